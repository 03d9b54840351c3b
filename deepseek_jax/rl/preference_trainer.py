"""Preference trainers through the run harness: the reward model, and DPO / IPO.

`train_preferences(model_cfg, train_cfg, workdir, ...)` is what launch.train
runs for TrainConfig.objective "reward_model" or "dpo" (its TRAINERS table),
with loop.train's signature and summary. Each step:

  batch      batch_size preference pairs of preference_files, encoded by
             data/preferences.py (2 x batch_size rows: row 2i pair i's chosen
             response, 2i+1 its rejected one), reshuffled every epoch by
             (seed, epoch) as pipeline.BatchIterator does, so a resumed run
             draws the batches it would have drawn. On a mesh the rows split
             over the batch axes in contiguous blocks; batch_size (pairs) a
             multiple of data*fsdp*expert makes every block whole pairs, so
             both rows of a pair sit on one shard
  reference  (DPO) the frozen start weights' per-token response log-probs of
             the batch (batch["ref_logp"]), a separate jitted forward outside
             the gradient. The start weights are init_from's / init_from_hf's
             (or the seed's random init), rebuilt on resume: the reference is
             never the resumed policy
  update     train.step.make_update_step with rl.reward_model's Bradley-Terry
             loss (params = the model's + "value_head", one AdamW for both) or
             rl.dpo's DPO / IPO loss; no router-bias update, no MTP or balance
             loss (the router biases stay the start's)
  eval       eval_preference_files at step 0, every eval_every steps and at
             the end, in chunks of eval_batch_size pairs (the accuracy also per
             record `kind`: eval_accuracy/<kind>, eval_reward_accuracy/<kind>,
             when the pairs have several). Reward model:
             eval_accuracy (pairs with r_chosen > r_rejected), eval_margin
             (mean r_chosen - r_rejected), eval_chosen_reward,
             eval_rejected_reward, eval_loss. DPO: eval_reward_accuracy
             (implicit reward beta (logp - ref_logp) ranks the pair right),
             eval_margin (its mean gap), eval_chosen_logp,
             eval_rejected_logp, eval_logp_margin (the policy's summed
             chosen-minus-rejected log-prob), eval_loss; the reference's
             held-out log-probs are computed once

The harness (train/runner.py) does the rest as for every trainer:
metrics.jsonl + TensorBoard, the progress line, checkpoints (async, keep
policy), resume, SIGTERM / SIGINT, the NaN/Inf policy; config.json and
preferences.png (loss, held-out accuracy) in the workdir.

A DPO run's checkpoints are a plain TrainState: launch.generate,
launch.evaluate and init_from read them like an SFT run's. A reward-model
run's TrainState has the value head in its params; `load_reward_model`
reads it back as a scorer of (prompt, response) texts.
"""

from __future__ import annotations

import dataclasses
import os
import time
from functools import partial
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax import parallel
from deepseek_jax.config import ModelConfig
from deepseek_jax.data import pipeline
from deepseek_jax.data import prompts as prompts_lib
from deepseek_jax.data.preferences import (encode_pairs, encode_responses,
                                           load_preference_files, split_pairs)
from deepseek_jax.data.tokenizer import default_tokenizer, load_tokenizer
from deepseek_jax.parallel import MeshConfig, distributed
from deepseek_jax.parallel.rules import BATCH_AXES, axes_size
from deepseek_jax.rl import dpo, reward_model
from deepseek_jax.train import checkpoint, loop, metrics, runner, start
from deepseek_jax.train.config import PREFERENCE_OBJECTIVES, TrainConfig, schedule_changes
from deepseek_jax.train.step import (TrainState, abstract_train_state, compiler_options,
                                     make_tx, make_update_step)

