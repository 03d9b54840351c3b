"""On-policy preference pairs (launch/make_preferences.py): a run's own right and wrong samples.

The oracle re-scores the sampled completions here, by loops over the texts
with the verifier and the task's format check, and pairs them by the
documented rule; the written file must be exactly those pairs, and must load
as preference records."""

import json
import os
import subprocess
import sys

import jax
import pytest

from deepseek_jax.data import default_tokenizer, tasks
from deepseek_jax.data.preferences import load_preference_files
from deepseek_jax.data.prompts import PromptFormat, PromptRecord, encode_records
from deepseek_jax.rl import rejection, verifiers
from deepseek_jax.train import evaluate, export
from launch import make_preferences as cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _oracle(records, texts, k, check, require_format, special, per_prompt):
  """Pairs by the module docstring's rule, written out with plain loops."""
  want = []
  for i, r in enumerate(records):
    right, wrong = [], []
    for j in range(i * k, (i + 1) * k):
      t = texts[j]
      if special[j] or not t.strip() or check(t, r.answer) is None:
        continue
      fmt_ok = tasks.format_ok(t) or not require_format
      if check(t, r.answer) == 1.0 and fmt_ok:
        if t not in right:
          right.append(t)
      elif t not in [w for w, _ in wrong]:
        wrong.append((t, "format" if not fmt_ok else "answer"))
    if not right or not wrong:
      continue
    for j in range(min(per_prompt, max(len(right), len(wrong)))):
      rec = {"prompt": r.prompt, "chosen": right[j % len(right)],
             "rejected": wrong[j % len(wrong)][0]}
      if r.kind:
        rec["kind"] = r.kind
      if r.system:
        rec["system"] = r.system
      rec.update(answer=r.answer, rejected_reason=wrong[j % len(wrong)][1])
      want.append(rec)
  return want


def test_pairs_are_a_right_and_a_wrong_sample_of_the_same_prompt():
  recs = [PromptRecord("2+3", "5", "add"), PromptRecord("Half of 1?", "1/2", "", "Be brief."),
          PromptRecord("3*3", "9", "mul"), PromptRecord("9-9", "0", "sub")]
  good = lambda a: f" <think>w</think> <answer>{a}</answer>"  # noqa: E731
  texts = [good(5), good(6), good(5), "5",              # right, wrong, repeat, no format
           good("0.5"), "  ", good("1/3"), good("2/4"),   # blank is left out
           good(9), good(9), good(9), good(8),            # one wrong: special-token row
           good(1), good(2), "x", good(3)]                # all wrong: no pair
  special = [False] * 11 + [True] + [False] * 4
  for per_prompt, require_format in ((1, True), (3, True), (3, False)):
    pairs, stats = cli.pair_completions(recs, texts, k=4, check=verifiers.math,
                                        require_format=require_format, has_special=special,
                                        pairs_per_prompt=per_prompt)
    assert pairs == _oracle(recs, texts, 4, verifiers.math, require_format, special,
                            per_prompt)
  assert [(p["chosen"], p["rejected"], p["rejected_reason"]) for p in pairs] == [
      (good(5), good(6), "answer"), (good(5), "5", "answer"),
      (good("0.5"), good("1/3"), "answer"), (good("2/4"), good("1/3"), "answer")]
  assert pairs[2]["system"] == "Be brief." and "kind" not in pairs[2]
  assert (stats["n_right"], stats["n_wrong"], stats["left_out"]) == (
      7, 7, {"special_tokens": 1, "blank": 1, "unscored": 0})
  assert (stats["prompts_paired"], stats["prompts_all_right"],
          stats["prompts_all_wrong"]) == (2, 1, 1)
  assert stats["by_kind"]["add"] == {"n_prompts": 1, "n_right": 2, "prompts_paired": 1,
                                     "n_pairs": 2, "accuracy": 0.5}
  with pytest.raises(ValueError, match="15 completions for 4 records"):
    cli.pair_completions(recs, texts[:15], k=4, check=verifiers.math)


