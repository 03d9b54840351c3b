"""Per-token log-probabilities of given continuations, chunked over the sequence.

    logp = token_logprobs(cfg, variables, tokens, targets)   # float32 [b, s]
    logp[b, i] = log p(targets[b, i] | tokens[b, :i+1])

What GRPO's policy, reference and old-policy scoring needs. The model runs
once to its normalised final hidden state; the output head and the
log-softmax then run over `chunk` positions at a time (lax.map, each chunk
rematerialised in the backward pass), so the [b, s, vocab] float32 logits
never exist at once: peak [b, chunk, vocab]. Differentiable in `variables`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.infer import sampling
from deepseek_jax.model import Transformer, stages


def _head_kernel(cfg: ModelConfig, variables) -> jax.Array:
  """[dim, vocab] float32: the head (published FP8 blocks dequantized), or the
  embedding table transposed when tie_word_embeddings (model.stages.head_kernel)."""
  return stages.head_kernel(cfg, variables["params"])


# log p of a target outside the sampling filter's support (the training
# forward's nucleus can differ from the sampler's by a rounding at its edge):
# finite, so ratios exp(logp - old) are 0 or 1 and gradients stay finite.
LOGP_FLOOR = -1e4


def token_logprobs(cfg: ModelConfig, variables, tokens: jax.Array, targets: jax.Array, *,
                   segment_ids=None, positions=None, chunk: int = 128,
                   temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   min_p: float = 0.0, routing=None, gather=None) -> jax.Array:
  """log p(targets) at every position, float32 [b, s] (see module docstring).

  temperature / top_k / top_p / min_p: score under the distribution the
  sampler draws from with those settings (infer.sampling: logits divided by
  the temperature, then the filters; what GRPO's ratio and KL need when
  rollouts are sampled that way), floored at LOGP_FLOOR. The defaults are
  the model's own distribution (the unfiltered path, unchanged).
  routing: int [b, s, n_moe_layers, k] experts to replay (routing replay:
  `Transformer`'s `routing=`, entries < 0 route normally; built from a
  rollout by infer.decode.rollout_routing); None routes normally.
  gather: int [b, L] positions to score (e.g. a rollout's completion
  tokens): the head and log-softmax then run on those L positions only and
  the result is [b, L] (= the full result's take_along_axis(., gather))."""
  if chunk < 1:
    raise ValueError(f"chunk={chunk} must be >= 1.")
  if not temperature > 0:
    raise ValueError(f"temperature={temperature} must be > 0 to score (0 is greedy: "
                     "no distribution).")
  filters = top_k > 0 or top_p < 1 or min_p > 0
  if tuple(targets.shape) != tuple(tokens.shape):
    raise ValueError(f"targets shape {targets.shape} must equal tokens shape {tokens.shape}.")
  h = Transformer(cfg).apply(variables, tokens, segment_ids=segment_ids, positions=positions,
                             return_hidden=True, routing=routing)
  if gather is not None:
    if gather.ndim != 2 or gather.shape[0] != tokens.shape[0]:
      raise ValueError(f"gather shape {gather.shape} must be [batch={tokens.shape[0]}, L].")
    h = jnp.take_along_axis(h, gather[..., None], axis=1)
    targets = jnp.take_along_axis(targets, gather, axis=1)
  b, s, d = h.shape
  c = min(chunk, s)
  n = -(-s // c)
  pad = n * c - s
  h = jnp.pad(h.astype(jnp.float32), ((0, 0), (0, pad), (0, 0)))
  t = jnp.pad(targets, ((0, 0), (0, pad)))
  w = _head_kernel(cfg, variables)

  @jax.checkpoint
  def one(args):
    hc, tc = args                                   # [b, c, d], [b, c]
    logits = jnp.einsum("bcd,dv->bcv", hc, w)
    if temperature != 1:
      logits = logits / temperature
    if filters:
      vocab = logits.shape[-1]
      logp = sampling.filtered_logprobs(logits.reshape(-1, vocab), top_k, top_p, min_p)
      picked = jnp.take_along_axis(logp.reshape(logits.shape), tc[..., None], -1)[..., 0]
      return jnp.maximum(picked, LOGP_FLOOR)
    logz = jax.nn.logsumexp(logits, axis=-1)
    return jnp.take_along_axis(logits, tc[..., None], -1)[..., 0] - logz

  out = jax.lax.map(one, (h.reshape(b, n, c, d).swapaxes(0, 1), t.reshape(b, n, c).swapaxes(0, 1)))
  return out.swapaxes(0, 1).reshape(b, n * c)[:, :s]
