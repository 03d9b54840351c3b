"""One optimisation step: loss, gradients, AdamW update, router-bias update.

    (L, aux), g = value_and_grad(loss)(params)       # params only
    params      = AdamW(clip(g))                      # optimizer.py
    b_l        += gamma * sign(mean_i load_{l,i} - load_l)   per MoE layer l

The last line is DeepSeek-V3's auxiliary-loss-free load balancing (V3 report
sec. 2.1.2): the bias b steers expert *selection* only; an overloaded expert
has its bias lowered by gamma, an underloaded one raised. It is computed from
this step's token counts over the whole (global) batch, after the gradient
step, and is not a gradient: b lives in its own `router_bias` collection, is
never differentiated, clipped or weight-decayed. gamma = `bias_update_speed`
(V3: 0.001 for most of training; 0 turns balancing by bias off).

MTP modules: each MTP block's MoE has its own bias, moved by the same rule
from that block's loads (`aux["mtp_expert_load"]`).

DeepSeek-V2's auxiliary balance losses (expert, device, communication;
model.moe.v2_balance_losses) join the loss when one of their TrainConfig
weights is > 0 (`v2_balance_devices` picks their D and M), alongside the
bias update and the V3 balance loss: all may be on at once.

`make_update_step(cfg, train_cfg, loss_fn)` is the step for any loss (the
GRPO trainer's among them); `make_train_step` is it with the pretraining
loss above, its MTP weight lambda a traced function of the step counter
(`mtp_weight_schedule`: V3's 0.3 then 0.1 in one compiled step). On a mesh
with pipe > 1 the pretraining gradient is the pipeline's
(`pipelined_pretraining_grad`): parallel/pipeline.py's executor running the
model's stage functions (model/stages.py) and the loss's additive pieces
(train/losses.py), wired here (`pretraining_stages`).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax import parallel
from deepseek_jax.config import ModelConfig
from deepseek_jax.model import Transformer, init_variables, stages
from deepseek_jax.parallel.pipeline import StageFns, check_pipeline, pipeline_value_and_grad
from deepseek_jax.parallel.pipeline_layout import (layout_for, stage_tree, state_layout,
                                                   unstage_tree)
from deepseek_jax.parallel.rules import Rules, axes_size, mesh_axes_of
from deepseek_jax.train import losses
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.optimizer import (AdamW, Muon, apply_update, lr_schedule_from_config,
                                          mask_grads, optimizer_from_config, trainable_mask)



@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; a pytree (checkpointed as is)."""
  step: jax.Array          # int32 scalar: optimizer steps taken so far
  params: Any              # the `params` collection
  opt_state: Any           # optax state of `make_optimizer`
  router_bias: Any         # the `router_bias` collection (not trained by grads)


def make_tx(train_cfg: TrainConfig) -> tuple[AdamW | Muon, optax.Schedule]:
  """The optimizer (train_cfg.optimizer: AdamW or Muon) and its learning-rate
  schedule for a TrainConfig."""
  schedule = lr_schedule_from_config(train_cfg)
  return optimizer_from_config(train_cfg, schedule), schedule


# XLA:CPU spends most of a small model's compile time in backend optimisation;
# level 0 compiles ~2.5x faster and runs ~1.6x slower (measured on the 2-core
# dev machine). Used for the one-off init, and for steps when fast_compile.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def compiler_options(train_cfg: TrainConfig) -> dict[str, Any] | None:
  return dict(FAST_COMPILE) if train_cfg.fast_compile else None


def _init_state_fn(cfg: ModelConfig, train_cfg: TrainConfig, layout=None
                   ) -> Callable[[jax.Array], TrainState]:
  tx, _ = make_tx(train_cfg)

  def init(rng):
    variables = init_variables(cfg, rng)
    if layout is not None:
      variables = stage_tree(layout, variables)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params),
                      router_bias=variables.get("router_bias", {}))
  return init


_FROM_MESH = "from_mesh"


