"""Token-level distillation: forward KL from a teacher's top-k next-token
distribution to the student's, on the response tokens.

When teacher (e.g. our MoE) and student (a dense Llama / Qwen2-style model)
share a tokenizer, each position t of a training row carries the teacher's
k most likely next tokens i_1..i_k with their log-probabilities l_j =
log p_T(i_j | x_<=t) (full-vocabulary normalised, as computed; `teacher_topk`).
The target is that distribution renormalised over its top k, at temperature T:

  q_j = softmax_j(l_j / T)                         (j = 1..k; sum_j q_j = 1)

and the per-token loss the forward KL to the student's full distribution
p_S = softmax(z / T) over the whole vocabulary:

  KL_t = sum_j q_j (log q_j - log p_S(i_j)),   log p_S(i) = z_i / T - logsumexp(z / T)

summed over the response tokens (weights = loss_mask, and never padding:
segment_ids == 0) and divided by their number, times T^2 (Hinton et al.:
keeps the gradient's scale as T varies). With k = vocabulary this is the
exact KL(p_T || p_S); the renormalisation makes a small k a proper
distribution rather than a truncated one (the mass kept is reported as
`teacher_mass`). Optional: ce_weight times the usual next-token CE on the
same tokens (the data's own targets), and an MoE student's balance loss.

The student's logits never exist whole: the model returns its final hidden
states and the head runs `chunk` positions at a time under jax.checkpoint
(as infer.scoring), so peak memory is [b, chunk, vocab] float32.

Teacher targets come on the fly (`make_teacher_fn`: one jitted teacher
forward per batch, outside the student's gradient) or from a disk cache
(`cache_teacher_topk` writes one npz shard per batch, atomically, and a
rerun skips the shards already there; `TopKCache` reads them back, checking
that the cached tokens are the batch's). Both add the batch keys
`teacher_ids` int32 [rows, seq, k] and `teacher_logprobs` float32 [rows,
seq, k]; `distill_loss_fn` is the loss for train.step.make_update_step.
"""

from __future__ import annotations

import json
import os
from functools import partial
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.files import atomic_json, atomic_write
from deepseek_jax.model import Transformer, stages

TEACHER_KEYS = ("teacher_ids", "teacher_logprobs")
META_NAME = "teacher_topk.json"
LOGPROB_DTYPES = ("float32", "float16")


def _check_k(k: int, vocab: int) -> None:
  if not isinstance(k, int) or not 1 <= k <= vocab:
    raise ValueError(f"k={k!r} must be an integer in [1, vocab_size={vocab}] (the teacher's "
                     "top-k tokens per position).")


def check_pair(teacher: ModelConfig, student: ModelConfig, k: int) -> None:
  """ValueError unless the teacher's token ids are the student's: the same
  tokenizer is assumed, so the teacher's vocabulary must fit the student's."""
  _check_k(k, teacher.vocab_size)
  if teacher.vocab_size > student.vocab_size:
    raise ValueError(f"teacher vocab_size={teacher.vocab_size} > student vocab_size="
                     f"{student.vocab_size}: token-level distillation needs a shared "
                     "tokenizer (teacher ids must be student ids).")


