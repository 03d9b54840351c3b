"""AdamW with the DeepSeek-V3 learning-rate schedule (V3 report sec. 4.2).

V3 pre-training used AdamW (beta1 0.9, beta2 0.95, weight decay 0.1),
gradient clipping at global norm 1.0 and this learning-rate schedule:

  * linear warmup 0 -> 2.2e-4 over the first 2K steps,
  * constant 2.2e-4 until 10T tokens,
  * cosine decay 2.2e-4 -> 2.2e-5 over the next 4.3T tokens,
  * constant 2.2e-5 for 333B tokens, then 7.3e-6 for the last 167B.

`lr_schedule` is that shape parameterised by steps. Weight decay is decoupled
(AdamW) and skips norm scales and any other parameter with fewer than two
dimensions: decaying an RMSNorm scale towards 0 fights the normalisation
it exists for. Stacked (`nn.scan`) layers give norm scales a leading layer
axis, so the mask goes by leaf name first and by rank second. The router bias
of aux-loss-free balancing is not a parameter at all (its own collection) and
never reaches the optimizer.

`make_muon` is the alternative DeepSeek-V4 trains most matrices with (its
`TrainConfig.optimizer="muon"`): optax's `contrib.muon`, whose momentum is
orthogonalised by Newton-Schulz iterations per weight matrix, with AdamW for
the embedding, the output head, RMSNorm scales, biases and V4's static mHC
biases and gating factors (`muon_labels`); `optimizer_from_config` builds
either from a TrainConfig.

Frozen parameters (`trainable_mask`; DeepSeek-V3.2's dense warm-up trains
only the lightning indexer): `apply_update(..., trainable=mask)` zeroes the
frozen leaves' gradients before clipping (the global norm is the trained
leaves'), and leaves those parameters untouched, weight decay included.
AdamW keeps their moments as they were (their update is not computed at
all); Muon runs its update on the zeroed gradients, so their momenta only
decay by the momentum factor (they stay exactly zero from a fresh optimizer,
which is how a warm-up starts: the stage changes only through init_from).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Leaf names that are never weight-decayed, whatever their rank.
NO_DECAY_NAMES = ("scale",)      # RMSNorm scales (the model has no additive biases)


def lr_schedule(peak_lr: float, *, warmup_steps: int, hold_steps: int = 0,
                decay_steps: int = 0, end_lr: float | None = None,
                end_steps: int = 0, final_lr: float | None = None) -> optax.Schedule:
  """The V3 schedule by steps; every segment may have length 0.

    [0, W)                 linear 0 -> peak_lr           (lr = peak * t / W)
    [W, W+H)               peak_lr
    [W+H, W+H+D)           cosine peak_lr -> end_lr
    [W+H+D, W+H+D+E)       end_lr
    [W+H+D+E, inf)         final_lr   (default: end_lr)

  with W = warmup_steps, H = hold_steps, D = decay_steps, E = end_steps.
  V3 (in tokens): W = 2K steps, H = 10T, D = 4.3T, end_lr = 2.2e-5 for
  E = 333B, final_lr = 7.3e-6 for the last 167B.
  """
  for name, v in (("warmup_steps", warmup_steps), ("hold_steps", hold_steps),
                  ("decay_steps", decay_steps), ("end_steps", end_steps)):
    if not isinstance(v, (int, np.integer)) or v < 0:
      raise ValueError(f"{name}={v!r} must be a non-negative integer.")
  if not peak_lr >= 0:
    raise ValueError(f"peak_lr={peak_lr} must be >= 0.")
  end_lr = peak_lr if end_lr is None else end_lr
  final_lr = end_lr if final_lr is None else final_lr
  if not 0 <= end_lr <= peak_lr or final_lr < 0:
    raise ValueError(
        f"end_lr={end_lr}, final_lr={final_lr}: need 0 <= end_lr <= peak_lr="
        f"{peak_lr} and final_lr >= 0.")

  segments = []        # (length, schedule); length None = forever
  if warmup_steps:
    segments.append((warmup_steps, optax.linear_schedule(0.0, peak_lr, warmup_steps)))
  if hold_steps:
    segments.append((hold_steps, optax.constant_schedule(peak_lr)))
  if decay_steps:
    alpha = end_lr / peak_lr if peak_lr > 0 else 0.0
    segments.append((decay_steps, optax.cosine_decay_schedule(peak_lr, decay_steps, alpha)))
  if end_steps:
    segments.append((end_steps, optax.constant_schedule(end_lr)))
  segments.append((None, optax.constant_schedule(final_lr)))

  boundaries = np.cumsum([n for n, _ in segments[:-1]]).tolist()
  return optax.join_schedules([s for _, s in segments], boundaries)


def lr_schedule_from_config(train_cfg: Any) -> optax.Schedule:
  """`lr_schedule` from a TrainConfig; decay_steps=0 decays until the last step."""
  decay = train_cfg.decay_steps or max(
      train_cfg.steps - train_cfg.warmup_steps - train_cfg.hold_steps
      - train_cfg.end_steps, 0)
  return lr_schedule(train_cfg.lr, warmup_steps=train_cfg.warmup_steps,
                     hold_steps=train_cfg.hold_steps, decay_steps=decay,
                     end_lr=train_cfg.end_lr, end_steps=train_cfg.end_steps,
                     final_lr=train_cfg.final_lr)


def weight_decay_mask(params: Any) -> Any:
  """True where a leaf is weight-decayed: rank >= 2 and not a norm scale."""
  def decays(path, leaf):
    name = getattr(path[-1], "key", getattr(path[-1], "name", None))
    return bool(name not in NO_DECAY_NAMES and np.ndim(leaf) >= 2)
  return jax.tree_util.tree_map_with_path(decays, params)


MOMENT_DTYPES = ("float32", "bfloat16")
# The lightning indexer's module name (model/dsa.py, inside MLA): the only
# parameters DSA's dense warm-up trains.
INDEXER_MODULE = "indexer"


def trainable_mask(params: Any, dsa_stage: str = "off") -> Any | None:
  """None (everything trains), or for dsa_stage "warmup" a tree of bools
  like `params` (arrays or shapes): True only under an `indexer` module."""
  if dsa_stage != "warmup":
    return None
  def trains(path, leaf):
    return any(_key(k) == INDEXER_MODULE for k in path)
  return jax.tree_util.tree_map_with_path(trains, params)


def mask_grads(grads: Any, trainable: Any | None) -> Any:
  """grads with the frozen leaves (`trainable_mask` False) set to zero."""
  if trainable is None:
    return grads
  return jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trainable)


class AdamW(NamedTuple):
  """`make_optimizer`'s transformation: optax's (init, update) pair plus the
  settings `apply_update` reads. Its state is optax's for
  chain(clip_by_global_norm, adamw) (adamw alone without clipping), so
  checkpoints and `optax` tree utilities see the familiar structure."""
  init: Callable[[Any], Any]
  update: Callable[..., tuple[Any, Any]]
  schedule: optax.Schedule
  b1: float
  b2: float
  eps: float
  weight_decay: float
  clip_norm: float            # <= 0 or inf: no clipping
  moments_dtype: str


def make_optimizer(schedule: optax.Schedule, *, weight_decay: float = 0.1,
                   b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                   clip_norm: float = 1.0, moments_dtype: str = "float32") -> AdamW:
  """clip_by_global_norm(clip_norm) -> AdamW(schedule) with the decay mask.

  clip_norm <= 0 or inf disables clipping. moments_dtype: "float32" or
  "bfloat16", the storage of AdamW's two moments (V3 sec. 3.3: BF16 moments,
  FP32 master weights and gradients). The arithmetic is float32; the
  parameter update reads the moments as stored (rounded to moments_dtype),
  which lets every buffer be updated in place (`apply_update`).
  """
  if moments_dtype not in MOMENT_DTYPES:
    raise ValueError(f"moments_dtype={moments_dtype!r} must be one of {MOMENT_DTYPES}.")
  clips = bool(clip_norm and math.isfinite(clip_norm) and clip_norm > 0)
  reference = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                          mask=weight_decay_mask)
  if clips:
    reference = optax.chain(optax.clip_by_global_norm(clip_norm), reference)
  dtype = jnp.dtype(moments_dtype)

  def init(params):
    state = reference.init(params)
    return _with_adam(state, lambda a: a._replace(
        mu=jax.tree.map(lambda m: m.astype(dtype), a.mu),
        nu=jax.tree.map(lambda v: v.astype(dtype), a.nu)))

  tx = AdamW(init, None, schedule, b1, b2, eps, weight_decay,
             clip_norm if clips else 0.0, moments_dtype)

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("AdamW.update needs params (decoupled weight decay).")
    return _step(tx, grads, state, params, keep_if=None, barrier=False, apply=False)
  return tx._replace(update=update)


def _with_adam(state, fn):
  """state with fn applied to its ScaleByAdamState."""
  is_adam = lambda n: isinstance(n, optax.ScaleByAdamState)  # noqa: E731
  return jax.tree.map(lambda n: fn(n) if is_adam(n) else n, state, is_leaf=is_adam)


def _find(state, kind):
  found = [n for n in jax.tree.leaves(state, is_leaf=lambda n: isinstance(n, kind))
           if isinstance(n, kind)]
  if len(found) != 1:
    raise ValueError(f"optimizer state has {len(found)} {kind.__name__} nodes, "
                     "expected 1: not a make_optimizer state.")
  return found[0]


def apply_update(tx: AdamW | Muon, grads: Any, state: Any, params: Any, *,
                 keep_if: jax.Array | None = None, barrier: bool = True,
                 trainable: Any | None = None) -> tuple[Any, Any]:
  """One AdamW step: (new params, new state), in place where donated (a
  `Muon` tx: its step, `_muon_step`).

  Per leaf, in float32: g <- g * min(1, clip_norm / ||grads||);
  m <- b1 m + (1-b1) g; v <- b2 v + (1-b2) g^2 (both stored in
  moments_dtype); p <- p - lr(t) (m_hat / (sqrt(v_hat) + eps) + wd p), with
  m_hat, v_hat the stored moments over (1 - b^(t+1)) and wd only where
  `weight_decay_mask`. keep_if (bool scalar): where False, params and state
  come back unchanged (the step-skipping of non-finite gradients).
  trainable (`trainable_mask`, static bools like params; None = all): the
  frozen leaves' gradients count as zero (also in the clipping norm) and
  those parameters and their moments come back as they were (module doc).

  Each buffer has one reader before it is overwritten (the moments are
  written first, behind an optimization barrier, and the parameter update
  reads the new ones), so XLA updates a donated state in place: with
  optax's separate transforms it copied every moment (and a clipped copy of
  every gradient) first, 6 bytes per parameter at the peak of the step.
  """
  grads = mask_grads(grads, trainable)
  if isinstance(tx, Muon):
    new, new_state = _muon_step(tx, grads, state, params, keep_if)
    if trainable is not None:
      new = jax.tree.map(lambda n, p, t: n if t else p, new, params, trainable)
    return new, new_state
  return _step(tx, grads, state, params, keep_if=keep_if, barrier=barrier, apply=True,
               trainable=trainable)


def _step(tx, grads, state, params, *, keep_if, barrier, apply, trainable=None):
  """apply_update (apply=True) or optax's (updates, state) (apply=False)."""
  adam = _find(state, optax.ScaleByAdamState)
  sched = _find(state, optax.ScaleByScheduleState)
  if tx.clip_norm:
    g_norm = optax.tree.norm(grads)
    scale = jnp.where(g_norm < tx.clip_norm, 1.0, tx.clip_norm / g_norm)
  count = optax.safe_increment(adam.count)
  bc1 = (1 - tx.b1 ** count).astype(jnp.float32)
  bc2 = (1 - tx.b2 ** count).astype(jnp.float32)
  lr = jnp.asarray(tx.schedule(sched.count), jnp.float32)
  keep = (lambda new, old: new) if keep_if is None else (  # noqa: E731
      lambda new, old: jnp.where(keep_if, new, old))

  def leaf(g, m, v, p, decays, trains=True):
    if not trains:                 # frozen: nothing computed, nothing moves
      return (jnp.zeros_like(p) if not apply else p), m, v
    g = g.astype(jnp.float32)
    if tx.clip_norm:
      g = g * scale
    m_new = keep(((1 - tx.b1) * g + tx.b1 * m.astype(jnp.float32)).astype(m.dtype), m)
    v_new = keep(((1 - tx.b2) * g ** 2 + tx.b2 * v.astype(jnp.float32)).astype(v.dtype), v)
    if barrier:
      m_new, v_new = jax.lax.optimization_barrier((m_new, v_new))
    u = (m_new.astype(jnp.float32) / bc1) / (
        jnp.sqrt(v_new.astype(jnp.float32) / bc2) + tx.eps)
    if decays and tx.weight_decay:
      u = u + tx.weight_decay * p
    delta = -lr * u
    if not apply:
      return delta, m_new, v_new
    return keep((p + delta).astype(p.dtype), p), m_new, v_new

  leaves, treedef = jax.tree.flatten(params)
  mask = treedef.flatten_up_to(weight_decay_mask(params))
  trains = [True] * len(leaves) if trainable is None else treedef.flatten_up_to(trainable)
  out = [leaf(*args) for args in zip(treedef.flatten_up_to(grads),
                                     treedef.flatten_up_to(adam.mu),
                                     treedef.flatten_up_to(adam.nu), leaves, mask, trains)]
  new, mu, nu = (treedef.unflatten(list(col)) for col in zip(*out))
  state = _with_adam(state, lambda a: a._replace(count=keep(count, a.count), mu=mu, nu=nu))
  sched_count = keep(optax.safe_increment(sched.count), sched.count)
  is_sched = lambda n: isinstance(n, optax.ScaleByScheduleState)  # noqa: E731
  state = jax.tree.map(lambda n: n._replace(count=sched_count) if is_sched(n) else n,
                       state, is_leaf=is_sched)
  return new, state