def check_mesh_support(cfg: ModelConfig, mesh: Mesh | None) -> None:
  """NotImplementedError for what the mesh path cannot run yet: V4
  (model/v4.py) on a pipeline (pipe > 1), which has no stage functions
  (model/stages.py runs V3's scanned stacks). V4 trains on any other mesh
  (its parameters' logical axes: parallel/rules.py)."""
  pipe = dict(mesh.shape).get("pipe", 1) if mesh is not None else 1
  if pipe > 1 and cfg.arch == "v4":
    raise NotImplementedError(
        f"arch='v4' has no pipeline stage functions yet: mesh pipe={pipe} cannot run it; "
        "set config.mesh.pipe=1 (data / fsdp / tensor / expert parallelism all run V4).")


def init_train_state(cfg: ModelConfig, train_cfg: TrainConfig, rng: jax.Array,
                     mesh: Mesh | None = None, rules: Rules | None = None) -> TrainState:
  """Fresh parameters, optimizer state, zero router bias; step 0.

  With a mesh, every leaf is created directly in its sharding (the jitted
  init's out_shardings): nothing is materialised whole on one device. On a
  mesh with pipe > 1 the layer stacks are stored in the stage layout
  (`state_layout`): each pipeline rank holds only its stage's blocks and
  their optimizer moments.
  """
  check_mesh_support(cfg, mesh)
  init = _init_state_fn(cfg, train_cfg,
                        state_layout(cfg, mesh, train_cfg.pipeline_schedule))
  if mesh is None:
    return jax.jit(init, compiler_options=FAST_COMPILE)(rng)
  # The init traces the model on a dummy batch of one row: it runs outside
  # `activate` (no shard_map); only its outputs are placed.
  shardings = state_shardings(cfg, train_cfg, mesh, rules)
  return jax.jit(init, out_shardings=shardings, compiler_options=FAST_COMPILE)(rng)


def abstract_train_state(cfg: ModelConfig, train_cfg: TrainConfig,
                         mesh: Mesh | None = None, rules: Rules | None = None,
                         layout=_FROM_MESH) -> TrainState:
  """Shapes and dtypes of `init_train_state` (jax.ShapeDtypeStruct leaves),
  carrying their shardings when a mesh is given (restore targets).
  layout: the stage layout (parallel.pipeline.StageLayout, or None for the
  model's own); by default the one `init_train_state` uses on `mesh`."""
  check_mesh_support(cfg, mesh)
  if layout == _FROM_MESH:
    layout = state_layout(cfg, mesh, train_cfg.pipeline_schedule)
  abstract = jax.eval_shape(_init_state_fn(cfg, train_cfg, layout), jax.random.key(0))
  if mesh is None:
    return abstract
  return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                      abstract, parallel.tree_shardings(abstract, mesh, rules))


def state_shardings(cfg: ModelConfig, train_cfg: TrainConfig, mesh: Mesh,
                    rules: Rules) -> TrainState:
  """NamedSharding of every TrainState leaf under `rules` (optimizer moments
  follow their parameters; counters are replicated)."""
  return jax.tree.map(lambda a: a.sharding,
                      abstract_train_state(cfg, train_cfg, mesh, rules))


def model_variables(cfg: ModelConfig, state: TrainState, mesh: Mesh | None = None,
                    schedule: str | None = None) -> dict:
  """{"params", "router_bias"} of `state` in the model's layout (what
  `Transformer.apply` takes), whatever the state's layout on `mesh`
  (schedule: the run's pipeline_schedule; DualPipeV stores its own)."""
  variables = {"params": state.params, "router_bias": state.router_bias}
  layout = state_layout(cfg, mesh, schedule)
  return variables if layout is None else jax.jit(partial(unstage_tree, layout))(variables)


def _bias_step(bias: jax.Array, load: jax.Array, speed: float) -> jax.Array:
  """b_i += speed * sign(mean(load) - load_i) along the last (expert) axis."""
  load = load.astype(jnp.float32)
  return (bias + speed * jnp.sign(load.mean(-1, keepdims=True) - load)).astype(bias.dtype)


