"""The decode loop's output bookkeeping: appending tokens, stopping rows.

The loop state is a dict pytree: "cache", "cur" (each row's pending token,
not yet in the cache), "pos" (its position = cache column), "out" / "out_logp"
/ "n_out" (the outputs so far), "done", "rng", "steps", and for speculative
decoding "draft", "drafted", "accepted".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def emit(state: dict, toks: jax.Array, logps: jax.Array, n_new: jax.Array,
         stop_ids: tuple[int, ...], max_new: int) -> dict:
  """Appends up to toks.shape[1] tokens per row (n_new[b] of them) to the
  outputs; a row stops after a stop id or at max_new tokens."""
  out, out_lp, n_out, done = state["out"], state["out_logp"], state["n_out"], state["done"]
  rows = jnp.arange(out.shape[0])
  stops = jnp.asarray(stop_ids, jnp.int32) if stop_ids else None
  for j in range(toks.shape[1]):
    write = ~done & (j < n_new)
    at = jnp.minimum(n_out, max_new - 1)
    out = out.at[rows, at].set(jnp.where(write, toks[:, j], out[rows, at]))
    out_lp = out_lp.at[rows, at].set(jnp.where(write, logps[:, j], out_lp[rows, at]))
    n_out = n_out + write.astype(jnp.int32)
    hit = jnp.isin(toks[:, j], stops) if stops is not None else jnp.zeros_like(write)
    done = done | (write & hit) | (n_out >= max_new)
  return {**state, "out": out, "out_logp": out_lp, "n_out": n_out, "done": done}
