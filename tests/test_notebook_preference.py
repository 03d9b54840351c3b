"""experiments/preference_learning.ipynb runs end to end at a tiny size and reports true numbers.

The notebook trains a tiny SFT start, a reward model, on-policy pairs, DPO
on shipped and on-policy pairs, and a stage-4 GRPO run. Its RESULT lines are
checked against what its runs wrote: the reward model's held-out accuracy
against the checkpoint's own scores of the held-out pairs (recomputed here
through load_reward_model), every on-policy pair against the verifier, the
greedy accuracies and win counts against the saved completions re-scored
here, the DPO margins and stage 4's per-kind rewards against metrics.jsonl.
At this size the models solve nothing, so the pairs' and the evaluation's
verifier is `regex` with patterns that split the tiny model's text."""

import json
import math
import os
import sys

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "experiments"))

from run_notebook import image_outputs, run_notebook, result_records  # noqa: E402

NOTEBOOK = os.path.join(REPO_ROOT, "experiments", "preference_learning.ipynb")
CACHE = os.environ["DSJ_TEST_JAX_CACHE"]
# regex answers: patterns that split a barely trained model's text into right and wrong
PATTERNS = [r"(?s).{6,}", r"(?s).*\d.*", r"(?s).*<.*", r"(?s).{12,}", r"(?s).*[A-Z].*",
            r"(?s).*[a-z].*"]


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def notebook_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("preference_nb")
  ops = ["+", "-", "*"]
  prompts = _write_jsonl(tmp / "prompts.jsonl", [
      {"prompt": f"{i}{ops[i % 3]}{i + 1}", "answer": PATTERNS[i % len(PATTERNS)],
       "kind": ("add", "sub", "mul")[i % 3]} for i in range(12)])
  evals = _write_jsonl(tmp / "eval.jsonl", [
      {"prompt": f"{i}+{i}", "answer": PATTERNS[i % len(PATTERNS)], "kind": "add"}
      for i in range(8)])
  with open(os.path.join(REPO_ROOT, "launch", "data", "arith_prefs_eval.jsonl")) as f:
    held = _write_jsonl(tmp / "prefs_eval.jsonl", [json.loads(x) for x in f][:8])
  general = _write_jsonl(tmp / "mixed.jsonl", [
      {"prompt": f"{i}+{i}", "answer": str(2 * i), "kind": "add"} for i in range(4)] + [
      {"prompt": f"{i}-1", "answer": "", "kind": "general"} for i in range(4)])
  workdir = str(tmp / "out")
  params = dict(
      sft_config="launch/configs/tiny.py", sft_overrides={"steps": 4},
      pref_overrides={"preset": "tiny", "batch_size": 4, "eval_batch_size": 8,
                      "eval_preference_files": (held,), "warmup_steps": 0, "log_every": 1},
      rm_steps=4, rm_eval_every=2, prompt_files=[prompts], eval_prompt_files=[evals],
      verifier="regex", require_format=False, pair_k=4, pair_temperature=1.0,
      pairs_per_prompt=2, dpo_steps=2, dpo_overrides={"eval_every": 2},
      eval_max_new_tokens=12, eval_batch_size=8, stage4_steps=2,
      stage4_overrides={"prompts_per_step": 4, "group_size": 2, "max_new_tokens": 8,
                        "judge_max_new_tokens": 3, "prompt_files": (general,),
                        "eval_prompt_files": (evals,), "eval_every": 0, "eval_samples": 1,
                        "eval_batch_size": 8, "warmup_steps": 0, "log_every": 1,
                        # no judge: at this size it never writes a score, so every
                        # general row would be unscored (test_grpo_trainer covers it)
                        "judges": (), "reward_weights": (),
                        "kind_rewards": ("add=accuracy", "general=helpful+harmless")},
      fast_compile=True, workdir_root=workdir, jax_cache_dir=CACHE)
  nb = run_notebook(NOTEBOOK, params, out=os.path.join(str(tmp), "executed.ipynb"),
                    timeout=600)
  results = result_records(nb)
  return nb, workdir, results


