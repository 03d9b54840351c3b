"""Rejection-sample a trained run's correct completions into an SFT data file (R1 sec. 2.3.3).

  python -m launch.rejection_sample --from_workdir=/tmp/demo --out=/tmp/demo_samples.jsonl \
      --n_prompts=500 --k=4 [--temperature=1.0 --max_new_tokens=64 --seed=0]
  # then SFT on them (launch/configs/sft_samples.py) or distil them into a
  # smaller model (launch/configs/distill.py)
  python -m launch.train --config=launch/configs/sft_samples.py --workdir=/tmp/demo_rs \
      --config.data_files='("/tmp/demo_samples.jsonl",)'

Prompts are n_prompts problems of the task's *train* split (data/tasks.py;
never the held-out test split that launch.train's eval_task scores), drawn
with --seed from the run's own task settings: max_digits, task_kinds,
prompt template and tokenizer (its TrainConfig; --max_digits / --task_kinds
override). k completions per prompt are sampled at --temperature; a
completion is kept when GRPO's format and accuracy rewards are both 1 and
its answer is the reference's exact text (--nocanonical_only: accept any
equal number), without repeats per prompt (--nodedupe keeps them), at most
--keep_per_prompt per prompt (0 = all). Any launch.train or launch.grpo
workdir works (a GRPO run is R1's teacher).

Your own prompts instead of the task: --prompt_files=a.jsonl,b.parquet
({"prompt", "answer", optional "kind", "system"} records, data/prompts.py),
rendered by the run's chat template (--chat_template=auto; none, short, r1
or a jinja2 file), every record used (--n_prompts caps them); a completion
is kept when --verifier (math, choice, exact, regex) scores it 1.0 against
the record's answer and, with --require_format (default), GRPO's format
reward is 1 (--norequire_format for data without <think>/<answer> tags).
The record's "prompt" in --out is the rendered text the model read.

Preference pairs of the same samples instead (a right and a wrong completion
of one prompt, for DPO or a reward model): launch/make_preferences.py.

Output: --out, one {"prompt", "completion", "answer", "kind"} object per line,
written atomically; stdout: the stats as one JSON line (n_prompts,
n_sampled, n_kept, acceptance, by_kind, prompts_with_kept, rejected by
reason, ...). A bad flag, a missing run or an impossible request exits
non-zero with one line naming it, before anything compiles.
"""

from __future__ import annotations

import math
import os
import sys

from absl import app, flags

from launch.config_flag import begin_main, parse_flags_or_exit, print_json_or_exit

PROG = "launch.rejection_sample"
# A user's mistake: the messages name the flag, file or field and the fix.
USER_ERRORS = (ValueError, FileNotFoundError, app.UsageError)
OUT_EXTENSIONS = (".jsonl", ".json")   # what launch.train reads as JSON lines


def check_out_path(out: str) -> None:
  """app.UsageError unless --out names a .jsonl / .json file (not a directory):
  what launch.train reads as JSON lines. launch.make_preferences shares it."""
  if os.path.splitext(out)[1].lower() not in OUT_EXTENSIONS:
    raise app.UsageError(f"--out={out!r} must end in .jsonl or .json (launch.train reads "
                         "data files by extension).")
  if os.path.isdir(out):
    raise app.UsageError(f"--out={out!r} is a directory; give the path of a .jsonl file.")


