"""Token-level distillation through the run harness: TrainConfig.objective "distill".

`train_distill(model_cfg, train_cfg, workdir, ...)` is what launch.train runs
for objective "distill" (its TRAINERS table), with loop.train's signature and
summary. model_cfg is the student; the teacher is train_cfg.distill_teacher
(a training run's workdir or an HF checkpoint directory: distill.load_teacher),
checked against the student (distill.check_pair: its token ids must be the
student's) and the data before anything compiles. Each step:

  batch     the rows SFT would train on (loop.build_data: the task, or
            data_files; prompt/completion records carry the loss on the
            completions only), drawn by the same BatchIterator (seed,
            epoch reshuffle), so a resumed run draws the batches it would have
  teacher   the teacher's top-distill_k next tokens and log-probs at every
            position: a jitted teacher forward per batch (outside the
            student's gradient), or with distill_cache=DIR read from a disk
            cache that the run fills once before its first step (one shard
            per step's batch, distill.cache_teacher_topk; a rerun, or a run
            resumed, reuses the shards there; shards for other tokens are
            refused)
  update    train.step.make_update_step with distill.distill_loss_fn:
            distill_temperature^2 x the top-k forward KL + distill_ce_weight
            x the data's CE (+ balance_weight x an MoE student's balance
            loss; its router bias moves as in pretraining)
  eval      greedy-decode exact match on the task's held-out problems (the
            built-in task, or data_files with eval_task), as loop.train's

The harness (train/runner.py) does the rest: metrics.jsonl (loss, kl, ce,
teacher_mass, tokens, grad_norm, lr; tokens_per_s on log lines), the
progress line, checkpoints (a plain TrainState of the student: launch.generate,
launch.evaluate, init_from read it like an SFT run's), resume, signals, the
NaN/Inf policy; loss.png and config.json in the workdir. One device or a
mesh (data / fsdp / tensor / expert axes: the teacher replicated, its
targets split over the batch axes like the rows); no pipeline.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax import parallel
from deepseek_jax.config import ModelConfig
from deepseek_jax.data import pipeline
from deepseek_jax.parallel import MeshConfig, distributed
from deepseek_jax.train import distill, loop, metrics, runner, start
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.step import compiler_options, make_update_step


def distill_mesh(mesh_cfg: MeshConfig | None, train_cfg: TrainConfig, model_cfg: ModelConfig):
  """(mesh, rules) of a distillation run ((None, None) on one device); a
  pipe mesh is refused before anything compiles."""
  if mesh_cfg is not None and mesh_cfg.pipe > 1:
    raise NotImplementedError(
        f"mesh.pipe={mesh_cfg.pipe}: the pipeline runs the pretraining loss only; "
        "objective='distill' has no pipelined gradient. Use mesh.pipe=1 "
        "(data/fsdp/tensor/expert axes).")
  return start.mesh_for(mesh_cfg, train_cfg, model_cfg)


def check_teacher(teacher_cfg: ModelConfig, student_cfg: ModelConfig, train_cfg: TrainConfig,
                  tokenizer_vocab: int) -> None:
  """One-line ValueErrors (before compiling) unless the teacher reads the
  student's rows: shared token ids (distill.check_pair, distill_k within the
  teacher's vocabulary), every token id of the tokenizer in its embedding,
  rows of seq_len within its context."""
  t = train_cfg.distill_teacher
  if train_cfg.distill_k > teacher_cfg.vocab_size:
    raise ValueError(f"distill_k={train_cfg.distill_k} exceeds the teacher's vocab_size="
                     f"{teacher_cfg.vocab_size} ({t}); lower distill_k.")
  try:
    distill.check_pair(teacher_cfg, student_cfg, train_cfg.distill_k)
  except ValueError as e:
    raise ValueError(f"distill_teacher={t!r}: {e}") from None
  if tokenizer_vocab > teacher_cfg.vocab_size:
    raise ValueError(f"distill_teacher={t!r} has vocab_size={teacher_cfg.vocab_size} but the "
                     f"run's tokenizer has {tokenizer_vocab} ids: the teacher must share the "
                     "student's tokenizer (set tokenizer_path to the teacher's).")
  if train_cfg.seq_len > teacher_cfg.max_seq_len:
    raise ValueError(f"seq_len={train_cfg.seq_len} exceeds distill_teacher={t!r}'s "
                     f"max_seq_len={teacher_cfg.max_seq_len}; lower seq_len.")


def _place(batch: dict[str, np.ndarray], sharding) -> dict:
  """A host global batch on the mesh (this process's rows), rows split over
  the batch axes; unchanged on one device."""
  if sharding is None:
    return batch
  shape = batch["tokens"].shape
  lo, hi = distributed.process_rows(sharding, shape)
  return distributed.put_batch({k: v[lo:hi] for k, v in batch.items()}, sharding, shape[0])


class DistillBatches:
  """The batch source (runner.Batches): the iterator's next rows plus the
  teacher's top-k, from `cache` (a distill.TopKCache, shard = the batch's
  index) or `teacher` (batch -> batch with the targets, on the mesh);
  train_cfg.nan_steps' batches poisoned as in loop.Rows."""

  def __init__(self, iterator: pipeline.BatchIterator, train_cfg: TrainConfig, sharding, *,
               teacher: Callable[[dict], dict] | None = None,
               cache: distill.TopKCache | None = None):
    self.iterator, self.sharding, self.teacher, self.cache = iterator, sharding, teacher, cache
    self.nan_steps = train_cfg.nan_steps

  def next(self, step: int, state) -> dict:
    index = self.iterator.step
    batch = next(self.iterator)
    if self.cache is not None:
      batch = self.cache.add(index, batch)
    batch = _place(batch, self.sharding)
    if self.teacher is not None:
      batch = self.teacher(batch)
    if step in self.nan_steps:
      batch = dict(batch, loss_mask=batch["loss_mask"] * jnp.float32(jnp.nan))
    return batch

  def state(self) -> dict[str, Any]:
    return self.iterator.state()

  def restore(self, saved: dict[str, Any]) -> None:
    self.iterator.restore(saved)