def update_router_bias(router_bias: Any, expert_load: jax.Array, speed: float,
                       mtp_expert_load: jax.Array | None = None) -> Any:
  """Aux-loss-free balancing (V3 sec. 2.1.2): b += speed * sign(mean - load).

  router_bias: the collection; `moe_layers/ffn/bias` is [n_moe_layers, E] and
  `mtp_{k}/block/ffn/bias` [E] for MoE MTP blocks (V4: `layers_{i}/ffn/bias`
  [E] per unrolled layer, hash-routed ones left alone).
  expert_load: [n_moe_layers, E] token counts of this step (V4: [n_layers,
  E]); mtp_expert_load:
  [D, E] for the MTP blocks (None leaves their biases unchanged).
  """
  if not speed:
    return router_bias
  new = dict(router_bias)
  if "moe_layers" in router_bias:
    moe = dict(router_bias["moe_layers"])
    moe["ffn"] = {**moe["ffn"], "bias": _bias_step(moe["ffn"]["bias"], expert_load, speed)}
    new["moe_layers"] = moe
  # V4 (model/v4.py): unrolled `layers_{i}`, expert_load [n_layers, E] row i;
  # hash-routed layers (their `tid2eid` table) route without the bias.
  for key, layer in router_bias.items():
    if key.startswith("layers_") and "ffn" in layer and "tid2eid" not in layer:
      i = int(key.split("_")[1])
      new[key] = {**layer, "ffn": {**layer["ffn"], "bias": _bias_step(
          layer["ffn"]["bias"], expert_load[i], speed)}}
  if mtp_expert_load is not None:
    for k in range(mtp_expert_load.shape[0]):
      block = dict(router_bias[f"mtp_{k}"]["block"])
      block["ffn"] = {**block["ffn"],
                      "bias": _bias_step(block["ffn"]["bias"], mtp_expert_load[k], speed)}
      new[f"mtp_{k}"] = {**router_bias[f"mtp_{k}"], "block": block}
  return new


def load_imbalance(expert_load: jax.Array) -> jax.Array:
  """max_l (max_i load_{l,i} / mean_i load_{l,i}): 1 is perfect balance."""
  if expert_load.size == 0:
    return jnp.ones((), jnp.float32)
  mean = jnp.maximum(expert_load.mean(-1), 1e-9)
  return (expert_load.max(-1) / mean).max()


# A loss for `make_update_step`: (params, router_bias, batch) -> (scalar to
# minimise, aux) with aux["metrics"] a dict of scalars and, for the router-bias
# update, optionally aux["expert_load"] [n_moe_layers, E] and
# aux["mtp_expert_load"] [D, E].
LossFn = Callable[[Any, Any, dict], tuple[jax.Array, dict]]


def v2_balance_devices(cfg: ModelConfig, train_cfg: TrainConfig, mesh: Mesh | None = None,
                       rules: Rules | None = None) -> tuple[int, int]:
  """(D, M) of DeepSeek-V2's balance losses for this run; (0, 0) = off (all
  three weights 0, or a model without MoE layers).

  D = train_cfg.balance_devices, or when 0: the mesh's expert-parallel
  degree when `mesh`/`rules` split the experts, else cfg.n_expert_groups.
  M = cfg.n_limited_groups when the router's groups are those D devices
  (n_expert_groups == D: device-limited routing), else D (no limit).
  ValueError, before anything compiles, when D does not divide
  n_routed_experts.
  """
  n_dev, e = train_cfg.balance_devices, cfg.n_routed_experts
  if cfg.n_moe_layers and n_dev and e % n_dev:
    raise ValueError(
        f"balance_devices={n_dev} must divide n_routed_experts={e} (the V2 device and "
        f"communication losses put E/D contiguous experts on each of D devices); set "
        f"balance_devices to one of {[d for d in range(1, e + 1) if e % d == 0]}, or 0 "
        "(the mesh's expert-parallel degree, else n_expert_groups).")
  weights = (train_cfg.expert_balance_weight, train_cfg.device_balance_weight,
             train_cfg.comm_balance_weight)
  if not any(weights) or not cfg.n_moe_layers:
    return 0, 0
  if not n_dev and mesh is not None and rules is not None:
    ep = axes_size(dict(mesh.shape), mesh_axes_of("exp", rules))
    n_dev = ep if ep > 1 else 0      # ep divides E (parallel/expert.py checks)
  n_dev = n_dev or cfg.n_expert_groups
  max_dev = cfg.n_limited_groups if cfg.n_expert_groups == n_dev else n_dev
  return n_dev, max_dev