def sample(from_workdir: str, out: str, *, step: int | None = None,
           n_prompts: int | None = None, k: int = 4, temperature: float = 1.0,
           max_new_tokens: int | None = None, seed: int = 0, batch_size: int = 64,
           keep_per_prompt: int = 0, dedupe: bool = True, canonical_only: bool = True,
           max_digits: int | None = None, task_kinds: str | None = None,
           prompt_files: list[str] | None = None, verifier: str = "math",
           chat_template: str = "auto", require_format: bool = True,
           judge: str | None = None, judge_rubric: str | None = None,
           judge_threshold: float = 0.5,
           log=lambda line: print(line, file=sys.stderr)) -> dict:
  """Samples and writes `out`; returns the stats (module docstring). None
  for max_new_tokens / max_digits / task_kinds (comma-separated) = the run's;
  n_prompts None = 500 task problems, or every prompt-file record.
  Raises one of USER_ERRORS for a user's mistake, before compiling."""
  if not from_workdir or not out:
    raise app.UsageError("give --from_workdir=RUN (a launch.train or launch.grpo workdir) "
                         "and --out=FILE.jsonl.")
  check_out_path(out)
  for name, value, low in (("n_prompts", n_prompts, 1), ("k", k, 1),
                           ("batch_size", batch_size, 1), ("keep_per_prompt", keep_per_prompt, 0),
                           ("max_new_tokens", max_new_tokens, 1), ("max_digits", max_digits, 1)):
    if value is not None and value < low:
      raise app.UsageError(f"--{name}={value} must be >= {low}.")
  if not (math.isfinite(temperature) and temperature >= 0):
    raise app.UsageError(f"--temperature={temperature} must be a finite number >= 0.")
  if not 0 <= judge_threshold <= 1:
    raise app.UsageError(f"--judge_threshold={judge_threshold} must lie in [0, 1].")
  if judge_rubric and not judge:
    raise app.UsageError("--judge_rubric needs --judge=RUN_OR_HF_DIR (the judge model).")
  if temperature == 0 and k > 1:
    raise app.UsageError(f"--temperature=0 (greedy) gives k={k} identical completions per "
                         "prompt; sample with --temperature > 0, or use --k=1.")
  from deepseek_jax.config import split_names
  from deepseek_jax.data import prompts as prompts_lib
  from deepseek_jax.data import tasks
  from deepseek_jax.rl import verifiers
  records = None
  if prompt_files:
    check = verifiers.get(verifier)
    records = prompts_lib.load_prompt_files(prompt_files)[:n_prompts or None]
  kinds = split_names(task_kinds) if task_kinds else None
  if kinds is not None and (not kinds or set(kinds) - set(tasks.KINDS)):
    raise app.UsageError(f"--task_kinds={task_kinds!r} must be comma-separated kinds out of "
                         f"{','.join(tasks.KINDS)}.")

  # The heavy imports (jax, orbax) only once the flags are sound.
  from deepseek_jax.data import pipeline
  from deepseek_jax.data.tokenizer import default_tokenizer, load_tokenizer
  from deepseek_jax.rl import rejection
  from deepseek_jax.train import export

  export.require_run(from_workdir, "--from_workdir")
  judge_fn = None
  if judge:
    from deepseek_jax.rl import model_rewards
    judge_fn = model_rewards.load_judges([f"judge={judge}"], rubric_file=judge_rubric or "")[
        "judge"]
  model_cfg, train_cfg, variables, run_step = export.load_trained_run(from_workdir, step)
  tok = (load_tokenizer(train_cfg.tokenizer_path) if train_cfg.tokenizer_path
         else default_tokenizer())
  kinds = kinds or train_cfg.task_kinds
  digits = max_digits or train_cfg.max_digits
  context_chars = 256
  if "passkey" in kinds:       # as launch.train sizes them (loop.build_data)
    context_chars = train_cfg.passkey_chars or pipeline.passkey_room(
        tok, train_cfg.seq_len, train_cfg.template)
  new = max_new_tokens or train_cfg.max_new_tokens
  kw = {}
  if records is not None:
    fmt = prompts_lib.resolve_format(chat_template, train_cfg.tokenizer_path or "",
                                     train_cfg.template)
    problems = records
    kw = dict(prompt_format=fmt, check=check, require_format=require_format)
    log(f"{PROG}: {from_workdir} step {run_step}: {len(records)} prompts from "
        f"{','.join(prompt_files)} ({fmt.describe()}, verifier {verifier!r}) x k={k} at "
        f"temperature {temperature}")
  else:
    n_prompts = n_prompts or 500
    problems = tasks.generate_problems(n_prompts, seed=seed, split="train",
                                       max_digits=digits, kinds=kinds,
                                       context_chars=context_chars)
    log(f"{PROG}: {from_workdir} step {run_step}: {n_prompts} train-split prompts "
        f"(max_digits={digits}, kinds={','.join(kinds)}, template={train_cfg.template!r}) "
        f"x k={k} at temperature {temperature}")
  records, stats = rejection.rejection_sample(
      model_cfg, variables, tok, problems, k=k, max_new_tokens=new, temperature=temperature,
      template=train_cfg.template, seed=seed, batch_size=min(batch_size, len(problems) * k),
      keep_per_prompt=keep_per_prompt or None, dedupe=dedupe, canonical_only=canonical_only,
      judge=judge_fn, judge_threshold=judge_threshold, **kw)
  rejection.write_jsonl(records, out)
  if judge:
    log(f"{PROG}: the judge ({judge}) rejected {stats['judge_rejected']} of the accepted "
        f"samples ({stats['judge_unparsable']} verdicts unparsable)")
  log(f"{PROG}: kept {stats['n_kept']} of {stats['n_sampled']} completions "
      f"(acceptance {stats['acceptance']:.3f}) -> {out}")
  if not records:
    log(f"{PROG}: note: nothing was kept, so {out} is empty (launch.train refuses it): "
        "sample from a better-trained run, or raise --k / --n_prompts.")
  stats.update(out=out, from_workdir=from_workdir, step=run_step, template=train_cfg.template,
               max_digits=digits, task_kinds=list(kinds))
  return stats