@pytest.fixture(scope="module")
def random_run(tmp_path_factory):
  """A run directory holding the tiny preset's random init at step 0: a policy
  that writes varied text in seconds (no training step to compile)."""
  from deepseek_jax.train.checkpoint import Checkpoints
  from deepseek_jax.train.step import init_train_state
  from launch.configs import build_configs
  from launch.configs import tiny as tiny_config
  workdir = str(tmp_path_factory.mktemp("random_run"))
  model_cfg, train_cfg = build_configs(tiny_config.get_config())
  state = init_train_state(model_cfg, train_cfg, jax.random.key(0))
  ckpts = Checkpoints(workdir, model_cfg, train_cfg.to_dict(), every=1, keep=1)
  ckpts.save(0, state, {"epoch": 0, "index": 0}, force=True)
  ckpts.close()
  return workdir


def test_written_pairs_are_the_sampled_completions_rescored(random_run, tmp_path):
  """End to end through `make` (what the command line runs): the file equals
  the oracle's pairs of the same sampler's texts, scored here by the regex
  verifier (a pattern that splits random text into right and wrong)."""
  lines = [json.dumps({"prompt": f"q{i}", "answer": pat, "kind": kind})
           for i, (pat, kind) in enumerate([(r"(?s).{2,}", "a"), (r"(?s).{3,}", "b"),
                                            (r"(?s).*[A-Z].*", "a"), (r"(?s).*\d.*", "b")])]
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("\n".join(lines) + "\n")
  out = tmp_path / "pairs" / "pairs.jsonl"
  kw = dict(k=6, temperature=1.0, max_new_tokens=5, seed=3, batch_size=8, pairs_per_prompt=2,
            verifier="regex", require_format=False, chat_template="short")
  stats = cli.make(random_run, str(out), [str(prompts)], log=lambda s: None, **kw)
  written = [json.loads(line) for line in out.read_text().splitlines()]
  # the oracle: the same sampler and seed, re-scored and paired here
  cfg, _, variables, _ = export.load_trained_run(random_run)
  tok = default_tokenizer()
  recs = [PromptRecord(json.loads(x)["prompt"], json.loads(x)["answer"], json.loads(x)["kind"])
          for x in lines]
  ids = evaluate.completions(cfg, variables,
                             [p for p in encode_records(tok, recs, PromptFormat("short"))
                              for _ in range(6)], max_new_tokens=5, eos_id=tok.eos_id,
                             batch_size=8, temperature=1.0, rng=jax.random.key(3))
  texts = [tok.decode(s) for s in ids]
  special = [bool(rejection.special_ids(tok) & set(s)) for s in ids]
  want = _oracle(recs, texts, 6, verifiers.regex, False, special, 2)
  assert written == want and len(want) >= 2
  assert stats["n_pairs"] == len(want) and stats["n_sampled"] == 24
  assert stats["n_right"] == sum(verifiers.regex(t, recs[j // 6].answer) == 1.0
                                 and t.strip() != "" and not special[j]
                                 for j, t in enumerate(texts))
  loaded = load_preference_files([str(out)])
  assert [(r.prompt, r.chosen, r.rejected, r.kind) for r in loaded] == [
      (w["prompt"], w["chosen"], w["rejected"], w["kind"]) for w in want]
  assert os.listdir(out.parent) == ["pairs.jsonl"]            # atomic: no temp file left


def test_bad_requests_are_refused_with_one_line(tmp_path):
  prompts = tmp_path / "p.jsonl"
  prompts.write_text('{"prompt": "1+1", "answer": "2"}\n')
  base = dict(from_workdir=str(tmp_path), out=str(tmp_path / "x.jsonl"),
              prompt_files=[str(prompts)])
  for kwargs, match in (({"k": 1}, "--k=1 must be >= 2"),
                        ({"temperature": 0.0}, "--temperature=0.0 must be a finite number > 0"),
                        ({"out": "x.txt"}, "must end in .jsonl"),
                        ({"prompt_files": None}, "give --from_workdir"),
                        ({"pairs_per_prompt": 0}, "--pairs_per_prompt=0 must be >= 1"),
                        ({"verifier": "maths"}, "--verifier='maths' must be one of")):
    with pytest.raises(cli.USER_ERRORS, match=match):
      cli.make(**{**base, **kwargs}, log=lambda s: None)
  out = tmp_path / "pairs.jsonl"
  result = subprocess.run(
      [sys.executable, "-m", "launch.make_preferences", f"--from_workdir={tmp_path / 'none'}",
       f"--prompt_files={prompts}", f"--out={out}"], cwd=REPO,
      env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      f"launch.make_preferences: error: --from_workdir='{tmp_path / 'none'}' holds no "
      "checkpoints/: give the workdir of a trained run.")
  assert not out.exists()