# ---------------------------------------------------------------------------
# Muon (DeepSeek-V4): optax's contrib.muon with AdamW for what is not a matrix
# ---------------------------------------------------------------------------
OPTIMIZERS = ("adamw", "muon")
# Newton-Schulz quintic coefficients (Keller Jordan's; optax's default).
NS_COEFFS = (3.4445, -4.7750, 2.0315)
# optimizer="muon": what AdamW trains instead. The V4 report lists the
# embedding, the prediction head, RMSNorm weights, static biases and mHC's
# gating factors: by leaf name the embedding table, norm and mHC `scale`s,
# `bias`es, mHC's static `base`, the compressors' per-slot `ape` bias and the
# attention `sinks`; by module the output head and a reward model's value
# head. Every other weight of rank >= 2 is a matrix for Muon, the MoE router's
# `gate` [dim, experts] and mHC's dynamic projections `fn` among them.
MUON_ADAMW_LEAVES = ("embedding", "scale", "bias", "base", "ape", "sinks")
MUON_ADAMW_MODULES = ("head", "value_head")
# The matrix of a weight: (reduction axes, output axes), counted from the end so
# that leading stack axes (nn.scan's layers, a pipeline's stages) and the
# experts of [E, d, f] are batch axes, each slice orthogonalised on its own.
_LAST_TWO = ((-2,), (-1,))              # [..., d_in, d_out]; experts, V4's wo_a groups
_IN_HEADS = ((-3,), (-2, -1))           # [..., d_in, heads, head_dim]
_HEADS_OUT = ((-3, -2), (-1,))          # [..., heads, head_dim, d_out]
_MATRIX_DIMS = {("wq", "kernel"): _IN_HEADS, ("wk", "kernel"): _IN_HEADS,
                ("wv", "kernel"): _IN_HEADS, ("wq_b", "kernel"): _IN_HEADS,
                ("wkv_b", "kernel"): _IN_HEADS, ("wo", "kernel"): _HEADS_OUT}