VALUE_HEAD = "value_head"
_VALUE_HEAD_SEED = 0x5EAD     # folded into the run's seed for the value head's init
PLOT_FILE = "preferences.png"


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class PairData:
  """A run's preference pairs: per field [pairs, 2, seq_len] arrays (chosen,
  rejected) of the training and held-out files, the tokenizer and prompt
  format that rendered them."""
  train: dict[str, np.ndarray]
  eval: dict[str, np.ndarray] | None
  tokenizer: Any
  fmt: prompts_lib.PromptFormat
  eval_kinds: list[str] = dataclasses.field(default_factory=list)   # per held-out pair


def run_tokenizer(model_cfg: ModelConfig, train_cfg: TrainConfig):
  """The run's tokenizer (tokenizer_path, else the shipped one), refused when
  it has more ids than the model."""
  tok = (load_tokenizer(train_cfg.tokenizer_path) if train_cfg.tokenizer_path
         else default_tokenizer())
  if tok.vocab_size > model_cfg.vocab_size:
    raise ValueError(f"the tokenizer has {tok.vocab_size} ids but vocab_size="
                     f"{model_cfg.vocab_size}; set model.vocab_size >= {tok.vocab_size}.")
  return tok


def prompt_format(train_cfg: TrainConfig) -> prompts_lib.PromptFormat:
  """How prompts are rendered: the chat template beside tokenizer_path when it
  has one, else the run's `template` (as GRPO's chat_template="auto")."""
  return prompts_lib.resolve_format("auto", train_cfg.tokenizer_path, train_cfg.template)


def _pairs(tok, fmt, files: Sequence[str], seq_len: int
           ) -> tuple[dict[str, np.ndarray], list[str]]:
  records = load_preference_files(files)
  rows = encode_pairs(tok, records, fmt, seq_len=seq_len)
  return ({k: v.reshape(len(records), 2, seq_len) for k, v in rows.items()},
          [r.kind for r in records])


def load_data(model_cfg: ModelConfig, train_cfg: TrainConfig) -> PairData:
  """Reads and encodes preference_files / eval_preference_files (errors name
  the file and line, or the field, before anything compiles)."""
  tok, fmt = run_tokenizer(model_cfg, train_cfg), prompt_format(train_cfg)
  train, _ = _pairs(tok, fmt, train_cfg.preference_files, train_cfg.seq_len)
  n = len(train["tokens"])
  if train_cfg.batch_size > n:
    raise ValueError(f"batch_size={train_cfg.batch_size} pairs exceeds the {n} pairs of "
                     f"preference_files; lower batch_size to <= {n}.")
  held, kinds = (_pairs(tok, fmt, train_cfg.eval_preference_files, train_cfg.seq_len)
                 if train_cfg.eval_preference_files else (None, []))
  return PairData(train, held, tok, fmt, kinds)