def _v2_weights(train_cfg: TrainConfig, n_dev: int) -> dict[str, float]:
  if not n_dev:
    return {}
  return dict(expert_balance_weight=train_cfg.expert_balance_weight,
              device_balance_weight=train_cfg.device_balance_weight,
              comm_balance_weight=train_cfg.comm_balance_weight)


def _loss_out(loss, metrics, aux, tokens):
  """(loss, the LossFn aux) from losses.combine's results and the model's aux."""
  out = {"metrics": dict(metrics, tokens=tokens), "expert_load": aux["expert_load"]}
  if "mtp_expert_load" in aux:
    out["mtp_expert_load"] = aux["mtp_expert_load"]
  return loss, out


def mtp_weight_schedule(train_cfg: TrainConfig) -> Callable[[jax.Array], Any]:
  """count -> V3's MTP weight lambda for the update a state with `count`
  steps taken makes (step number count + 1, as the loop numbers steps):
  mtp_weight, then mtp_weight_final for step numbers > mtp_weight_switch_step
  (0: no switch, a constant). Traced inside the step, so that one compiled
  step serves the whole run."""
  switch = train_cfg.mtp_weight_switch_step
  if not switch:
    return lambda count: train_cfg.mtp_weight
  return lambda count: jnp.where(count + 1 > switch, jnp.float32(train_cfg.mtp_weight_final),
                                 jnp.float32(train_cfg.mtp_weight))


def pretraining_loss(cfg: ModelConfig, train_cfg: TrainConfig, mesh: Mesh | None = None,
                     rules: Rules | None = None, *, vocab_chunk: int | None = None) -> LossFn:
  """CE + lambda MTP + alpha balance (+ alpha1..3 times V2's balance losses
  when their weights are > 0; losses.total_loss) on the data contract
  (tokens, targets, segment_ids, positions, loss_mask). mesh/rules: only to
  default V2's D to the expert-parallel degree (`v2_balance_devices`).
  The returned loss_fn(params, router_bias, batch, mtp_weight=None) takes
  lambda as an optional (traceable) fourth argument; None = train_cfg's.
  The model hands the loss its hidden states and the CE applies the head
  over `vocab_chunk` vocabulary columns at a time (None: losses.VOCAB_CHUNK,
  read when this is called; losses.chunked_cross_entropy); 0 = the model's
  [b, s, V] logits and the full log-softmax (the same numbers).

  A DSA model training its indexer (cfg.dsa_stage != "off") adds
  indexer_loss_weight x its KL (losses.combine). In the "warmup" stage only
  the indexer trains: the gradient is taken of that term alone (the rest of
  the loss is reported, not differentiated), so the main model's backward
  is not computed; make_update_step also freezes every other parameter."""
  losses.check_dsa_training(cfg, train_cfg)
  n_dev, max_dev = v2_balance_devices(cfg, train_cfg, mesh, rules)
  model = Transformer(cfg, balance_devices=n_dev, balance_max_devices=max_dev)
  v2_weights = _v2_weights(train_cfg, n_dev)
  chunk = losses.VOCAB_CHUNK if vocab_chunk is None else vocab_chunk
  warmup = cfg.use_dsa and cfg.dsa_stage == "warmup"

  def loss_fn(params, router_bias, batch, mtp_weight=None):
    out, aux = model.apply(
        {"params": params, "router_bias": router_bias}, batch["tokens"],
        segment_ids=batch["segment_ids"], positions=batch["positions"],
        targets=batch["targets"], return_aux=True, return_hidden=bool(chunk))
    head_args = dict(kernel=stages.head_kernel(cfg, params), chunk=chunk) if chunk else {}
    loss, metrics = losses.total_loss(
        out, aux, batch,
        mtp_weight=train_cfg.mtp_weight if mtp_weight is None else mtp_weight,
        balance_weight=train_cfg.balance_weight,
        indexer_loss_weight=train_cfg.indexer_loss_weight, **v2_weights, **head_args)
    if warmup:       # the value of the whole loss, the gradient of the indexer's term
      indexer = train_cfg.indexer_loss_weight * aux["indexer_loss"]
      loss = jax.lax.stop_gradient(loss - indexer) + indexer
    return _loss_out(loss, metrics, aux,
                     (batch["segment_ids"] != 0).sum().astype(jnp.float32))
  return loss_fn


