"""The GRPO trainer: `train_grpo(gcfg, workdir)` starting from a trained run.

Each step (DeepSeekMath sec. 4.1.2, DeepSeek-R1 sec. 2.2):
  1. draw `prompts_per_step` training problems (seeded by step: resumable);
  2. rollout: `infer.generate` samples `group_size` completions per prompt
     at `temperature` from the current policy, with each token's log-prob
     under the temperature-1 model (pi_old);
  3. rewards (rewards.combine of the weighted rule-based functions) and
     group advantages (grpo.group_advantages); completions a reward
     function could not score are masked out, and optionally truncated
     ones (`mask_truncated`) and groups of equal rewards
     (`skip_equal_groups`, DAPO's dynamic sampling by filtering; or
     `resample_rounds`: replaced by informative groups of fresh prompts);
  4. `mu` optimisation passes of `make_update_step` over the rollout batch
     with grpo.grpo_loss; the policy's log-probs are recomputed by
     `infer.token_logprobs` (the same module and precision as the rollout,
     so on the first pass rho = 1 up to float32 rounding) and the frozen
     reference's are computed once per step (not at all when beta = 0);
     the reference is the starting policy, refreshed every
     `ref_refresh_every` steps when set. A step whose loss or gradient is
     not finite is skipped (params, optimizer, nothing changes) and counted.
The policy, the reference and the rollout all run the one `Transformer`.

The loss printed is ~0 at the start by construction (grpo.py's docstring):
the progress line leads with reward and accuracy instead.

Files in `workdir`: grpo_config.json, checkpoints/ (the policy's TrainState,
readable by every tool that reads a training run: launch.generate, export,
init_from; resumable), metrics.jsonl (per step: reward mean/std, reward/<fn>,
accuracy, format, zero_std_groups (all of the trained batch: with resample_rounds
its groups are selected; zero_std_groups_drawn is the step's first draw's),
resample_rounds, completion length mean/max, truncated,
kl, entropy (-mean log p of the sampled tokens), clip_low/high, grad_norm,
skipped; per eval: eval_greedy_accuracy, eval_sampled_accuracy (the mean
of eval_samples draws per problem), eval_format_ok, and per problem kind
eval_greedy_accuracy/<kind>, eval_sampled_accuracy/<kind>), samples.jsonl
(some rollouts every `sample_every` steps), grpo.png (reward and accuracy
over steps).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax import parallel
from deepseek_jax.config import ModelConfig, check_field_names, check_ints, split_names
from deepseek_jax.data import pipeline, tasks
from deepseek_jax.data.tokenizer import default_tokenizer, load_tokenizer
from deepseek_jax.infer import generate, token_logprobs
from deepseek_jax.infer.decode import Generation
from deepseek_jax.parallel import MeshConfig
from deepseek_jax.parallel.rules import BATCH_AXES, axes_size
from deepseek_jax.rl import grpo, rewards
from deepseek_jax.train import checkpoint, evaluate, metrics
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.loop import describe_mesh, mesh_for, with_variables
from deepseek_jax.train.step import abstract_train_state, init_train_state, make_update_step


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """GRPO hyperparameters. The model is the `init_from` run's.

  Problems: the embedded arithmetic task (data/tasks.py) of that run's
    tokenizer and template; n_train_problems to draw prompts from (mixed
    by kind_mix, tasks.mixed_problems), n_eval_problems held out.
    Rollout: prompts_per_step x group_size completions of at most
    max_new_tokens at temperature / top_p.
  Objective (grpo.py): loss_type, scale, eps_low / eps_high, beta,
    kl_estimator, kl_clamp; mu passes per rollout; ref_refresh_every (0 =
    the reference stays the starting policy); mask_truncated,
    skip_equal_groups; resample_rounds > 0: DAPO's dynamic sampling, up to
    that many extra rollout rounds of fresh prompts per step whose
    informative groups (not all rewards equal) replace the equal ones.
    Rewards: weights of the built-in functions (0 = off);
    overlong_buffer > 0 adds DAPO's overlong shaping over the last that
    many tokens before max_new_tokens.
  Optimizer: AdamW at constant lr after warmup_steps (grad clip clip_norm).
  Logging: log_every; eval_every (0 = before and after only) on the held-out
    problems, greedy and sampled (eval_samples completions per problem: the
    sampled accuracy is their mean, a lower-variance estimate of the
    expected accuracy at `temperature` than one draw); sample_every steps
    some rollouts go to samples.jsonl; checkpoints every ckpt_every steps,
    keep_ckpts kept.
  """

  init_from: str = ""
  steps: int = 100
  seed: int = 0
  # problems
  n_train_problems: int = 2000
  n_eval_problems: int = 100
  max_digits: int = 2
  task_kinds: tuple[str, ...] = tasks.DEFAULT_KINDS
  kind_mix: str = "distinct"
  # rollout
  prompts_per_step: int = 16
  group_size: int = 8
  max_new_tokens: int = 64
  temperature: float = 1.0
  top_p: float = 1.0
  # objective
  loss_type: str = "grpo"
  scale: str = "group"
  eps_low: float = 0.2
  eps_high: float = 0.2
  beta: float = 0.04
  kl_estimator: str = "k3"
  kl_clamp: float | None = None
  mu: int = 1
  ref_refresh_every: int = 0
  mask_truncated: bool = False
  skip_equal_groups: bool = False
  resample_rounds: int = 0
  # rewards
  accuracy_weight: float = 1.0
  format_weight: float = 0.5
  language_weight: float = 0.0
  overlong_buffer: int = 0
  # optimizer
  lr: float = 1e-5
  warmup_steps: int = 5
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.99
  clip_norm: float = 1.0
  # logging, evaluation, checkpoints
  log_every: int = 1
  eval_every: int = 0
  eval_batch_size: int = 50
  eval_samples: int = 1
  sample_every: int = 10
  ckpt_every: int = 20
  keep_ckpts: int = 2
  fast_compile: bool = False

  def __post_init__(self):
    object.__setattr__(self, "task_kinds", split_names(self.task_kinds))
    self.validate()

  def validate(self) -> None:
    check_ints(self, positive=("steps", "prompts_per_step", "group_size", "max_new_tokens",
                               "mu", "log_every", "eval_batch_size", "eval_samples",
                               "sample_every", "ckpt_every", "keep_ckpts",
                               "n_train_problems"),
               non_negative=("warmup_steps", "eval_every", "ref_refresh_every",
                             "overlong_buffer", "n_eval_problems", "resample_rounds"))
    if self.group_size < 2:
      raise ValueError(f"group_size={self.group_size} must be >= 2: advantages compare "
                       "completions of the same prompt.")
    if self.loss_type not in grpo.LOSS_TYPES:
      raise ValueError(f"loss_type={self.loss_type!r} must be one of {grpo.LOSS_TYPES}.")
    if self.scale not in grpo.SCALES:
      raise ValueError(f"scale={self.scale!r} must be one of {grpo.SCALES}.")
    if self.kl_estimator not in grpo.KL_ESTIMATORS:
      raise ValueError(f"kl_estimator={self.kl_estimator!r} must be one of "
                       f"{grpo.KL_ESTIMATORS}.")
    if not (0 <= self.eps_low < 1 and self.eps_high >= 0):
      raise ValueError(f"eps_low={self.eps_low} must lie in [0, 1), eps_high={self.eps_high} "
                       ">= 0.")
    if not self.temperature > 0:
      raise ValueError(f"temperature={self.temperature} must be > 0: GRPO needs different "
                       "completions per prompt.")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p={self.top_p} must lie in (0, 1].")
    for name in ("beta", "accuracy_weight", "format_weight", "language_weight"):
      if not getattr(self, name) >= 0:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 0.")
    if not self.lr > 0:
      raise ValueError(f"lr={self.lr} must be > 0.")
    if self.overlong_buffer > self.max_new_tokens:
      raise ValueError(f"overlong_buffer={self.overlong_buffer} must be <= max_new_tokens="
                       f"{self.max_new_tokens}.")
    if self.kind_mix not in tasks.KIND_MIXES:
      raise ValueError(f"kind_mix={self.kind_mix!r} must be one of {tasks.KIND_MIXES}.")
    bad = [k for k in self.task_kinds if k not in tasks.VERIFIABLE_KINDS]
    if bad or not self.task_kinds:
      raise ValueError(f"task_kinds={self.task_kinds} must be a non-empty subset of "
                       f"{tasks.VERIFIABLE_KINDS}.")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> "GRPOConfig":
    check_field_names(cls, values)
    return cls(**values)

  def optimizer_config(self, source: TrainConfig) -> TrainConfig:
    """The TrainConfig the shared step/state/checkpoint code reads (and
    tools reading a run: export, launch.generate, init_from): AdamW at
    constant lr after warmup, no bias updates; the tokenizer and template of
    the `source` run."""
    return TrainConfig(steps=self.steps * self.mu, seed=self.seed, lr=self.lr,
                       warmup_steps=min(self.warmup_steps, self.steps * self.mu),
                       end_lr=self.lr, weight_decay=self.weight_decay, b1=self.b1, b2=self.b2,
                       clip_norm=self.clip_norm, bias_update_speed=0.0,
                       tokenizer_path=source.tokenizer_path, template=source.template,
                       max_digits=self.max_digits, task_kinds=self.task_kinds,
                       kind_mix=self.kind_mix, fast_compile=self.fast_compile)


# ---------------------------------------------------------------------------
# Rollout batches
# ---------------------------------------------------------------------------
def reward_functions(gcfg: GRPOConfig) -> dict[str, tuple[rewards.RewardFn, float]]:
  fns = {name: (rewards.BUILTIN[name], w) for name, w in
         (("accuracy", gcfg.accuracy_weight), ("format", gcfg.format_weight),
          ("language", gcfg.language_weight)) if w > 0}
  if not fns:
    raise ValueError("every reward weight is 0: set accuracy_weight, format_weight or "
                     "language_weight > 0.")
  return fns


def rollout_batch(prompts: list[list[int]], gen, pad_id: int) -> dict[str, np.ndarray]:
  """Arrays for scoring the generated completions with `token_logprobs`:
  tokens / targets / segment_ids / positions [N, S] (prompt + completion,
  right-padded; S = the longest prompt, rounded up to 8, + max_new) and
  `gather` [N, L]: the input position whose prediction is completion token j
  (prompt length - 1 + j)."""
  n, L = gen.tokens.shape
  longest = max(len(p) for p in prompts)
  S = -(-longest // 8) * 8 + L
  seq = np.full((n, S + 1), pad_id, np.int32)
  seg = np.zeros((n, S + 1), np.int32)
  for i, (p, ids) in enumerate(zip(prompts, gen.sequences())):
    row = list(p) + list(ids)
    seq[i, :len(row)] = row
    seg[i, :len(row)] = 1
  plen = np.array([len(p) for p in prompts], np.int32)
  gather = np.minimum(plen[:, None] - 1 + np.arange(L)[None], S - 1).astype(np.int32)
  return {"tokens": seq[:, :-1], "targets": seq[:, 1:], "segment_ids": seg[:, :-1],
          "positions": np.broadcast_to(np.arange(S, dtype=np.int32), (n, S)).copy(),
          "gather": gather}


def completion_logprobs(cfg: ModelConfig, variables, batch: dict) -> jax.Array:
  """log pi(completion token j) [N, L] of a rollout batch under `variables`."""
  full = token_logprobs(cfg, variables, batch["tokens"], batch["targets"],
                        segment_ids=batch["segment_ids"], positions=batch["positions"])
  return jnp.take_along_axis(full, batch["gather"], axis=1)


def grpo_loss_fn(cfg: ModelConfig, gcfg: GRPOConfig) -> Callable:
  """The loss for `make_update_step` on a rollout batch (+ old_logp,
  ref_logp, advantages [N, L] (constant along L), mask [N, L])."""
  def loss_fn(params, router_bias, batch):
    logp = completion_logprobs(cfg, {"params": params, "router_bias": router_bias}, batch)
    loss, m = grpo.grpo_loss(
        logp, batch["old_logp"], batch["ref_logp"] if gcfg.beta > 0 else None,
        batch["advantages"][:, 0], batch["mask"], eps_low=gcfg.eps_low,
        eps_high=gcfg.eps_high, beta=gcfg.beta, loss_type=gcfg.loss_type,
        kl_estimator=gcfg.kl_estimator, kl_clamp=gcfg.kl_clamp)
    return loss, {"metrics": dict(m, loss=loss)}
  return loss_fn


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------
def _plot(workdir: str) -> str | None:
  records = metrics.read_metrics(os.path.join(workdir, metrics.METRICS_FILE))
  train = [r for r in records if "reward" in r]
  evals = [r for r in records if "eval_sampled_accuracy" in r]
  if not train:
    return None
  from matplotlib.figure import Figure
  fig = Figure(figsize=(7, 4))
  ax = fig.add_subplot()
  steps = np.array([r["step"] for r in train])
  window = max(1, len(train) // 20)
  for key, label in (("reward", "rollout reward (mean)"), ("accuracy", "rollout accuracy")):
    metrics.plot_smoothed(ax, steps, np.array([r[key] for r in train]),
                          label + (f" ({window}-step mean)" if window > 1 else ""), window)
  if evals:
    ax.plot([r["step"] for r in evals], [r["eval_sampled_accuracy"] for r in evals], "o-",
            label="held-out sampled accuracy")
    ax.plot([r["step"] for r in evals], [r["eval_greedy_accuracy"] for r in evals], "s--",
            label="held-out greedy accuracy")
  ax.set_xlabel("GRPO step")
  ax.grid(alpha=0.3)
  ax.legend(loc="upper left", fontsize=8)
  path = os.path.join(workdir, "grpo.png")
  fig.savefig(path + ".tmp.png", dpi=100)
  os.replace(path + ".tmp.png", path)
  return path


def _atomic_json(path: str, value: Any) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=1)
  os.replace(path + ".tmp", path)


def grpo_mesh(gcfg: GRPOConfig, mesh_cfg: MeshConfig | None, model_cfg: ModelConfig,
              opt_cfg: TrainConfig):
  """(mesh, rules) of a GRPO run ((None, None) on one device); errors
  naming the field before anything compiles."""
  if mesh_cfg is None:
    return None, None
  if mesh_cfg.pipe > 1:
    raise NotImplementedError(
        f"mesh.pipe={mesh_cfg.pipe}: the pipeline runs the pretraining loss only; GRPO's "
        "loss has no pipelined gradient. Use mesh.pipe=1 (data/fsdp/tensor/expert axes).")
  if jax.process_count() > 1:
    raise NotImplementedError(
        f"GRPO runs in one process (this is process {jax.process_index()} of "
        f"{jax.process_count()}): use one host's devices with a mesh.")
  rows = gcfg.prompts_per_step * gcfg.group_size
  sizes = mesh_cfg.shape(len(jax.devices()))
  split = axes_size(sizes, BATCH_AXES)
  if rows % split:
    raise ValueError(
        f"prompts_per_step x group_size = {gcfg.prompts_per_step} x {gcfg.group_size} = "
        f"{rows} rollouts per step must be a multiple of the mesh's batch axes "
        f"data*fsdp*expert={split}; change prompts_per_step or the mesh.")
  return mesh_for(mesh_cfg, dataclasses.replace(opt_cfg, batch_size=rows), model_cfg)


def train_grpo(gcfg: GRPOConfig, workdir: str, *, stop_after: int | None = None,
               extra_rewards: dict[str, tuple[rewards.RewardFn, float]] | None = None,
               mesh_cfg: MeshConfig | None = None,
               log: Callable[[str], None] = print) -> dict[str, Any]:
  """GRPO from the run in gcfg.init_from, resuming from `workdir` if it
  holds checkpoints. Returns the summary (also written to summary.json):
  greedy/sampled held-out accuracy before and after, format rate after,
  wall_s, final_step, skipped_steps, history (per-step scalars of this call).
  extra_rewards: {name: (fn(completion, example) -> float | None, weight)}
  added to the built-in ones (example: {"answer", "prompt"}).
  mesh_cfg: run on a device mesh (data/fsdp/tensor/expert axes, one
  process): the policy, its optimizer state and the reference are sharded
  by the mesh's rule set, rollouts and updates run on all devices, and the
  numbers are the one-device run's up to float summation order.
  stop_after: end this call after that step, with a checkpoint (tests)."""
  t_start = time.time()
  if not gcfg.init_from:
    raise ValueError("init_from is empty: GRPO starts from a trained run (e.g. the SFT "
                     "stage: python -m launch.train --config=launch/configs/default.py "
                     "--workdir=W, then --config.init_from=W).")
  from deepseek_jax.train import export
  export.require_run(gcfg.init_from, "init_from")
  model_cfg, src_train, init_vars, src_step = export.load_trained_run(gcfg.init_from)
  tok = (load_tokenizer(src_train.tokenizer_path) if src_train.tokenizer_path
         else default_tokenizer())
  template = src_train.template
  train_problems = tasks.mixed_problems(gcfg.n_train_problems, seed=gcfg.seed, split="train",
                                        max_digits=gcfg.max_digits, kinds=gcfg.task_kinds,
                                        kind_mix=gcfg.kind_mix)
  eval_problems = tasks.generate_problems(gcfg.n_eval_problems, seed=gcfg.seed, split="test",
                                          max_digits=gcfg.max_digits, kinds=gcfg.task_kinds)
  reward_fns = {**(reward_functions(gcfg) if gcfg.accuracy_weight or gcfg.format_weight
                   or gcfg.language_weight or not extra_rewards else {}),
                **(extra_rewards or {})}
  prompt_ids = [pipeline.encode_prompt(tok, p, template) for p in train_problems]
  longest = max(len(p) for p in prompt_ids) + gcfg.max_new_tokens
  if longest > model_cfg.max_seq_len:
    raise ValueError(f"a prompt plus max_new_tokens={gcfg.max_new_tokens} is {longest} "
                     f"tokens > the model's max_seq_len={model_cfg.max_seq_len}; lower "
                     "max_new_tokens.")
  opt_cfg = gcfg.optimizer_config(src_train)
  mesh, rules = grpo_mesh(gcfg, mesh_cfg, model_cfg, opt_cfg)
  os.makedirs(workdir, exist_ok=True)
  _atomic_json(os.path.join(workdir, "grpo_config.json"), gcfg.to_dict())
  # The checkpoint's train config is a plain TrainConfig (so export,
  # launch.generate and init_from read GRPO runs like any other) plus the
  # GRPO config under "grpo" (compared on resume like any field).
  ckpts, diff = checkpoint.open_checkpoints(
      workdir, model_cfg, {**opt_cfg.to_dict(), "grpo": gcfg.to_dict()},
      every=gcfg.ckpt_every, keep=gcfg.keep_ckpts)
  writer = None
  try:
    if diff:
      log("note: the config differs from the checkpointed run: " + "; ".join(diff))
    state = with_variables(init_train_state(model_cfg, opt_cfg, jax.random.key(gcfg.seed),
                                            mesh, rules), init_vars)
    # The reference: the starting policy (refreshed every ref_refresh_every
    # steps; a resumed run with refreshes restarts it from the resumed policy).
    # (copies: the update step donates the policy's buffers)
    snapshot = lambda: jax.tree.map(jnp.copy, {"params": state.params,  # noqa: E731
                                               "router_bias": state.router_bias})
    ref = snapshot() if gcfg.beta > 0 else None
    resumed = ckpts.latest_step()
    if resumed is None:
      log(f"GRPO from {gcfg.init_from} (step {src_step}); {model_cfg.n_layers} layers, "
          f"{gcfg.prompts_per_step} prompts x {gcfg.group_size} completions per step")
    else:
      state, _ = ckpts.restore(abstract_train_state(model_cfg, opt_cfg, mesh, rules))
      if gcfg.ref_refresh_every and gcfg.beta > 0:
        ref = snapshot()
      log(f"resuming from {ckpts.directory} at step {resumed}")
    del init_vars
    start = resumed or 0
    end = gcfg.steps if stop_after is None else min(stop_after, gcfg.steps)
    if mesh is not None:
      log(f"mesh: {describe_mesh(mesh)}, rules {mesh_cfg.rules}")
    update = make_update_step(model_cfg, opt_cfg, grpo_loss_fn(model_cfg, gcfg), mesh, rules,
                              skip_nonfinite=True)
    score_fn = jax.jit(lambda v, b: completion_logprobs(model_cfg, v, b))

    def score(variables, batch):   # the reference's log-probs, on the policy's mesh
      if mesh is None:
        return score_fn(variables, batch)
      with parallel.activate(mesh, rules):
        return score_fn(variables, jax.device_put(batch, parallel.batch_sharding(mesh, rules)))
    writer = metrics.MetricsWriter(workdir, start)
    samples_path = os.path.join(workdir, "samples.jsonl")
    n_eval_batch = min(gcfg.eval_batch_size, max(len(eval_problems), 1))

    def policy():
      return {"params": state.params, "router_bias": state.router_bias}

    def run_eval(step: int) -> dict[str, float]:
      if not eval_problems:
        return {}
      kw = dict(max_new_tokens=gcfg.max_new_tokens, batch_size=n_eval_batch, template=template,
                mesh=mesh)
      greedy = evaluate.exact_match(policy(), tok, eval_problems, model_cfg, **kw)
      sampled = evaluate.exact_match(policy(), tok, list(eval_problems) * gcfg.eval_samples,
                                     model_cfg, **kw, temperature=gcfg.temperature,
                                     rng=jax.random.key(gcfg.seed + 7919))
      out = {"eval_greedy_accuracy": greedy["accuracy"],
             "eval_sampled_accuracy": sampled["accuracy"],
             "eval_format_ok": sampled["format_ok"],
             **{f"eval_greedy_accuracy/{k}": v for k, v in greedy["by_kind"].items()},
             **{f"eval_sampled_accuracy/{k}": v for k, v in sampled["by_kind"].items()}}
      writer.write(step, out)
      draws = f" x {gcfg.eval_samples} draws" if gcfg.eval_samples > 1 else ""
      log(f"eval step {step}: held-out accuracy greedy {out['eval_greedy_accuracy']:.3f}, "
          f"sampled (T={gcfg.temperature}) {out['eval_sampled_accuracy']:.3f}, format "
          f"{out['eval_format_ok']:.3f} (n={len(eval_problems)}{draws})")
      return out

    evals = [r for r in metrics.read_metrics(writer.path) if "eval_sampled_accuracy" in r]
    before = next((r for r in evals if r["step"] == 0), None) or run_eval(0)
    history, skipped = [], 0
    G, P = gcfg.group_size, gcfg.prompts_per_step
    def rollout(step: int, round_: int) -> dict[str, Any]:
      """P prompts x G completions, scored: per-completion fields (lists and
      arrays of N = P * G rows, group-major). Round 0 is the step's draw;
      rounds >= 1 are dynamic sampling's fresh prompts."""
      seed = [gcfg.seed, step] + ([round_] if round_ else [])
      chosen = np.random.default_rng(seed).choice(len(train_problems), size=P,
                                                  replace=len(train_problems) < P)
      problems = [train_problems[i] for i in chosen for _ in range(G)]
      prompts = [prompt_ids[i] for i in chosen for _ in range(G)]
      key = jax.random.key(gcfg.seed * 1_000_003 + step)
      gen = generate(model_cfg, policy(), prompts, max_new_tokens=gcfg.max_new_tokens,
                     temperature=gcfg.temperature, top_p=gcfg.top_p, stop_ids=(tok.eos_id,),
                     rng=jax.random.fold_in(key, round_) if round_ else key, mesh=mesh)
      seqs = gen.sequences()
      texts = [tok.decode(s[:-1] if s and s[-1] == tok.eos_id else s) for s in seqs]
      examples = [{"answer": p.answer, "prompt": p.prompt} for p in problems]
      total, per_fn, valid = rewards.combine(texts, examples, reward_fns)
      if gcfg.overlong_buffer:
        total = total + np.array([rewards.overlong(len(s), gcfg.max_new_tokens,
                                                   gcfg.overlong_buffer) for s in seqs])
      return {"problems": problems, "prompts": prompts, "seqs": seqs, "texts": texts,
              "examples": examples, "total": total, "valid": valid,
              "per_fn": per_fn, "tokens": gen.tokens, "lengths": gen.lengths,
              "logprobs": gen.logprobs}

    def equal_groups(roll) -> np.ndarray:    # [P] bool: all G rewards the same
      return roll["total"].reshape(P, G).std(axis=1) == 0

    def take_groups(roll, groups) -> dict[str, Any]:
      rows = [g * G + j for g in groups for j in range(G)]
      out = {}
      for k, v in roll.items():
        if k == "per_fn":
          out[k] = {f: np.asarray(a)[rows] for f, a in v.items()}
        elif isinstance(v, list):
          out[k] = [v[i] for i in rows]
        else:
          out[k] = np.asarray(v)[rows]
      return out

    def concat(a, b) -> dict[str, Any]:
      return {k: ({f: np.concatenate([a[k][f], b[k][f]]) for f in a[k]} if k == "per_fn"
                  else a[k] + b[k] if isinstance(a[k], list) else np.concatenate([a[k], b[k]]))
              for k in a}

    for step in range(start + 1, end + 1):
      t0 = time.time()
      roll = rollout(step, 0)
      drawn_equal = float(equal_groups(roll).mean())
      rounds = 0
      # DAPO's dynamic sampling: replace groups of equal rewards (no gradient
      # signal) by informative groups of fresh prompts, up to resample_rounds.
      while rounds < gcfg.resample_rounds and equal_groups(roll).any():
        rounds += 1
        fresh = rollout(step, rounds)
        good = np.flatnonzero(~equal_groups(fresh))
        bad = np.flatnonzero(equal_groups(roll))
        n = min(len(good), len(bad))
        if n:
          drop = set(bad[:n].tolist())
          roll = concat(take_groups(roll, [g for g in range(P) if g not in drop]),
                        take_groups(fresh, good[:n]))
      problems, prompts, seqs, texts = (roll["problems"], roll["prompts"], roll["seqs"],
                                        roll["texts"])
      examples, total, per_fn, valid = (roll["examples"], roll["total"], roll["per_fn"],
                                        roll["valid"])
      gen = Generation(tokens=roll["tokens"], lengths=roll["lengths"],
                       logprobs=roll["logprobs"], steps=0)
      truncated = np.array([not (s and s[-1] == tok.eos_id) for s in seqs])
      adv = np.asarray(grpo.group_advantages(total, G, gcfg.scale))
      equal = np.repeat(equal_groups(roll), G)
      keep = valid.copy()
      if gcfg.mask_truncated:
        keep &= ~truncated
      if gcfg.skip_equal_groups:
        keep &= ~equal
      L = gcfg.max_new_tokens
      mask = (np.arange(L)[None] < gen.lengths[:, None]) & keep[:, None]
      batch = rollout_batch(prompts, gen, tok.pad_id)
      batch.update(old_logp=np.asarray(gen.logprobs, np.float32), mask=mask.astype(np.float32),
                   advantages=np.repeat(adv[:, None], L, axis=1).astype(np.float32))
      batch["ref_logp"] = (np.asarray(score(ref, batch)) if gcfg.beta > 0
                           else np.zeros_like(batch["old_logp"]))
      for _ in range(gcfg.mu):
        state, m = update(state, batch)
        m = jax.device_get(m)
        skipped += int(m["skipped"])
      if gcfg.beta > 0 and gcfg.ref_refresh_every and step % gcfg.ref_refresh_every == 0:
        ref = snapshot()
      lengths = gen.lengths.astype(np.float64)
      n_tok = max(mask.sum(), 1)
      scalars = {
          "reward": float(total.mean()), "reward_std": float(total.std()),
          **{f"reward/{k}": float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
             for k, v in per_fn.items()},
          "accuracy": float(np.nanmean(per_fn["accuracy"])) if "accuracy" in per_fn else
          float(np.mean([rewards.accuracy(t, e) for t, e in zip(texts, examples)])),
          "format": float(np.mean([tasks.format_ok(t) for t in texts])),
          "zero_std_groups": float(equal.reshape(P, G)[:, 0].mean()),
          "zero_std_groups_drawn": drawn_equal, "resample_rounds": float(rounds),
          "completion_len": float(lengths.mean()), "completion_len_max": float(lengths.max()),
          "truncated": float(truncated.mean()), "invalid": float((~valid).mean()),
          "entropy": float(-(np.asarray(gen.logprobs) * mask).sum() / n_tok),
          "loss": float(m["loss"]), "kl": float(m["kl"]), "clip_low": float(m["clip_low"]),
          "clip_high": float(m["clip_high"]), "grad_norm": float(m["grad_norm"]),
          "lr": float(m["lr"]), "skipped": float(skipped), "step_s": time.time() - t0}
      history.append({"step": step, **scalars})
      writer.write(step, scalars)
      if step % gcfg.log_every == 0 or step == end or step == start + 1:
        log(f"step {step:>4d}/{gcfg.steps} | reward {scalars['reward']:.3f} "
            f"acc {scalars['accuracy']:.3f} fmt {scalars['format']:.2f} | "
            f"len {scalars['completion_len']:.0f} trunc {scalars['truncated']:.2f} "
            f"zero-std {scalars['zero_std_groups']:.2f} | kl {scalars['kl']:.4f} "
            f"gnorm {scalars['grad_norm']:.3f} loss {scalars['loss']:+.4f} | "
            f"{scalars['step_s']:.1f}s" + (f" | skipped {skipped}" if skipped else ""))
      if step % gcfg.sample_every == 0 or step == start + 1:
        with open(samples_path, "a") as f:
          for i in range(0, len(texts), G)[:4]:
            f.write(json.dumps({"step": step, "prompt": problems[i].prompt,
                                "answer": problems[i].answer, "completion": texts[i],
                                "reward": float(total[i])}) + "\n")
      if gcfg.eval_every and step % gcfg.eval_every == 0 and step != gcfg.steps:
        run_eval(step)
      ckpts.save(step, state, {"step": step}, force=step == end)
    final_step = int(state.step) // gcfg.mu
    ckpts.save(final_step, state, {"step": final_step}, force=True)
    evals = [r for r in metrics.read_metrics(writer.path) if "eval_sampled_accuracy" in r]
    after = next((r for r in evals if r["step"] == final_step), None)
    if after is None and final_step == gcfg.steps:
      after = run_eval(final_step)
    plot = _plot(workdir)
    summary = {
        "greedy_accuracy_before": before.get("eval_greedy_accuracy"),
        "sampled_accuracy_before": before.get("eval_sampled_accuracy"),
        "greedy_accuracy_after": (after or {}).get("eval_greedy_accuracy"),
        "sampled_accuracy_after": (after or {}).get("eval_sampled_accuracy"),
        "format_rate_after": (after or {}).get("eval_format_ok"),
        "final_step": final_step, "skipped_steps": skipped,
        "wall_s": time.time() - t_start, "init_from": gcfg.init_from,
    }
    if final_step == gcfg.steps:
      _atomic_json(os.path.join(workdir, "summary.json"), summary)
    log(f"done: step {final_step}; sampled accuracy {summary['sampled_accuracy_before']} -> "
        f"{summary['sampled_accuracy_after']}, greedy {summary['greedy_accuracy_before']} -> "
        f"{summary['greedy_accuracy_after']}" + (f"; plot {plot}" if plot else ""))
    return {**summary, "history": history}
  finally:
    if writer is not None:
      writer.close()     # flushes the TensorBoard events
    ckpts.close()