def fill_cache(teacher_cfg: ModelConfig, teacher_vars, data: loop.Data, train_cfg: TrainConfig,
               log: Callable[[str], None]) -> distill.TopKCache:
  """The teacher's top-k of every batch the run draws (steps 1..steps: the
  iterator's batch_at(0..steps-1)) in train_cfg.distill_cache, computed by
  process 0 for the shards not there yet; the others wait for it."""
  tc, directory = train_cfg, train_cfg.distill_cache
  if distributed.is_primary():
    t = time.time()
    have = sum(os.path.exists(distill.shard_path(directory, i)) for i in range(tc.steps))
    batches = (data.iterator.batch_at(i) for i in range(tc.steps))
    distill.cache_teacher_topk(teacher_cfg, teacher_vars, batches, directory, k=tc.distill_k,
                               chunk=tc.distill_chunk)
    log(f"teacher top-{tc.distill_k} cache {directory}: {tc.steps - have} of {tc.steps} "
        f"batches computed ({have} already there), {time.time() - t:.1f}s")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("distill_cache")
  return distill.TopKCache(directory)


def _teacher_fn(teacher_cfg: ModelConfig, teacher_vars, train_cfg: TrainConfig, mesh, rules):
  """batch -> batch plus the teacher's top-k: one jitted teacher forward per
  batch (replicated teacher on a mesh; targets in the batch's sharding)."""
  sharding = None if mesh is None else parallel.batch_sharding(mesh, rules)
  if mesh is not None:
    teacher_vars = jax.device_put(teacher_vars, NamedSharding(mesh, P()))
  fn = distill.make_teacher_fn(teacher_cfg, train_cfg.distill_k, chunk=train_cfg.distill_chunk,
                               out_sharding=sharding,
                               compiler_options=compiler_options(train_cfg))
  keys = ("tokens", "segment_ids", "positions")
  return lambda batch: {**batch, **{k: v for k, v in fn(
      teacher_vars, {k: batch[k] for k in keys}).items() if k in distill.TEACHER_KEYS}}


def scalars(step: int, m: dict) -> tuple[dict[str, float], dict[str, Any]]:
  """Host scalars of a step's metrics (an MoE student's loads dropped)."""
  m.pop("expert_load", None)
  m.pop("mtp_expert_load", None)
  return {k: float(v) for k, v in m.items()}, {}


def make_line(train_cfg: TrainConfig) -> Callable[[int, dict, float], str]:
  def line(step: int, s: dict[str, float], eta: float) -> str:
    return (f"step {step:>6d}/{train_cfg.steps} | loss {s['loss']:.4f} kl {s['kl']:.4f} "
            f"ce {s['ce']:.4f} mass {s['teacher_mass']:.3f} | gnorm {s['grad_norm']:.3f} "
            f"lr {s['lr']:.2e} | {s.get('tokens_per_s', 0.0):,.0f} tok/s | eta "
            f"{metrics.format_duration(eta)}"
            + (f" | skipped {int(s['bad_steps'])}" if s.get("bad_steps") else ""))
  return line


