"""Speculative decoding with DeepSeek-V3's MTP module as the drafter.

MTP module 1 reads the main model's normalised hidden state h_i at position
i and the embedding of token t_{i+1}, and predicts t_{i+2} (V3 report
sec. 2.2; at inference "the MTP modules can be repurposed for speculative
decoding"). One step, for every row at once:

  verify   the main model runs [pending token t_{i+1}, draft d] at positions
           i+1, i+2 (absorbed decode, both written to the cache) and gives
           the distributions p1 (of t_{i+2}) and p2 (of t_{i+3});
  accept   d with probability p1(d) (the draft is deterministic, the argmax
           of MTP's logits, so standard speculative sampling reduces to
           this); greedy accepts iff d is p1's argmax. On a reject, t_{i+2}
           is drawn from p1 with d removed (renormalised), so every emitted
           token has exactly the main model's sampling distribution and
           greedy output equals plain greedy decoding;
  emit     d and a token from p2 when accepted (2 tokens for one forward),
           else the replacement (1 token);
  draft    MTP module 1 runs on (h at i+1, i+2; tokens t_{i+2}, t_{i+3})
           with its own latent cache, and the next draft is its argmax at
           the last accepted position.

Columns written for a rejected draft (main and MTP caches) are rewritten by
the next step before any query can see them (a query at position p sees
columns <= p), so rows advance by 1 or 2 independently. Only MTP module 1
drafts (one token per step, as the V3 report measures: 85-90% acceptance of
the second token on the real model).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.infer import cache as cache_lib
from deepseek_jax.infer.sampling import (next_token, sample, sampled_token_logprob,
                                         sampling_logprobs)
from deepseek_jax.infer.state import emit
from deepseek_jax.model import Transformer


def draft_after_prefill(cfg: ModelConfig, variables, state: dict, prompts, seg, lengths,
                        h) -> dict:
  """MTP module 1 over the prompt (token t_{j+1} at each position j; the
  first generated token at the last one): fills its cache, drafts."""
  b = prompts.shape[0]
  rows = jnp.arange(b)
  nxt = jnp.concatenate([prompts[:, 1:], jnp.zeros((b, 1), prompts.dtype)], axis=1)
  nxt = nxt.at[rows, lengths - 1].set(state["cur"])
  logits, _, entries = Transformer(cfg).apply(
      variables, nxt, segment_ids=seg, mode="mtp_prefill", mtp_hidden=h,
      logits_index=lengths - 1)
  cache = cache_lib.write(state["cache"], entries, jnp.zeros((b,), jnp.int32))
  return {**state, "cache": cache, "draft": jnp.argmax(logits[:, 0], -1).astype(jnp.int32)}


def step(cfg: ModelConfig, variables, state: dict, settings, *, max_new: int,
         stop_ids: tuple[int, ...]) -> dict:
  model = Transformer(cfg)
  cur, draft, pos = state["cur"], state["draft"], state["pos"]
  b = cur.shape[0]
  rows = jnp.arange(b)
  positions = pos[:, None] + jnp.arange(2, dtype=pos.dtype)
  logits, h, entries = model.apply(variables, jnp.stack([cur, draft], 1),
                                   positions=positions, mode="decode", cache=state["cache"])
  cache = cache_lib.write(state["cache"], entries, pos)
  rng, k_accept, k1, k2 = jax.random.split(state["rng"], 4)
  greedy1 = jnp.argmax(logits[:, 0], -1).astype(jnp.int32)

  def sampled_verdict():
    lp1 = sampling_logprobs(logits[:, 0], *settings)
    accept = jax.random.uniform(k_accept, (b,)) < jnp.exp(lp1[rows, draft])
    return accept, sample(k1, lp1.at[rows, draft].set(-jnp.inf))

  # Greedy needs no distribution: accept iff the draft is the argmax.
  accept, redrawn = jax.lax.cond(settings.temperature > 0, sampled_verdict,
                                 lambda: (draft == greedy1, greedy1))
  t1 = jnp.where(accept, draft, redrawn)
  t2 = next_token(k2, logits[:, 1], *settings)
  was_done = state["done"]
  state = emit({**state, "cache": cache, "rng": rng}, jnp.stack([t1, t2], 1),
               jnp.stack([sampled_token_logprob(logits[:, 0], t1, *settings),
                          sampled_token_logprob(logits[:, 1], t2, *settings)], 1),
               1 + accept.astype(jnp.int32), stop_ids, max_new)
  mtp_logits, _, mtp_entries = model.apply(
      variables, jnp.stack([t1, t2], 1), positions=positions, mode="mtp_decode",
      cache=state["cache"], mtp_hidden=h)
  cache = cache_lib.write(state["cache"], mtp_entries, pos)
  new_draft = jnp.argmax(mtp_logits[rows, accept.astype(jnp.int32)], -1).astype(jnp.int32)
  active = ~was_done
  return {**state, "cache": cache, "cur": jnp.where(accept, t2, t1), "draft": new_draft,
          "pos": jnp.where(was_done, pos, pos + 1 + accept.astype(pos.dtype)),
          "steps": state["steps"] + 1,
          "drafted": state["drafted"] + active.sum(dtype=jnp.int32),
          "accepted": state["accepted"] + (accept & active).sum(dtype=jnp.int32)}
