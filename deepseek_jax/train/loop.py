"""The trainer: `train(model_cfg, train_cfg, workdir)` (one device, a mesh, or many processes).

Used by `launch/train.py` and by notebooks alike; it reads no flags or
environment. The sections of `train` follow big_vision's trainer:

  1. workdir + checkpoints: refuse a workdir trained with another model
  2. input: tokenizer, documents, packed rows, the resumable BatchIterator;
     the first batch is validated on the host before anything compiles
  3. model + update step: TrainState, the jitted step (step.py)
  4. resume: the latest checkpoint's state and data position, if any
  5. evaluation: greedy-decode exact match on held-out problems
  6. the loop: step, NaN check, log, evaluate, checkpoint
  7. wrap-up: final checkpoint, final eval, loss.png, the summary dict
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax import parallel
from deepseek_jax.config import ModelConfig
from deepseek_jax.data import pipeline, tasks
from deepseek_jax.data.tokenizer import default_tokenizer, load_tokenizer
from deepseek_jax.model import abstract_variables, count_params
from deepseek_jax.parallel import MeshConfig, distributed
from deepseek_jax.parallel.pipeline import (layout_from_sizes, layout_sizes, stage_tree,
                                            state_layout, unstage_tree)
from deepseek_jax.train import checkpoint, evaluate, flops, hf_init, metrics
from deepseek_jax.train.config import TrainConfig, schedule_changes  # noqa: F401 (re-exported)
from deepseek_jax.train.step import (abstract_train_state, init_train_state,
                                     make_train_step, model_variables, state_shardings,
                                     v2_balance_devices)


def check_compatible(model_cfg: ModelConfig, train_cfg: TrainConfig) -> None:
  """Cross-config checks (each config validates itself on construction)."""
  if train_cfg.seq_len > model_cfg.max_seq_len:
    raise ValueError(f"seq_len={train_cfg.seq_len} exceeds the model's max_seq_len="
                     f"{model_cfg.max_seq_len}; lower seq_len or raise model.max_seq_len.")
  v2_balance_devices(model_cfg, train_cfg)    # balance_devices must divide the experts


# ModelConfig fields a run may change from the run it starts from (init_from):
# the context extension (YaRN) and how the same weights are computed.
INIT_FROM_MAY_CHANGE = (("max_seq_len", "rope_factor", "beta_fast", "beta_slow", "mscale",
                         "dtype", "param_dtype", "init_std")
                        + checkpoint.IMPLEMENTATION_FIELDS)


def load_init_from(model_cfg: ModelConfig, workdir: str) -> tuple[dict, int]:
  """(variables, step) of the latest checkpoint of the run in `workdir`.

  ValueError when that run's model differs from model_cfg in a field outside
  INIT_FROM_MAY_CHANGE (shapes or the function computed).
  """
  from deepseek_jax.train import export  # noqa: PLC0415  (export imports this module)
  export.require_run(workdir, "init_from")
  src_cfg, _, variables, src_step = export.load_trained_run(workdir)
  src, dst = src_cfg.to_dict(), model_cfg.to_dict()
  bad = [f"{k}: {src[k]!r} -> {dst[k]!r}" for k in dst
         if k not in INIT_FROM_MAY_CHANGE and src.get(k) != dst[k]]
  if bad:
    raise ValueError(f"init_from={workdir!r}: its model differs in " + "; ".join(bad)
                     + f". Only {INIT_FROM_MAY_CHANGE} may change; set the others "
                     "as that run had them.")
  return variables, src_step


def with_variables(state, variables: dict, layout=None):
  """state with `variables`' params and router biases (the model's layout),
  cast to and placed like state's (any mesh, any process count); `layout`:
  the state's stage layout on a pipe mesh (`state_layout`), None otherwise."""
  if layout is not None:
    variables = stage_tree(layout, jax.tree.map(np.asarray, jax.device_get(variables)))

  def place(new, old):
    host = np.asarray(jax.device_get(new)).astype(old.dtype)
    if not old.committed:   # one device: stay uncommitted like the rest of the
      return jnp.asarray(host)   # state, or the step compiles a second time
    return jax.make_array_from_callback(old.shape, old.sharding, lambda idx: host[idx])
  return state.replace(
      params=jax.tree.map(place, variables["params"], state.params),
      router_bias=jax.tree.map(place, variables["router_bias"], state.router_bias))


