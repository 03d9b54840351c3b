"""On-policy preference pairs: a run's own right and wrong answers, for DPO or a reward model.

  python -m launch.make_preferences --from_workdir=runs/own_sft \
      --prompt_files=launch/data/arith_prompts.jsonl --verifier=math \
      --k=8 --temperature=1.0 --out=runs/own_pairs.jsonl
  python -m launch.train --config=launch/configs/dpo.py --workdir=runs/dpo_onpolicy \
      --config.init_from=runs/own_sft --config.preference_files='("runs/own_pairs.jsonl",)'

For every record of --prompt_files ({"prompt", "answer", optional "kind",
"system"}, data/prompts.py), rendered by the run's chat template
(--chat_template=auto; none, short, r1 or a jinja2 file, as
launch.rejection_sample), the run samples --k completions at --temperature
(evaluate.completions, seeded by --seed, --max_new_tokens each: default the
run's). Each completion is scored as launch.rejection_sample keeps one:
right when --verifier (math, choice, exact, regex) scores it 1.0 against the
record's answer and, with --require_format (default), GRPO's <think>/<answer>
format reward is 1; wrong otherwise. Left out of both sides: a completion
holding a special token (<pad>, <bos>, ...), a blank one, and one the
verifier cannot score (None). A prompt whose distinct right texts R and
wrong texts W are both non-empty gives min(--pairs_per_prompt, max(|R|,
|W|)) pairs, pair j = (R[j mod |R|], W[j mod |W|]), each list in sampling
order; prompts with every sample right, or every one wrong, give none (they
contrast nothing: DPO learns from the model's own mistakes next to its own
successes, which the shipped pairs of launch/data/arith_prefs.jsonl, a worked
solution against a copied final digit, do not hold).

Output: --out, one {"prompt", "chosen", "rejected", "kind", "system",
"answer", "rejected_reason"} object per line ("kind" / "system" only when
the record has them; "rejected_reason": "format" or "answer"), written
atomically; data.preferences.load_preference_files reads it, and, as it
carries "answer", it is a prompt file too. "prompt" is the record's user
turn, not the rendered text: the trainer renders it with the DPO run's own
template, which must be the one sampled with (--chat_template=auto and a DPO
run from the same SFT run agree). stdout: the stats as one JSON line
(n_prompts, n_sampled, n_right, n_wrong, left-out counts, prompts_all_right,
prompts_all_wrong, prompts_paired, n_pairs, by_kind with the sampled
accuracy). A bad flag, a missing run or an impossible request exits non-zero
with one line naming it, before anything compiles.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

from absl import app, flags

from launch.config_flag import begin_main, parse_flags_or_exit, print_json_or_exit
from launch.rejection_sample import USER_ERRORS, check_out_path

PROG = "launch.make_preferences"
LEFT_OUT = ("special_tokens", "blank", "unscored")   # on neither side of a pair


def score_completion(text: str, answer: str, check: Callable[[str, str], float | None], *,
                     require_format: bool = True, special: bool = False) -> str:
  """"right", "wrong" or a LEFT_OUT reason for one sampled completion: a
  special token or a blank text is left out first, then a verifier score of
  None; right when the verifier says 1.0 and (require_format) GRPO's format
  reward is 1."""
  from deepseek_jax.rl import rejection
  if special:
    return "special_tokens"
  if not text.strip():
    return "blank"
  if check(text, answer) is None:
    return "unscored"
  reason = rejection.record_verdict(text, answer, check, require_format=require_format)
  return "right" if reason is None else "wrong"


def _distinct(items: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
  seen, out = set(), []
  for text, why in items:
    if text not in seen:
      seen.add(text)
      out.append((text, why))
  return out


def pair_completions(records: Sequence[Any], completions: Sequence[str], *, k: int,
                     check: Callable[[str, str], float | None], require_format: bool = True,
                     has_special: Sequence[bool] | None = None, pairs_per_prompt: int = 1
                     ) -> tuple[list[dict[str, str]], dict[str, Any]]:
  """Pairs and stats from k completions per record (the module docstring's
  rule). records: data.prompts.PromptRecords; completions: len(records) * k
  texts, record i's at [i*k, (i+1)*k); has_special: per completion, whether
  its ids hold a special token."""
  from deepseek_jax.rl import rejection
  if k < 1 or pairs_per_prompt < 1:
    raise ValueError(f"k={k} and pairs_per_prompt={pairs_per_prompt} must be >= 1.")
  if len(completions) != len(records) * k:
    raise ValueError(f"{len(completions)} completions for {len(records)} records x k={k}.")
  if has_special is not None and len(has_special) != len(completions):
    raise ValueError(f"has_special has {len(has_special)} entries for {len(completions)} "
                     "completions.")
  counts = dict.fromkeys(("right", "wrong") + LEFT_OUT, 0)
  reasons = {"format": 0, "answer": 0}
  shares = dict.fromkeys(("prompts_all_right", "prompts_all_wrong", "prompts_paired"), 0)
  kinds: dict[str, dict[str, float]] = {}
  pairs: list[dict[str, str]] = []
  for i, r in enumerate(records):
    right, wrong = [], []
    n_right = counts["right"]
    for j in range(i * k, (i + 1) * k):
      text = completions[j]
      verdict = score_completion(text, r.answer, check, require_format=require_format,
                                 special=bool(has_special is not None and has_special[j]))
      counts[verdict] += 1
      if verdict == "right":
        right.append((text, ""))
      elif verdict == "wrong":
        why = rejection.record_verdict(text, r.answer, check, require_format=require_format)
        reasons[why] += 1
        wrong.append((text, why))
    right, wrong = _distinct(right), _distinct(wrong)
    kind = kinds.setdefault(r.kind or "all", {"n_prompts": 0, "n_right": 0,
                                              "prompts_paired": 0, "n_pairs": 0})
    n = min(pairs_per_prompt, max(len(right), len(wrong))) if right and wrong else 0
    for j in range(n):
      chosen, (rejected, why) = right[j % len(right)][0], wrong[j % len(wrong)]
      pairs.append({"prompt": r.prompt, "chosen": chosen, "rejected": rejected,
                    **({"kind": r.kind} if r.kind else {}),
                    **({"system": r.system} if r.system else {}),
                    "answer": r.answer, "rejected_reason": why})
    kind["n_prompts"] += 1
    kind["n_pairs"] += n
    kind["prompts_paired"] += bool(n)
    kind["n_right"] += counts["right"] - n_right
    if right and not wrong:
      shares["prompts_all_right"] += 1
    elif wrong and not right:
      shares["prompts_all_wrong"] += 1
    shares["prompts_paired"] += bool(n)
  for kind in kinds.values():
    kind["accuracy"] = kind["n_right"] / (kind["n_prompts"] * k)
  stats = {"n_prompts": len(records), "k": k, "n_sampled": len(completions),
           "n_right": counts["right"], "n_wrong": counts["wrong"],
           "accuracy": counts["right"] / len(completions) if completions else 0.0,
           "left_out": {x: counts[x] for x in LEFT_OUT}, "wrong_by_reason": reasons,
           **shares, "n_pairs": len(pairs), "pairs_per_prompt": pairs_per_prompt,
           "by_kind": dict(sorted(kinds.items()))}
  return pairs, stats


def sample_pairs(model_cfg, variables, tok, records: Sequence[Any], fmt, *, k: int,
                 max_new_tokens: int, temperature: float, check, seed: int = 0,
                 batch_size: int = 64, require_format: bool = True, pairs_per_prompt: int = 1,
                 mesh=None) -> tuple[list[dict[str, str]], dict[str, Any]]:
  """Samples k completions per record (each record's prompt, rendered by the
  data.prompts.PromptFormat `fmt`, repeated k times in order, decoded by
  evaluate.completions at `temperature` with rng jax.random.key(seed),
  batch_size rows at a time; max_new_tokens lowered to fit max_seq_len) and
  pairs them (`pair_completions`). stats gain temperature, seed and the
  max_new_tokens used."""
  import jax

  from deepseek_jax.data import prompts as prompts_lib
  from deepseek_jax.rl import rejection
  from deepseek_jax.train import evaluate
  if not records:
    raise ValueError("no prompt records to sample from.")
  if not temperature > 0:
    raise ValueError(f"temperature={temperature} must be > 0: greedy decoding gives k "
                     "identical completions, which pair nothing.")
  prompts = prompts_lib.encode_records(tok, records, fmt)
  new = evaluate.eval_max_new_tokens(prompts, max_new_tokens, model_cfg.max_seq_len)
  ids = evaluate.completions(model_cfg, variables, [p for p in prompts for _ in range(k)],
                             max_new_tokens=new, eos_id=tok.eos_id,
                             batch_size=min(batch_size, len(prompts) * k),
                             temperature=temperature, rng=jax.random.key(seed), mesh=mesh)
  special = rejection.special_ids(tok)
  pairs, stats = pair_completions(records, [tok.decode(s) for s in ids], k=k, check=check,
                                  require_format=require_format,
                                  has_special=[any(t in special for t in s) for s in ids],
                                  pairs_per_prompt=pairs_per_prompt)
  stats.update(temperature=float(temperature), seed=seed, max_new_tokens=new)
  return pairs, stats


def check_request(from_workdir: str | None, out: str | None, prompt_files, *, k: int,
                  temperature: float, pairs_per_prompt: int, batch_size: int,
                  max_new_tokens: int | None, n_prompts: int | None, verifier: str) -> None:
  """app.UsageError / ValueError, one line naming the flag, for a request
  that cannot work; nothing heavy is imported."""
  if not from_workdir or not out or not prompt_files:
    raise app.UsageError("give --from_workdir=RUN (a launch.train or launch.grpo workdir), "
                         "--prompt_files=FILE.jsonl ({prompt, answer} records) and "
                         "--out=PAIRS.jsonl.")
  check_out_path(out)
  if k < 2:
    raise app.UsageError(f"--k={k} must be >= 2: a pair needs a right and a wrong sample "
                         "of the same prompt.")
  for name, value, low in (("pairs_per_prompt", pairs_per_prompt, 1),
                           ("batch_size", batch_size, 1), ("max_new_tokens", max_new_tokens, 1),
                           ("n_prompts", n_prompts, 1)):
    if value is not None and value < low:
      raise app.UsageError(f"--{name}={value} must be >= {low}.")
  if not (temperature > 0 and temperature < float("inf")):
    raise app.UsageError(f"--temperature={temperature} must be a finite number > 0 "
                         "(greedy decoding gives k identical completions).")
  from deepseek_jax.rl import verifiers
  if verifier not in verifiers.VERIFIERS:
    raise app.UsageError(f"--verifier={verifier!r} must be one of "
                         f"{', '.join(sorted(verifiers.VERIFIERS))}.")


def make(from_workdir: str, out: str, prompt_files: Sequence[str], *, step: int | None = None,
         n_prompts: int | None = None, k: int = 8, temperature: float = 1.0,
         max_new_tokens: int | None = None, seed: int = 0, batch_size: int = 64,
         pairs_per_prompt: int = 1, verifier: str = "math", chat_template: str = "auto",
         require_format: bool = True, log=lambda line: print(line, file=sys.stderr)) -> dict:
  """Samples, pairs and writes `out` (module docstring); returns the stats.
  Raises one of USER_ERRORS for a user's mistake, before compiling."""
  check_request(from_workdir, out, prompt_files, k=k, temperature=temperature,
                pairs_per_prompt=pairs_per_prompt, batch_size=batch_size,
                max_new_tokens=max_new_tokens, n_prompts=n_prompts, verifier=verifier)
  from deepseek_jax.data import prompts as prompts_lib
  from deepseek_jax.rl import verifiers
  records = prompts_lib.load_prompt_files(list(prompt_files))[:n_prompts or None]

  from deepseek_jax.data.tokenizer import default_tokenizer, load_tokenizer
  from deepseek_jax.rl import rejection
  from deepseek_jax.train import export
  export.require_run(from_workdir, "--from_workdir")
  model_cfg, train_cfg, variables, run_step = export.load_trained_run(from_workdir, step)
  fmt = prompts_lib.resolve_format(chat_template, train_cfg.tokenizer_path or "",
                                   train_cfg.template)
  tok = (load_tokenizer(train_cfg.tokenizer_path) if train_cfg.tokenizer_path
         else default_tokenizer())
  log(f"{PROG}: {from_workdir} step {run_step}: {len(records)} prompts from "
      f"{','.join(prompt_files)} ({fmt.describe()}, verifier {verifier!r}) x k={k} at "
      f"temperature {temperature}")
  pairs, stats = sample_pairs(model_cfg, variables, tok, records, fmt, k=k,
                              max_new_tokens=max_new_tokens or train_cfg.max_new_tokens,
                              temperature=temperature, check=verifiers.get(verifier),
                              seed=seed, batch_size=batch_size, require_format=require_format,
                              pairs_per_prompt=pairs_per_prompt)
  rejection.write_jsonl(pairs, out)
  log(f"{PROG}: sampled accuracy {stats['accuracy']:.3f}; {stats['prompts_paired']} of "
      f"{stats['n_prompts']} prompts paired ({stats['prompts_all_right']} all right, "
      f"{stats['prompts_all_wrong']} all wrong) -> {stats['n_pairs']} pairs in {out}")
  if not pairs:
    log(f"{PROG}: note: no prompt had both a right and a wrong sample, so {out} is empty "
        "(the trainers refuse it): raise --k or --temperature, or sample a better run.")
  stats.update(out=out, from_workdir=from_workdir, step=run_step, verifier=verifier,
               prompt_format=fmt.describe())
  return stats