def pretraining_stages(cfg: ModelConfig, train_cfg: TrainConfig, mesh: Mesh | None = None,
                       rules: Rules | None = None, *, vocab_chunk: int | None = None
                       ) -> StageFns:
  """`pretraining_loss` cut into the pipeline executor's stage functions: the
  model's (model/stages.py) and the loss's additive pieces (train/losses.py).
  loss_args: the MTP weight (None = train_cfg.mtp_weight). vocab_chunk: as
  pretraining_loss's (the head stage's CE over hidden states, chunked)."""
  v2 = v2_balance_devices(cfg, train_cfg, mesh, rules)
  v2_weights = _v2_weights(train_cfg, v2[0])
  chunk = losses.VOCAB_CHUNK if vocab_chunk is None else vocab_chunk
  mtp_key = "mtp_hidden" if chunk else "mtp_logits"

  def blocks(stacks, stacks_bias, x, mb, totals, active):
    x, aux = stages.blocks(cfg, stacks, stacks_bias, x, mb["segment_ids"], mb["positions"],
                           active=active, v2=v2)
    share, tokens = losses.sequence_share(mb, totals), losses.token_share(mb, totals)
    return x, {key: losses.share_aux(a, share, tokens) for key, a in aux.items()}

  def head(shared, shared_bias, x, mb, totals):
    out, aux = stages.head(cfg, shared, shared_bias, x, mb["targets"], mb["segment_ids"],
                           mb["positions"], v2=v2, hidden=bool(chunk))
    head_args = dict(kernel=stages.head_kernel(cfg, shared), chunk=chunk) if chunk else {}
    terms = losses.head_terms(out, aux.get(mtp_key), mb, totals, **head_args)
    aux = {k: v for k, v in aux.items() if k != mtp_key}
    return {"terms": terms, "aux": losses.share_aux(aux, losses.sequence_share(mb, totals),
                                                    losses.token_share(mb, totals))}

  def loss(layers, head, totals, mtp_weight):
    aux = stages.merge_aux(cfg, layers, head["aux"])
    loss, metrics = losses.combine(
        head["terms"], aux, mtp_weight=train_cfg.mtp_weight if mtp_weight is None else mtp_weight,
        balance_weight=train_cfg.balance_weight,
        indexer_loss_weight=train_cfg.indexer_loss_weight, **v2_weights)
    return _loss_out(loss, metrics, aux, totals["tokens"])

  return StageFns(totals=lambda batch: losses.batch_totals(batch, cfg.n_mtp_depth),
                  embed=lambda shared, mb: stages.embed(cfg, shared, mb["tokens"]),
                  blocks=blocks, head=head, loss=loss)


def pipelined_pretraining_grad(cfg: ModelConfig, train_cfg: TrainConfig, mesh: Mesh,
                               rules: Rules | None, *, schedule: str, n_microbatches: int,
                               stage_layers: tuple[int, ...] | None = None,
                               staged: bool = False) -> Callable:
  """f(params, router_bias, batch, mtp_weight=None) -> ((loss, aux), grads):
  `jax.value_and_grad(pretraining_loss(...), has_aux=True)` run as a
  pipeline over mesh axis `pipe` (parallel/pipeline.py; stage_layers: blocks
  per stage, default split_layers' even split; staged: see
  pipeline_value_and_grad). Same loss, metrics, expert loads and gradients
  up to float summation order (tests/test_pipeline.py)."""
  pp = dict(mesh.shape)["pipe"]
  check_pipeline(pp, schedule, n_microbatches)     # the schedule's errors first
  layout = layout_for(cfg, pp, schedule, stage_layers)
  return pipeline_value_and_grad(pretraining_stages(cfg, train_cfg, mesh, rules), mesh, layout,
                                 schedule=schedule, n_microbatches=n_microbatches,
                                 staged=staged)