def _key(entry) -> str:
  return str(getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry))))


def muon_labels(params: Any) -> Any:
  """Per leaf of `params` (arrays or shapes): optax's MuonDimensionNumbers of
  the matrix Muon orthogonalises, or None for a leaf AdamW trains (see
  MUON_ADAMW_LEAVES). Query heads [d, h, hd] are one [d, h hd] matrix, the
  output projection [h, hd, d] one [h hd, d]; leading stack and expert axes
  are batch axes."""
  def label(path, leaf):
    keys = [_key(k) for k in path]
    name, module = keys[-1], (keys[-2] if len(keys) > 1 else "")
    if name in MUON_ADAMW_LEAVES or module in MUON_ADAMW_MODULES or np.ndim(leaf) < 2:
      return None
    reduction, output = _MATRIX_DIMS.get((module, name), _LAST_TWO)
    return optax.contrib.MuonDimensionNumbers(reduction, output)
  return jax.tree_util.tree_map_with_path(label, params)


def _is_label(x) -> bool:
  return x is None or isinstance(x, optax.contrib.MuonDimensionNumbers)


class Muon(NamedTuple):
  """`make_muon`'s transformation: (init, update) as optax's, the settings
  `apply_update` reads. Its state is optax's for chain(clip_by_global_norm,
  contrib.muon) with the Newton-Schulz coefficients (constants of the
  configuration) left out: every stored leaf is a counter or a moment shaped
  and sharded like its parameter."""
  init: Callable[[Any], Any]
  update: Callable[..., tuple[Any, Any]]
  schedule: optax.Schedule
  weight_decay: float
  clip_norm: float            # 0: no clipping
  moments_dtype: str