def _define_flags() -> None:
  """The flags, defined when run as a program only (importing this module
  leaves absl's global FLAGS alone, as launch.rejection_sample)."""
  flags.DEFINE_string("from_workdir", None, "A launch.train or launch.grpo run directory.")
  flags.DEFINE_integer("step", None, "The run's checkpoint step (default: latest).")
  flags.DEFINE_list("prompt_files", None, "Prompt files ({prompt, answer} records).")
  flags.DEFINE_string("out", None, "The .jsonl file of pairs to write (atomically).")
  flags.DEFINE_integer("n_prompts", None, "Use the first N records (default: all).")
  flags.DEFINE_string("verifier", "math", "math, choice, exact or regex.")
  flags.DEFINE_string("chat_template", "auto", "auto, none, short, r1 or a jinja2 file.")
  flags.DEFINE_bool("require_format", True, "A right sample also needs GRPO's "
                    "<think>/<answer> format.")
  flags.DEFINE_integer("k", 8, "Completions sampled per prompt (>= 2).")
  flags.DEFINE_float("temperature", 1.0, "Sampling temperature (> 0).")
  flags.DEFINE_integer("max_new_tokens", None, "Tokens per completion (default: the run's).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_integer("batch_size", 64, "Completions decoded per batch.")
  flags.DEFINE_integer("pairs_per_prompt", 1, "At most this many pairs per prompt.")


def main(argv):
  begin_main(argv, PROG)
  f = flags.FLAGS
  print_json_or_exit(PROG, USER_ERRORS, lambda: make(
      f.from_workdir, f.out, f.prompt_files, step=f.step, n_prompts=f.n_prompts, k=f.k,
      temperature=f.temperature, max_new_tokens=f.max_new_tokens, seed=f.seed,
      batch_size=f.batch_size, pairs_per_prompt=f.pairs_per_prompt, verifier=f.verifier,
      chat_template=f.chat_template, require_format=f.require_format))


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=lambda argv: parse_flags_or_exit(argv, PROG))