def _rows(pairs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """[p, 2, seq] pairs -> [2p, seq] interleaved rows (encode_pairs' layout)."""
  return {k: v.reshape(-1, v.shape[-1]) for k, v in pairs.items()}


def _place(batch: dict[str, np.ndarray], sharding) -> dict:
  """Host rows (the same global batch on every process) on the mesh, rows
  split over the batch axes; unchanged on one device."""
  if sharding is None:
    return batch
  shape = batch["tokens"].shape
  lo, hi = distributed.process_rows(sharding, shape)
  return distributed.put_batch({k: v[lo:hi] for k, v in batch.items()}, sharding, shape[0])


def _mesh_jit(fn: Callable, mesh, rules, out_sharding=None, options=None) -> Callable:
  """jit(fn), traced and called inside parallel.activate on a mesh (the
  model reads the mesh and rules while tracing)."""
  jitted = jax.jit(fn, out_shardings=out_sharding, compiler_options=options)
  if mesh is None:
    return jitted

  def call(*args):
    with parallel.activate(mesh, rules):
      return jitted(*args)
  return call


class PairBatches:
  """The batch source (runner.Batches): batch `step` is the pairs
  BatchIterator gives for it, as interleaved rows on the mesh; with
  `reference` (DPO), plus "ref_logp" = reference(batch)."""

  def __init__(self, pairs: dict[str, np.ndarray], train_cfg: TrainConfig, sharding,
               reference: Callable | None = None):
    self.iterator = pipeline.BatchIterator(pairs, train_cfg.batch_size, seed=train_cfg.seed)
    self.sharding, self.reference = sharding, reference

  def next(self, step: int, state) -> dict:
    batch = _place(_rows(next(self.iterator)), self.sharding)
    if self.reference is not None:
      batch = dict(batch, ref_logp=self.reference(batch))
    return batch

  def state(self) -> dict[str, Any]:
    return self.iterator.state()

  def restore(self, saved: dict[str, Any]) -> None:
    self.iterator.restore(saved)


class HeldOut:
  """Held-out pairs in fixed chunks of `chunk` pairs (one compiled forward;
  the last chunk padded with copies of pair 0, dropped from the results)."""

  def __init__(self, pairs: dict[str, np.ndarray], chunk: int, sharding):
    self.n = len(pairs["tokens"])
    index = np.concatenate([np.arange(self.n), np.zeros(-self.n % chunk, np.int64)])
    self.chunks = [_rows({k: v[index[i:i + chunk]] for k, v in pairs.items()})
                   for i in range(0, len(index), chunk)]
    self.sharding = sharding

  def values(self, fn: Callable[[dict], jax.Array]) -> np.ndarray:
    """fn(batch) -> per-row values [rows] of every chunk: float64 [2n]."""
    out = [np.asarray(jax.device_get(fn(_place(c, self.sharding)))) for c in self.chunks]
    return np.concatenate(out).astype(np.float64)[:2 * self.n]


# ---------------------------------------------------------------------------
# The reward model's state: the model's TrainState with the value head in params
# ---------------------------------------------------------------------------
def with_value_head(model_cfg: ModelConfig, train_cfg: TrainConfig, state: TrainState,
                    key: jax.Array) -> TrainState:
  """`state` with a fresh value head (rl.reward_model.init_value_head) in its
  params and a fresh optimizer state for all of them."""
  tx, _ = make_tx(train_cfg)
  params = {**state.params, VALUE_HEAD: reward_model.init_value_head(model_cfg, key)}
  return state.replace(params=params, opt_state=tx.init(params))


def reward_model_abstract(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh=None,
                          rules=None) -> TrainState:
  """Shapes (and on a mesh shardings, by the rule set: the value head's
  kernel is `embed`) of a reward-model run's TrainState: the restore target."""
  base = abstract_train_state(model_cfg, train_cfg)
  abstract = jax.eval_shape(partial(with_value_head, model_cfg, train_cfg), base,
                            jax.random.key(0))
  if mesh is None:
    return abstract
  return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                      abstract, parallel.tree_shardings(abstract, mesh, rules))


def _shardings(abstract):
  return jax.tree.map(lambda a: a.sharding, abstract)


def fresh_reward_model(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh, rules,
                       log: Callable[[str], None]) -> TrainState:
  """Step 0 of a reward-model run: start.fresh_state (init_from, init_from_hf
  or random) plus a value head drawn from the run's seed."""
  base = start.fresh_state(model_cfg, train_cfg, mesh, rules, log)
  key = jax.random.fold_in(jax.random.key(train_cfg.seed), _VALUE_HEAD_SEED)
  out = (None if mesh is None
         else _shardings(reward_model_abstract(model_cfg, train_cfg, mesh, rules)))
  return jax.jit(partial(with_value_head, model_cfg, train_cfg), out_shardings=out)(base, key)