def prepare(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh_cfg: MeshConfig | None):
  """(mesh, rules, data, teacher cfg, teacher variables): every check a
  user's input needs, before anything compiles."""
  if train_cfg.objective != "distill":
    raise ValueError(f"objective={train_cfg.objective!r}: train_distill trains "
                     "objective='distill'.")
  loop.check_compatible(model_cfg, train_cfg)
  mesh, rules = distill_mesh(mesh_cfg, train_cfg, model_cfg)
  data = loop.build_data(model_cfg, train_cfg)
  pipeline.validate_batch(data.iterator.batch_at(0), model_cfg.vocab_size,
                          model_cfg.max_seq_len)
  teacher_cfg, teacher_vars = distill.load_teacher(train_cfg.distill_teacher)
  check_teacher(teacher_cfg, model_cfg, train_cfg, data.tokenizer.vocab_size)
  return mesh, rules, data, teacher_cfg, teacher_vars


def train_distill(model_cfg: ModelConfig, train_cfg: TrainConfig, workdir: str, *,
                  mesh_cfg: MeshConfig | None = None, stop_after: int | None = None,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
  """Distils train_cfg.distill_teacher into the student model_cfg in
  `workdir` (module docstring), resuming from its checkpoints; loop.train's
  arguments and summary (final_step, final_loss, eval: {step, accuracy,
  format_ok} of the whole run, history, resumed_from, stopped_by, workdir).
  ValueError / NotImplementedError / FileNotFoundError for bad configs,
  teachers or files before anything compiles."""
  mesh, rules, data, teacher_cfg, teacher_vars = prepare(model_cfg, train_cfg, mesh_cfg)
  tc = train_cfg
  settings = runner.Settings.of(tc, stop_after=stop_after)
  with runner.Run(workdir, model_cfg, tc.to_dict(), settings, mesh=mesh, log=log) as run:
    run.log(f"data: {data.n_documents} "
            + ("prompt/completion records (loss on completions only)" if data.sft
               else "documents")
            + f" in {data.iterator.n_rows} rows of {tc.seq_len} tokens; "
            f"{len(data.eval_problems)} held-out problems; objective 'distill'")
    run.log(f"teacher {tc.distill_teacher}: {teacher_cfg.arch}/{teacher_cfg.attention}, "
            f"{teacher_cfg.n_layers} layers, dim {teacher_cfg.dim}; top-{tc.distill_k} at T="
            f"{tc.distill_temperature}, ce weight {tc.distill_ce_weight}, targets "
            + (f"cached in {tc.distill_cache}" if tc.distill_cache else "on the fly"))
    if mesh is not None:
      run.log(f"mesh: {start.describe_mesh(mesh)}, rules {mesh_cfg.rules}")
    state = run.start(model_cfg, tc, rules, fresh=lambda: start.fresh_state(
        model_cfg, tc, mesh, rules, run.log))
    sharding = None if mesh is None else parallel.batch_sharding(mesh, rules)
    if tc.distill_cache:
      batches = DistillBatches(data.iterator, tc, sharding,
                               cache=fill_cache(teacher_cfg, teacher_vars, data, tc, run.log))
    else:
      batches = DistillBatches(data.iterator, tc, sharding,
                               teacher=_teacher_fn(teacher_cfg, teacher_vars, tc, mesh, rules))
    del teacher_vars
    loss_fn = distill.distill_loss_fn(model_cfg, temperature=tc.distill_temperature,
                                      ce_weight=tc.distill_ce_weight,
                                      balance_weight=tc.balance_weight, chunk=tc.distill_chunk)
    step = make_update_step(model_cfg, tc, loss_fn, mesh, rules,
                            skip_nonfinite=tc.max_bad_steps > 0)
    reading = loop.Reading(model_cfg, tc, data, mesh, run.log)
    task = runner.Task(step=step, batches=batches, line=make_line(tc), scalars=scalars,
                       evaluate=reading.evaluate if data.eval_problems else None,
                       mfu_scale=loop.describe_start(run, model_cfg, tc, mesh_cfg))
    result = run.train(task, state)
    plot = metrics.plot_losses(workdir) if run.primary else None
    evals, last = result.evals, result.last
    run.log(f"done: step {result.final_step}, {result.seconds:.1f}s"
            + (f", loss {last['loss']:.4f} (kl {last['kl']:.4f})" if last else "")
            + (f", held-out exact match {evals[-1]['eval_accuracy']:.3f}" if evals else "")
            + (f"; plot {plot}" if plot else ""))
  return {"final_step": result.final_step,
          "final_loss": result.last["loss"] if result.last else None,
          "eval": [{"step": r["step"], "accuracy": r["eval_accuracy"],
                    "format_ok": r["eval_format_ok"]} for r in result.evals],
          "history": result.history, "samples": reading.samples,
          "resumed_from": result.resumed_from, "stopped_by": result.stopped_by,
          "workdir": workdir}
