"""R1-style evaluation of a run or an HF checkpoint on prompt files.

  python -m launch.evaluate --workdir=runs/grpo_files \
      --prompt_files=launch/data/arith_eval.jsonl --samples=8
  python -m launch.evaluate --from_hf=DIR --prompt_files=aime.jsonl,gpqa.parquet \
      --verifier=math --samples=64 --temperature=0.6 --top_p=0.95 --max_new_tokens=32768

Each prompt record ({"prompt", "answer", optional "kind" and "system"}, data/prompts.py)
is rendered with the checkpoint's chat template (`--chat_template=auto`: the
tokenizer directory's tokenizer_config.json when it has one, else the run's
own template), decoded greedily once and `--samples` times at --temperature /
--top_p (DeepSeek-R1 sec. 3: 0.6 / 0.95), and every completion scored by
`--verifier` against the record's answer (rl/verifiers.py). Reported overall
and per kind (rl/evaluation.evaluate_prompts): greedy accuracy, pass@1 (the
mean over the samples), unbiased pass@k for k = 1, 2, 4, ... samples (Chen
et al. 2021), cons@samples (majority vote over the answers, grouped by the
verifier's canonical form), and the share of unscored samples.

Writes OUT/eval.json (the figures), OUT/completions.jsonl (every completion
with its score) and OUT/pass_at_k.png (pass@k against k, per kind); OUT is
--out, default WORKDIR/eval (or ./eval with --from_hf). The last stdout
line is the figures as one JSON line. Bad flags, missing or malformed
files (named with their line), and prompts that do not fit the context exit
non-zero before anything compiles.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

from launch.checkpoint_flags import define_checkpoint_flags
from launch.config_flag import begin_main

_CHECKPOINT = define_checkpoint_flags()
_FILES = flags.DEFINE_list("prompt_files", None, "Prompt files (.jsonl / .parquet), comma "
                           "separated: records with prompt and answer.")
_VERIFIER = flags.DEFINE_string("verifier", "math", "How answers are checked: math, choice, "
                                "exact or regex (rl/verifiers.py).")
_CHAT = flags.DEFINE_string("chat_template", "auto", "auto, none, short, r1, or a jinja2 "
                            "template file.")
_SAMPLES = flags.DEFINE_integer("samples", 8, "Sampled completions per prompt (k of pass@k, "
                                "cons@k).")
_GREEDY = flags.DEFINE_bool("greedy", True, "Also decode each prompt greedily.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.6, "Sampling temperature.")
_TOP_P = flags.DEFINE_float("top_p", 0.95, "Nucleus sampling mass.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens generated per completion.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Prompts decoded together.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_OUT = flags.DEFINE_string("out", None, "Output directory (default WORKDIR/eval, or ./eval).")
flags.mark_flags_as_required(["prompt_files"])


def _fail(msg: str):
  sys.exit(f"launch.evaluate: error: {msg}")


def _check_flags() -> None:
  from deepseek_jax.rl import verifiers
  if _VERIFIER.value not in verifiers.VERIFIERS:
    _fail(f"--verifier={_VERIFIER.value!r} must be one of {sorted(verifiers.VERIFIERS)}.")
  for flag, ok, want in ((_SAMPLES, _SAMPLES.value >= 0, ">= 0"),
                         (_MAX_NEW, _MAX_NEW.value >= 1, ">= 1"),
                         (_BATCH, _BATCH.value >= 1, ">= 1"),
                         (_TEMPERATURE, _TEMPERATURE.value > 0, "> 0"),
                         (_TOP_P, 0 < _TOP_P.value <= 1, "in (0, 1]")):
    if not ok:
      _fail(f"--{flag.name}={flag.value} must be {want}.")
  if _SAMPLES.value == 0 and not _GREEDY.value:
    _fail("--samples=0 with --nogreedy evaluates nothing: set --samples >= 1 or --greedy.")


def _load():
  """(cfg, variables, tokenizer, tokenizer path, template) of the checkpoint."""
  cfg, variables, tok, path, template = _CHECKPOINT.load()
  if tok is None:
    _fail(f"{_CHECKPOINT.from_hf.value!r} has no tokenizer.json: pass --tokenizer=PATH.")
  return cfg, variables, tok, path, template


def _plot(result: dict, samples: int, path: str) -> str | None:
  from deepseek_jax.rl.evaluation import pass_ks
  from deepseek_jax.train import metrics
  from matplotlib.figure import Figure
  ks = pass_ks(samples)
  fig = Figure(figsize=(6, 4))
  ax = fig.add_subplot()
  groups = [("all", result["overall"])] + (sorted(result["by_kind"].items())
                                           if len(result["by_kind"]) > 1 else [])
  for name, figures in groups:
    ax.plot(ks, [figures[f"pass@{k}"] for k in ks], "o-", label=f"{name} (n={int(figures['n'])})")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("k (samples)")
  ax.set_ylabel("pass@k")
  ax.set_ylim(0, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title(f"pass@k, T={_TEMPERATURE.value}, top_p={_TOP_P.value}")
  return metrics.save_figure(fig, path)


def main(argv):
  begin_main(argv, "launch.evaluate")
  t0 = time.time()
  _check_flags()
  from deepseek_jax.data import prompts
  from deepseek_jax.files import atomic_json, atomic_text
  from deepseek_jax.rl import evaluation, verifiers
  try:
    records = prompts.load_prompt_files(_FILES.value)
    cfg, variables, tok, tok_path, template = _load()
    fmt = prompts.resolve_format(_CHAT.value, tok_path or "", template)
    ids = prompts.encode_records(tok, records, fmt)
    for r, i in zip(records, ids):
      if len(i) >= cfg.max_seq_len:
        raise ValueError(f"{r.where}: the prompt is {len(i)} tokens with {fmt.describe()}, "
                         f"the model's max_seq_len is {cfg.max_seq_len}; shorten it.")
  except (ValueError, FileNotFoundError) as e:
    _fail(str(e))
  print(f"{len(records)} prompts ({fmt.describe()}, verifier {_VERIFIER.value!r}), "
        f"greedy {'+ ' if _GREEDY.value else 'off, '}{_SAMPLES.value} samples each",
        file=sys.stderr, flush=True)
  import jax
  check = verifiers.get(_VERIFIER.value)
  result = evaluation.evaluate_prompts(
      cfg, variables, tok, records, ids, score=lambda text, r: check(text, r.answer),
      answer_key=lambda text: verifiers.answer_key(_VERIFIER.value, text),
      samples=_SAMPLES.value, greedy=_GREEDY.value, temperature=_TEMPERATURE.value,
      top_p=_TOP_P.value, max_new_tokens=_MAX_NEW.value, batch_size=_BATCH.value,
      rng=jax.random.key(_SEED.value))
  workdir = _CHECKPOINT.workdir.value
  out = _OUT.value or (os.path.join(workdir, "eval") if workdir else "eval")
  os.makedirs(out, exist_ok=True)
  completions = result.pop("completions")
  atomic_text("".join(json.dumps(c) + "\n" for c in completions),
              os.path.join(out, "completions.jsonl"))
  summary = {**result, "prompt_files": _FILES.value, "verifier": _VERIFIER.value,
             "samples": _SAMPLES.value, "temperature": _TEMPERATURE.value, "top_p": _TOP_P.value,
             "max_new_tokens": _MAX_NEW.value, "prompt_format": fmt.describe(),
             "checkpoint": workdir or _CHECKPOINT.from_hf.value,
             "wall_s": round(time.time() - t0, 1)}
  atomic_json(summary, os.path.join(out, "eval.json"))
  plot = (_plot(result, _SAMPLES.value, os.path.join(out, "pass_at_k.png")) if _SAMPLES.value
          else None)
  for name, figures in [("all", result["overall"])] + sorted(result["by_kind"].items()):
    print(f"{name:>12s}: " + ", ".join(f"{k} {v:.3f}" if k != "n" else f"n {int(v)}"
                                       for k, v in figures.items()), file=sys.stderr)
  print(f"wrote {out}/eval.json, completions.jsonl" + (f", {os.path.basename(plot)}"
                                                       if plot else ""), file=sys.stderr)
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  from launch.config_flag import parse_flags_or_exit
  app.run(main, flags_parser=lambda argv: parse_flags_or_exit(argv, "launch.evaluate"))
