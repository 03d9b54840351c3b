"""The run harness: one loop, with checkpoints, signals, logs and evals, for every trainer.

A trainer (pretraining / SFT: loop.train, which SFT on rejection-sampled
records and distillation also are; GRPO: rl.trainer.train_grpo) hands the
harness a `Task`, i.e. what makes it that trainer:

  step(state, batch) -> (state, metrics)   the update, dispatched (metrics may
                                           stay on device: read one step late)
  batches.next(step, state) -> batch       the batch source (GRPO's rollouts
                                           read the policy); its position goes
                                           into each checkpoint (state/restore)
  evaluate(state, step) -> {eval_*: ...}   held-out evaluation (or None)
  scalars / line                           how its metrics read: host scalars
                                           for metrics.jsonl, the progress line

and the harness does the rest, the same way for all of them:

    with Run(workdir, model_cfg, config_dict, settings, mesh=mesh, log=log) as run:
      state = run.start(model_cfg, train_cfg, rules, fresh=...)   # resume, or fresh
      result = run.train(task, state)

  `Run(...)`     the workdir, its checkpoints (a workdir of another model is
                 refused), SIGTERM / SIGINT handlers (single process), and on
                 exit: handlers put back, logs flushed, checkpoints closed; a
                 multi-process JaxRuntimeError becomes PeerLostError
  `run.start`    the latest checkpoint (start.resume_or_start: pipeline relayout,
                 schedule check), else `fresh()` (init_from / init_from_hf)
  `run.train`    the loop below, then the final checkpoint and final eval

  for step in start+1 .. end:
    batch = task.batches.next(step, state)
    state, m = task.step(state, batch)          # the device runs; the host goes on
    record the previous step's metrics          # NaN/Inf policy, metrics.jsonl, TB, log
    at a log line, eval, checkpoint or signal: record this step now, evaluate,
      checkpoint (data position + bad-step counters in its meta), stop on a signal

Policies (Settings, from the trainer's config): checkpoints every ckpt_every
steps and at the end, keep_ckpts kept (+ every keep_every-th), written in the
background; a non-finite step is skipped by the step (make_update_step's
skip_nonfinite) and counted here: max_bad_steps in a row stop the run with
FloatingPointError (0: the first non-finite step stops it), the counters
live in the checkpoint, so a resume continues them; SIGTERM / SIGINT (or,
multi-process, JAX's preemption notice) -> a checkpoint at the step reached,
`stopped_by` set, a normal return (the launchers exit 0); evaluations every
eval_every steps, at the last step (once: a resumed run that has it in
metrics.jsonl does not redo it), and at step 0 with eval_at_start; only
process 0 logs and writes files.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import signal
import threading
import time
from typing import Any, Callable, Protocol

import jax
import numpy as np
from jax.experimental import multihost_utils

from deepseek_jax.config import ModelConfig
from deepseek_jax.files import atomic_json
from deepseek_jax.parallel import distributed
from deepseek_jax.parallel.pipeline_layout import layout_sizes, state_layout
from deepseek_jax.train import checkpoint, metrics
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.start import resume_or_start


@dataclasses.dataclass(frozen=True)
class Settings:
  """The loop's policies (TrainConfig's fields of the same names document
  them); `Settings.of(cfg)` reads them from any config that has them.
  stop_after: end this call after that step, with a checkpoint, as if
  preempted there (tests). eval_at_start: also evaluate at step 0 (GRPO's
  "before")."""
  steps: int
  stop_after: int | None = None
  log_every: int = 10
  eval_every: int = 0
  ckpt_every: int = 100
  keep_ckpts: int = 3
  keep_every: int = 0
  async_checkpoints: bool = True
  max_bad_steps: int = 10
  summary_steps: int = 1000
  eval_at_start: bool = False

  @classmethod
  def of(cls, cfg: Any, **overrides: Any) -> "Settings":
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)
              if hasattr(cfg, f.name)}
    return cls(**{**values, **overrides})

  @property
  def end(self) -> int:
    return self.steps if self.stop_after is None else min(self.stop_after, self.steps)


class Batches(Protocol):
  """A trainer's batch source. `state()` is its position, saved with each
  checkpoint; its "step" (batches drawn) must equal the checkpoint's step."""

  def next(self, step: int, state: Any) -> Any: ...

  def state(self) -> dict[str, Any]: ...

  def restore(self, saved: dict[str, Any]) -> None: ...


