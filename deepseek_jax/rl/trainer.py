"""The GRPO trainer: `train_grpo(gcfg, workdir)` starting from a trained run.

Each step (DeepSeekMath sec. 4.1.2, DeepSeek-R1 sec. 2.2):
  1. draw `prompts_per_step` training problems (seeded by step: resumable);
  2. rollout: `infer.generate` samples `group_size` completions per prompt
     at `temperature` from the current policy (its key a function of the
     step: resumable), prefilling each prompt once for its group
     (`generate(..., group_size=)`: prefix sharing);
  3. rewards (rewards.combine of the weighted rule-based functions) and
     group advantages (grpo.group_advantages); completions a reward
     function could not score are masked out, and optionally truncated
     ones (`mask_truncated`) and groups of equal rewards
     (`skip_equal_groups`, DAPO's dynamic sampling by filtering; or
     `resample_rounds`: replaced by informative groups of fresh prompts);
  4. `mu` optimisation passes of `make_update_step` over the rollout batch
     with grpo.grpo_loss. Every log-prob (pi_old, pi_theta, the reference)
     comes from the training forward (`infer.token_logprobs`) in the
     distribution the rollout sampled from: logits / temperature, then the
     sampler's top-p filter. pi_old is scored once per step before the
     update (so on the first pass rho = 1 exactly), the frozen reference
     once per step (not at all when beta = 0);
     the reference is the starting policy, refreshed every
     `ref_refresh_every` steps when set.
The policy, the reference and the rollout all run the one `Transformer`.

Steps 1-3 are the batch source, step 4 the update, and the held-out
evaluation the eval that `GRPO` hands the run harness (train/runner.py),
which runs them as it runs pretraining: resume, checkpoints (async, keep
policy), SIGTERM / SIGINT -> a checkpoint at the step reached and a normal
return, the NaN/Inf policy (a non-finite step is skipped and counted;
max_bad_steps in a row stop the run; the counters live in the checkpoint),
metrics.jsonl + TensorBoard, the progress line. A resumed run equals an
uninterrupted one bit for bit, except with ref_refresh_every: the
reference then restarts from the resumed policy, not from the policy of
the last refresh (documented, not bit-exact).

The loss printed is ~0 at the start by construction (grpo.py's docstring):
the progress line leads with reward and accuracy instead.

Files in `workdir`: grpo_config.json, checkpoints/ (the policy's TrainState,
readable by every tool that reads a training run: launch.generate, export,
init_from; resumable), metrics.jsonl (per step: reward mean/std, reward/<fn>,
accuracy, format, zero_std_groups (all of the trained batch: with resample_rounds
its groups are selected; zero_std_groups_drawn is the step's first draw's),
resample_rounds, completion length mean/max, truncated,
kl, entropy (-mean log p of the sampled tokens), clip_low/high, grad_norm,
skipped, bad_steps; per eval: eval_greedy_accuracy, eval_sampled_accuracy
(the mean of eval_samples draws per problem), eval_format_ok, and per problem
kind eval_greedy_accuracy/<kind>, eval_sampled_accuracy/<kind>), tb/,
samples.jsonl (some rollouts every `sample_every` steps), grpo.png (reward
and accuracy over steps), summary.json (at the last step).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax import parallel
from deepseek_jax.config import ModelConfig, check_field_names, check_ints, split_names
from deepseek_jax.data import prompts as prompts_lib
from deepseek_jax.data import tasks
from deepseek_jax.data.tokenizer import default_tokenizer, load_tokenizer
from deepseek_jax.files import atomic_json
from deepseek_jax.infer import generate, rollout_routing, token_logprobs
from deepseek_jax.infer.decode import Generation, bucket_length
from deepseek_jax.parallel import MeshConfig
from deepseek_jax.parallel.rules import BATCH_AXES, axes_size
from deepseek_jax.rl import evaluation, grpo, model_rewards, rewards, verifiers
from deepseek_jax.train import export, metrics, runner
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.start import describe_mesh, mesh_for, with_variables
from deepseek_jax.train.step import init_train_state, make_update_step


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """GRPO hyperparameters. The model is the `init_from` run's.

  Problems: the embedded arithmetic task (data/tasks.py) of that run's
    tokenizer and template; n_train_problems to draw prompts from (mixed
    by kind_mix, tasks.mixed_problems), n_eval_problems held out.
    Or the user's prompts: prompt_files (jsonl / parquet records with
    prompt, answer, optional kind and system: data/prompts.py), every record
    used; held out: eval_prompt_files, or n_eval_problems records drawn from
    prompt_files (seeded). chat_template: "auto" (the chat template of the
    tokenizer's tokenizer_config.json when it has one, else the run's
    template), "none", "short", "r1" or a jinja2 file. verifier (rl/verifiers:
    math, choice, exact, regex) is the accuracy reward and the held-out check
    on prompt files. reward_fns: user functions by import path
    ("pkg.module:fn", called fn(completion_text, answer) -> float | None,
    weight 1), each call limited to reward_timeout_s; errors and timeouts
    score None and are counted per function in metrics
    (reward_errors/<fn>, reward_timeouts/<fn>).
    reward_models: trained reward models ('NAME=RUN[@on]': a run of
    launch/configs/reward_model.py, scored in batches through
    preference_trainer.load_reward_model; on "response" (default: the whole
    completion) or "summary" (the text after </think>), as R1's fourth stage
    scores harmlessness and helpfulness).
    judges: LLM judges ('NAME=PATH[@on]': a training run or an HF directory,
    greedy through our generate, prompted with judge_rubric (a file; default
    model_rewards.DEFAULT_RUBRIC), the first number of the output over 10 is
    the score; on "summary" (default: the text after </think>) or
    "response"); unparsable outputs score None, counted per step
    (reward_unparsable/<name>). reward_weights: 'NAME=W' for reward_fns and
    judges (default 1). kind_rewards: 'KIND=NAME+NAME' routes prompt kinds to
    rewards (R1's fourth stage: 'math=accuracy+format', 'general=judge');
    a reward no entry names scores every kind; per-kind mean rewards are
    logged as reward_kind/<kind>.
    Rollout: prompts_per_step x group_size completions of at most
    max_new_tokens at temperature / top_p.
  Rollout vs trainer: the sampler's log-probs (gen.logprobs, in the sampling
    distribution) are compared with pi_old from the training forward
    (logp_mismatch_mean / _max per step); tis_cap > 0 weights each token by
    min(pi_old / pi_rollout, tis_cap) (truncated importance sampling, for
    rollouts from another numerical path); routing_replay: the update and
    pi_old use the experts each token was routed to in the rollout
    (Transformer's routing=; the reference routes itself).
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
  Robustness, as in pretraining (TrainConfig): a step whose loss or
    gradients are not finite in any of its mu passes is skipped (`skipped`,
    counted in `bad_steps`); max_bad_steps in a row stop the run with
    FloatingPointError (0 = the first one does). nan_steps: test hook, the
    advantages of these steps are NaN.
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
  # the user's prompts instead of the arithmetic task (data/prompts.py)
  prompt_files: tuple[str, ...] = ()
  eval_prompt_files: tuple[str, ...] = ()
  chat_template: str = "auto"
  verifier: str = "math"
  reward_fns: tuple[str, ...] = ()
  reward_timeout_s: float = 10.0
  # model rewards (rl/model_rewards.py) and R1 stage 4's routing by prompt kind
  reward_models: tuple[str, ...] = ()
  judges: tuple[str, ...] = ()
  judge_rubric: str = ""
  judge_max_new_tokens: int = 8
  reward_weights: tuple[str, ...] = ()
  kind_rewards: tuple[str, ...] = ()
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
  routing_replay: bool = False
  tis_cap: float | None = None
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
  # robustness
  max_bad_steps: int = 10
  nan_steps: tuple[int, ...] = ()
  fast_compile: bool = False

  def __post_init__(self):
    object.__setattr__(self, "task_kinds", split_names(self.task_kinds))
    object.__setattr__(self, "nan_steps", tuple(self.nan_steps))
    for name in ("prompt_files", "eval_prompt_files", "reward_fns", "reward_models", "judges",
                 "reward_weights", "kind_rewards"):
      object.__setattr__(self, name, split_names(getattr(self, name)))
    self.validate()

  def validate(self) -> None:
    check_ints(self, positive=("steps", "prompts_per_step", "group_size", "max_new_tokens",
                               "mu", "log_every", "eval_batch_size", "eval_samples",
                               "sample_every", "ckpt_every", "keep_ckpts",
                               "n_train_problems"),
               non_negative=("warmup_steps", "eval_every", "ref_refresh_every",
                             "overlong_buffer", "n_eval_problems", "resample_rounds",
                             "max_bad_steps"))
    if not all(isinstance(t, int) and t >= 1 for t in self.nan_steps):
      raise ValueError(f"nan_steps={self.nan_steps!r} must be step numbers >= 1.")
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
    if self.verifier not in verifiers.VERIFIERS:
      raise ValueError(f"verifier={self.verifier!r} must be one of "
                       f"{tuple(sorted(verifiers.VERIFIERS))}.")
    if self.tis_cap is not None and not self.tis_cap > 0:
      raise ValueError(f"tis_cap={self.tis_cap} must be > 0 (or None: no correction).")
    check_ints(self, positive=("judge_max_new_tokens",))
    for field in ("reward_models", "judges"):
      for spec in getattr(self, field):
        model_rewards.parse_spec(spec, field)
    for entry in self.reward_weights:
      name, eq, w = entry.partition("=")
      try:
        ok = eq and float(w) >= 0
      except ValueError:
        ok = False
      if not ok:
        raise ValueError(f"reward_weights entry {entry!r} must read NAME=WEIGHT with a "
                         "weight >= 0 (e.g. 'judge=0.5').")
    if not self.reward_timeout_s > 0:
      raise ValueError(f"reward_timeout_s={self.reward_timeout_s} must be > 0 seconds.")
    if self.eval_prompt_files and not self.prompt_files:
      raise ValueError(f"eval_prompt_files={self.eval_prompt_files} without prompt_files: "
                       "the built-in task holds out its own problems; set prompt_files too.")
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
class TimedReward:
  """A user reward function `fn(completion_text, answer) -> float | None` (the
  verifiers' signature), called with a timeout (verifiers.call_with_timeout).
  An exception, a timeout or a return value that is not a finite number
  scores None (the completion is not scored) and is counted; `take_counts`
  returns {"errors", "timeouts"} since the last call and the first message."""

  def __init__(self, fn: Callable[[str, Any], Any], timeout_s: float, name: str):
    self.fn, self.timeout_s, self.__name__ = fn, timeout_s, name
    self.errors = self.timeouts = 0
    self.first_error: str | None = None

  def __call__(self, completion: str, example: dict[str, Any]) -> float | None:
    score, error = verifiers.call_with_timeout(self.fn, completion, example["answer"],
                                               self.timeout_s)
    if error is not None:
      if error.startswith("TimeoutError"):
        self.timeouts += 1
      else:
        self.errors += 1
      self.first_error = self.first_error or error
    return score

  def take_counts(self) -> tuple[dict[str, float], str | None]:
    counts = {"errors": float(self.errors), "timeouts": float(self.timeouts)}
    first, self.errors, self.timeouts, self.first_error = self.first_error, 0, 0, None
    return counts, first


def verifier_reward(name: str) -> rewards.RewardFn:
  """The reward `fn(completion, example)` of verifier `name` against example["answer"]."""
  check = verifiers.get(name)

  def reward(completion: str, example: dict[str, Any]) -> float | None:
    return check(completion, example["answer"])
  reward.__name__ = f"verifier_{name}"
  return reward


def task_score(completion: str, record: prompts_lib.PromptRecord) -> float:
  """The built-in task's held-out check (tasks.is_correct: the <answer> text
  equals the reference; Countdown: any valid expression) as a score."""
  return float(tasks.is_correct(completion, tasks.Problem(record.prompt, "", record.answer)))


def accuracy_reward(gcfg: GRPOConfig) -> rewards.RewardFn:
  """The accuracy reward: the `verifier` on prompt files, the task's check
  (number equivalence, Countdown verified) on the built-in task."""
  return verifier_reward(gcfg.verifier) if gcfg.prompt_files else rewards.accuracy


def reward_functions(gcfg: GRPOConfig, extra: dict[str, tuple[rewards.RewardFn, float]] | None
                     = None) -> dict[str, tuple[rewards.RewardFn, float]]:
  """{name: (fn(completion, example), weight)}: accuracy (`accuracy_reward`),
  format and language at their weights (0 = off), each of `reward_fns`
  (weight 1, a TimedReward), and `extra`."""
  fns = {name: (fn, w) for name, fn, w in
         (("accuracy", accuracy_reward(gcfg), gcfg.accuracy_weight),
          ("format", rewards.format_reward, gcfg.format_weight),
          ("language", rewards.language, gcfg.language_weight)) if w > 0}
  weights = {n.strip(): float(w) for n, _, w in (e.partition("=") for e in gcfg.reward_weights)}
  for path in gcfg.reward_fns:
    fns[path] = (TimedReward(verifiers.load_reward_fn(path), gcfg.reward_timeout_s, path),
                 weights.get(path, 1.0))
  for spec in gcfg.reward_models:
    from deepseek_jax.rl.preference_trainer import load_reward_model
    name, path, on = model_rewards.parse_spec(spec, "reward_models")
    fns[name] = (model_rewards.RewardModelReward(load_reward_model(path), on=on, name=name),
                 weights.get(name, 1.0))
  judges = model_rewards.load_judges(gcfg.judges, rubric_file=gcfg.judge_rubric,
                                     max_new_tokens=gcfg.judge_max_new_tokens)
  fns.update({name: (judge, weights.get(name, 1.0)) for name, judge in judges.items()})
  fns.update(extra or {})
  unknown = sorted(set(weights) - set(fns))
  if unknown:
    raise ValueError(f"reward_weights names {unknown}, which are not rewards of this run "
                     f"({sorted(fns)}).")
  if not fns:
    raise ValueError("every reward weight is 0 and no reward_fns are given: set "
                     "accuracy_weight, format_weight or language_weight > 0, or name "
                     "reward_fns=('package.module:function',).")
  return _route_kinds(fns, gcfg.kind_rewards)


class _Routed:
  """A reward function restricted to some prompt kinds (rewards.applies):
  the function's calls, batching and counters, with a `kinds` set."""

  def __init__(self, fn, kinds: frozenset):
    self.fn, self.kinds = fn, kinds
    self.__name__ = getattr(fn, "__name__", "reward")
    if hasattr(fn, "score_batch"):
      self.score_batch = fn.score_batch
    if hasattr(fn, "take_counts"):
      self.take_counts = fn.take_counts

  def __call__(self, completion: str, example: dict[str, Any]):
    return self.fn(completion, example)


def _route_kinds(fns: dict[str, tuple[rewards.RewardFn, float]], entries: Sequence[str]
                 ) -> dict[str, tuple[rewards.RewardFn, float]]:
  """fns with each reward that `kind_rewards` names restricted to its kinds."""
  kinds = model_rewards.parse_kind_rewards(entries, list(fns))
  return {name: ((_Routed(fn, kinds[name]), w) if name in kinds else (fn, w))
          for name, (fn, w) in fns.items()}


def rollout_batch(prompts: list[list[int]], gen, pad_id: int, *,
                  prompt_len: int | None = None) -> dict[str, np.ndarray]:
  """Arrays for scoring the generated completions with `token_logprobs`:
  tokens / targets / segment_ids / positions [N, S] (prompt + completion,
  right-padded; S = prompt_len + max_new, prompt_len by default the longest
  prompt rounded up to 8; the trainer passes the sampler's power-of-two
  bucket, infer.decode.bucket_length, so S takes few values over a run and
  the update compiles once per bucket) and `gather` [N, L]: the input
  position whose prediction is completion token j (prompt length - 1 + j)."""
  n, L = gen.tokens.shape
  longest = max(len(p) for p in prompts)
  if prompt_len is not None and prompt_len < longest:
    raise ValueError(f"prompt_len={prompt_len} < the longest prompt ({longest} tokens).")
  S = (prompt_len if prompt_len is not None else -(-longest // 8) * 8) + L
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


def completion_logprobs(cfg: ModelConfig, variables, batch: dict, *,
                        temperature: float = 1.0, top_p: float = 1.0) -> jax.Array:
  """log pi(completion token j) [N, L] of a rollout batch under `variables`,
  in the distribution the rollout sampled from (temperature, top_p: the
  sampler's, infer.sampling), so that pi/pi_old and the KL compare the
  distributions that drew the tokens."""
  return token_logprobs(cfg, variables, batch["tokens"], batch["targets"],
                        segment_ids=batch["segment_ids"], positions=batch["positions"],
                        temperature=temperature, top_p=top_p, routing=batch.get("routing"),
                        gather=batch["gather"])   # the head on completion positions only


def grpo_loss_fn(cfg: ModelConfig, gcfg: GRPOConfig) -> Callable:
  """The loss for `make_update_step` on a rollout batch (+ old_logp,
  ref_logp, advantages [N, L] (constant along L), mask [N, L])."""
  def loss_fn(params, router_bias, batch):
    logp = completion_logprobs(cfg, {"params": params, "router_bias": router_bias}, batch,
                               temperature=gcfg.temperature, top_p=gcfg.top_p)
    loss, m = grpo.grpo_loss(
        logp, batch["old_logp"], batch["ref_logp"] if gcfg.beta > 0 else None,
        batch["advantages"][:, 0], batch["mask"], eps_low=gcfg.eps_low,
        eps_high=gcfg.eps_high, beta=gcfg.beta, loss_type=gcfg.loss_type,
        kl_estimator=gcfg.kl_estimator, kl_clamp=gcfg.kl_clamp,
        rollout_logp=batch["rollout_logp"] if gcfg.tis_cap else None, tis_cap=gcfg.tis_cap)
    return loss, {"metrics": dict(m, loss=loss)}
  return loss_fn



# ---------------------------------------------------------------------------
# The trainer, as the run harness sees it
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
  return metrics.save_figure(fig, os.path.join(workdir, "grpo.png"))


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


def _mean(values: np.ndarray, reduce=np.mean) -> float:
  return float(reduce(values)) if values.size else float("nan")


def _finite_mean(values: np.ndarray) -> float:
  """The mean of the scored (finite) values; nan when there are none."""
  return _mean(values[np.isfinite(values)])


def equal_groups(total: np.ndarray, group_size: int, scored: np.ndarray | None = None
                 ) -> np.ndarray:
  """[groups] bool: all scored rewards of the group equal (no gradient
  signal); a group with fewer than two scored rows counts as equal."""
  if scored is None:
    return total.reshape(-1, group_size).std(axis=1) == 0
  t, s = total.reshape(-1, group_size), scored.reshape(-1, group_size)
  hi = np.where(s, t, -np.inf).max(axis=1)
  lo = np.where(s, t, np.inf).min(axis=1)
  return (s.sum(axis=1) < 2) | (hi == lo)


def take_groups(roll: dict[str, Any], groups, group_size: int) -> dict[str, Any]:
  """The rows of `groups` (group-major) of every per-completion field."""
  rows = [g * group_size + j for g in groups for j in range(group_size)]
  out = {}
  for k, v in roll.items():
    if k == "per_fn":
      out[k] = {f: np.asarray(a)[rows] for f, a in v.items()}
    elif isinstance(v, list):
      out[k] = [v[i] for i in rows]
    else:
      out[k] = np.asarray(v)[rows]
  return out


def _widen(x: np.ndarray, width: int) -> np.ndarray:
  """prompt_routing [n, P, ...] padded with -1 (route normally) to width P."""
  return np.pad(x, ((0, 0), (0, width - x.shape[1])) + ((0, 0),) * (x.ndim - 2),
                constant_values=-1)


def concat(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
  """a's rows, then b's, of every per-completion field (prompt routing
  records of two prompt buckets widened to the larger)."""
  out = {}
  for k in a:
    if k == "per_fn":
      out[k] = {f: np.concatenate([a[k][f], b[k][f]]) for f in a[k]}
    elif isinstance(a[k], list):
      out[k] = a[k] + b[k]
    elif k == "prompt_routing":
      width = max(a[k].shape[1], b[k].shape[1])
      out[k] = np.concatenate([_widen(a[k], width), _widen(b[k], width)])
    else:
      out[k] = np.concatenate([a[k], b[k]])
  return out


def snapshot(state) -> dict[str, Any]:
  """A copy of the policy's variables (the update donates the state's buffers)."""
  return jax.tree.map(jnp.copy, {"params": state.params, "router_bias": state.router_bias})


@dataclasses.dataclass
class Rollout:
  """One step's batch: the update's arrays (`rollout_batch` + old_logp,
  ref_logp, advantages, mask) and what the host keeps of the rollout."""
  step: int
  arrays: dict[str, np.ndarray]
  stats: dict[str, float]
  samples: list[dict[str, Any]]
  t0: float


class GRPO:
  """GRPO for the run harness (runner.Task): `next` / `state` / `restore`
  are the batch source (steps 1-3 of the module docstring), `update` the
  step (4), `evaluate` the held-out evaluation, `line` the progress line.

  The batch of step t is a function of t and the policy only (prompts and
  sampling keys are seeded by the step), so the saved position is the step.
  ref: the reference's variables (None at beta = 0); `update` refreshes it
  every ref_refresh_every steps."""

  def __init__(self, model_cfg: ModelConfig, gcfg: GRPOConfig, opt_cfg: TrainConfig, *,
               tok, prompts: "Prompts", reward_fns, mesh, rules, ref, workdir: str,
               log: Callable[[str], None]):
    self.model_cfg, self.gcfg, self.tok, self.prompts = model_cfg, gcfg, tok, prompts
    self.problems, self.prompt_ids = prompts.train, prompts.train_ids
    self.reward_fns, self.mesh, self.rules, self.ref, self.log = reward_fns, mesh, rules, ref, log
    self.accuracy_fn = (reward_fns["accuracy"][0] if "accuracy" in reward_fns
                        else accuracy_reward(gcfg))
    self.samples_path = os.path.join(workdir, "samples.jsonl")
    self.update_fn = make_update_step(model_cfg, opt_cfg, grpo_loss_fn(model_cfg, gcfg), mesh,
                                      rules, skip_nonfinite=gcfg.max_bad_steps > 0)
    self._score = jax.jit(lambda v, b: completion_logprobs(
        model_cfg, v, b, temperature=gcfg.temperature, top_p=gcfg.top_p))
    self.position, self.first = 0, None

  # -- the batch source -------------------------------------------------------
  def next(self, step: int, state) -> Rollout:
    t0 = time.time()
    policy = {"params": state.params, "router_bias": state.router_bias}
    roll, drawn_equal, rounds = self._dynamic_sampling(step, policy)
    arrays, stats = self._arrays(step, roll, policy)
    stats.update(zero_std_groups_drawn=drawn_equal, resample_rounds=float(rounds))
    self.position, self.first = step, self.first or step
    G, samples = self.gcfg.group_size, []
    if step % self.gcfg.sample_every == 0 or step == self.first:
      samples = [{"step": step, "prompt": roll["problems"][i].prompt,
                  "answer": roll["problems"][i].answer, "kind": roll["problems"][i].kind,
                  "completion": roll["texts"][i],
                  "reward": float(roll["total"][i])} for i in range(0, len(roll["texts"]), G)[:4]]
    return Rollout(step, arrays, stats, samples, t0)

  def state(self) -> dict[str, Any]:
    return {"step": self.position}

  def restore(self, saved: dict[str, Any]) -> None:
    self.position = int(saved["step"])

  def _rollout(self, step: int, round_: int, policy) -> dict[str, Any]:
    """P prompts x G completions, scored: per-completion fields (lists and
    arrays of N = P * G rows, group-major). Round 0 is the step's draw;
    rounds >= 1 are dynamic sampling's fresh prompts."""
    g = self.gcfg
    seed = [g.seed, step] + ([round_] if round_ else [])
    chosen = np.random.default_rng(seed).choice(len(self.problems), size=g.prompts_per_step,
                                                replace=len(self.problems) < g.prompts_per_step)
    problems = [self.problems[i] for i in chosen for _ in range(g.group_size)]
    prompts = [self.prompt_ids[i] for i in chosen for _ in range(g.group_size)]
    key = jax.random.key(g.seed * 1_000_003 + step)
    gen = generate(self.model_cfg, policy, prompts, max_new_tokens=g.max_new_tokens,
                   temperature=g.temperature, top_p=g.top_p, stop_ids=(self.tok.eos_id,),
                   rng=jax.random.fold_in(key, round_) if round_ else key, mesh=self.mesh,
                   return_routing=g.routing_replay, group_size=g.group_size,  # prefix sharing
                   rules=self.rules)          # rows split over the batch axes, EP dispatch
    seqs = gen.sequences()
    eos = self.tok.eos_id
    texts = [self.tok.decode(s[:-1] if s and s[-1] == eos else s) for s in seqs]
    examples = [{"answer": p.answer, "prompt": p.prompt, "kind": p.kind} for p in problems]
    total, per_fn, valid = rewards.combine(texts, examples, self.reward_fns)
    if g.overlong_buffer:
      total = total + np.array([rewards.overlong(len(s), g.max_new_tokens, g.overlong_buffer)
                                for s in seqs])
    return {"problems": problems, "prompts": prompts, "seqs": seqs, "texts": texts,
            "examples": examples, "total": total, "valid": valid,
            "per_fn": per_fn, "tokens": gen.tokens, "lengths": gen.lengths,
            "logprobs": gen.logprobs,
            **({"routing": gen.routing, "prompt_routing": gen.prompt_routing}
               if g.routing_replay else {})}

  def _dynamic_sampling(self, step: int, policy) -> tuple[dict[str, Any], float, int]:
    """(the step's rollout, the share of equal-reward groups of its first
    draw, extra rounds): DAPO's dynamic sampling replaces groups of equal
    rewards by informative groups of fresh prompts, up to resample_rounds."""
    G, P = self.gcfg.group_size, self.gcfg.prompts_per_step
    roll = self._rollout(step, 0, policy)
    equal = lambda r: equal_groups(r["total"], G, r["valid"])  # noqa: E731
    drawn_equal = float(equal(roll).mean())
    rounds = 0
    while rounds < self.gcfg.resample_rounds and equal(roll).any():
      rounds += 1
      fresh = self._rollout(step, rounds, policy)
      good = np.flatnonzero(~equal(fresh))
      bad = np.flatnonzero(equal(roll))
      n = min(len(good), len(bad))
      if n:
        drop = set(bad[:n].tolist())
        roll = concat(take_groups(roll, [g for g in range(P) if g not in drop], G),
                      take_groups(fresh, good[:n], G))
    return roll, drawn_equal, rounds

  def _arrays(self, step: int, roll: dict[str, Any], policy) -> tuple[dict[str, np.ndarray],
                                                             dict[str, float]]:
    """(the update's batch, the rollout's scalars) of a scored rollout."""
    g, G, eos = self.gcfg, self.gcfg.group_size, self.tok.eos_id
    gen = Generation(tokens=roll["tokens"], lengths=roll["lengths"],
                     logprobs=roll["logprobs"], steps=0, routing=roll.get("routing"),
                     prompt_routing=roll.get("prompt_routing"))
    truncated = np.array([not (s and s[-1] == eos) for s in roll["seqs"]])
    adv = np.asarray(grpo.group_advantages(roll["total"], G, g.scale, scored=roll["valid"]))
    if step in g.nan_steps:      # the NaN policy's test hook
      adv = adv * np.float32(np.nan)
    equal = np.repeat(equal_groups(roll["total"], G, roll["valid"]), G)
    keep = roll["valid"].copy()
    if g.mask_truncated:
      keep &= ~truncated
    if g.skip_equal_groups:
      keep &= ~equal
    L = g.max_new_tokens
    mask = (np.arange(L)[None] < gen.lengths[:, None]) & keep[:, None]
    longest = max(len(p) for p in roll["prompts"])
    batch = rollout_batch(roll["prompts"], gen, self.tok.pad_id,
                          prompt_len=bucket_length(longest, self.model_cfg, L))
    if g.routing_replay:
      batch["routing"] = rollout_routing(gen, [len(p) for p in roll["prompts"]],
                                         batch["tokens"].shape[1])
    batch.update(mask=mask.astype(np.float32),
                 advantages=np.repeat(adv[:, None], L, axis=1).astype(np.float32))
    # pi_old by the training forward, in the sampled distribution (the
    # rollout's own log-probs come from the decode path: kept for the
    # mismatch metric and the optional truncated importance weights).
    batch["old_logp"] = np.asarray(self._logprobs(policy, batch))
    ref_batch = {k: v for k, v in batch.items() if k != "routing"}   # the reference routes itself
    batch["ref_logp"] = (np.asarray(self._logprobs(self.ref, ref_batch)) if g.beta > 0
                         else np.zeros_like(batch["old_logp"]))
    rollout_logp = np.asarray(roll["logprobs"], np.float32)
    if g.tis_cap:
      batch["rollout_logp"] = rollout_logp
    stats = self._stats(roll, mask, truncated, equal)
    # The sampler's log-probs (decode path, same distribution) against the
    # training forward's pi_old, over the tokens the loss counts.
    gap = np.abs(rollout_logp - batch["old_logp"])[mask]
    stats.update(logp_mismatch_mean=_mean(gap), logp_mismatch_max=_mean(gap, np.max))
    return batch, stats

  def _logprobs(self, variables, batch: dict[str, np.ndarray]) -> jax.Array:
    """completion_logprobs of `variables` (policy or reference) on the batch."""
    batch = {k: v for k, v in batch.items() if k not in ("old_logp", "ref_logp",
                                                          "rollout_logp")}
    if self.mesh is None:
      return self._score(variables, batch)
    with parallel.activate(self.mesh, self.rules):   # on the policy's mesh
      return self._score(variables, jax.device_put(
          batch, parallel.batch_sharding(self.mesh, self.rules)))

  def _stats(self, roll, mask, truncated, equal) -> dict[str, float]:
    per_fn, texts, total = roll["per_fn"], roll["texts"], roll["total"]
    lengths = roll["lengths"].astype(np.float64)
    if "accuracy" in per_fn:
      accuracy = _finite_mean(per_fn["accuracy"])
    else:
      scored = [self.accuracy_fn(t, e) for t, e in zip(texts, roll["examples"])]
      accuracy = _mean(np.array([v for v in scored if v is not None], np.float64))
    errors = {}
    for name, (fn, _) in self.reward_fns.items():
      if hasattr(fn, "take_counts"):        # user functions, judges: their failures
        counts, first = fn.take_counts()
        errors.update({f"reward_{k}/{name}": v for k, v in counts.items()})
        if first:
          said = ", ".join(f"{int(v)} {k}" for k, v in counts.items())
          self.log(f"reward {name}: {said} this step (first: {first})")
    kinds = np.array([str(ex.get("kind") or "") for ex in roll["examples"]])
    if len(set(kinds.tolist())) > 1:        # per-kind curves of a mixed run
      errors.update({f"reward_kind/{k}": _mean(total[roll["valid"] & (kinds == k)])
                     for k in sorted(set(kinds.tolist()))})
    return {**errors,
        # Over the scored rows (an unscored row's total is a placeholder 0).
        "reward": _mean(total[roll["valid"]]), "reward_std": _mean(total[roll["valid"]], np.std),
        **{f"reward/{k}": _finite_mean(v) for k, v in per_fn.items()},
        "accuracy": accuracy, "format": float(np.mean([tasks.format_ok(t) for t in texts])),
        "zero_std_groups": float(equal.reshape(-1, self.gcfg.group_size)[:, 0].mean()),
        "completion_len": float(lengths.mean()), "completion_len_max": float(lengths.max()),
        "truncated": float(truncated.mean()), "invalid": float((~roll["valid"]).mean()),
        "entropy": float(-(np.asarray(roll["logprobs"]) * mask).sum() / max(mask.sum(), 1))}

  # -- the update -------------------------------------------------------------
  def update(self, state, batch: Rollout):
    """mu passes over the rollout batch; host scalars (a step counts as
    skipped when any pass was). Refreshes the reference when due and
    appends the step's samples to samples.jsonl."""
    g = self.gcfg
    passes = []
    for _ in range(g.mu):
      state, m = self.update_fn(state, batch.arrays)
      passes.append(m)
    passes = jax.device_get(passes)
    m = passes[-1]
    if g.beta > 0 and g.ref_refresh_every and batch.step % g.ref_refresh_every == 0:
      self.ref = snapshot(state)
    if batch.samples:
      with open(self.samples_path, "a") as f:
        f.writelines(json.dumps(s) + "\n" for s in batch.samples)
    scalars = {**batch.stats, **{k: float(m[k]) for k in
                                 ("loss", "kl", "clip_low", "clip_high", "grad_norm", "lr")}}
    if "skipped" in m:
      scalars["skipped"] = max(float(p["skipped"]) for p in passes)
    scalars["step_s"] = time.time() - batch.t0
    return state, scalars

  # -- evaluation and the progress line ---------------------------------------
  def evaluate(self, state, step: int) -> dict[str, float]:
    """Held-out greedy accuracy, sampled accuracy (pass@1 over eval_samples
    draws at the rollout's temperature / top_p), pass@k and cons@k, format
    rate, per kind: rl.evaluation.evaluate_prompts, as launch.evaluate runs it."""
    g, p = self.gcfg, self.prompts
    policy = {"params": state.params, "router_bias": state.router_bias}
    res = evaluation.evaluate_prompts(
        self.model_cfg, policy, self.tok, p.eval, p.eval_ids, score=p.score,
        answer_key=p.answer_key, samples=g.eval_samples, temperature=g.temperature,
        top_p=g.top_p, max_new_tokens=g.max_new_tokens, batch_size=g.eval_batch_size,
        rng=jax.random.key(g.seed + 7919), mesh=self.mesh)
    o, k = res["overall"], g.eval_samples
    texts = [t for c in res["completions"] for t in c["sampled"]]
    out = {"eval_greedy_accuracy": o["greedy_accuracy"], "eval_sampled_accuracy": o["pass@1"],
           f"eval_cons@{k}": o[f"cons@{k}"], f"eval_pass@{k}": o[f"pass@{k}"],
           "eval_format_ok": float(np.mean([tasks.format_ok(t) for t in texts])),
           "eval_unscored": o["unscored"],
           **{f"eval_greedy_accuracy/{kind}": v["greedy_accuracy"]
              for kind, v in res["by_kind"].items()},
           **{f"eval_sampled_accuracy/{kind}": v["pass@1"] for kind, v in res["by_kind"].items()}}
    draws = f" x {k} draws" if k > 1 else ""
    self.log(f"eval step {step}: held-out accuracy greedy {out['eval_greedy_accuracy']:.3f}, "
             f"sampled (T={g.temperature}) {out['eval_sampled_accuracy']:.3f}"
             + (f", cons@{k} {out[f'eval_cons@{k}']:.3f}" if k > 1 else "")
             + f", format {out['eval_format_ok']:.3f} (n={len(p.eval)}{draws})")
    return out

  def line(self, step: int, s: dict[str, float], eta: float) -> str:
    return (f"step {step:>4d}/{self.gcfg.steps} | reward {s['reward']:.3f} "
            f"acc {s['accuracy']:.3f} fmt {s['format']:.2f} | "
            f"len {s['completion_len']:.0f} trunc {s['truncated']:.2f} "
            f"zero-std {s['zero_std_groups']:.2f} | kl {s['kl']:.4f} "
            f"gnorm {s['grad_norm']:.3f} loss {s['loss']:+.4f} | {s['step_s']:.1f}s"
            + (f" | skipped {int(s['bad_steps'])}" if s.get("bad_steps") else ""))


def check_inputs(gcfg: GRPOConfig) -> None:
  """Reads what a run's config names outside the model (prompt files, user
  reward functions, a chat template file) so that a bad one fails before any
  stage runs (launch.grpo calls this before its SFT stage)."""
  for files in (gcfg.prompt_files, gcfg.eval_prompt_files):
    if files:
      prompts_lib.load_prompt_files(files)
  for path in gcfg.reward_fns:
    verifiers.load_reward_fn(path)
  for spec in gcfg.judges:
    name, path, _ = model_rewards.parse_spec(spec, "judges")
    if not (os.path.isdir(os.path.join(path, "checkpoints"))
            or os.path.isfile(os.path.join(path, "config.json"))):
      raise ValueError(f"judges ({name}): {path!r} is neither a training run directory (with "
                       "checkpoints/) nor an HF checkpoint directory (with config.json).")
  for spec in gcfg.reward_models:
    name, path, _ = model_rewards.parse_spec(spec, "reward_models")
    _check_reward_model_run(name, path)
  if gcfg.judge_rubric:
    with open(gcfg.judge_rubric) as f:       # FileNotFoundError names the file
      model_rewards.JudgeReward(lambda texts: texts, rubric=f.read())
  builtin = [n for n, w in (("accuracy", gcfg.accuracy_weight), ("format", gcfg.format_weight),
                            ("language", gcfg.language_weight)) if w > 0]
  models = [model_rewards.parse_spec(s, field)[0]
            for field in ("reward_models", "judges") for s in getattr(gcfg, field)]
  model_rewards.parse_kind_rewards(gcfg.kind_rewards,
                                   builtin + list(gcfg.reward_fns) + models)
  if gcfg.chat_template not in prompts_lib.CHAT_CHOICES:
    prompts_lib.resolve_format(gcfg.chat_template, "", "none")


def _check_reward_model_run(name: str, path: str) -> None:
  """A reward_models entry names a reward-model run (read from its newest
  checkpoint's meta, nothing restored); ValueError naming the entry."""
  from deepseek_jax.train.checkpoint import Checkpoints
  try:
    ckpts = Checkpoints.existing(path)
  except FileNotFoundError as e:
    raise ValueError(f"reward_models ({name}): {e}") from None
  try:
    saved = TrainConfig.from_saved(ckpts.saved_meta(ckpts.latest_step())["train_config"])
  finally:
    ckpts.close()
  if saved.objective != "reward_model":
    raise ValueError(f"reward_models ({name}): {path!r} is a run of objective="
                     f"{saved.objective!r}, not a reward model; train one with "
                     "launch/configs/reward_model.py.")


@dataclasses.dataclass
class Prompts:
  """A GRPO run's prompts: training records and their ids, held-out records
  and their ids, how a record became text (`fmt`), and the held-out check:
  score(text, record) -> 1.0 / 0.0 / None and answer_key(text) for cons@k."""

  train: list[prompts_lib.PromptRecord]
  train_ids: list[list[int]]
  eval: list[prompts_lib.PromptRecord]
  eval_ids: list[list[int]]
  fmt: prompts_lib.PromptFormat
  score: Callable[[str, Any], float | None]
  answer_key: Callable[[str], Any]


def task_records(problems: list[tasks.Problem]) -> list[prompts_lib.PromptRecord]:
  return [prompts_lib.PromptRecord(p.prompt, p.answer, tasks.kind_of(p)) for p in problems]


def held_out(records: list, n_eval: int, seed: int) -> tuple[list, list]:
  """(training, held-out) records: n_eval of them drawn by a seeded permutation."""
  if n_eval >= len(records):
    raise ValueError(f"n_eval_problems={n_eval} leaves no training prompt among the "
                     f"{len(records)} records of prompt_files; lower n_eval_problems or "
                     "give eval_prompt_files.")
  order = np.random.default_rng([seed, 17]).permutation(len(records))
  held = set(order[:n_eval].tolist())
  return ([r for i, r in enumerate(records) if i not in held],
          [r for i, r in enumerate(records) if i in held])


def load_prompts(gcfg: GRPOConfig, tok, tokenizer_path: str, template: str,
                 max_seq_len: int) -> Prompts:
  """The run's prompts: the user's prompt files (chat template resolved from
  the tokenizer's directory, verifier `gcfg.verifier`) or the built-in task
  (the run's template, its own check). ValueError, naming the file and line,
  when a prompt plus max_new_tokens does not fit the model."""
  if gcfg.prompt_files:
    fmt = prompts_lib.resolve_format(gcfg.chat_template, tokenizer_path, template)
    train = prompts_lib.load_prompt_files(gcfg.prompt_files)
    if gcfg.eval_prompt_files:
      held = prompts_lib.load_prompt_files(gcfg.eval_prompt_files)
    else:
      train, held = held_out(train, gcfg.n_eval_problems, gcfg.seed)
    check = verifiers.get(gcfg.verifier)
    score = lambda text, r: check(text, r.answer)  # noqa: E731
    key = lambda text: verifiers.answer_key(gcfg.verifier, text)  # noqa: E731
  else:
    fmt = (prompts_lib.PromptFormat(template) if gcfg.chat_template == "auto" else
           prompts_lib.resolve_format(gcfg.chat_template, tokenizer_path, template))
    train = task_records(tasks.mixed_problems(
        gcfg.n_train_problems, seed=gcfg.seed, split="train", max_digits=gcfg.max_digits,
        kinds=gcfg.task_kinds, kind_mix=gcfg.kind_mix))
    held = task_records(tasks.generate_problems(
        gcfg.n_eval_problems, seed=gcfg.seed, split="test", max_digits=gcfg.max_digits,
        kinds=gcfg.task_kinds))
    score, key = task_score, tasks.extract_answer
  train_ids = prompts_lib.encode_records(tok, train, fmt)
  eval_ids = prompts_lib.encode_records(tok, held, fmt) if held else []
  for ids, records in ((train_ids, train), (eval_ids, held)):
    for i, r in zip(ids, records):
      if len(i) + gcfg.max_new_tokens > max_seq_len:
        raise ValueError(f"{r.where or 'a prompt'}: the prompt ({len(i)} tokens with "
                         f"{fmt.describe()}) plus max_new_tokens={gcfg.max_new_tokens} > "
                         f"the model's max_seq_len={max_seq_len}; lower max_new_tokens or "
                         "shorten the prompt.")
  return Prompts(train, train_ids, held, eval_ids, fmt, score, key)


def _summary(gcfg: GRPOConfig, result: runner.Result, t_start: float) -> dict[str, Any]:
  """summary.json's fields: held-out accuracy at step 0 and at the end."""
  evals = {r["step"]: r for r in result.evals}
  before, after = evals.get(0, {}), evals.get(result.final_step, {})
  return {
      "greedy_accuracy_before": before.get("eval_greedy_accuracy"),
      "sampled_accuracy_before": before.get("eval_sampled_accuracy"),
      "greedy_accuracy_after": after.get("eval_greedy_accuracy"),
      "sampled_accuracy_after": after.get("eval_sampled_accuracy"),
      "format_rate_after": after.get("eval_format_ok"),
      "final_step": result.final_step, "skipped_steps": result.bad_steps,
      "stopped_by": result.stopped_by,
      "wall_s": time.time() - t_start, "init_from": gcfg.init_from,
  }


def train_grpo(gcfg: GRPOConfig, workdir: str, *, stop_after: int | None = None,
               extra_rewards: dict[str, tuple[rewards.RewardFn, float]] | None = None,
               mesh_cfg: MeshConfig | None = None,
               log: Callable[[str], None] = print) -> dict[str, Any]:
  """GRPO from the run in gcfg.init_from, resuming from `workdir` if it
  holds checkpoints. Returns the summary (also written to summary.json when
  the run reaches gcfg.steps): greedy/sampled held-out accuracy before and
  after, format rate after, wall_s, final_step, skipped_steps, stopped_by
  (the signal that ended the call early, or None), history (per-step
  scalars of this call).
  extra_rewards: {name: (fn(completion, example) -> float | None, weight)}
  added to the built-in ones (example: {"answer", "prompt"}).
  mesh_cfg: run on a device mesh (data/fsdp/tensor/expert axes, one
  process): the policy, its optimizer state and the reference are sharded
  by the mesh's rule set, rollouts and updates run on all devices, and the
  numbers are the one-device run's up to float summation order.
  stop_after: end this call after that step, with a checkpoint (tests).
  SIGTERM / SIGINT end the call after the step in flight with a checkpoint
  there; FloatingPointError after max_bad_steps non-finite steps in a row."""
  t_start = time.time()
  if not gcfg.init_from:
    raise ValueError("init_from is empty: GRPO starts from a trained run (e.g. the SFT "
                     "stage: python -m launch.train --config=launch/configs/default.py "
                     "--workdir=W, then --config.init_from=W).")
  export.require_run(gcfg.init_from, "init_from")
  model_cfg, src_train, init_vars, src_step = export.load_trained_run(gcfg.init_from)
  tok = (load_tokenizer(src_train.tokenizer_path) if src_train.tokenizer_path
         else default_tokenizer())
  prompts = load_prompts(gcfg, tok, src_train.tokenizer_path, src_train.template,
                         model_cfg.max_seq_len)
  reward_fns = reward_functions(gcfg, extra_rewards)
  opt_cfg = gcfg.optimizer_config(src_train)
  mesh, rules = grpo_mesh(gcfg, mesh_cfg, model_cfg, opt_cfg)
  settings = runner.Settings.of(gcfg, stop_after=stop_after, eval_at_start=True,
                                summary_steps=gcfg.steps)
  # The checkpoint's train config is a plain TrainConfig (so export,
  # launch.generate and init_from read GRPO runs like any other) plus the
  # GRPO config under "grpo" (compared on resume like any field).
  with runner.Run(workdir, model_cfg, {**opt_cfg.to_dict(), "grpo": gcfg.to_dict()},
                  settings, mesh=mesh, log=log) as run:
    run.write_json("grpo_config.json", gcfg.to_dict())
    initial = with_variables(init_train_state(model_cfg, opt_cfg, jax.random.key(gcfg.seed),
                                              mesh, rules), init_vars)
    del init_vars
    ref = snapshot(initial) if gcfg.beta > 0 else None   # the starting policy

    def fresh():
      run.log(f"GRPO from {gcfg.init_from} (step {src_step}); {model_cfg.n_layers} layers, "
              f"{gcfg.prompts_per_step} prompts x {gcfg.group_size} completions per step")
      return initial
    state = run.start(model_cfg, opt_cfg, rules, fresh=fresh)
    initial = None
    if run.resumed_from is not None and gcfg.ref_refresh_every and gcfg.beta > 0:
      ref = snapshot(state)    # not the last refresh's policy: documented, not bit-exact
    if mesh is not None:
      run.log(f"mesh: {describe_mesh(mesh)}, rules {mesh_cfg.rules}")
    metrics.keep_steps_up_to(os.path.join(workdir, "samples.jsonl"), run.start_step)
    if gcfg.prompt_files:
      run.log(f"prompts: {len(prompts.train)} training, {len(prompts.eval)} held-out records "
              f"from {', '.join(gcfg.prompt_files)} ({prompts.fmt.describe()}, verifier "
              f"{gcfg.verifier!r})")
    trainer = GRPO(model_cfg, gcfg, opt_cfg, tok=tok, prompts=prompts, reward_fns=reward_fns,
                   mesh=mesh, rules=rules, ref=ref, workdir=workdir, log=run.log)
    result = run.train(runner.Task(step=trainer.update, batches=trainer, line=trainer.line,
                                   evaluate=trainer.evaluate if prompts.eval else None), state)
    summary = _summary(gcfg, result, t_start)
    plot = _plot(workdir)
    if result.final_step == gcfg.steps:
      atomic_json(summary, os.path.join(workdir, "summary.json"))
    log(f"done: step {result.final_step}; sampled accuracy {summary['sampled_accuracy_before']}"
        f" -> {summary['sampled_accuracy_after']}, greedy {summary['greedy_accuracy_before']} "
        f"-> {summary['greedy_accuracy_after']}" + (f"; plot {plot}" if plot else ""))
  return {**summary, "history": result.history}