def make_muon(schedule: optax.Schedule, *, weight_decay: float = 0.1, b1: float = 0.9,
              b2: float = 0.95, eps: float = 1e-8, clip_norm: float = 1.0,
              moments_dtype: str = "float32", momentum: float = 0.95, ns_steps: int = 5,
              nesterov: bool = True, rms: float = 0.2) -> Muon:
  """clip_by_global_norm(clip_norm) -> optax.contrib.muon, one lr `schedule`.

  Matrices (`muon_labels`): momentum (`momentum`, Nesterov when `nesterov`)
  orthogonalised by `ns_steps` Newton-Schulz iterations, scaled by
  rms x sqrt(max(fan_in, fan_out)) so that the update's RMS is `rms`
  (AdamW's typical 0.2: V4 and Moonlight reuse AdamW's lr and decay that
  way; rms=0: Keller Jordan's sqrt(max(1, fan_out / fan_in))), plus
  decoupled weight decay: p -= lr (update + weight_decay p). The rest: optax's
  AdamW (b1, b2, eps; with nesterov, optax gives it Nesterov momentum too)
  whose decoupled decay is added here to the embedding and the head only
  (not to norm scales, biases or mHC gates: optax's would decay every leaf).
  moments_dtype: the momenta's storage (Adam's second moment stays in the
  parameters' dtype).
  """
  if moments_dtype not in MOMENT_DTYPES:
    raise ValueError(f"moments_dtype={moments_dtype!r} must be one of {MOMENT_DTYPES}.")
  if not isinstance(ns_steps, int) or ns_steps < 1:
    raise ValueError(f"ns_steps={ns_steps!r} must be an integer >= 1.")
  if not 0 <= momentum < 1 or not rms >= 0:
    raise ValueError(f"momentum={momentum}, rms={rms}: need 0 <= momentum < 1, rms >= 0.")
  clips = bool(clip_norm and math.isfinite(clip_norm) and clip_norm > 0)
  reference = optax.contrib.muon(
      schedule, ns_coeffs=NS_COEFFS, ns_steps=ns_steps, beta=momentum, eps=eps,
      weight_decay=weight_decay, mu_dtype=jnp.dtype(moments_dtype), nesterov=nesterov,
      adam_b1=b1, adam_b2=b2, adam_weight_decay=0.0, muon_weight_dimension_numbers=muon_labels,
      consistent_rms=rms or None)
  if clips:
    reference = optax.chain(optax.clip_by_global_norm(clip_norm), reference)

  def adam_decays(params):     # the embedding and the head: AdamW's weights, not gains
    def decays(path, leaf):
      keys = [_key(k) for k in path]
      return bool(np.ndim(leaf) >= 2 and (keys[-1] == "embedding" or (
          len(keys) > 1 and keys[-2] in MUON_ADAMW_MODULES)))
    return jax.tree_util.tree_map_with_path(decays, params)

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("Muon.update needs params (decoupled weight decay).")
    lr = jnp.asarray(schedule(_schedule_count(state)), jnp.float32)
    updates, state = reference.update(grads, _ns_coeffs(state, jnp.asarray(NS_COEFFS)),
                                      params)
    if weight_decay:
      updates = jax.tree.map(
          lambda u, p, decays: (u - lr * weight_decay * p).astype(u.dtype) if decays else u,
          updates, params, adam_decays(params))
    return updates, _ns_coeffs(state, ())

  return Muon(lambda params: _ns_coeffs(reference.init(params), ()), update, schedule,
              weight_decay, clip_norm if clips else 0.0, moments_dtype)