def _resume_or_start(run: runner.Run, model_cfg: ModelConfig, train_cfg: TrainConfig, rules,
                     fresh: Callable[[], TrainState], abstract: TrainState | None):
  """run.start, restoring `abstract` when given (the reward model's state,
  which start.resume_or_start's target lacks the value head of). Until
  Run.start takes the restore target, this sets what Run.start sets."""
  if abstract is None or run.ckpts.latest_step() is None:
    return run.start(model_cfg, train_cfg, rules, fresh=fresh)
  changed = schedule_changes(run.ckpts.saved_meta()["train_config"], train_cfg)
  if changed:
    raise ValueError(
        f"the learning-rate schedule differs from the checkpointed run's in "
        f"{run.ckpts.directory} ({'; '.join(changed)}): resuming would bend it mid-run. "
        "Keep the saved values, or start a new workdir with init_from.")
  run.resumed_from = run.ckpts.latest_step()
  state, run.saved = run.ckpts.restore(abstract)
  run.log(f"resuming from {run.ckpts.directory} at step {run.resumed_from}")
  return state


def _update_step(model_cfg: ModelConfig, train_cfg: TrainConfig, loss_fn, mesh, rules,
                 abstract: TrainState | None):
  """make_update_step's step; on a mesh with the reward model's state
  (`abstract`: its shardings), that step jitted in those shardings, as
  make_update_step does for the model's own TrainState."""
  skip = train_cfg.max_bad_steps > 0
  if mesh is None or abstract is None:
    return make_update_step(model_cfg, train_cfg, loss_fn, mesh, rules, skip_nonfinite=skip)
  update = make_update_step(model_cfg, train_cfg, loss_fn, skip_nonfinite=skip).__wrapped__
  state_sh = _shardings(abstract)
  jitted = jax.jit(update, donate_argnums=0, compiler_options=compiler_options(train_cfg),
                   in_shardings=(state_sh, parallel.batch_sharding(mesh, rules)),
                   out_shardings=(state_sh, NamedSharding(mesh, P())))

  def step(state: TrainState, batch: dict):
    with parallel.activate(mesh, rules):
      return jitted(state, batch)
  return step


def _with_tokens(loss_fn: Callable) -> Callable:
  """loss_fn plus metrics["tokens"] (the batch's non-padding inputs: tokens/s)."""
  def fn(params, router_bias, batch):
    loss, aux = loss_fn(params, router_bias, batch)
    tokens = (batch["segment_ids"] != 0).sum().astype(jnp.float32)
    return loss, dict(aux, metrics=dict(aux["metrics"], tokens=tokens))
  return fn


def _split_head(params: dict) -> tuple[dict, dict]:
  return {k: v for k, v in params.items() if k != VALUE_HEAD}, params[VALUE_HEAD]