def restore_relayout(ckpts, model_cfg: ModelConfig, train_cfg: TrainConfig, mesh, rules,
                     saved_layout, layout):
  """(state, data state) of the latest checkpoint, saved in stage layout
  `saved_layout` (None: the model's own), converted to `layout` (a resume on
  another pipe count, or without one): read whole on every device, then
  re-split and placed in the state's shardings."""
  target = abstract_train_state(model_cfg, train_cfg, layout=saved_layout)
  if mesh is not None:
    whole = NamedSharding(mesh, P())
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=whole),
                          target)
  state, saved = ckpts.restore(target)

  def convert(st):
    st = unstage_tree(saved_layout, st) if saved_layout is not None else st
    return stage_tree(layout, st) if layout is not None else st
  out = (None if mesh is None
         else state_shardings(model_cfg, train_cfg, mesh, rules))
  return jax.jit(convert, out_shardings=out)(state), saved


def mesh_for(mesh_cfg: MeshConfig | None, train_cfg: TrainConfig, model_cfg=None):
  """(mesh, rules) for training, or (None, None) for one device; checks that
  the batch splits over the batch axes (and, with a pipe axis, that the
  model, schedule and micro-batches fit the pipeline: pass model_cfg) before
  anything compiles."""
  if mesh_cfg is None:
    return None, None
  mesh_cfg.shape(len(jax.devices()))          # axis sizes vs devices: ValueError
  if len(jax.devices()) == 1:
    return None, None
  mesh, rules = parallel.setup(mesh_cfg)
  rows = parallel.rules.axes_size(dict(mesh.shape), parallel.rules.BATCH_AXES)
  if train_cfg.batch_size % rows:
    raise ValueError(f"batch_size={train_cfg.batch_size} must be a multiple of the batch "
                     f"mesh axes data*fsdp*expert={rows} ({describe_mesh(mesh)}).")
  if mesh_cfg.pipe > 1:
    from deepseek_jax.parallel.pipeline import check_pipeline, split_layers
    from deepseek_jax.train.step import num_microbatches
    m = num_microbatches(train_cfg, mesh_cfg.pipe)
    check_pipeline(model_cfg, train_cfg, mesh_cfg.pipe, train_cfg.pipeline_schedule, m)
    if model_cfg is not None:
      split_layers(model_cfg, mesh_cfg.pipe)
    if train_cfg.batch_size % (m * rows):
      raise ValueError(
          f"batch_size={train_cfg.batch_size} must be a multiple of num_microbatches x the "
          f"batch mesh axes = {m} x {rows} (each micro-batch splits over data*fsdp*expert); "
          f"raise batch_size to a multiple of {m * rows} or change num_microbatches.")
  return mesh, rules


def describe_mesh(mesh) -> str:
  return " ".join(f"{a}={n}" for a, n in mesh.shape.items()) + f" ({mesh.size} devices)"


CONFIG_FILE = "config.json"


