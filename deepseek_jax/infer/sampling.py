"""Turning logits into the next token: temperature, top-k, top-p, min-p.

`sampling_logprobs` returns the log-probabilities of the distribution a token
is drawn from, after the filters, applied in this order (as transformers'
logits processors do): divide by the temperature, keep the `top_k` largest,
keep the smallest set of most likely tokens whose probability reaches `top_p`
(renormalised after top-k), drop tokens below `min_p` x the most likely
token's probability. Temperature 0 is greedy: the distribution puts all its
mass on the argmax. Every setting is a traced value (no recompilation per
setting); top_k = 0, top_p = 1, min_p = 0 switch a filter off.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def _filtered(scaled: jax.Array, top_k, top_p, min_p) -> jax.Array:
  """log-probs of `scaled` logits after top-k, top-p, min-p (one sort)."""
  vocab = scaled.shape[-1]
  order = jnp.argsort(-scaled, axis=-1, stable=True)                  # most likely first
  vals = jnp.take_along_axis(scaled, order, -1)
  rank = jnp.arange(vocab)
  keep = (top_k <= 0) | (rank < top_k)                                # [b, V] in sorted order
  probs = jax.nn.softmax(jnp.where(keep, vals, NEG_INF), -1)
  mass_before = jnp.cumsum(probs, -1) - probs
  keep &= (mass_before < top_p) | (rank == 0)
  probs = jax.nn.softmax(jnp.where(keep, vals, NEG_INF), -1)
  keep &= probs >= min_p * probs[..., :1]
  filtered = jnp.where(keep, vals, NEG_INF)
  rows = jnp.arange(scaled.shape[0])[:, None]
  out = jnp.full_like(scaled, NEG_INF).at[rows, order].set(filtered)
  return jax.nn.log_softmax(out, -1)


def filtered_logprobs(scaled: jax.Array, top_k, top_p, min_p) -> jax.Array:
  """log-probs [b, V] of temperature-scaled logits [b, V] after the top-k,
  top-p and min-p filters, exactly as the sampler applies them (-inf for
  filtered tokens); for scoring the distribution a rollout was drawn from."""
  return _filtered(scaled, top_k, top_p, min_p)


def sampling_logprobs(logits: jax.Array, temperature, top_k, top_p, min_p) -> jax.Array:
  """logits [b, V] float32 -> log-probs [b, V] of the sampling distribution
  (-inf for filtered tokens). The sort runs only when a filter is on
  (lax.cond), the temperature only when it is > 0."""
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]

  def greedy(_):
    return jnp.where(jax.nn.one_hot(jnp.argmax(logits, -1), vocab, dtype=bool), 0.0, NEG_INF)

  def sampled(_):
    scaled = logits / temperature
    return jax.lax.cond((top_k > 0) | (top_p < 1) | (min_p > 0),
                        lambda s: _filtered(s, top_k, top_p, min_p),
                        lambda s: jax.nn.log_softmax(s, -1), scaled)

  return jax.lax.cond(temperature > 0, sampled, greedy, None)


def next_token(rng: jax.Array, logits: jax.Array, temperature, top_k, top_p, min_p
               ) -> jax.Array:
  """A token per row (int32 [b]) from the sampling distribution; greedy is a
  plain argmax (no distribution, no random draw)."""
  return jax.lax.cond(
      temperature > 0,
      lambda: sample(rng, sampling_logprobs(logits, temperature, top_k, top_p, min_p)),
      lambda: jnp.argmax(logits, -1).astype(jnp.int32))


def next_token_and_logprob(rng: jax.Array, logits: jax.Array, temperature, top_k, top_p,
                           min_p) -> tuple[jax.Array, jax.Array]:
  """(`next_token`'s token [b], its log-prob [b] under the distribution it was
  drawn from): at temperature > 0 the sampling distribution (logits / T, then
  the filters: what GRPO's ratio compares), greedy the model's temperature-1
  log-prob. The same tokens as next_token for the same key."""
  def sampled():
    logp = sampling_logprobs(logits, temperature, top_k, top_p, min_p)
    token = sample(rng, logp)
    return token, jnp.take_along_axis(logp, token[:, None], -1)[:, 0]

  def greedy():
    token = jnp.argmax(logits, -1).astype(jnp.int32)
    return token, token_logprob(logits, token)

  return jax.lax.cond(temperature > 0, sampled, greedy)


def sampled_token_logprob(logits: jax.Array, tokens: jax.Array, temperature, top_k, top_p,
                          min_p) -> jax.Array:
  """log p(tokens) [b] under the distribution `next_token_and_logprob` drew
  them from (for tokens chosen another way, e.g. speculative acceptance)."""
  def sampled():
    logp = sampling_logprobs(logits, temperature, top_k, top_p, min_p)
    return jnp.take_along_axis(logp, tokens[:, None], -1)[:, 0]

  return jax.lax.cond(temperature > 0, sampled, lambda: token_logprob(logits, tokens))


def sample(rng: jax.Array, logprobs: jax.Array) -> jax.Array:
  """One token per row from log-probs [b, V] (int32 [b])."""
  return jax.random.categorical(rng, logprobs, axis=-1).astype(jnp.int32)


def token_logprob(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """log p(token) under the temperature-1 model: logits [..., V], tokens [...]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  return jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0]