# ---------------------------------------------------------------------------
# The trainer, as the run harness sees it
# ---------------------------------------------------------------------------
class PreferenceTrainer:
  """The reward model or DPO for runner.Task: `start` (the state), `step`,
  `batches`, `evaluate`, `line`. `row_values(params, router_bias, batch)` is
  what a held-out row is measured by: its reward (reward model) or its
  summed response log-prob (DPO)."""

  def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, data: PairData, mesh,
               rules, log: Callable[[str], None]):
    self.model_cfg, self.tc, self.data, self.mesh, self.rules = (model_cfg, train_cfg, data,
                                                                 mesh, rules)
    self.log = log
    self.rm = train_cfg.objective == "reward_model"
    self.sharding = None if mesh is None else parallel.batch_sharding(mesh, rules)
    self.abstract = reward_model_abstract(model_cfg, train_cfg, mesh, rules) if self.rm else None
    opts = compiler_options(train_cfg)
    if self.rm:
      loss_fn = reward_model.reward_model_loss_fn(model_cfg, margin=train_cfg.rm_margin)

      def row_values(params, router_bias, batch):
        model, head = _split_head(params)
        return reward_model.reward_scores(
            model_cfg, {"params": model, "router_bias": router_bias}, head, batch)
    else:
      loss_fn = dpo.dpo_loss_fn(model_cfg, beta=train_cfg.beta,
                                loss_type=train_cfg.dpo_loss_type)

      def row_values(params, router_bias, batch):
        return dpo.response_logprobs(model_cfg, {"params": params, "router_bias": router_bias},
                                     batch)
    self.loss_fn = _with_tokens(loss_fn)
    replicated = None if mesh is None else NamedSharding(mesh, P())
    self.row_values = _mesh_jit(row_values, mesh, rules, replicated, opts)
    self.ref_token_logp = _mesh_jit(
        lambda v, b: dpo.response_token_logprobs(model_cfg, v, b), mesh, rules,
        self.sharding, opts)
    self.held = None
    if data.eval is not None:
      chunk = min(train_cfg.eval_batch_size, len(data.eval["tokens"]))
      shards = 1 if mesh is None else axes_size(dict(mesh.shape), BATCH_AXES)
      self.held = HeldOut(data.eval, -(-chunk // shards) * shards, self.sharding)
    self.ref, self.ref_eval = None, None
    self.step: Callable | None = None          # set by start(): the update
    self.batches: PairBatches | None = None    # set by start(): the batch source

  def start(self, run: runner.Run) -> TrainState:
    """The state to train from (module docstring); for DPO also the frozen
    reference (the start weights) and its held-out log-probs."""
    cfg, tc = self.model_cfg, self.tc
    if self.rm:
      state = _resume_or_start(run, cfg, tc, self.rules, lambda: fresh_reward_model(
          cfg, tc, self.mesh, self.rules, run.log), self.abstract)
    else:
      notes: list[str] = []
      initial = start.fresh_state(cfg, tc, self.mesh, self.rules, notes.append)
      self.ref = {"params": jax.tree.map(jnp.copy, initial.params),
                  "router_bias": jax.tree.map(jnp.copy, initial.router_bias)}

      def fresh():
        for note in notes:
          run.log(note)
        return initial
      state = run.start(cfg, tc, self.rules, fresh=fresh)
      del initial
      source = tc.init_from or tc.init_from_hf or f"the random init of seed {tc.seed}"
      run.log(f"DPO reference: the start weights ({source}), frozen")
      if self.held is not None:
        self.ref_eval = self.held.values(partial(self.row_values, self.ref["params"],
                                                 self.ref["router_bias"]))
    self.step = _update_step(cfg, tc, self.loss_fn, self.mesh, self.rules, self.abstract)
    self.batches = PairBatches(self.data.train, tc, self.sharding,
                               None if self.rm else self._reference_logp)
    return state

  def _reference_logp(self, batch: dict) -> jax.Array:
    """The frozen reference's per-token response log-probs [rows, seq] of a
    batch: one forward, outside the update's gradient."""
    keys = ("tokens", "targets", "segment_ids", "positions", "response_mask")
    return self.ref_token_logp(self.ref, {k: batch[k] for k in keys})

  def eval_metrics(self, values: np.ndarray) -> dict[str, float]:
    """The held-out metrics (module docstring) of per-row values [2n]."""
    tc = self.tc
    c, r = split_pairs(values)
    if self.rm:
      m = reward_model.reward_metrics(c, r)
      loss = reward_model.bradley_terry_loss(c, r, margin=tc.rm_margin).mean()
    else:
      rc, rr = split_pairs(self.ref_eval)
      m = dpo.dpo_metrics(c, r, rc, rr, beta=tc.beta)
      loss = dpo.dpo_loss(c, r, rc, rr, beta=tc.beta, loss_type=tc.dpo_loss_type).mean()
    out = {f"eval_{k}": float(v) for k, v in {**m, "loss": loss}.items()}
    name = "accuracy" if self.rm else "reward_accuracy"
    kinds = np.array(self.data.eval_kinds)
    if len(set(self.data.eval_kinds)) > 1:       # per kind: the records' `kind` field
      right = np.asarray(c > r) if self.rm else np.asarray((c - rc) - (r - rr) > 0)
      out.update({f"eval_{name}/{k or 'none'}": float(right[kinds == k].mean())
                  for k in sorted(set(self.data.eval_kinds))})
    return out

  def evaluate(self, state: TrainState, step: int) -> dict[str, float]:
    t = time.time()
    out = self.eval_metrics(self.held.values(partial(self.row_values, state.params,
                                                     state.router_bias)))
    out["eval_n"] = float(self.held.n)
    acc = out["eval_accuracy" if self.rm else "eval_reward_accuracy"]
    what = ("pairwise accuracy" if self.rm else "implicit reward accuracy")
    extra = ("" if self.rm else f", log-prob margin {out['eval_logp_margin']:+.3f} (chosen "
             f"{out['eval_chosen_logp']:.3f}, rejected {out['eval_rejected_logp']:.3f})")
    self.log(f"eval step {step}: held-out {what} {acc:.3f}, margin {out['eval_margin']:+.4f}"
             f"{extra} (n={self.held.n}, {time.time() - t:.1f}s)")
    return out

  def line(self, step: int, s: dict[str, float], eta: float) -> str:
    acc = s["accuracy"] if self.rm else s["reward_accuracy"]
    logp = ("" if self.rm else
            f" logp c/r {s['chosen_logp']:.2f}/{s['rejected_logp']:.2f}")
    return (f"step {step:>6d}/{self.tc.steps} | loss {s['loss']:.4f} acc {acc:.3f} "
            f"margin {s['margin']:+.4f}{logp} | gnorm {s['grad_norm']:.3f} lr {s['lr']:.2e} | "
            f"{s.get('tokens_per_s', 0.0):,.0f} tok/s | eta {metrics.format_duration(eta)}"
            + (f" | skipped {int(s['bad_steps'])}" if s.get("bad_steps") else ""))


def _plot(workdir: str, rm: bool) -> str | None:
  """preferences.png: the training loss and the held-out accuracy by step."""
  records = metrics.read_metrics(os.path.join(workdir, metrics.METRICS_FILE))
  train = [r for r in records if "loss" in r and "grad_norm" in r]
  key = "eval_accuracy" if rm else "eval_reward_accuracy"
  evals = [r for r in records if key in r]
  if not train:
    return None
  from matplotlib.figure import Figure
  fig = Figure(figsize=(7, 4))
  ax = fig.add_subplot()
  steps = np.array([r["step"] for r in train])
  window = max(1, len(train) // 50)
  metrics.plot_smoothed(ax, steps, np.array([r["loss"] for r in train]), "training loss",
                        window)
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.grid(alpha=0.3)
  handles, labels = ax.get_legend_handles_labels()
  if evals:
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in evals], [r[key] for r in evals], "o-", color="tab:red",
             label="held-out " + ("pairwise accuracy" if rm else "implicit reward accuracy"))
    ax2.set_ylim(0, 1)
    h2, l2 = ax2.get_legend_handles_labels()
    handles, labels = handles + h2, labels + l2
  ax.legend(handles, labels, loc="center right")
  fig.tight_layout()
  return metrics.save_figure(fig, os.path.join(workdir, PLOT_FILE))


def preference_mesh(mesh_cfg: MeshConfig | None, train_cfg: TrainConfig,
                    model_cfg: ModelConfig):
  """(mesh, rules) of a preference run ((None, None) on one device): batch_size
  pairs split over the batch axes; no pipeline (errors before compiling)."""
  if mesh_cfg is not None and mesh_cfg.pipe > 1:
    raise NotImplementedError(
        f"mesh.pipe={mesh_cfg.pipe}: the pipeline runs the pretraining loss only; "
        f"objective={train_cfg.objective!r} has no pipelined gradient. Use mesh.pipe=1 "
        "(data/fsdp/tensor/expert axes).")
  return start.mesh_for(mesh_cfg, train_cfg, model_cfg)


def train_preferences(model_cfg: ModelConfig, train_cfg: TrainConfig, workdir: str, *,
                      mesh_cfg: MeshConfig | None = None, stop_after: int | None = None,
                      log: Callable[[str], None] = print) -> dict[str, Any]:
  """Trains a reward model or DPO (train_cfg.objective; module docstring) in
  `workdir`, resuming from its checkpoints; loop.train's arguments. Returns
  final_step, final_loss, eval (every eval record of the run: step and the
  eval_* metrics), history (this call's per-step scalars), resumed_from,
  stopped_by, workdir. ValueError / NotImplementedError for bad configs or
  files before anything compiles; FloatingPointError as loop.train."""
  if train_cfg.objective not in PREFERENCE_OBJECTIVES:
    raise ValueError(f"objective={train_cfg.objective!r}: train_preferences trains "
                     f"{PREFERENCE_OBJECTIVES}.")
  loop.check_compatible(model_cfg, train_cfg)
  mesh, rules = preference_mesh(mesh_cfg, train_cfg, model_cfg)
  data = load_data(model_cfg, train_cfg)
  settings = runner.Settings.of(train_cfg, stop_after=stop_after,
                                eval_at_start=data.eval is not None)
  with runner.Run(workdir, model_cfg, train_cfg.to_dict(), settings, mesh=mesh,
                  log=log) as run:
    n_eval = 0 if data.eval is None else len(data.eval["tokens"])
    run.log(f"data: {len(data.train['tokens'])} preference pairs ({data.fmt.describe()}), "
            f"{train_cfg.batch_size} pairs per step, {n_eval} held-out pairs; objective "
            f"{train_cfg.objective!r}")
    if mesh is not None:
      run.log(f"mesh: {start.describe_mesh(mesh)}, rules {mesh_cfg.rules}")
    trainer = PreferenceTrainer(model_cfg, train_cfg, data, mesh, rules, run.log)
    state = trainer.start(run)
    loop.describe_start(run, model_cfg, train_cfg, mesh_cfg)
    task = runner.Task(step=trainer.step, batches=trainer.batches, line=trainer.line,
                       evaluate=trainer.evaluate if trainer.held is not None else None)
    result = run.train(task, state)
    plot = _plot(workdir, trainer.rm) if run.primary else None
    last, evals = result.last, result.evals
    key = "eval_accuracy" if trainer.rm else "eval_reward_accuracy"
    run.log(f"done: step {result.final_step}, {result.seconds:.1f}s"
            + (f", loss {last['loss']:.4f}" if last else "")
            + (f", held-out accuracy {evals[-1][key]:.3f}" if evals else "")
            + (f"; plot {plot}" if plot else ""))
  return {"final_step": result.final_step,
          "final_loss": result.last["loss"] if result.last else None,
          "eval": [{k: v for k, v in r.items() if k == "step" or k.startswith("eval_")}
                   for r in result.evals],
          "history": result.history, "resumed_from": result.resumed_from,
          "stopped_by": result.stopped_by, "workdir": workdir}


# ---------------------------------------------------------------------------
# A trained reward model as a scorer
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class RewardModel:
  """A reward-model run's checkpoint as a scorer (`load_reward_model`):
  `rm(prompts, responses)` -> float32 [n] rewards of (prompt, response) text
  pairs (the prompt the user turn, rendered by the run's template or chat
  template; the response the assistant's text), scored in batches of
  batch_size rows padded to a power-of-two length (one compilation per
  length bucket). `rm.score(prompt, response)` for one."""
  model_cfg: ModelConfig
  train_cfg: TrainConfig
  variables: dict[str, Any]
  value_head: dict[str, Any]
  tokenizer: Any
  fmt: prompts_lib.PromptFormat
  step: int
  batch_size: int = 16
  mesh: Any = None
  rules: Any = None

  def __post_init__(self):
    cfg = self.model_cfg
    sharding = (None if self.mesh is None
                else NamedSharding(self.mesh, P()))
    self._scores = _mesh_jit(partial(reward_model.reward_scores, cfg), self.mesh, self.rules,
                             sharding)
    self._sharding = (None if self.mesh is None
                      else parallel.batch_sharding(self.mesh, self.rules))

  def _length(self, prompts, responses) -> int:
    """The padded input length of these rows: a power of two >= 16 that holds
    the longest, at most the model's max_seq_len (ValueError beyond it)."""
    tok, fmt = self.tokenizer, self.fmt
    p = tok.encode_batch([fmt.text(r) for r in prompts], add_bos=not fmt.adds_bos)
    c = tok.encode_batch(list(responses), add_eos=True)
    longest = max(len(a) + len(b) for a, b in zip(p, c)) - 1
    if longest > self.model_cfg.max_seq_len:
      raise ValueError(f"a prompt + response is {longest} tokens, more than the reward "
                       f"model's max_seq_len={self.model_cfg.max_seq_len}; shorten it.")
    return min(max(16, 1 << (longest - 1).bit_length()), self.model_cfg.max_seq_len)

  def __call__(self, prompts: Sequence[str], responses: Sequence[str], *,
               systems: Sequence[str] | None = None) -> np.ndarray:
    if len(prompts) != len(responses):
      raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses; pass one "
                       "prompt per response.")
    if not responses:
      return np.zeros((0,), np.float32)
    records = [prompts_lib.PromptRecord(prompt=p, answer="",
                                        system=systems[i] if systems else "")
               for i, p in enumerate(prompts)]
    rows = encode_responses(self.tokenizer, records, responses, self.fmt,
                            seq_len=self._length(records, responses))
    shards = (1 if self.mesh is None
              else axes_size(dict(self.mesh.shape), BATCH_AXES))
    size = -(-self.batch_size // shards) * shards
    n, out = len(responses), []
    index = np.concatenate([np.arange(n), np.zeros(-n % size, np.int64)])
    for i in range(0, len(index), size):
      batch = _place({k: v[index[i:i + size]] for k, v in rows.items()}, self._sharding)
      out.append(np.asarray(jax.device_get(self._scores(self.variables, self.value_head,
                                                         batch))))
    return np.concatenate(out)[:n].astype(np.float32)

  def score(self, prompt: str, response: str) -> float:
    return float(self([prompt], [response])[0])


def load_reward_model(workdir: str, step: int | None = None, *, batch_size: int = 16,
                      mesh=None, rules=None) -> RewardModel:
  """The reward model of a reward-model run (objective="reward_model") in
  `workdir`, its latest checkpoint (or `step`), as a `RewardModel` scorer;
  on `mesh` (parallel.setup) its parameters sharded by `rules`. ValueError
  naming the field for a run of another objective."""
  ckpts = checkpoint.Checkpoints.existing(workdir)
  try:
    step = ckpts.latest_step() if step is None else step
    meta = ckpts.saved_meta(step)
    model_cfg = ModelConfig.from_dict(meta["model_config"])
    train_cfg = TrainConfig.from_saved(meta["train_config"])
    if train_cfg.objective != "reward_model":
      raise ValueError(f"{workdir!r} is a run of objective={train_cfg.objective!r}, not a "
                       "reward model; give the workdir of a run with "
                       "--config.objective=reward_model (launch/configs/reward_model.py).")
    state, _ = ckpts.restore(reward_model_abstract(model_cfg, train_cfg, mesh, rules), step)
  finally:
    ckpts.close()
  model, head = _split_head(state.params)
  return RewardModel(model_cfg=model_cfg, train_cfg=train_cfg,
                     variables={"params": model, "router_bias": state.router_bias},
                     value_head=head, tokenizer=run_tokenizer(model_cfg, train_cfg),
                     fmt=prompt_format(train_cfg), step=int(step), batch_size=batch_size,
                     mesh=mesh, rules=rules)