def _write_json(path: str, obj: Any) -> None:
  """Writes JSON atomically (temp file + rename)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
    f.write("\n")
  os.replace(tmp, path)


class StopSignals:
  """SIGTERM / SIGINT -> finish the step in flight, checkpoint it, return.

  Single-process runs only (in the main thread): the handlers record the
  first signal; later ones (e.g. a second Ctrl-C while the checkpoint is
  written) are ignored, so a save is never interrupted. Under
  jax.distributed JAX's preemption service owns SIGTERM, and every process
  must stop at the same step: the loop polls Checkpoints.reached_preemption
  instead (a local handler here would desynchronise the processes).
  """

  def __init__(self, install: bool):
    self.received: str | None = None
    self._previous = {}
    if install and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    if self.received is None:
      self.received = signal.Signals(signum).name

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}


@dataclasses.dataclass
class Data:
  iterator: pipeline.BatchIterator
  tokenizer: Any
  eval_problems: list[tasks.Problem]
  n_documents: int
  sft: bool = False       # prompt/completion records: loss on the completions only


def build_data(model_cfg: ModelConfig, train_cfg: TrainConfig) -> Data:
  """Tokenizer + packed rows + iterator (+ held-out problems for the task)."""
  tok = (load_tokenizer(train_cfg.tokenizer_path) if train_cfg.tokenizer_path
         else default_tokenizer())
  if tok.vocab_size > model_cfg.vocab_size:
    raise ValueError(f"the tokenizer has {tok.vocab_size} ids but vocab_size="
                     f"{model_cfg.vocab_size}; set model.vocab_size >= {tok.vocab_size}.")
  sft = False
  if train_cfg.data_files:
    docs, sft = pipeline.load_documents(tok, train_cfg.data_files,
                                        text_field=train_cfg.text_field)
    if train_cfg.fim_rate:
      if sft:
        raise ValueError(f"fim_rate={train_cfg.fim_rate} rewrites plain-text documents; the "
                         "data files hold prompt/completion records: set fim_rate=0.")
      fim_ids = tok.fim_ids()
      fim_rng = np.random.default_rng([train_cfg.seed, 0xF1])
      docs = [pipeline.fim_transform(d, fim_rng, rate=train_cfg.fim_rate, fim_ids=fim_ids)
              for d in docs]
    rows = pipeline.pack_documents(docs, train_cfg.seq_len, pad_id=tok.pad_id,
                                   completion_only=sft or train_cfg.completion_only)
    eval_problems, n_docs = [], len(docs)
    if train_cfg.eval_task:
      eval_problems = tasks.generate_problems(
          train_cfg.n_eval_problems, seed=train_cfg.seed, split="test",
          max_digits=train_cfg.max_digits, kinds=train_cfg.task_kinds,
          context_chars=(train_cfg.passkey_chars
                         or pipeline.passkey_room(tok, train_cfg.seq_len, train_cfg.template)))
  else:
    ds = pipeline.make_task_dataset(
        tok, n_train=train_cfg.n_train_problems, n_test=train_cfg.n_eval_problems,
        seq_len=train_cfg.seq_len, seed=train_cfg.seed, max_digits=train_cfg.max_digits,
        template=train_cfg.template, completion_only=train_cfg.completion_only,
        kinds=train_cfg.task_kinds, context_chars=train_cfg.passkey_chars,
        kind_mix=train_cfg.kind_mix)
    rows, eval_problems, n_docs = ds.train_rows, ds.test_problems, ds.n_train_documents
  it = pipeline.BatchIterator(rows, train_cfg.batch_size, seed=train_cfg.seed)
  return Data(iterator=it, tokenizer=tok, eval_problems=eval_problems, n_documents=n_docs,
              sft=sft)


def train(model_cfg: ModelConfig, train_cfg: TrainConfig, workdir: str, *,
          mesh_cfg: MeshConfig | None = None, stop_after: int | None = None,
          log: Callable[[str], None] = print) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds checkpoints) up to train_cfg.steps.

  mesh_cfg: the device mesh and sharding rule set (parallel.MeshConfig); None
    or a mesh of one device trains on one device. Checkpoints restore onto
    any mesh, whatever mesh wrote them.
  stop_after: end this call after that global step, with a checkpoint, as if
    the job were preempted there; a later call resumes (used by tests).
  log: where progress lines go.

  Multi-process runs (parallel.distributed.initialize first; one call per
  process, same arguments everywhere): each process feeds only its rows of
  every global batch, so the global batch equals the single-process one;
  only process 0 logs and writes metrics.jsonl and loss.png (the summary's
  `eval` on other processes lists this call's evaluations only); a peer that
  dies raises distributed.PeerLostError.

  SIGTERM / SIGINT (or, multi-process, JAX's preemption notice) end the call
  after the step in flight with a checkpoint at that step (`stopped_by` in
  the summary names the signal; launch.train then exits 0); rerunning
  resumes from exactly there.

  Returns a summary: final_step, final_loss, eval (list of {step, accuracy,
  format_ok} of the whole run, from metrics.jsonl), history (per-step scalar
  metrics of this call), expert_load
  (np.ndarray [steps of this call, n_moe_layers, E]), samples (a few
  decoded completions of the last eval), resumed_from (step or None),
  workdir.

  Raises FloatingPointError after max_bad_steps consecutive non-finite
  steps (each one skipped until then), or at once with max_bad_steps=0 (the
  last good checkpoint stays the latest one), ValueError on bad configs or
  data.
  """
  check_compatible(model_cfg, train_cfg)
  mesh, rules = mesh_for(mesh_cfg, train_cfg, model_cfg)
  end_step = train_cfg.steps if stop_after is None else min(stop_after, train_cfg.steps)
  multiprocess = jax.process_count() > 1
  primary = distributed.is_primary()
  if not primary:
    log = lambda line: None  # noqa: E731

  # 1. Workdir and checkpoints -------------------------------------------------
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"workdir {workdir!r} is a file, not a directory; pass a new "
                     "directory, or one of an earlier run to resume it.")
  os.makedirs(workdir, exist_ok=True)
  ckpts, train_diff = checkpoint.open_checkpoints(
      workdir, model_cfg, train_cfg.to_dict(), every=train_cfg.ckpt_every,
      keep=train_cfg.keep_ckpts, keep_every=train_cfg.keep_every,
      async_save=train_cfg.async_checkpoints)
  # On a pipe mesh the state stores each stage's blocks on its own ranks.
  layout = state_layout(model_cfg, mesh)
  ckpts.pipeline_stages = layout_sizes(layout)
  peer_lost = False
  stop = StopSignals(install=not multiprocess)
  writer = None
  try:
    if train_diff:
      log("note: the config differs from the checkpointed run: " + "; ".join(train_diff))

    # 2. Input -----------------------------------------------------------------
    data = build_data(model_cfg, train_cfg)
    pipeline.validate_batch(data.iterator.batch_at(0), model_cfg.vocab_size,
                            model_cfg.max_seq_len)
    log(f"data: {data.n_documents} "
        + ("prompt/completion records (loss on completions only)" if data.sft else "documents")
        + f" in {data.iterator.n_rows} rows of "
        f"{train_cfg.seq_len} tokens, {data.iterator.steps_per_epoch} steps/epoch; "
        f"{len(data.eval_problems)} held-out problems")

    # 3. Mesh, model and update step -------------------------------------------
    if mesh is not None:
      log(f"mesh: {describe_mesh(mesh)}, rules {mesh_cfg.rules}")
    rng = jax.random.key(train_cfg.seed)
    if mesh is None:
      next_batch = lambda: next(data.iterator)  # noqa: E731
    else:   # this process's rows only, assembled into the global batch
      batch_sh = parallel.batch_sharding(mesh, rules)
      lo, hi = distributed.process_rows(batch_sh, (train_cfg.batch_size, train_cfg.seq_len))
      next_batch = lambda: distributed.put_batch(  # noqa: E731
          data.iterator.next_rows(lo, hi), batch_sh, train_cfg.batch_size)

    # 4. Resume ------------------------------------------------------------------
    resumed_from = ckpts.latest_step()
    saved: dict[str, Any] = {}      # the checkpoint's data/loop state when resuming
    if resumed_from is None and train_cfg.init_from_hf:
      state = hf_init.init_state_from_hf(model_cfg, train_cfg, train_cfg.init_from_hf,
                                         mesh, rules)
      log(f"initialised from {train_cfg.init_from_hf} (HF checkpoint): parameters and "
          "router biases; optimizer and data start fresh")
    elif resumed_from is None:
      init = load_init_from(model_cfg, train_cfg.init_from) if train_cfg.init_from else None
      state = init_train_state(model_cfg, train_cfg, rng, mesh, rules)
      if init is not None:
        state = with_variables(state, init[0], layout)
        log(f"initialised from {train_cfg.init_from} (step {init[1]}): parameters and "
            "router biases; optimizer and data start fresh")
        del init
    else:
      saved_meta = ckpts.saved_meta()
      changed = schedule_changes(saved_meta["train_config"], train_cfg)
      if changed:
        raise ValueError(
            f"the learning-rate schedule differs from the checkpointed run's in {ckpts.directory} "
            f"({'; '.join(changed)}): resuming would bend it mid-run. Keep the saved values "
            "(with decay_steps=0 the cosine runs to `steps`: to extend a run, set decay_steps "
            "to the saved resolved value), or start a new workdir with init_from.")
      saved_stages = saved_meta.get("pipeline_stages")
      if saved_stages == layout_sizes(layout):
        state, saved = ckpts.restore(abstract_train_state(model_cfg, train_cfg, mesh, rules))
      else:
        state, saved = restore_relayout(ckpts, model_cfg, train_cfg, mesh, rules,
                                        layout_from_sizes(model_cfg, saved_stages), layout)
        log(f"checkpoint converted from pipeline stages {saved_stages or 'none'} to "
            f"{layout_sizes(layout) or 'none (mesh.pipe=1)'}")
      data.iterator.restore(saved)
      log(f"resuming from {ckpts.directory} at step {resumed_from}"
          + (f" (ignoring init_from_hf={train_cfg.init_from_hf}: the run's own checkpoint "
             "comes first)" if train_cfg.init_from_hf else ""))
    start = int(state.step)
    if resumed_from is not None and start != data.iterator.step:
      raise ValueError(f"checkpoint step {start} and data iterator step "
                       f"{data.iterator.step} disagree; the checkpoint is corrupt.")
    # Built after the resume: a bad checkpoint or init_from fails before it.
    train_step = make_train_step(model_cfg, train_cfg, mesh, rules)
    n_params = count_params(abstract_variables(model_cfg)["params"])   # without stage padding
    log(f"model: {n_params:,} parameters; training steps {start} -> {end_step} "
        f"of {train_cfg.steps}")
    step_flops = flops.train_flops_per_token(model_cfg, train_cfg.seq_len)
    peak = train_cfg.peak_tflops * 1e12
    if train_cfg.peak_tflops < 0:
      peak = flops.measured_peak_flops()
    n_devices = mesh.size if mesh is not None else 1
    if peak:
      log(f"MFU against {peak / 1e12:.3g} TFLOP/s per device "
          f"({'a measured float32 matmul' if train_cfg.peak_tflops < 0 else 'peak_tflops'}) "
          f"x {n_devices}; {step_flops / 1e6:,.2f} MFLOP per trained token")
    if primary:   # the resolved configs of this call, beside metrics.jsonl
      _write_json(os.path.join(workdir, CONFIG_FILE), {
          "model": model_cfg.to_dict(), "train": train_cfg.to_dict(),
          "mesh": mesh_cfg.to_dict() if mesh_cfg is not None else None,
          "devices": n_devices, "train_flops_per_token": step_flops,
          "peak_flops_per_device": peak or None})

    # 5. Evaluation --------------------------------------------------------------
    run_eval = None
    if data.eval_problems:
      eval_batch = min(train_cfg.eval_batch_size, len(data.eval_problems))

      def run_eval(state):
        variables = model_variables(model_cfg, state, mesh)
        return evaluate.exact_match(variables, data.tokenizer, data.eval_problems, model_cfg,
                                    max_new_tokens=train_cfg.max_new_tokens,
                                    batch_size=eval_batch, template=train_cfg.template,
                                    mesh=mesh)

    # 6. The loop ----------------------------------------------------------------
    writer = metrics.MetricsWriter(workdir, start) if primary else None
    evals_here = []     # this call's evaluations (what non-primary processes report)
    progress = metrics.Progress(start, end_step)
    # The summary keeps the last summary_steps steps; metrics.jsonl has all.
    history = collections.deque(maxlen=train_cfg.summary_steps)
    loads = collections.deque(maxlen=train_cfg.summary_steps)
    samples = []
    t_start = time.time()

    def do_eval(step):
      t = time.time()
      result = run_eval(state)
      samples[:] = result["samples"][:5]
      evals_here.append({"step": step, "accuracy": result["accuracy"],
                         "format_ok": result["format_ok"]})
      kinds = result["by_kind"] if len(result["by_kind"]) > 1 else {}
      if writer:
        writer.write(step, {"eval_accuracy": result["accuracy"],
                            "eval_format_ok": result["format_ok"], "eval_n": result["n"],
                            **{f"eval_accuracy_{k}": v for k, v in kinds.items()}})
      ex = result["samples"][0]
      prompt = ex["prompt"] if len(ex["prompt"]) <= 80 else "..." + ex["prompt"][-60:]
      log(f"eval step {step}: exact match {result['accuracy']:.3f} "
          + (f"[{' '.join(f'{k} {v:.2f}' for k, v in kinds.items())}] " if kinds else "")
          + f"(format ok {result['format_ok']:.3f}, n={result['n']}, "
          f"{time.time() - t:.1f}s); e.g. {prompt} -> {ex['completion']!r}")

    last = None
    # Skipped-step counters live in the checkpoint with the data position, so a
    # streak of bad steps is counted across a resume.
    bad_in_a_row, bad_steps = int(saved.get("bad_in_a_row", 0)), int(saved.get("bad_steps", 0))

    def record(step, m):
      """The host side of one step: its metrics, the finiteness check, logs.
      Called one step late where nothing waits for it (the device runs the
      next step meanwhile), at once before a log line, eval or checkpoint."""
      nonlocal bad_in_a_row, bad_steps, last
      m = jax.device_get(m)
      loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
      skipped = bool(m.get("skipped", 0.0))
      if not skipped and not (np.isfinite(loss) and np.isfinite(grad_norm)):
        # Checked before this step's state can be saved: a non-finite gradient
        # has already poisoned the new parameters (max_bad_steps=0).
        raise FloatingPointError(
            f"loss={loss} at step {step} (ce={float(m['ce'])}, grad_norm={grad_norm}); "
            f"stopping. The last good checkpoint is step {ckpts.latest_step()} in "
            f"{ckpts.directory}; lower lr or raise warmup_steps.")
      if skipped:
        bad_in_a_row, bad_steps = bad_in_a_row + 1, bad_steps + 1
        log(f"step {step}: loss={loss}, grad_norm={grad_norm}: not finite, update skipped "
            f"({bad_in_a_row} in a row; the run stops at max_bad_steps="
            f"{train_cfg.max_bad_steps})")
        if bad_in_a_row >= train_cfg.max_bad_steps:
          raise FloatingPointError(
              f"{bad_in_a_row} consecutive non-finite steps (the last: step {step}, "
              f"loss={loss}, grad_norm={grad_norm}); stopping. The parameters are still "
              f"those of step {step - bad_in_a_row}; the last checkpoint is step "
              f"{ckpts.latest_step()} in {ckpts.directory}; lower lr or raise warmup_steps.")
      else:
        bad_in_a_row = 0
      loads.append(np.asarray(m.pop("expert_load")))
      m.pop("mtp_expert_load", None)
      per_layer = {k: np.asarray(m.pop(k)).tolist()      # V2 balance losses, per layer
                   for k in [k for k in m if k.endswith("_per_layer")]}
      scalars = {k: float(v) for k, v in m.items()}
      if "skipped" in scalars:
        scalars["bad_steps"] = float(bad_steps)
      if train_cfg.mtp_weight_switch_step:
        scalars["mtp_weight"] = mtp_weight_at(step)
      history.append({"step": step, **scalars})
      progress.add(scalars["tokens"])
      last = scalars
      if step == start + 1:           # compilation: keep it out of tokens/s
        log(f"first step (compile + run) took {time.time() - t_start:.1f}s")
        progress.restart_window(step)
      if step % train_cfg.log_every == 0 or step == end_step or step == start + 1:
        tps, eta = progress.report(step)
        scalars["tokens_per_s"] = tps
        if peak:
          scalars["mfu"] = tps * step_flops / (peak * n_devices)
        log(metrics.progress_line(step, train_cfg.steps, scalars, tps, eta))
      if writer:
        writer.write(step, {**scalars, **per_layer})

    def mtp_weight_at(step):   # V3: lambda 0.3, then 0.1 (mtp_weight_switch_step)
      switch = train_cfg.mtp_weight_switch_step
      return train_cfg.mtp_weight_final if switch and step > switch else train_cfg.mtp_weight

    late_step = None        # the step with mtp_weight_final, built at the switch
    pending = None          # (step, device metrics) not yet recorded
    for step in range(start + 1, end_step + 1):
      batch = next_batch()
      if step in train_cfg.nan_steps:
        batch = dict(batch, loss_mask=batch["loss_mask"] * jnp.float32(jnp.nan))
      step_fn = train_step
      if model_cfg.n_mtp_depth and mtp_weight_at(step) != train_cfg.mtp_weight:
        if late_step is None:
          log(f"step {step}: MTP weight {train_cfg.mtp_weight} -> "
              f"{train_cfg.mtp_weight_final} (mtp_weight_switch_step="
              f"{train_cfg.mtp_weight_switch_step})")
          late_step = make_train_step(
              model_cfg, dataclasses.replace(train_cfg, mtp_weight=train_cfg.mtp_weight_final),
              mesh, rules)
        step_fn = late_step
      state, m = step_fn(state, batch)      # dispatched; runs while the host goes on
      if pending is not None:
        record(*pending)
      pending = (step, m)
      if stop.received is None and multiprocess and ckpts.reached_preemption(step):
        stop.received = "SIGTERM (preemption, all processes)"
      eval_due = bool(run_eval and train_cfg.eval_every and step % train_cfg.eval_every == 0
                      and step != train_cfg.steps)
      if not (step == start + 1 or step % train_cfg.log_every == 0 or step == end_step
              or eval_due or ckpts.due(step) or stop.received is not None):
        continue
      record(*pending)
      pending = None
      paused = time.time()
      if eval_due:
        do_eval(step)
      force_save = step == end_step or stop.received is not None
      if writer and (force_save or ckpts.due(step)):
        writer.flush()
      ckpts.save(step, state, {**data.iterator.state(), "bad_in_a_row": bad_in_a_row,
                               "bad_steps": bad_steps},
                 force=force_save)
      progress.exclude(time.time() - paused)   # eval/checkpoint time is not step time
      if stop.received is not None:
        log(f"stopped by {stop.received} after step {step}: checkpoint written to "
            f"{ckpts.directory}; rerun with the same workdir to resume from step {step}")
        break

    # 7. Wrap-up -----------------------------------------------------------------
    final_step = int(state.step)
    ckpts.save(final_step, state, {**data.iterator.state(), "bad_in_a_row": bad_in_a_row,
                                   "bad_steps": bad_steps}, force=True)
    def evals_so_far():   # the whole run's, resumed calls included
      if not writer:
        return list(evals_here)
      return [{"step": r["step"], "accuracy": r["eval_accuracy"],
               "format_ok": r["eval_format_ok"]}
              for r in metrics.read_metrics(writer.path) if "eval_accuracy" in r]
    if run_eval and final_step == train_cfg.steps and stop.received is None:
      # Every process must take the same decision (decoding is collective):
      # process 0 reads metrics.jsonl and tells the others.
      need = not any(e["step"] == final_step for e in evals_so_far())
      if multiprocess:
        need = bool(multihost_utils.broadcast_one_to_all(np.asarray(need)))
      if need:
        do_eval(final_step)
    evals = evals_so_far()
    if writer:
      writer.close()      # flushes the TensorBoard events
    plot = metrics.plot_losses(workdir) if primary else None
    log(f"done: step {final_step}, {time.time() - t_start:.1f}s"
        + (f", loss {last['loss']:.4f}" if last else "")
        + (f", held-out exact match {evals[-1]['accuracy']:.3f}" if evals else "")
        + (f"; plot {plot}" if plot else ""))
    n_moe, n_exp = model_cfg.n_moe_layers, max(model_cfg.n_routed_experts, 1)
    return {
        "final_step": final_step,
        "final_loss": last["loss"] if last else None,
        "eval": evals,
        "history": list(history),
        "expert_load": (np.stack(loads) if loads
                        else np.zeros((0, n_moe, n_exp), np.float32)),
        "samples": samples,
        "resumed_from": resumed_from,
        "stopped_by": stop.received,
        "workdir": workdir,
    }
  except jax.errors.JaxRuntimeError as e:
    if not multiprocess:
      raise
    # A collective whose peer died fails at once; saying so beats a trace of
    # gloo internals. Closing the checkpoint manager would wait for the peer.
    peer_lost = True
    latest = ckpts.latest_step()
    raise distributed.PeerLostError(
        f"process {jax.process_index()} of {jax.process_count()} lost contact with another "
        f"process ({str(e).splitlines()[0][:300]}). Relaunch all processes with the same "
        f"workdir to resume from "
        + (f"step {latest}" if latest is not None else "the start (no checkpoint yet)")
        + f" in {ckpts.directory}.") from e
  finally:
    stop.restore()
    if writer:
      writer.close()
    if not peer_lost:
      ckpts.close()