def _map_positions(fn: Callable, chunk: int, *arrays: jax.Array):
  """fn over `chunk` positions at a time (axis 1 of each [b, s, ...] array),
  under jax.checkpoint; outputs [b, s, ...] (padding cut off)."""
  if chunk < 1:
    raise ValueError(f"chunk={chunk} must be >= 1.")
  b, s = arrays[0].shape[:2]
  c = min(chunk, s)
  n = -(-s // c)

  def split(x):
    x = jnp.pad(x, [(0, 0), (0, n * c - s)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape((b, n, c) + x.shape[2:]).swapaxes(0, 1)

  out = jax.lax.map(jax.checkpoint(lambda xs: fn(*xs)), tuple(split(x) for x in arrays))
  return jax.tree.map(lambda y: y.swapaxes(0, 1).reshape((b, n * c) + y.shape[3:])[:, :s], out)


# ---------------------------------------------------------------------------
# The teacher's top-k
# ---------------------------------------------------------------------------
def load_teacher(path: str, field: str = "distill_teacher") -> tuple[ModelConfig, dict]:
  """(cfg, variables) of a teacher: a training run's workdir (its latest
  checkpoint) or an HF checkpoint directory (export.load_model_dir);
  ValueError naming `field` otherwise."""
  from deepseek_jax.train.export import load_model_dir
  cfg, variables, _ = load_model_dir(path, field)
  return cfg, variables


def teacher_topk(cfg: ModelConfig, variables: Any, tokens: jax.Array, *, k: int,
                 segment_ids=None, positions=None, chunk: int = 128
                 ) -> tuple[jax.Array, jax.Array]:
  """(ids int32 [b, s, k], log-probs float32 [b, s, k]): the teacher's k most
  likely next tokens at every position, most likely first, with their
  full-vocabulary log-probabilities. The head runs `chunk` positions at a
  time (no [b, s, vocab] array)."""
  _check_k(k, cfg.vocab_size)
  h = Transformer(cfg).apply(variables, tokens, segment_ids=segment_ids, positions=positions,
                             return_hidden=True)
  w = stages.head_kernel(cfg, variables["params"])

  def one(hc):
    logits = jnp.einsum("bcd,dv->bcv", hc.astype(jnp.float32), w)
    logp = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    values, ids = jax.lax.top_k(logp, k)
    return ids.astype(jnp.int32), values

  return _map_positions(one, chunk, h)


def make_teacher_fn(cfg: ModelConfig, k: int, *, chunk: int = 128, out_sharding=None,
                    compiler_options=None) -> Callable[[Any, dict], dict]:
  """jit(fn)(teacher_variables, batch) -> batch plus teacher_ids /
  teacher_logprobs: the on-the-fly targets, computed once per batch outside
  the student's gradient. out_sharding: where the targets go (on a mesh the
  batch's sharding, so that the student's step takes them as they are)."""
  _check_k(k, cfg.vocab_size)

  @partial(jax.jit, out_shardings=out_sharding, compiler_options=compiler_options)
  def targets(variables, tokens, segment_ids, positions):
    return teacher_topk(cfg, variables, tokens, k=k, segment_ids=segment_ids,
                        positions=positions, chunk=chunk)

  def fn(variables, batch):
    ids, logp = targets(variables, batch["tokens"], batch.get("segment_ids"),
                        batch.get("positions"))
    return dict(batch, teacher_ids=ids, teacher_logprobs=logp)
  return fn


# ---------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------
def _kl_terms(z: jax.Array, ids: jax.Array, teacher_logp: jax.Array, temperature: float
              ) -> tuple[jax.Array, jax.Array]:
  """(KL_t, teacher_mass) per position from student logits z [..., V]
  (float32) and the teacher's top-k (module doc)."""
  zt = z / temperature if temperature != 1 else z
  student = jnp.take_along_axis(zt, ids, -1) - jax.nn.logsumexp(zt, -1, keepdims=True)
  scaled = teacher_logp.astype(jnp.float32) / temperature
  log_q = scaled - jax.nn.logsumexp(scaled, -1, keepdims=True)
  q = jnp.exp(log_q)
  kl = jnp.where(q > 0, q * (log_q - student), 0.0).sum(-1)
  return kl, jnp.exp(teacher_logp.astype(jnp.float32)).sum(-1)


def loss_weights(batch: dict) -> jax.Array:
  """float32 [rows, seq]: loss_mask (the response tokens), zero on padding."""
  mask = jnp.asarray(batch["loss_mask"], jnp.float32)
  if "segment_ids" in batch:
    mask = jnp.where(batch["segment_ids"] != 0, mask, 0.0)
  return mask


def topk_forward_kl(logits: jax.Array, teacher_ids: jax.Array, teacher_logprobs: jax.Array,
                    weights: jax.Array, *, temperature: float = 1.0) -> jax.Array:
  """T^2 times the weighted mean over positions of KL_t, from the student's
  full logits [b, s, V] (the unchunked form of distill_loss_fn's KL)."""
  kl, _ = _kl_terms(logits.astype(jnp.float32), teacher_ids, teacher_logprobs, temperature)
  w = jnp.asarray(weights, jnp.float32)
  return temperature ** 2 * (kl * w).sum() / jnp.maximum(w.sum(), 1.0)


def distill_token_terms(cfg: ModelConfig, variables: Any, batch: dict, *,
                        temperature: float = 1.0, chunk: int = 128, return_aux: bool = False):
  """Per-position (KL_t, CE_t, teacher_mass) float32 [rows, seq] of the
  student on `batch` (tokens, targets, segment_ids, positions and the
  teacher keys); with return_aux also the model's aux (expert loads)."""
  ids, teacher_logp = batch["teacher_ids"], batch["teacher_logprobs"]
  if ids.shape != teacher_logp.shape or ids.shape[:2] != batch["tokens"].shape:
    raise ValueError(f"teacher_ids {ids.shape} / teacher_logprobs {teacher_logp.shape} must "
                     f"both be [rows, seq, k] over tokens {batch['tokens'].shape}.")
  h, aux = Transformer(cfg).apply(variables, batch["tokens"],
                                  segment_ids=batch.get("segment_ids"),
                                  positions=batch.get("positions"), return_hidden=True,
                                  return_aux=True)
  w = stages.head_kernel(cfg, variables["params"])

  def one(hc, tc, ic, lc):
    z = jnp.einsum("bcd,dv->bcv", hc.astype(jnp.float32), w)
    kl, mass = _kl_terms(z, ic, lc, temperature)
    ce = jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, tc[..., None], -1)[..., 0]
    return kl, ce, mass

  terms = _map_positions(one, chunk, h, batch["targets"], ids, teacher_logp)
  return (terms, aux) if return_aux else terms


def distill_loss_fn(cfg: ModelConfig, *, temperature: float = 1.0, ce_weight: float = 0.0,
                    balance_weight: float = 0.0, chunk: int = 128) -> Callable:
  """The token-level distillation loss for train.step.make_update_step:
  (params, router_bias, batch) -> (loss, {"metrics": ..., ["expert_load"]}).

  loss = T^2 mean KL_t + ce_weight mean CE_t (+ balance_weight times an MoE
  student's balance loss), means over loss_weights(batch). batch: the data
  contract (tokens, targets, segment_ids, positions, loss_mask) plus the
  teacher's teacher_ids / teacher_logprobs [rows, seq, k]. metrics: loss,
  kl, ce, teacher_mass (the top-k's share of the teacher's probability),
  tokens (the non-padding inputs: tokens/s, as pretraining's), target_tokens
  (the weight sum the means divide by). An MoE student also returns its expert loads, so
  the step moves its router bias as in pre-training."""
  if not temperature > 0:
    raise ValueError(f"temperature={temperature} must be > 0.")
  if ce_weight < 0 or balance_weight < 0:
    raise ValueError(f"ce_weight={ce_weight}, balance_weight={balance_weight} must be >= 0.")

  def loss_fn(params, router_bias, batch):
    variables = {"params": params, "router_bias": router_bias}
    (kl, ce, mass), aux = distill_token_terms(cfg, variables, batch, temperature=temperature,
                                              chunk=chunk, return_aux=True)
    w = loss_weights(batch)
    count = w.sum()
    mean = lambda x: (x * w).sum() / jnp.maximum(count, 1.0)  # noqa: E731
    kl_mean, ce_mean = mean(kl), mean(ce)
    loss = temperature ** 2 * kl_mean + ce_weight * ce_mean
    if balance_weight and cfg.n_moe_layers:
      loss = loss + balance_weight * aux["balance_loss"]
    tokens = (batch["segment_ids"] != 0).sum() if "segment_ids" in batch else w.size
    metrics = {"loss": loss, "kl": kl_mean, "ce": ce_mean, "teacher_mass": mean(mass),
               "tokens": jnp.asarray(tokens, jnp.float32), "target_tokens": count}
    out = {"metrics": metrics}
    if cfg.n_moe_layers:
      out["expert_load"] = aux["expert_load"]
    return loss, out

  return loss_fn


# ---------------------------------------------------------------------------
# The disk cache
# ---------------------------------------------------------------------------
def shard_path(directory: str, index: int) -> str:
  return os.path.join(directory, f"topk-{index:06d}.npz")


def write_topk_shard(directory: str, index: int, tokens, ids, logprobs, *,
                     logprob_dtype: str = "float32") -> str:
  """Writes batch `index`'s tokens [rows, seq] and teacher top-k [rows, seq,
  k] as one npz (temp file, then rename: never half written)."""
  tokens, ids, logprobs = np.asarray(tokens), np.asarray(ids), np.asarray(logprobs)
  if ids.shape != logprobs.shape or ids.shape[:2] != tokens.shape:
    raise ValueError(f"ids {ids.shape} / logprobs {logprobs.shape} must be [rows, seq, k] "
                     f"over tokens {tokens.shape}.")
  if logprob_dtype not in LOGPROB_DTYPES:
    raise ValueError(f"logprob_dtype={logprob_dtype!r} must be one of {LOGPROB_DTYPES}.")
  path = shard_path(directory, index)

  def write(tmp):
    with open(tmp, "wb") as f:     # a file object: np.savez would add ".npz" to a name
      np.savez(f, tokens=tokens.astype(np.int32), ids=ids.astype(np.int32),
               logprobs=logprobs.astype(logprob_dtype))
  atomic_write(path, write)
  return path


def read_topk_shard(directory: str, index: int, tokens=None) -> tuple[np.ndarray, np.ndarray]:
  """(ids int32, logprobs float32) of shard `index`; with `tokens`, ValueError
  unless the shard was written for exactly these tokens."""
  path = shard_path(directory, index)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: batch {index} is not in the teacher cache "
                            f"{directory} (run cache_teacher_topk over the same batches).")
  with np.load(path) as data:
    cached, ids, logp = data["tokens"], data["ids"], data["logprobs"].astype(np.float32)
  if tokens is not None and not np.array_equal(cached, np.asarray(tokens)):
    raise ValueError(f"{path}: cached for other tokens than batch {index}'s (shape "
                     f"{cached.shape} vs {np.shape(tokens)}); the data or its order changed: "
                     "rebuild the cache.")
  return ids, logp


def _meta(cfg: ModelConfig, k: int, logprob_dtype: str) -> dict:
  return {"k": k, "teacher_vocab_size": cfg.vocab_size, "logprob_dtype": logprob_dtype,
          "teacher": cfg.to_dict()}


def cache_teacher_topk(cfg: ModelConfig, variables: Any, batches: Iterable[dict],
                       directory: str, *, k: int, chunk: int = 128,
                       logprob_dtype: str = "float32", log=None) -> int:
  """Writes the teacher's top-k of every batch (dicts with tokens and, if
  packed, segment_ids / positions) to `directory`: one shard per batch, in
  order, and teacher_topk.json (k, the teacher's config). A shard already
  there is kept (a rerun resumes); a directory cached with another k or
  teacher is refused. Returns the number of batches."""
  _check_k(k, cfg.vocab_size)
  os.makedirs(directory, exist_ok=True)
  meta, meta_path = _meta(cfg, k, logprob_dtype), os.path.join(directory, META_NAME)
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      old = json.load(f)
    if old != meta:
      changed = sorted(key for key in meta if old.get(key) != meta[key])
      raise ValueError(f"{meta_path}: the cache holds another teacher top-k ({changed} "
                       "differ); use a new directory or delete this one.")
  else:
    atomic_json(meta, meta_path)
  fn = make_teacher_fn(cfg, k, chunk=chunk)
  n = 0
  for n, batch in enumerate(batches, start=1):
    if os.path.exists(shard_path(directory, n - 1)):
      continue
    out = fn(variables, batch)
    write_topk_shard(directory, n - 1, batch["tokens"], out["teacher_ids"],
                     out["teacher_logprobs"], logprob_dtype=logprob_dtype)
    if log is not None:
      log(f"teacher top-{k}: wrote shard {n - 1} ({np.shape(batch['tokens'])})")
  return n


class TopKCache:
  """Reads what cache_teacher_topk wrote: `cache.add(index, batch)` is the
  batch plus its teacher_ids / teacher_logprobs (tokens checked)."""

  def __init__(self, directory: str, *, student: ModelConfig | None = None):
    path = os.path.join(directory, META_NAME)
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} not found: {directory} is not a teacher top-k cache "
                              "(write one with cache_teacher_topk).")
    with open(path) as f:
      self.meta = json.load(f)
    self.directory, self.k = directory, int(self.meta["k"])
    if student is not None:
      check_pair(ModelConfig.from_dict(self.meta["teacher"]), student, self.k)

  def add(self, index: int, batch: dict) -> dict:
    ids, logp = read_topk_shard(self.directory, index, batch["tokens"])
    return dict(batch, teacher_ids=ids, teacher_logprobs=logp)


__all__ = ["TEACHER_KEYS", "TopKCache", "cache_teacher_topk", "check_pair",
           "distill_loss_fn", "distill_token_terms", "load_teacher", "loss_weights",
           "make_teacher_fn",
           "read_topk_shard", "teacher_topk", "topk_forward_kl", "write_topk_shard"]