def _all_finite(*trees) -> jax.Array:
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(trees)]))


def _bias_update(train_cfg: TrainConfig, layout, router_bias, aux: dict, metrics: dict):
  """The router bias after this step's expert loads (if the loss reports
  any), and the load metrics added to `metrics`. layout: the state's stage
  layout (the bias stored by stage on a pipe mesh), or None."""
  load = aux.get("expert_load")
  if load is None:
    return router_bias
  load = jax.lax.stop_gradient(load)
  mtp_load = aux.get("mtp_expert_load")
  if mtp_load is not None:
    mtp_load = jax.lax.stop_gradient(mtp_load)
    metrics["mtp_expert_load"] = mtp_load
  metrics.update(load_imbalance=load_imbalance(load), expert_load=load)
  if layout is not None:   # the loads in the state's layout (a padded slot: block 0's)
    load = stage_tree(layout, {"moe_layers": load})["moe_layers"]
  return update_router_bias(router_bias, load, train_cfg.bias_update_speed, mtp_load)


def _jit_step(step, cfg: ModelConfig, train_cfg: TrainConfig, mesh: Mesh | None,
              rules: Rules | None):
  """jit(step) with the state donated; on a mesh in the state's and the
  batch's shardings, traced and called inside parallel.activate."""
  if mesh is None:
    return jax.jit(step, donate_argnums=0, compiler_options=compiler_options(train_cfg))
  state_sh = state_shardings(cfg, train_cfg, mesh, rules)
  jitted = jax.jit(step, donate_argnums=0, compiler_options=compiler_options(train_cfg),
                   in_shardings=(state_sh, parallel.batch_sharding(mesh, rules)),
                   out_shardings=(state_sh, NamedSharding(mesh, P())))

  def sharded_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    # The model reads the mesh and rules while tracing; entering the context
    # on every call is a few microseconds and keeps the jit cache key stable.
    with parallel.activate(mesh, rules):
      return jitted(state, batch)

  def lower(state: TrainState, batch: dict):   # AOT, as jax.jit(...).lower
    with parallel.activate(mesh, rules):
      return jitted.lower(state, batch)
  sharded_step.lower = lower
  return sharded_step


# grad_fn of make_update_step: (params, router_bias, batch, count) -> ((loss,
# aux), grads), count = the state's step counter (traced), for what varies by
# step inside one compiled step (the MTP weight's schedule).
GradFn = Callable[[Any, Any, dict, jax.Array], tuple[tuple[jax.Array, dict], Any]]


def make_update_step(cfg: ModelConfig, train_cfg: TrainConfig, loss_fn: LossFn,
                     mesh: Mesh | None = None, rules: Rules | None = None, *,
                     skip_nonfinite: bool = False, grad_fn: GradFn | None = None
                     ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """jit(step)(state, batch) -> (new state, metrics) for any loss; `state` is
  donated. The optimizer is train_cfg's (make_tx); the router bias moves by
  train_cfg.bias_update_speed when the loss reports expert loads.

  metrics: the loss's, plus grad_norm (before clipping), lr (used by this
  step), and with expert loads load_imbalance and expert_load. With
  skip_nonfinite, a step whose loss or gradients are not finite leaves
  params, optimizer state and router bias as they were (the step counter
  still advances) and reports skipped = 1.

  grad_fn (`GradFn`) in place of `jax.value_and_grad(loss_fn, has_aux=True)`
  (make_train_step's: the MTP weight schedule, the pipeline; loss_fn is then
  unused). A mesh with pipe > 1 needs one.

  With `mesh` and `rules` (parallel.setup): the state stays in its
  shardings, every batch array ([rows, seq]) is split over the batch axes
  by rows, the MoE dispatch runs in shard_map (expert parallel under
  `ep_fsdp`), metrics come back replicated.
  """
  if mesh is not None and dict(mesh.shape).get("pipe", 1) > 1 and grad_fn is None:
    raise NotImplementedError(
        f"mesh.pipe={dict(mesh.shape)['pipe']}: this loss has no pipelined gradient (the "
        "pipeline runs the pretraining loss: make_train_step); use mesh.pipe=1.")
  tx, schedule = make_tx(train_cfg)
  layout = state_layout(cfg, mesh, train_cfg.pipeline_schedule)
  if grad_fn is None:
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
    grad_fn = lambda params, router_bias, batch, count: value_and_grad(  # noqa: E731
        params, router_bias, batch)

  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    (loss, aux), grads = grad_fn(state.params, state.router_bias, batch, state.step)
    # DSA's dense warm-up: only the indexer trains (optimizer.trainable_mask).
    trainable = trainable_mask(state.params, cfg.dsa_stage if cfg.use_dsa else "off")
    grads = mask_grads(grads, trainable)
    ok = _all_finite(loss, grads) if skip_nonfinite else None
    params, opt_state = apply_update(tx, grads, state.opt_state, state.params, keep_if=ok,
                                     trainable=trainable)
    metrics = dict(aux["metrics"], grad_norm=optax.tree.norm(grads),
                   lr=jnp.asarray(schedule(state.step), jnp.float32))
    router_bias = _bias_update(train_cfg, layout, state.router_bias, aux, metrics)
    if trainable is not None:        # frozen too: the loads are reported, not applied
      router_bias = state.router_bias
    if skip_nonfinite:
      router_bias = jax.tree.map(lambda a, b: jnp.where(ok, a, b), router_bias,
                                 state.router_bias)
      metrics["skipped"] = 1.0 - ok.astype(jnp.float32)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                           router_bias=router_bias)
    return new_state, metrics

  return _jit_step(step, cfg, train_cfg, mesh, rules)