def _ns_coeffs(state, value):
  """state with every MuonState's ns_coeffs set to value (() when stored)."""
  is_muon = lambda n: isinstance(n, optax.contrib.MuonState)  # noqa: E731
  return jax.tree.map(lambda n: n._replace(ns_coeffs=value) if is_muon(n) else n, state,
                      is_leaf=is_muon)


def _schedule_count(state) -> jax.Array:
  """The step count the learning-rate schedule reads (every
  ScaleByScheduleState of a make_muon state holds the same)."""
  is_sched = lambda n: isinstance(n, optax.ScaleByScheduleState)  # noqa: E731
  return [n for n in jax.tree.leaves(state, is_leaf=is_sched) if is_sched(n)][0].count


def _muon_step(tx: Muon, grads, state, params, keep_if):
  """apply_update for a Muon tx: optax's update added to the parameters;
  keep_if False keeps parameters and state (not updated in place: the
  orthogonalisation reads the whole momentum before anything is written)."""
  updates, new_state = tx.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  if keep_if is None:
    return new, new_state
  keep = lambda a, b: jnp.where(keep_if, a, b)  # noqa: E731
  return jax.tree.map(keep, new, params), jax.tree.map(keep, new_state, state)


def optimizer_from_config(train_cfg: Any, schedule: optax.Schedule | None = None
                          ) -> AdamW | Muon:
  """The optimizer a TrainConfig asks for (`optimizer`: "adamw" or "muon"),
  on `schedule` (default: lr_schedule_from_config)."""
  schedule = schedule if schedule is not None else lr_schedule_from_config(train_cfg)
  common = dict(weight_decay=train_cfg.weight_decay, b1=train_cfg.b1, b2=train_cfg.b2,
                eps=train_cfg.eps, clip_norm=train_cfg.clip_norm,
                moments_dtype=train_cfg.moments_dtype)
  kind = getattr(train_cfg, "optimizer", "adamw")
  if kind == "muon":
    return make_muon(schedule, momentum=train_cfg.muon_momentum,
                     ns_steps=train_cfg.muon_ns_steps, nesterov=train_cfg.muon_nesterov,
                     rms=train_cfg.muon_rms, **common)
  if kind != "adamw":
    raise ValueError(f"optimizer={kind!r} must be one of {OPTIMIZERS}.")
  return make_optimizer(schedule, **common)
