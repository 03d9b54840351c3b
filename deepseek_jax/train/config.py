"""The training configuration: `TrainConfig` (hyperparameters of a run) and
the learning-rate schedule a checkpoint keeps (`resolved_schedule`,
`schedule_changes`).

Its own module so that the step builder (step.py), the run harness
(runner.py, start.py), the trainers (loop.py, rl/trainer.py) and the planner
import it without importing each other; the
model's configuration is `deepseek_jax.config.ModelConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from deepseek_jax.config import check_field_names, check_ints, split_names
from deepseek_jax.data import tasks
from deepseek_jax.train.optimizer import MOMENT_DTYPES, OPTIMIZERS

# What a run trains (TrainConfig.objective); launch.train's TRAINERS table maps
# each to its trainer. "lm": next-token prediction (loop.train); "dpo",
# "reward_model": preference pairs (rl/preference_trainer.py); "distill":
# token-level distillation from a teacher (train/distill_trainer.py).
OBJECTIVES = ("lm", "dpo", "reward_model", "distill")
PREFERENCE_OBJECTIVES = ("dpo", "reward_model")
DPO_LOSS_TYPES = ("sigmoid", "ipo")        # rl.dpo.LOSS_TYPES


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Training hyperparameters (the model's live in ModelConfig).

  Run: steps (optimizer steps in total), seed (init and data order).
  Data: batch_size rows of seq_len tokens. With `data_files` empty the
    corpus is the generated arithmetic task (data/tasks.py): n_train_problems
    training documents, n_eval_problems held-out ones for exact match.
    `data_files` (no exact-match eval): .jsonl / .json (JSON lines), .parquet
    or .txt (blank-line-separated documents), by extension
    (data.pipeline.load_documents); a record with `prompt` and `completion`
    fields is an SFT record (loss on the completion and <eos> only), else
    its `text_field` is a plain document; the files must be all of one kind.
    eval_task: with data_files, still evaluate exact match on the task's
    held-out problems (n_eval_problems of task_kinds / max_digits, the
    `template` prompt): for SFT on task records (launch.rejection_sample
    output, distillation), whose prompts come from the train split.
    task_kinds: the problem kinds (data/tasks.py KINDS); "passkey" is the
    long-context retrieval kind, its prompts passkey_chars long (0 = as long
    as a row of seq_len holds). kind_mix: "distinct" (n_train_problems
    distinct problems; a kind with a small prompt space, e.g. "mul" at
    max_digits=2, gets less than its share) or "uniform" (each kind an equal
    share, as in the held-out problems; small kinds' problems repeat):
    tasks.mixed_problems.
    tokenizer_path "" = the shipped character tokenizer. completion_only: loss
    only on completion tokens.
  Optimizer (optimizer.py): peak lr, warmup_steps (<= steps; V3 used 2000
    of ~530K), hold_steps, decay_steps (0 = cosine until the last step minus
    end_steps), end_lr, end_steps, final_lr (None = end_lr); AdamW b1, b2,
    eps, weight_decay; clip_norm. A resumed run keeps its schedule: a change
    that would bend it mid-run (e.g. a larger `steps` with decay_steps=0) is
    refused, naming the fields (`schedule_changes`).
  moments_dtype: storage of AdamW's moments, "float32" or "bfloat16" (V3).
  optimizer: "adamw" (V3) or "muon" (V4: optimizer.make_muon, optax's
    contrib.muon for the weight matrices, AdamW with the settings above for
    the embedding, head, norm scales and biases; same lr schedule, weight
    decay and clipping): muon_momentum (its beta), muon_nesterov, muon_ns_steps
    (Newton-Schulz iterations), muon_rms (the update RMS Muon's orthogonalised
    update is scaled to, AdamW's 0.2, so that lr and weight_decay carry over;
    0 = Keller Jordan's sqrt(max(1, fan_out / fan_in))). A run resumes only
    with the optimizer it was saved with (`optimizer_change`); init_from
    starts another optimizer from its weights.
  Losses: mtp_weight (lambda; V3 0.3 then 0.1: mtp_weight_final from the
    step after mtp_weight_switch_step, 0 = no switch), balance_weight (alpha; V3
    1e-4), bias_update_speed (gamma; V3 1e-3, 0 = off).
    DeepSeek-V2's auxiliary balance losses (model.moe.v2_balance_losses), for
    ablations; each weight 0 = off (nothing computed when all three are):
    expert_balance_weight (alpha1; V2 0.003), device_balance_weight (alpha2;
    V2 0.05), comm_balance_weight (alpha3; V2 0.02), summed over MoE layers
    (MTP blocks included); they combine with balance_weight and the bias
    update. balance_devices: D, the devices the experts are split over in
    contiguous groups (must divide n_routed_experts); 0 = the mesh's
    expert-parallel degree when a mesh splits the experts, else the model's
    n_expert_groups. The losses' M (devices a token may reach) is the
    model's n_limited_groups when n_expert_groups == D (device-limited
    routing), else D. Logged as balance_expert, balance_device,
    balance_comm (layer sums, before alpha) and *_per_layer lists.
    indexer_loss_weight (w_I): DeepSeek-V3.2's indexer loss (a DSA model,
    index_topk > 0), the KL from the main attention's head-summed,
    L1-normalised distribution to the indexer's softmax, summed over layers
    and averaged over non-padding tokens (losses.py, model/dsa.py), logged as
    indexer_loss. Its stage is the model's, --config.model.dsa_stage (the one
    place it is set): "warmup" (dense attention; only the indexer's
    parameters train, everything else and its optimizer moments stay as they
    are: optimizer.trainable_mask), "sparse" (top-k attention; the whole
    model trains on the LM loss, the indexer on its KL over the selected
    tokens, its inputs detached) or "off" (no indexer loss). A run moves
    from one stage to the next through init_from (dsa_stage may change
    there), and a dense V3 run's weights start a V3.2 model (the indexer
    fresh). The report gives the KL no weight (the two gradients reach
    disjoint parameters, so w_I only scales the indexer's against global
    clipping): 1.0.
  Logging: every step to metrics.jsonl, every log_every steps to `log`
    (with tokens/s); eval_every steps (0 = only at the end);
    eval_batch_size, max_new_tokens for decoding. summary_steps: how many of
    the last steps' metrics and expert loads the returned summary keeps in
    memory (metrics.jsonl has every step). Checkpoints: ckpt_every steps
    plus the last step, keep_ckpts most recent plus every keep_every-th step
    (0 = none; a multiple of ckpt_every), written in the background while
    training goes on unless async_checkpoints=False.
  fim_rate: with data_files of plain text, the fraction of documents
    rewritten as fill-in-the-middle (PSM, data.pipeline.fim_transform; V3
    used 0.1); the FIM token ids come from the tokenizer (refused when it
    has none).
  init_from: the workdir of an earlier run; a run with no checkpoint of
    its own starts from that run's latest parameters and router biases
    (fresh optimizer, step 0): a fine-tuning stage, e.g. the long-context
    extension (launch/configs/long_context.py). The model config may differ
    from that run's only in INIT_FROM_MAY_CHANGE (context length / YaRN and
    numerics); once this run has checkpoints it resumes from its own.
  init_from_hf: an HF checkpoint directory (DeepSeek-V3 / R1 or V2 / V2-Lite,
    interop.hf): a run with no checkpoint of its own starts from its
    parameters and router biases (fresh optimizer, step 0), streamed tensor
    by tensor onto the mesh. The model config must be the checkpoint's up to
    shape-keeping changes: build both configs with
    `train.hf_init.finetune_configs(dir, train_values, model_overrides)`
    (launch.train does), which also picks DIR/tokenizer.json as the
    tokenizer when tokenizer_path is empty. Once this run has checkpoints it
    resumes from its own and ignores init_from_hf.
  peak_tflops: per-device peak (TFLOP/s) for MFU in the progress line and
    metrics.jsonl (`mfu`: model FLOPs of a trained token, train/flops.py,
    x tokens/s / (devices x peak)); 0 = no MFU, < 0 = measure a float32
    matmul on this device at start (CPU). The resolved configs, devices and
    FLOPs per token go to workdir/config.json at start.
  max_bad_steps: a step whose loss or gradients are not finite is skipped
    (parameters, optimizer state and router biases stay as they were; the
    data moves on; `skipped` in metrics.jsonl, `bad_steps` counted in the
    progress line); after max_bad_steps consecutive ones the run stops with
    FloatingPointError naming the last good checkpoint. 0 = stop at the
    first non-finite step.
  nan_steps: test hook: the batches of these steps get a NaN loss mask, so
    their loss and gradients are NaN (exercises the skip above).
  pipeline_schedule, num_microbatches: with mesh.pipe > 1, the pipeline
    schedule ("gpipe", "1f1b", "zb1p", "dualpipe"; parallel/pipeline.py) and
    the micro-batches each step's batch is cut into (0 = 2 x pipe, which
    every schedule accepts). Unused when mesh.pipe is 1.
  fast_compile: compile the step and the decoder at XLA backend optimisation
    level 0 (on CPU ~2.5x faster compiles, ~1.6x slower steps): for tests and
    short runs.
  objective: "lm" (the above: next-token prediction on the task or
    data_files), or a preference objective on preference_files (jsonl /
    parquet {prompt, chosen, rejected} records, data/preferences.py;
    eval_preference_files held out, evaluated every eval_every steps and at
    the start and end), trained by rl/preference_trainer.py (launch.train
    dispatches on objective): "reward_model" (a scalar value head on the last
    response token, Bradley-Terry loss with margin rm_margin) or "dpo" (the
    policy against the frozen start weights, beta, dpo_loss_type "sigmoid" =
    DPO or "ipo"). For them batch_size counts pairs (2 x batch_size rows of
    seq_len), prompts are rendered by `template` (or the chat template beside
    tokenizer_path), and the start is init_from / init_from_hf as for SFT.
    "distill": token-level distillation (train/distill_trainer.py) on the
    data of "lm" (the task, or data_files; SFT records: loss on the
    completions): the forward KL from the teacher's top-distill_k next-token
    distribution (renormalised, at distill_temperature; train/distill.py) to
    the student's, plus distill_ce_weight x the data's own CE. The teacher
    distill_teacher is a training run's workdir or an HF checkpoint directory
    sharing the student's token ids (its vocabulary must fit the student's);
    its top-k come from a jitted teacher forward per batch, or with
    distill_cache=DIR from a disk cache filled once before training (one
    shard per step; a rerun reuses it). distill_chunk: positions per head
    chunk (peak memory [rows, chunk, vocab]). Held-out exact match as "lm".
  """

  steps: int = 1000
  seed: int = 0
  # data
  batch_size: int = 16
  seq_len: int = 128
  data_files: tuple[str, ...] = ()
  text_field: str = "text"
  tokenizer_path: str = ""
  n_train_problems: int = 20000
  n_eval_problems: int = 100
  max_digits: int = 3
  task_kinds: tuple[str, ...] = tasks.DEFAULT_KINDS
  kind_mix: str = "distinct"
  passkey_chars: int = 0
  init_from: str = ""
  init_from_hf: str = ""
  template: str = "short"
  completion_only: bool = False
  fim_rate: float = 0.0
  eval_task: bool = False
  # optimizer (V3 values)
  lr: float = 2.2e-4
  warmup_steps: int = 100
  hold_steps: int = 0
  decay_steps: int = 0
  end_lr: float = 2.2e-5
  end_steps: int = 0
  final_lr: float | None = None
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  clip_norm: float = 1.0
  moments_dtype: str = "float32"
  optimizer: str = "adamw"
  muon_momentum: float = 0.95
  muon_nesterov: bool = True
  muon_ns_steps: int = 5
  muon_rms: float = 0.2
  # losses
  mtp_weight: float = 0.3
  mtp_weight_final: float = 0.1
  mtp_weight_switch_step: int = 0
  balance_weight: float = 1e-4
  bias_update_speed: float = 1e-3
  expert_balance_weight: float = 0.0
  device_balance_weight: float = 0.0
  comm_balance_weight: float = 0.0
  balance_devices: int = 0
  indexer_loss_weight: float = 1.0
  # logging, evaluation, checkpoints
  log_every: int = 10
  eval_every: int = 0
  eval_batch_size: int = 50
  max_new_tokens: int = 96
  ckpt_every: int = 100
  keep_ckpts: int = 3
  keep_every: int = 0
  async_checkpoints: bool = True
  summary_steps: int = 1000
  peak_tflops: float = 0.0
  # robustness
  max_bad_steps: int = 10
  nan_steps: tuple[int, ...] = ()
  # pipeline (mesh.pipe > 1)
  pipeline_schedule: str = "1f1b"
  num_microbatches: int = 0
  # compilation
  fast_compile: bool = False
  # objective (preference objectives: rl/preference_trainer.py)
  objective: str = "lm"
  preference_files: tuple[str, ...] = ()
  eval_preference_files: tuple[str, ...] = ()
  beta: float = 0.1
  dpo_loss_type: str = "sigmoid"
  rm_margin: float = 0.0
  # objective "distill" (train/distill_trainer.py)
  distill_teacher: str = ""
  distill_k: int = 64
  distill_temperature: float = 1.0
  distill_ce_weight: float = 0.0
  distill_cache: str = ""
  distill_chunk: int = 128

  def __post_init__(self):
    object.__setattr__(self, "data_files", tuple(self.data_files))
    object.__setattr__(self, "nan_steps", tuple(self.nan_steps))
    object.__setattr__(self, "task_kinds", split_names(self.task_kinds))
    for name in ("preference_files", "eval_preference_files"):
      object.__setattr__(self, name, split_names(getattr(self, name)))
    self.validate()

  def validate(self) -> None:
    check_ints(self, positive=("steps", "batch_size", "seq_len", "log_every", "ckpt_every",
                               "keep_ckpts", "eval_batch_size", "max_new_tokens",
                               "summary_steps"),
               non_negative=("warmup_steps", "hold_steps", "decay_steps", "end_steps",
                             "eval_every", "n_eval_problems", "passkey_chars",
                             "balance_devices", "max_bad_steps", "keep_every",
                             "mtp_weight_switch_step", "num_microbatches"))
    from deepseek_jax.parallel.schedules import SCHEDULES
    if self.pipeline_schedule not in SCHEDULES:
      raise ValueError(f"pipeline_schedule={self.pipeline_schedule!r} must be one of "
                       f"{list(SCHEDULES)}.")
    if self.keep_every % self.ckpt_every:
      raise ValueError(f"keep_every={self.keep_every} must be a multiple of ckpt_every="
                       f"{self.ckpt_every} (only saved steps can be kept), or 0.")
    if not 0 <= self.fim_rate <= 1:
      raise ValueError(f"fim_rate={self.fim_rate} must lie in [0, 1].")
    if self.fim_rate and not self.data_files:
      raise ValueError(f"fim_rate={self.fim_rate} applies to plain-text data_files; the "
                       "arithmetic task has none: set data_files or fim_rate=0.")
    if not all(isinstance(t, int) and t >= 1 for t in self.nan_steps):
      raise ValueError(f"nan_steps={self.nan_steps!r} must be step numbers >= 1.")
    if not self.data_files and self.n_train_problems < 1:
      raise ValueError(f"n_train_problems={self.n_train_problems} must be >= 1 "
                       "when no data_files are given.")
    if not self.lr > 0:
      raise ValueError(f"lr={self.lr} must be > 0.")
    if self.warmup_steps > self.steps:
      raise ValueError(f"warmup_steps={self.warmup_steps} exceeds steps={self.steps}: the run "
                       "would end before reaching the peak lr; lower warmup_steps.")
    if not 0 <= self.end_lr <= self.lr:
      raise ValueError(f"end_lr={self.end_lr} must be in [0, lr={self.lr}].")
    for name in ("weight_decay", "mtp_weight", "mtp_weight_final", "balance_weight",
                 "bias_update_speed", "expert_balance_weight", "device_balance_weight",
                 "comm_balance_weight"):
      if not getattr(self, name) >= 0:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 0.")
    if not (isinstance(self.indexer_loss_weight, (int, float))
            and not isinstance(self.indexer_loss_weight, bool)
            and math.isfinite(self.indexer_loss_weight) and self.indexer_loss_weight >= 0):
      raise ValueError(f"indexer_loss_weight={self.indexer_loss_weight!r} must be a finite "
                       "number >= 0 (the DSA indexer's KL weight; 1.0 is usual).")
    if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
      raise ValueError(f"b1={self.b1}, b2={self.b2} must lie in [0, 1).")
    if self.passkey_chars and self.passkey_chars < tasks.PASSKEY_MIN_CHARS:
      raise ValueError(f"passkey_chars={self.passkey_chars} must be 0 (fill the row) or >= "
                       f"{tasks.PASSKEY_MIN_CHARS}.")
    if not isinstance(self.init_from, str):
      raise ValueError(f"init_from={self.init_from!r} must be a workdir path or ''.")
    if not isinstance(self.init_from_hf, str):
      raise ValueError(f"init_from_hf={self.init_from_hf!r} must be an HF checkpoint "
                       "directory or ''.")
    if self.init_from and self.init_from_hf:
      raise ValueError(f"init_from={self.init_from!r} and init_from_hf={self.init_from_hf!r} "
                       "both give the starting weights; set one of them.")
    if self.moments_dtype not in MOMENT_DTYPES:
      raise ValueError(f"moments_dtype={self.moments_dtype!r} must be one of "
                       f"{MOMENT_DTYPES}.")
    self._validate_optimizer()
    if self.kind_mix not in tasks.KIND_MIXES:
      raise ValueError(f"kind_mix={self.kind_mix!r} must be one of {tasks.KIND_MIXES}.")
    if self.template not in tasks.TEMPLATES:
      raise ValueError(f"template={self.template!r} must be one of {tuple(tasks.TEMPLATES)}.")
    bad = [k for k in self.task_kinds if k not in tasks.KINDS]
    if bad or not self.task_kinds:
      raise ValueError(f"task_kinds={self.task_kinds} must be a non-empty subset of "
                       f"{tasks.KINDS}.")
    self._validate_objective()

  def _validate_optimizer(self) -> None:
    """optimizer and its Muon fields: one-line errors naming the field."""
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"optimizer={self.optimizer!r} must be one of {OPTIMIZERS}.")
    if not (isinstance(self.muon_momentum, (int, float)) and 0 <= self.muon_momentum < 1):
      raise ValueError(f"muon_momentum={self.muon_momentum!r} must lie in [0, 1) (0.95 is "
                       "usual).")
    if not isinstance(self.muon_nesterov, bool):
      raise ValueError(f"muon_nesterov={self.muon_nesterov!r} must be True or False.")
    if (not isinstance(self.muon_ns_steps, int) or isinstance(self.muon_ns_steps, bool)
        or self.muon_ns_steps < 1):
      raise ValueError(f"muon_ns_steps={self.muon_ns_steps!r} must be an integer >= 1 "
                       "(Newton-Schulz iterations; 5 is usual).")
    if not (isinstance(self.muon_rms, (int, float)) and math.isfinite(self.muon_rms)
            and self.muon_rms >= 0):
      raise ValueError(f"muon_rms={self.muon_rms!r} must be a finite number >= 0 (0.2 matches "
                       "AdamW's update RMS; 0 = width scaling).")

  def _validate_objective(self) -> None:
    """The objective's fields: one-line errors naming the field and the fix."""
    if self.objective not in OBJECTIVES:
      raise ValueError(f"objective={self.objective!r} must be one of {OBJECTIVES}.")
    preference = self.objective in PREFERENCE_OBJECTIVES
    if preference and not self.preference_files:
      raise ValueError(f"objective={self.objective!r} trains on preference pairs: set "
                       "preference_files=('pairs.jsonl',) ({prompt, chosen, rejected} "
                       "records).")
    if not preference and (self.preference_files or self.eval_preference_files):
      raise ValueError(f"preference_files / eval_preference_files are read by objective "
                       f"'dpo' or 'reward_model', not objective={self.objective!r}; set "
                       "objective or drop them.")
    if preference and self.data_files:
      raise ValueError(f"data_files={self.data_files} are documents for objective='lm'; "
                       f"objective={self.objective!r} reads preference_files: drop "
                       "data_files.")
    if preference and self.nan_steps:
      raise ValueError(f"nan_steps={self.nan_steps!r} is a test hook of objective='lm'; "
                       "drop it.")
    if not (math.isfinite(self.beta) and self.beta > 0):
      raise ValueError(f"beta={self.beta} must be a finite number > 0 (DPO's usual 0.1).")
    if self.dpo_loss_type not in DPO_LOSS_TYPES:
      raise ValueError(f"dpo_loss_type={self.dpo_loss_type!r} must be one of "
                       f"{DPO_LOSS_TYPES}.")
    if not (math.isfinite(self.rm_margin) and self.rm_margin >= 0):
      raise ValueError(f"rm_margin={self.rm_margin} must be a finite number >= 0 (0 = plain "
                       "Bradley-Terry).")
    self._validate_distill()

  def _validate_distill(self) -> None:
    """objective "distill"'s fields (one line each, naming the field)."""
    if self.objective == "distill" and not self.distill_teacher:
      raise ValueError("objective='distill' needs a teacher: set distill_teacher=DIR (a "
                       "training run's workdir or an HF checkpoint directory).")
    if self.objective != "distill" and (self.distill_teacher or self.distill_cache):
      raise ValueError(f"distill_teacher / distill_cache are read by objective='distill', not "
                       f"objective={self.objective!r}; set objective or drop them.")
    if not isinstance(self.distill_k, int) or self.distill_k < 1:
      raise ValueError(f"distill_k={self.distill_k!r} must be an integer >= 1 (the teacher's "
                       "top-k tokens per position; 64 is usual).")
    if not isinstance(self.distill_chunk, int) or self.distill_chunk < 1:
      raise ValueError(f"distill_chunk={self.distill_chunk!r} must be an integer >= 1 "
                       "(positions per head chunk).")
    if not (math.isfinite(self.distill_temperature) and self.distill_temperature > 0):
      raise ValueError(f"distill_temperature={self.distill_temperature} must be a finite "
                       "number > 0 (1.0 = the teacher's own distribution).")
    if not (math.isfinite(self.distill_ce_weight) and self.distill_ce_weight >= 0):
      raise ValueError(f"distill_ce_weight={self.distill_ce_weight} must be a finite number "
                       ">= 0 (0 = the KL alone).")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
    check_field_names(cls, values)
    return cls(**values)

  @classmethod
  def from_saved(cls, values: dict[str, Any]) -> "TrainConfig":
    """The TrainConfig a checkpoint's meta recorded, for reading the run
    (export, GRPO's source run): keys of other trainers (GRPO's "grpo") are
    dropped, and a warmup longer than the run (allowed before that was
    refused) is clamped to `steps`: the schedule is not part of the state."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in values.items() if k in names}
    if "warmup_steps" in values and "steps" in values:
      values["warmup_steps"] = min(values["warmup_steps"], values["steps"])
    return cls(**values)


SCHEDULE_FIELDS = ("lr", "warmup_steps", "hold_steps", "decay_steps", "end_lr", "end_steps",
                   "final_lr")


def resolved_schedule(values: dict[str, Any]) -> dict[str, Any]:
  """The LR schedule's parameters of a train config dict (TrainConfig.to_dict
  or a checkpoint's; missing keys take today's defaults, nothing is
  re-validated) with decay_steps=0 resolved as
  optimizer.lr_schedule_from_config does; a schedule flat after its warmup
  (end_lr = lr) has no later segments to compare."""
  v = {**{f.name: f.default for f in dataclasses.fields(TrainConfig)}, **values}
  out = {k: v[k] for k in SCHEDULE_FIELDS}
  out["decay_steps"] = v["decay_steps"] or max(
      v["steps"] - v["warmup_steps"] - v["hold_steps"] - v["end_steps"], 0)
  if v["end_lr"] == v["lr"] and v["final_lr"] in (None, v["lr"]):
    # Flat after the warmup (GRPO's optimizer_config): the lengths of the
    # segments after it change nothing, so a longer run does not bend it.
    out.update(hold_steps=0, decay_steps=0, end_steps=0, final_lr=None)
  return out


def schedule_changes(saved: dict[str, Any], train_cfg: TrainConfig) -> list[str]:
  """How train_cfg's resolved LR schedule differs from that of the saved
  train config dict (a checkpoint's), e.g. ["decay_steps: 97 -> 197"]."""
  old, new = resolved_schedule(saved), resolved_schedule(train_cfg.to_dict())
  return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in SCHEDULE_FIELDS if old[k] != new[k]]


def optimizer_change(saved: dict[str, Any], train_cfg: TrainConfig) -> str | None:
  """None when train_cfg resumes a checkpoint whose train config dict is
  `saved` with the same optimizer (a run saved before the field counts as
  "adamw"), else a one-line reason to refuse: the optimizer states differ in
  structure (Muon keeps one moment per matrix, AdamW two), so the run cannot
  carry on; init_from starts a new one from its weights."""
  old = saved.get("optimizer", "adamw")
  if old == train_cfg.optimizer:
    return None
  return (f"optimizer={train_cfg.optimizer!r}, but the checkpointed run trained with "
          f"optimizer={old!r}: its optimizer state cannot carry over. Keep "
          f"optimizer={old!r}, or start a new workdir with init_from=<that run's workdir> "
          "(its weights, a fresh optimizer).")