def make_train_step(cfg: ModelConfig, train_cfg: TrainConfig, mesh: Mesh | None = None,
                    rules: Rules | None = None
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """The pretraining step: `make_update_step` with `pretraining_loss`.

  batch: the data contract (tokens, targets, segment_ids, positions,
  loss_mask; [batch, seq]). metrics: scalars loss, ce, mtp, balance,
  grad_norm (before clipping), lr (used by this step), load_imbalance,
  tokens (non-padding inputs), target_tokens; and expert_load
  [n_moe_layers, E]. With a V2 balance weight > 0 also balance_expert,
  balance_device, balance_comm (sums over MoE layers, before alpha) and
  balance_expert_per_layer etc. [main MoE layers + MTP blocks]. With
  train_cfg.max_bad_steps > 0 a non-finite update is skipped and reported as
  skipped = 1 (make_update_step's skip_nonfinite). With
  mtp_weight_switch_step > 0 also mtp_weight, the lambda this step used
  (`mtp_weight_schedule`, traced: one compilation for the whole run).
  Numerically the same on one device and on a mesh (tests/test_parallel.py).
  A mesh with pipe > 1 runs the step as a pipeline (parallel/pipeline.py;
  train_cfg.pipeline_schedule, num_microbatches), with the same numbers
  (tests/test_pipeline.py).
  """
  check_mesh_support(cfg, mesh)
  loss_fn = pretraining_loss(cfg, train_cfg, mesh, rules)
  pipe = dict(mesh.shape).get("pipe", 1) if mesh is not None else 1
  if pipe > 1:
    value_and_grad = pipelined_pretraining_grad(
        cfg, train_cfg, mesh, rules, schedule=train_cfg.pipeline_schedule,
        n_microbatches=num_microbatches(train_cfg, pipe), staged=True)
  else:
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
  mtp_weight = mtp_weight_schedule(train_cfg)

  def grad_fn(params, router_bias, batch, count):
    weight = mtp_weight(count)
    (loss, aux), grads = value_and_grad(params, router_bias, batch, weight)
    if train_cfg.mtp_weight_switch_step:
      aux = dict(aux, metrics=dict(aux["metrics"], mtp_weight=weight))
    return (loss, aux), grads
  return make_update_step(cfg, train_cfg, loss_fn, mesh, rules,
                          skip_nonfinite=train_cfg.max_bad_steps > 0, grad_fn=grad_fn)


def num_microbatches(train_cfg: TrainConfig, pipe: int) -> int:
  """train_cfg.num_microbatches, or 2 x pipe when it is 0 (module doc of
  TrainConfig)."""
  return train_cfg.num_microbatches or 2 * pipe