def float_scalars(step: int, m: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
  """The default `Task.scalars`: every metric as a float, nothing else."""
  return {k: float(v) for k, v in m.items()}, {}


@dataclasses.dataclass
class Task:
  """What a trainer supplies to `Run.train` (module docstring).

  scalars(step, host metrics) -> (scalars for the history, metrics.jsonl and
    TensorBoard; extra values for metrics.jsonl only, e.g. per-layer lists).
    Scalars named loss, grad_norm and (with skipping on) skipped drive the
    NaN/Inf policy; `tokens`, when present, gives tokens/s (and MFU).
  line(step, scalars, eta seconds) -> the progress line.
  evaluate(state, step) -> eval metrics, every name starting with "eval_"
    (how metrics.jsonl's eval records are told apart); it logs its own line.
  mfu_scale: FLOPs per token / (devices x peak FLOP/s): mfu = tokens/s x it
    (0 = no MFU).
  """
  step: Callable[[Any, Any], tuple[Any, dict]]
  batches: Batches
  line: Callable[[int, dict[str, float], float], str]
  evaluate: Callable[[Any, int], dict[str, Any]] | None = None
  scalars: Callable[[int, dict], tuple[dict[str, float], dict[str, Any]]] = float_scalars
  mfu_scale: float = 0.0


@dataclasses.dataclass
class Result:
  """What `Run.train` leaves: the final state and step, the last
  summary_steps steps' scalars (`history`), every eval record of the run
  (`evals`, from metrics.jsonl; on processes other than 0 this call's),
  the last step's scalars, the bad-step count, seconds spent in the loop."""
  state: Any
  final_step: int
  resumed_from: int | None
  stopped_by: str | None
  history: list[dict[str, float]]
  evals: list[dict[str, Any]]
  last: dict[str, float] | None
  bad_steps: int
  seconds: float


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


class BadSteps:
  """The NaN/Inf policy. A step the update skipped (`skipped` = 1: its loss
  or gradients were not finite; parameters, optimizer state and router
  biases kept) is counted; max_bad_steps in a row raise FloatingPointError.
  Without skipping (max_bad_steps=0) a non-finite loss or gradient norm
  raises at once, before that step's state can be checkpointed. The counters
  are saved with every checkpoint (`state`) and restored on resume."""

  def __init__(self, max_bad_steps: int, saved: dict[str, Any],
               ckpts: checkpoint.Checkpoints, log: Callable[[str], None]):
    self.max_bad_steps, self.ckpts, self.log = max_bad_steps, ckpts, log
    self.in_a_row = int(saved.get("bad_in_a_row", 0))
    self.total = int(saved.get("bad_steps", 0))

  def state(self) -> dict[str, int]:
    return {"bad_in_a_row": self.in_a_row, "bad_steps": self.total}

  def _where(self) -> str:
    return f"step {self.ckpts.latest_step()} in {self.ckpts.directory}"

  def check(self, step: int, scalars: dict[str, float]) -> None:
    """Counts step `step` (adds `bad_steps` to scalars when skipping is on)."""
    loss, grad_norm = scalars["loss"], scalars["grad_norm"]
    skipped = bool(scalars.get("skipped", 0.0))
    if not skipped and not (np.isfinite(loss) and np.isfinite(grad_norm)):
      # A non-finite gradient has already poisoned the new parameters.
      ce = f"ce={scalars['ce']}, " if "ce" in scalars else ""
      raise FloatingPointError(
          f"loss={loss} at step {step} ({ce}grad_norm={grad_norm}); stopping. The last "
          f"good checkpoint is {self._where()}; lower lr or raise warmup_steps.")
    if skipped:
      self.in_a_row, self.total = self.in_a_row + 1, self.total + 1
      self.log(f"step {step}: loss={loss}, grad_norm={grad_norm}: not finite, update "
               f"skipped ({self.in_a_row} in a row; the run stops at max_bad_steps="
               f"{self.max_bad_steps})")
      if self.in_a_row >= self.max_bad_steps:
        raise FloatingPointError(
            f"{self.in_a_row} consecutive non-finite steps (the last: step {step}, "
            f"loss={loss}, grad_norm={grad_norm}); stopping. The parameters are still "
            f"those of step {step - self.in_a_row}; the last checkpoint is "
            f"{self._where()}; lower lr or raise warmup_steps.")
    else:
      self.in_a_row = 0
    if "skipped" in scalars:
      scalars["bad_steps"] = float(self.total)


class Run:
  """One call of a trainer in `workdir` (module docstring); a context manager.

  config: the train config dict saved in every checkpoint's meta (compared
  on resume: differences are reported, a different model_cfg is refused).
  mesh: the training mesh (None: one device); on a pipe mesh the checkpoint
  records its stage layout.
  """

  def __init__(self, workdir: str, model_cfg: ModelConfig, config: dict[str, Any],
               settings: Settings, *, mesh=None, log: Callable[[str], None] = print):
    if os.path.exists(workdir) and not os.path.isdir(workdir):
      raise ValueError(f"workdir {workdir!r} is a file, not a directory; pass a new "
                       "directory, or one of an earlier run to resume it.")
    self.workdir, self.settings, self.mesh = workdir, settings, mesh
    self.multiprocess = jax.process_count() > 1
    self.primary = distributed.is_primary()
    self.log = log if self.primary else (lambda line: None)
    self.created_workdir = not os.path.exists(workdir)
    os.makedirs(workdir, exist_ok=True)
    self.ckpts, diff = checkpoint.open_checkpoints(
        workdir, model_cfg, config, every=settings.ckpt_every, keep=settings.keep_ckpts,
        keep_every=settings.keep_every, async_save=settings.async_checkpoints)
    # On a pipe mesh the state stores each stage's blocks on its own ranks
    # (`start` sets the layout of the run's pipeline schedule).
    self.ckpts.pipeline_stages = layout_sizes(state_layout(model_cfg, mesh))
    self.stop: StopSignals | None = None
    self.writer: metrics.MetricsWriter | None = None
    self.saved: dict[str, Any] = {}
    self.resumed_from: int | None = None
    if diff:
      self.log("note: the config differs from the checkpointed run: " + "; ".join(diff))

  def __enter__(self) -> "Run":
    self.stop = StopSignals(install=not self.multiprocess)
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    # A collective whose peer died fails at once; saying so beats a trace of
    # gloo internals. Closing the checkpoint manager would wait for the peer.
    peer_lost = self.multiprocess and isinstance(exc, jax.errors.JaxRuntimeError)
    self.stop.restore()
    if self.writer is not None:
      self.writer.close()
    if not peer_lost:
      self.ckpts.close()
      if exc is not None and self.primary:
        self._remove_if_empty()
      return
    latest = self.ckpts.latest_step()
    raise distributed.PeerLostError(
        f"process {jax.process_index()} of {jax.process_count()} lost contact with another "
        f"process ({str(exc).splitlines()[0][:300]}). Relaunch all processes with the same "
        f"workdir to resume from "
        + (f"step {latest}" if latest is not None else "the start (no checkpoint yet)")
        + f" in {self.ckpts.directory}.") from exc

  def _remove_if_empty(self) -> None:
    """After a failed start: no empty checkpoints/ (nor a workdir this run
    created and left empty) stays behind to look like a run."""
    for path in (self.ckpts.directory, self.workdir if self.created_workdir else None):
      try:
        if path and os.path.isdir(path) and not os.listdir(path):
          os.rmdir(path)
      except OSError:
        pass

  def write_json(self, name: str, obj: Any) -> None:
    """workdir/name, written atomically by process 0 (e.g. the resolved configs)."""
    if self.primary:
      atomic_json(obj, os.path.join(self.workdir, name))

  def start(self, model_cfg: ModelConfig, train_cfg: TrainConfig, rules, *,
            fresh: Callable[[], Any]) -> Any:
    """The state to train from: the latest checkpoint's (its data position and
    bad-step counters kept for `train`), or `fresh()` when there is none."""
    self.ckpts.pipeline_stages = layout_sizes(
        state_layout(model_cfg, self.mesh, train_cfg.pipeline_schedule))
    state, self.saved, self.resumed_from = resume_or_start(
        self.ckpts, model_cfg, train_cfg, self.mesh, rules, fresh=fresh, log=self.log)
    return state

  @property
  def start_step(self) -> int:
    return self.resumed_from or 0

  def train(self, task: Task, state: Any) -> Result:
    """The loop from start_step to settings.end, the final checkpoint, and the
    final evaluation when the run reached settings.steps (module docstring)."""
    if self.resumed_from is not None:
      task.batches.restore(self.saved)
      if task.batches.state().get("step") != self.resumed_from:
        raise ValueError(f"checkpoint step {self.resumed_from} and data iterator step "
                         f"{task.batches.state().get('step')} disagree; the checkpoint "
                         "is corrupt.")
    self._begin(task)
    if self.settings.eval_at_start and self.start_step == 0:
      self._evaluate_once(0, state)
      if self.writer:
        self.writer.flush()   # step 0's eval survives a kill before the first checkpoint
    with metrics.CompileCounter() as self.compiles:
      state, step = self._loop(task, state)
    self._save(step, state, force=True)
    if step == self.settings.steps and self.stop.received is None:
      self._evaluate_once(step, state)
    if self.writer:
      self.writer.close()     # flushes the TensorBoard events
    return Result(state=state, final_step=step, resumed_from=self.resumed_from,
                  stopped_by=self.stop.received, history=list(self.history),
                  evals=self._evals(), last=self.last, bad_steps=self.bad.total,
                  seconds=time.time() - self.t_start)

  # -- the loop ---------------------------------------------------------------
  def _begin(self, task: Task) -> None:
    s = self.settings
    self.task = task
    self.writer = metrics.MetricsWriter(self.workdir, self.start_step) if self.primary else None
    self.bad = BadSteps(s.max_bad_steps, self.saved, self.ckpts, self.log)
    self.progress = metrics.Progress(self.start_step, s.end)
    # The summary keeps the last summary_steps steps; metrics.jsonl has all.
    self.history = collections.deque(maxlen=s.summary_steps)
    self.last: dict[str, float] | None = None
    self.evals_here: list[dict[str, Any]] = []   # what non-primary processes report
    self.t_start = time.time()

  def _loop(self, task: Task, state: Any) -> tuple[Any, int]:
    step, end, pending = self.start_step, self.settings.end, None
    for step in range(self.start_step + 1, end + 1):
      compiled = self.compiles.count
      batch = task.batches.next(step, state)
      state, m = task.step(state, batch)    # dispatched; runs while the host goes on
      compiled = self.compiles.count - compiled   # compilation happens at dispatch
      if pending is not None:
        self._record(*pending)
      pending = (step, m, compiled)
      if self.stop.received is None and self.multiprocess and \
          self.ckpts.reached_preemption(step):
        self.stop.received = "SIGTERM (preemption, all processes)"
      if not self._pause_due(step):
        continue
      self._record(*pending)
      pending = None
      paused = time.time()
      if self._eval_due(step):
        self._evaluate(step, state)
      self._save(step, state, force=step == end or self.stop.received is not None)
      self.progress.exclude(time.time() - paused)   # eval/checkpoint time is not step time
      if self.stop.received is not None:
        self.log(f"stopped by {self.stop.received} after step {step}: checkpoint written to "
                 f"{self.ckpts.directory}; rerun with the same workdir to resume from step "
                 f"{step}")
        break
    return state, step

  def _log_due(self, step: int) -> bool:
    return (step % self.settings.log_every == 0 or step == self.settings.end
            or step == self.start_step + 1)

  def _eval_due(self, step: int) -> bool:
    s = self.settings
    return bool(self.task.evaluate and s.eval_every and step % s.eval_every == 0
                and step != s.steps)

  def _pause_due(self, step: int) -> bool:
    """Whether the host waits for `step` now: its metrics are recorded at once
    (a log line, eval or checkpoint follows), not one step late."""
    return (self._log_due(step) or self._eval_due(step) or self.ckpts.due(step)
            or self.stop.received is not None)

  def _record(self, step: int, m: dict, compiled: int = 0) -> None:
    """The host side of one step: its metrics (+ `compiles`: the programs
    compiled while the step's batch was made and its update dispatched), the
    NaN/Inf policy, logs."""
    scalars, extra = self.task.scalars(step, jax.device_get(m))
    scalars["compiles"] = float(compiled)
    if compiled and step > self.start_step + 1:
      self.log(f"step {step}: {compiled} new compilation(s) (a new shape or setting); "
               "a steady run compiles only in its first step")
    self.bad.check(step, scalars)
    self.history.append({"step": step, **scalars})
    self.last = scalars
    self.progress.add(scalars.get("tokens", 0.0))
    if step == self.start_step + 1:           # compilation: keep it out of tokens/s
      self.log(f"first step (compile + run) took {time.time() - self.t_start:.1f}s")
      self.progress.restart_window(step)
    if self._log_due(step):
      tps, eta = self.progress.report(step)
      if "tokens" in scalars:
        scalars["tokens_per_s"] = tps
        if self.task.mfu_scale:
          scalars["mfu"] = tps * self.task.mfu_scale
      self.log(self.task.line(step, scalars, eta))
    if self.writer:
      self.writer.write(step, {**scalars, **extra})

  def _save(self, step: int, state: Any, *, force: bool) -> None:
    if self.ckpts.saved(step) or not (force or self.ckpts.due(step)):
      return
    if self.writer:
      self.writer.flush()       # the logs up to a checkpoint survive any later kill
    self.ckpts.save(step, state, {**self.task.batches.state(), **self.bad.state()},
                    force=force)

  # -- evaluation -------------------------------------------------------------
  def _evaluate(self, step: int, state: Any) -> None:
    result = self.task.evaluate(state, step)
    self.evals_here.append({"step": step, **result})
    if self.writer:
      self.writer.write(step, result)

  def _evals(self) -> list[dict[str, Any]]:
    """The eval records of the whole run (resumed calls included)."""
    if not self.writer:
      return list(self.evals_here)
    return [r for r in metrics.read_metrics(self.writer.path)
            if any(k.startswith("eval_") for k in r)]

  def _evaluate_once(self, step: int, state: Any) -> None:
    """Evaluates at `step` unless metrics.jsonl already has it. Every process
    takes the same decision (decoding is collective): process 0 decides."""
    if not self.task.evaluate:
      return
    need = not any(e["step"] == step for e in self._evals())
    if self.multiprocess:
      need = bool(multihost_utils.broadcast_one_to_all(np.asarray(need)))
    if need:
      self._evaluate(step, state)