def _define_flags() -> None:
  """The flags, defined when run as a program only: importing this module
  (for `sample`) leaves absl's global FLAGS alone, so it can share a process
  with launch.generate / launch.convert, which define flags of the same names."""
  flags.DEFINE_string("from_workdir", None, "A launch.train or launch.grpo run directory.")
  flags.DEFINE_integer("step", None, "The run's checkpoint step (default: latest).")
  flags.DEFINE_string("out", None, "The .jsonl file to write (atomically).")
  flags.DEFINE_integer("n_prompts", None, "Train-split problems to sample for (default "
                       "500), or the first N records of --prompt_files (default: all).")
  flags.DEFINE_list("prompt_files", None, "Prompt files ({prompt, answer} records) instead "
                    "of the task's problems.")
  flags.DEFINE_string("verifier", "math", "With --prompt_files: math, choice, exact, regex.")
  flags.DEFINE_string("chat_template", "auto", "With --prompt_files: auto, none, short, r1 "
                      "or a jinja2 file.")
  flags.DEFINE_bool("require_format", True, "With --prompt_files: also require GRPO's "
                    "<think>/<answer> format.")
  flags.DEFINE_integer("k", 4, "Completions sampled per prompt.")
  flags.DEFINE_float("temperature", 1.0, "Sampling temperature (0 = greedy, with --k=1).")
  flags.DEFINE_integer("max_new_tokens", None, "Tokens per completion (default: the run's "
                       "max_new_tokens).")
  flags.DEFINE_integer("seed", 0, "Seed of the problems and of the sampling.")
  flags.DEFINE_integer("batch_size", 64, "Completions decoded per batch.")
  flags.DEFINE_integer("keep_per_prompt", 0, "Keep at most this many per prompt (0 = all).")
  flags.DEFINE_bool("dedupe", True, "Drop a completion already kept for the same prompt.")
  flags.DEFINE_bool("canonical_only", True, "Keep only answers written exactly as the "
                    "reference ('7', not '007' or '7.0', which the accuracy reward accepts).")
  flags.DEFINE_string("judge", None, "Also keep only samples this judge model (a run "
                      "directory or an HF directory) scores >= --judge_threshold.")
  flags.DEFINE_string("judge_rubric", None, "The judge's prompt: a text file with {prompt} "
                      "and {response} (default: rl.model_rewards.DEFAULT_RUBRIC).")
  flags.DEFINE_float("judge_threshold", 0.5, "The judge's lowest accepted score (0..1).")
  flags.DEFINE_integer("max_digits", None, "Problem difficulty (default: the run's).")
  flags.DEFINE_string("task_kinds", None, "Comma-separated problem kinds (default: the run's).")


def main(argv):
  begin_main(argv, PROG)
  f = flags.FLAGS
  print_json_or_exit(PROG, USER_ERRORS, lambda: sample(
      f.from_workdir, f.out, step=f.step, n_prompts=f.n_prompts, k=f.k,
      temperature=f.temperature, max_new_tokens=f.max_new_tokens, seed=f.seed,
      batch_size=f.batch_size, keep_per_prompt=f.keep_per_prompt, dedupe=f.dedupe,
      canonical_only=f.canonical_only, max_digits=f.max_digits, task_kinds=f.task_kinds,
      prompt_files=f.prompt_files, verifier=f.verifier, chat_template=f.chat_template,
      require_format=f.require_format, judge=f.judge, judge_rubric=f.judge_rubric,
      judge_threshold=f.judge_threshold))


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=lambda argv: parse_flags_or_exit(argv, PROG))
