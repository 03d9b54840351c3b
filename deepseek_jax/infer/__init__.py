"""Inference: latent-cache decoding, sampling, MTP speculative decoding.

    from deepseek_jax.infer import generate
    gen = generate(cfg, variables, prompts, max_new_tokens=64, temperature=0.7)

One concept a file: cache.py (the latent KV cache), sampling.py (temperature,
top-k/p, min-p), decode.py (prefill + decode loop, `generate`, `stream`),
speculative.py (MTP drafts, one-forward verification), scoring.py (token
log-probs without the whole [b, s, vocab] logits).
"""

from deepseek_jax.infer.cache import bytes_per_token, init_cache
from deepseek_jax.infer.decode import Generation, generate, rollout_routing, stream
from deepseek_jax.infer.sampling import sampling_logprobs
from deepseek_jax.infer.scoring import token_logprobs

__all__ = ["Generation", "bytes_per_token", "generate", "init_cache", "rollout_routing",
           "sampling_logprobs", "stream", "token_logprobs"]
