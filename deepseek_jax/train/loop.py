"""Pretraining / SFT: `train(model_cfg, train_cfg, workdir)` on one device, a mesh or many hosts.

Used by `launch/train.py` and by notebooks alike; it reads no flags or
environment. What makes it pretraining is supplied to the run harness
(runner.py, which does the workdir, resume, checkpoints, signals, the NaN
policy, logs and eval scheduling for every trainer):

  batches   packed rows of the BatchIterator (build_data: the task's
            generated problems, or jsonl / parquet / text files), this
            process's rows on a mesh; the first batch is validated on the host
            before anything compiles
  step      make_train_step: CE + MTP + balance losses, AdamW, router bias
  evaluate  greedy-decode exact match on held-out problems
  reading   its metrics: per-layer lists, expert loads for the summary, the
            progress line with tokens/s and MFU
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from deepseek_jax import parallel
from deepseek_jax.config import ModelConfig
from deepseek_jax.data import pipeline, tasks
from deepseek_jax.data.tokenizer import default_tokenizer, load_tokenizer
from deepseek_jax.model import abstract_variables, count_params
from deepseek_jax.parallel import MeshConfig, distributed
from deepseek_jax.train import evaluate, flops, losses, metrics, runner, start
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.step import make_train_step, model_variables, v2_balance_devices

CONFIG_FILE = "config.json"


def check_compatible(model_cfg: ModelConfig, train_cfg: TrainConfig) -> None:
  """Cross-config checks (each config validates itself on construction)."""
  if train_cfg.seq_len > model_cfg.max_seq_len:
    raise ValueError(f"seq_len={train_cfg.seq_len} exceeds the model's max_seq_len="
                     f"{model_cfg.max_seq_len}; lower seq_len or raise model.max_seq_len.")
  v2_balance_devices(model_cfg, train_cfg)    # balance_devices must divide the experts
  losses.check_dsa_training(model_cfg, train_cfg)   # a DSA warm-up needs its loss weight


@dataclasses.dataclass
class Data:
  iterator: pipeline.BatchIterator
  tokenizer: Any
  eval_problems: list[tasks.Problem]
  n_documents: int
  sft: bool = False       # prompt/completion records: loss on the completions only


def _file_rows(tok, train_cfg: TrainConfig):
  """(rows, held-out problems, documents, sft) of train_cfg.data_files."""
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
  eval_problems = []
  if train_cfg.eval_task:
    eval_problems = tasks.generate_problems(
        train_cfg.n_eval_problems, seed=train_cfg.seed, split="test",
        max_digits=train_cfg.max_digits, kinds=train_cfg.task_kinds,
        context_chars=(train_cfg.passkey_chars
                       or pipeline.passkey_room(tok, train_cfg.seq_len, train_cfg.template)))
  return rows, eval_problems, len(docs), sft


def build_data(model_cfg: ModelConfig, train_cfg: TrainConfig) -> Data:
  """Tokenizer + packed rows + iterator (+ held-out problems for the task).
  Too few distinct task problems for n_train_problems / n_eval_problems is a
  ValueError naming that field and what to change."""
  try:
    return _build_data(model_cfg, train_cfg)
  except tasks.TooFewProblems as e:
    field = "n_train_problems" if e.split == "train" else "n_eval_problems"
    raise ValueError(
        f"{field}={e.n}: the {e.split!r} split holds only {e.found} distinct problems with "
        f"max_digits={train_cfg.max_digits} and task_kinds={tuple(train_cfg.task_kinds)}; "
        f"set --config.{field}={e.found} or lower, or raise --config.max_digits.") from None


def _build_data(model_cfg: ModelConfig, train_cfg: TrainConfig) -> Data:
  tok = (load_tokenizer(train_cfg.tokenizer_path) if train_cfg.tokenizer_path
         else default_tokenizer())
  if tok.vocab_size > model_cfg.vocab_size:
    raise ValueError(f"the tokenizer has {tok.vocab_size} ids but vocab_size="
                     f"{model_cfg.vocab_size}; set model.vocab_size >= {tok.vocab_size}.")
  sft = False
  if train_cfg.data_files:
    rows, eval_problems, n_docs, sft = _file_rows(tok, train_cfg)
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


class Rows:
  """Pretraining's batch source: the iterator's next batch (on a mesh, only
  this process's rows of it, assembled into the global batch), with
  train_cfg.nan_steps' batches poisoned (a NaN loss mask: the test hook of
  the NaN policy)."""

  def __init__(self, data: Data, train_cfg: TrainConfig, mesh, rules):
    self.iterator, self.nan_steps = data.iterator, train_cfg.nan_steps
    self.sharding, self.rows = None, None
    if mesh is not None:
      self.sharding = parallel.batch_sharding(mesh, rules)
      self.rows = distributed.process_rows(self.sharding,
                                           (train_cfg.batch_size, train_cfg.seq_len))
      self.batch_size = train_cfg.batch_size

  def next(self, step: int, state) -> dict:
    if self.sharding is None:
      batch = next(self.iterator)
    else:
      batch = distributed.put_batch(self.iterator.next_rows(*self.rows), self.sharding,
                                    self.batch_size)
    if step in self.nan_steps:
      batch = dict(batch, loss_mask=batch["loss_mask"] * jnp.float32(jnp.nan))
    return batch

  def state(self) -> dict[str, Any]:
    return self.iterator.state()

  def restore(self, saved: dict[str, Any]) -> None:
    self.iterator.restore(saved)


class Reading:
  """How pretraining's metrics read: scalars (expert loads kept for the
  summary, V2's per-layer lists to metrics.jsonl only; the MTP weight the
  step used, reported by the step itself with mtp_weight_switch_step), the
  progress line; and the held-out evaluation, whose samples it keeps."""

  def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, data: Data, mesh,
               log: Callable[[str], None]):
    self.model_cfg, self.train_cfg, self.data, self.mesh = model_cfg, train_cfg, data, mesh
    self.log = log
    self.loads = collections.deque(maxlen=train_cfg.summary_steps)
    self.samples: list[dict] = []

  def scalars(self, step: int, m: dict) -> tuple[dict[str, float], dict[str, Any]]:
    self.loads.append(np.asarray(m.pop("expert_load")))
    m.pop("mtp_expert_load", None)
    per_layer = {k: np.asarray(m.pop(k)).tolist()      # V2 balance losses, per layer
                 for k in [k for k in m if k.endswith("_per_layer")]}
    scalars = {k: float(v) for k, v in m.items()}
    tc = self.train_cfg
    if tc.mtp_weight_switch_step and step == tc.mtp_weight_switch_step + 1:
      self.log(f"step {step}: MTP weight {tc.mtp_weight} -> {tc.mtp_weight_final} "
               f"(mtp_weight_switch_step={tc.mtp_weight_switch_step})")
    return scalars, per_layer

  def line(self, step: int, scalars: dict[str, float], eta: float) -> str:
    return metrics.progress_line(step, self.train_cfg.steps, scalars,
                                 scalars.get("tokens_per_s", 0.0), eta)

  def evaluate(self, state, step: int) -> dict[str, Any]:
    t = time.time()
    tc, problems = self.train_cfg, self.data.eval_problems
    result = evaluate.exact_match(
        model_variables(self.model_cfg, state, self.mesh, tc.pipeline_schedule),
        self.data.tokenizer, problems, self.model_cfg, max_new_tokens=tc.max_new_tokens,
        batch_size=min(tc.eval_batch_size, len(problems)), template=tc.template,
        mesh=self.mesh)
    self.samples[:] = result["samples"][:5]
    kinds = result["by_kind"] if len(result["by_kind"]) > 1 else {}
    ex = result["samples"][0]
    prompt = ex["prompt"] if len(ex["prompt"]) <= 80 else "..." + ex["prompt"][-60:]
    self.log(f"eval step {step}: exact match {result['accuracy']:.3f} "
             + (f"[{' '.join(f'{k} {v:.2f}' for k, v in kinds.items())}] " if kinds else "")
             + f"(format ok {result['format_ok']:.3f}, n={result['n']}, "
             f"{time.time() - t:.1f}s); e.g. {prompt} -> {ex['completion']!r}")
    return {"eval_accuracy": result["accuracy"], "eval_format_ok": result["format_ok"],
            "eval_n": result["n"], **{f"eval_accuracy_{k}": v for k, v in kinds.items()}}


def describe_start(run: runner.Run, model_cfg: ModelConfig, train_cfg: TrainConfig,
                    mesh_cfg: MeshConfig | None) -> float:
  """Logs the model and MFU basis and writes config.json (the resolved
  configs); returns mfu_scale. Every trainer of a TrainConfig calls it."""
  n_params = count_params(abstract_variables(model_cfg)["params"])   # without stage padding
  run.log(f"model: {n_params:,} parameters; training steps {run.start_step} -> "
          f"{run.settings.end} of {train_cfg.steps}")
  step_flops = flops.train_flops_per_token(model_cfg, train_cfg.seq_len)
  peak = train_cfg.peak_tflops * 1e12
  if train_cfg.peak_tflops < 0:
    peak = flops.measured_peak_flops()
  n_devices = run.mesh.size if run.mesh is not None else 1
  if peak:
    run.log(f"MFU against {peak / 1e12:.3g} TFLOP/s per device "
            f"({'a measured float32 matmul' if train_cfg.peak_tflops < 0 else 'peak_tflops'}) "
            f"x {n_devices}; {step_flops / 1e6:,.2f} MFLOP per trained token")
  run.write_json(CONFIG_FILE, {      # the resolved configs of this call
      "model": model_cfg.to_dict(), "train": train_cfg.to_dict(),
      "mesh": mesh_cfg.to_dict() if mesh_cfg is not None else None,
      "devices": n_devices, "train_flops_per_token": step_flops,
      "peak_flops_per_device": peak or None})
  return step_flops / (peak * n_devices) if peak else 0.0


def _summary(result: runner.Result, reading: Reading, model_cfg: ModelConfig,
             workdir: str) -> dict[str, Any]:
  n_moe, n_exp = model_cfg.n_moe_layers, max(model_cfg.n_routed_experts, 1)
  return {
      "final_step": result.final_step,
      "final_loss": result.last["loss"] if result.last else None,
      "eval": [{"step": r["step"], "accuracy": r["eval_accuracy"],
                "format_ok": r["eval_format_ok"]} for r in result.evals],
      "history": result.history,
      "expert_load": (np.stack(reading.loads) if reading.loads
                      else np.zeros((0, n_moe, n_exp), np.float32)),
      "samples": reading.samples,
      "resumed_from": result.resumed_from,
      "stopped_by": result.stopped_by,
      "workdir": workdir,
  }


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
  stopped_by, workdir.

  Raises FloatingPointError after max_bad_steps consecutive non-finite
  steps (each one skipped until then), or at once with max_bad_steps=0 (the
  last good checkpoint stays the latest one), ValueError on bad configs or
  data.
  """
  if train_cfg.objective != "lm":
    raise ValueError(f"objective={train_cfg.objective!r} is not next-token prediction: "
                     "loop.train trains objective='lm'; launch.train sends each objective "
                     "to its trainer (preference objectives: "
                     "rl.preference_trainer.train_preferences).")
  check_compatible(model_cfg, train_cfg)
  mesh, rules = start.mesh_for(mesh_cfg, train_cfg, model_cfg)
  settings = runner.Settings.of(train_cfg, stop_after=stop_after)
  with runner.Run(workdir, model_cfg, train_cfg.to_dict(), settings, mesh=mesh,
                  log=log) as run:
    data = build_data(model_cfg, train_cfg)
    pipeline.validate_batch(data.iterator.batch_at(0), model_cfg.vocab_size,
                            model_cfg.max_seq_len)
    run.log(f"data: {data.n_documents} "
            + ("prompt/completion records (loss on completions only)" if data.sft
               else "documents")
            + f" in {data.iterator.n_rows} rows of {train_cfg.seq_len} tokens, "
            f"{data.iterator.steps_per_epoch} steps/epoch; {len(data.eval_problems)} "
            "held-out problems")
    if mesh is not None:
      run.log(f"mesh: {start.describe_mesh(mesh)}, rules {mesh_cfg.rules}")
    state = run.start(model_cfg, train_cfg, rules, fresh=lambda: start.fresh_state(
        model_cfg, train_cfg, mesh, rules, run.log))
    # Built after the resume: a bad checkpoint or init_from fails before it.
    step = make_train_step(model_cfg, train_cfg, mesh, rules)
    reading = Reading(model_cfg, train_cfg, data, mesh, run.log)
    task = runner.Task(step=step, batches=Rows(data, train_cfg, mesh, rules), line=reading.line,
                       scalars=reading.scalars,
                       evaluate=reading.evaluate if data.eval_problems else None,
                       mfu_scale=describe_start(run, model_cfg, train_cfg, mesh_cfg))
    result = run.train(task, state)
    plot = metrics.plot_losses(workdir) if run.primary else None
    evals, last = result.evals, result.last
    run.log(f"done: step {result.final_step}, {result.seconds:.1f}s"
            + (f", loss {last['loss']:.4f}" if last else "")
            + (f", held-out exact match {evals[-1]['eval_accuracy']:.3f}" if evals else "")
            + (f"; plot {plot}" if plot else ""))
  return _summary(result, reading, model_cfg, workdir)