@pytest.mark.slow   # trains five tiny runs (~2-3 min on 2 cores): CI's slow step
def test_preference_notebook_numbers_recompute_from_its_runs(notebook_run):
  from deepseek_jax.data.preferences import load_preference_files
  from deepseek_jax.rl import verifiers
  from deepseek_jax.rl.preference_trainer import load_reward_model
  nb, workdir, results = notebook_run
  assert image_outputs(nb) >= 3
  for name in ("reward_model.png", "dpo_vs_sft.png", "stage4_rewards.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  by_part = {}
  for r in results:
    by_part.setdefault(r["part"], []).append(r)

  # 1. reward model: the curve is the run's eval records; the last point its checkpoint's
  (rm,) = by_part["reward_model"]
  assert rm["steps"] == [0, 2, 4]
  evals = [m for m in _metrics(rm["workdir"]) if "eval_accuracy" in m]
  assert [m["eval_accuracy"] for m in evals] == rm["accuracy"]
  pairs = load_preference_files(rm["eval_files"])
  scorer = load_reward_model(rm["workdir"])
  prompts = [p.prompt for p in pairs]
  chosen = scorer(prompts, [p.chosen for p in pairs])
  rejected = scorer(prompts, [p.rejected for p in pairs])
  assert abs(float(np.mean(chosen > rejected)) - rm["accuracy"][-1]) <= 1 / len(pairs)
  assert rm["margin"][-1] == pytest.approx(float(np.mean(chosen - rejected)), abs=1e-3)

  # 2. on-policy pairs: every chosen is right by the verifier, every rejected wrong
  (made,) = by_part["pairs"]
  with open(made["path"]) as f:
    written = [json.loads(line) for line in f]
  assert len(written) == made["n_pairs"] >= 4
  for p in written:
    assert verifiers.regex(p["chosen"], p["answer"]) == 1.0
    assert verifiers.regex(p["rejected"], p["answer"]) == 0.0
  assert made["prompts_paired"] + made["prompts_all_right"] + made["prompts_all_wrong"] <= 12
  assert made["n_right"] + made["n_wrong"] + sum(made["left_out"].values()) == 48

  # 3. DPO vs SFT: accuracy and wins from the saved greedy answers, margins from metrics
  arms = {r["arm"]: r for r in by_part["dpo"]}
  assert sorted(arms) == ["on_policy", "sft", "shipped"]
  scores = {}
  for name, r in arms.items():
    with open(r["completions_path"]) as f:
      rows = [json.loads(line) for line in f]
    scores[name] = [verifiers.regex(x["greedy"], x["answer"]) == 1.0 for x in rows]
    assert len(rows) == r["n"] == 8
    assert r["greedy_accuracy"] == pytest.approx(np.mean(scores[name]))
  for name in ("shipped", "on_policy"):
    r = arms[name]
    wins = sum(a and not b for a, b in zip(scores[name], scores["sft"]))
    losses = sum(b and not a for a, b in zip(scores[name], scores["sft"]))
    assert (r["wins"], r["losses"]) == (wins, losses)
    run = os.path.join(workdir, f"dpo_{name}")
    evals = [m for m in _metrics(run) if "eval_logp_margin" in m]
    assert [m["eval_logp_margin"] for m in evals] == r["logp_margin"]
    assert r["eval_steps"] == [0, 2]
  assert arms["sft"]["wins"] == arms["sft"]["losses"] == 0

  # 4. stage 4: per-kind means over the logged steps
  (s4,) = by_part["stage4"]
  steps = [m for m in _metrics(s4["workdir"]) if "reward" in m and "step" in m]
  assert s4["steps"] == len(steps) == 2
  assert set(s4["kind_mean"]) == {"add", "general"}
  for kind, mean in s4["kind_mean"].items():
    values = [m[f"reward_kind/{kind}"] for m in steps if f"reward_kind/{kind}" in m]
    assert math.isfinite(mean) and mean == pytest.approx(float(np.mean(values)))
  assert s4["unparsable"] == 0
  assert all(m["reward/helpful"] == m["reward/helpful"] for m in steps)   # scored, not NaN
