"""Rejection sampling (rl/rejection.py, launch/rejection_sample.py) and SFT on its output."""

import json
import os
import subprocess
import sys

import jax
import pytest

from deepseek_jax.data import default_tokenizer, pipeline, tasks
from deepseek_jax.rl import rejection
from deepseek_jax.train import evaluate, export, loop
from launch import rejection_sample as cli
from launch.config_flag import load_config
from launch.configs import build_configs, sft_samples
from launch.configs import tiny as tiny_config
from random_weights import random_variables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """A tiny model after two steps: it writes text, but solves nothing yet. Its
  schedule is the SFT test's (sft_samples.py's lr), so that run can reuse this
  one's compiled update step (persistent cache)."""
  workdir = str(tmp_path_factory.mktemp("run"))
  config = tiny_config.get_config()
  sft = sft_samples.get_config()
  config.steps, config.warmup_steps, config.lr, config.end_lr = 2, 0, sft.lr, sft.end_lr
  config.ckpt_every, config.n_eval_problems = 2, 0
  loop.train(*build_configs(config), workdir, log=lambda s: None)
  return workdir


def _worked(problems):
  """The reference completion of each problem: correct, well formed, canonical."""
  return [tasks.format_completion(p) for p in problems]


def test_select_keeps_exactly_the_samples_that_pass_grpos_checks():
  p, q = tasks.solve("405-398"), tasks.solve("3*4")     # answers 7 and 12
  good, q_good = _worked([p, q])
  nonc = good.replace("<answer>7<", "<answer>007<")     # the number 7, not as written
  samples = [good, good, good.replace("<answer>7<", "<answer>8<"), nonc,
             q_good.replace("</think>", ""), q_good, q_good, q_good + " "]
  special = [False] * 6 + [True, False]                 # the 7th holds e.g. a <pad>
  records, stats = rejection.select([p, q], samples, k=4, template="short",
                                    has_special=special)
  assert records == [
      {"prompt": "User: 405-398\nAssistant:", "completion": good, "answer": "7", "kind": "sub"},
      {"prompt": "User: 3*4\nAssistant:", "completion": q_good, "answer": "12", "kind": "mul"},
      {"prompt": "User: 3*4\nAssistant:", "completion": q_good + " ", "answer": "12",
       "kind": "mul"}]
  assert stats["rejected"] == {"special_tokens": 1, "format": 1, "answer": 1, "noncanonical": 1}
  assert (stats["n_sampled"], stats["n_accepted"], stats["n_kept"], stats["n_duplicates"],
          stats["prompts_with_kept"]) == (8, 4, 3, 1, 2)
  assert stats["acceptance"] == 0.5
  assert stats["by_kind"]["sub"] == {"n_prompts": 1, "n_sampled": 4, "n_accepted": 2,
                                     "n_kept": 1, "prompts_with_kept": 1, "acceptance": 0.5}
  # accuracy-reward equivalence only, repeats kept, a cap per prompt, the r1 template
  loose, _ = rejection.select([p, q], samples, k=4, canonical_only=False, dedupe=False,
                              keep_per_prompt=2, has_special=special, template="r1")
  assert [r["completion"] for r in loose] == [good, good, q_good, q_good + " "]
  capped, stats = rejection.select([p, q], samples, k=4, keep_per_prompt=1,
                                   has_special=special)
  assert [r["completion"] for r in capped] == [good, q_good] and stats["n_over_cap"] == 1
  assert loose[0]["prompt"] == tasks.format_prompt(p, "r1")
  with pytest.raises(ValueError, match="7 completions for 2 problems"):
    rejection.select([p, q], samples[:7], k=4)


def test_select_records_keeps_what_the_verifier_scores_one():
  """Prompt-file records: kept exactly when the verifier says 1.0 (and, with
  require_format, GRPO's format reward is 1); the record's prompt is the
  rendered text; kinds default to "all"."""
  from deepseek_jax.data.prompts import PromptFormat, PromptRecord
  from deepseek_jax.rl import verifiers
  recs = [PromptRecord("Half of 1?", "1/2", "frac"), PromptRecord("Pick: A) 1 B) 2", "B")]
  fmt = PromptFormat("none")
  texts = [fmt.text(r) for r in recs]
  samples = ["<think>1/2</think> <answer>0.5</answer>", "<think>x</think> <answer>1/3</answer>",
             "so \\boxed{\\frac12}", "<think>t</think> <answer>\\dfrac{1}{2}</answer>",
             "<think>b</think> <answer>B</answer>", "<think>a</think> <answer>A</answer>",
             "The answer is (B)", "<think>b</think> <answer>B</answer>"]
  check = {0: verifiers.math, 1: verifiers.choice}
  judge = lambda r, c: check[recs.index(r)](c, r.answer)  # noqa: E731
  for require_format in (True, False):
    kept, stats = rejection.select_records(
        recs, texts, samples, k=4, check=lambda c, a: check[0 if a == "1/2" else 1](c, a),
        require_format=require_format)
    want = []
    for i, r in enumerate(recs):
      for c in samples[4 * i:4 * i + 4]:
        ok = judge(r, c) == 1.0 and (not require_format or tasks.format_ok(c))
        if ok and c not in [w["completion"] for w in want if w["prompt"] == texts[i]]:
          want.append({"prompt": texts[i], "completion": c, "answer": r.answer,
                       "kind": r.kind or "all"})
    assert kept == want and len(want) >= 3
    assert stats["n_duplicates"] == 1 and set(stats["by_kind"]) == {"frac", "all"}


@pytest.mark.slow   # trains a tiny run (~40 s cold): CI's slow step
def test_rejection_sample_is_the_sampler_filtered_by_the_task_checks(tiny_run):
  cfg, train_cfg, variables, _ = export.load_trained_run(tiny_run)
  tok = default_tokenizer()
  problems = tasks.generate_problems(4, seed=3, split="train", max_digits=1)
  kw = dict(k=2, max_new_tokens=40, temperature=1.0, template=train_cfg.template,
            batch_size=8)
  records, stats = rejection.rejection_sample(cfg, variables, tok, problems, seed=5, **kw)
  # the oracle: the same sampler and seed, filtered here with the task's own checks
  prompts = [pipeline.encode_prompt(tok, p, train_cfg.template) for p in problems]
  ids = evaluate.completions(cfg, variables, [x for x in prompts for _ in range(2)],
                             max_new_tokens=40, eos_id=tok.eos_id, batch_size=8,
                             temperature=1.0, rng=jax.random.key(5))
  texts = [tok.decode(s) for s in ids]
  special = rejection.special_ids(tok)
  want = []
  for i, p in enumerate(problems):
    prompt = tasks.format_prompt(p, train_cfg.template)
    for j in (2 * i, 2 * i + 1):
      ok = (tasks.is_correct(texts[j], p) and tasks.format_ok(texts[j])
            and not special & set(ids[j]))
      if ok and texts[j] not in [r["completion"] for r in want if r["prompt"] == prompt]:
        want.append({"prompt": prompt, "completion": texts[j], "answer": p.answer,
                     "kind": tasks.kind_of(p)})
  assert records == want
  assert stats["n_sampled"] == 8 and stats["n_kept"] == len(want)
  assert sum(stats["rejected"].values()) == 8 - stats["n_accepted"]
  assert len(set(texts)) > 1                            # sampled, not greedy
  assert rejection.rejection_sample(cfg, variables, tok, problems, seed=5, **kw) == (
      records, stats)                                   # deterministic in the seed
  # a model that cannot solve anything keeps nothing
  noise = random_variables(cfg, 0)
  none, stats = rejection.rejection_sample(cfg, noise, tok, problems, seed=5, **kw)
  assert none == [] and stats["n_kept"] == 0 and stats["prompts_with_kept"] == 0
  with pytest.raises(ValueError, match="identical completions"):
    rejection.rejection_sample(cfg, variables, tok, problems, **{**kw, "temperature": 0.0})


@pytest.mark.parametrize("template", ["short", "r1"])
def test_written_records_are_sft_documents_like_the_tasks_own(tmp_path, template):
  tok = default_tokenizer()
  problems = tasks.generate_problems(6, seed=1, split="train", max_digits=3,
                                     kinds=tasks.ARITHMETIC_KINDS)
  records, _ = rejection.select(problems, _worked(problems), k=1, template=template)
  path = tmp_path / "out" / "samples.jsonl"
  (tmp_path / "out").mkdir()
  path.write_text("stale\n")
  assert rejection.write_jsonl(records, path) == 6
  assert os.listdir(tmp_path / "out") == ["samples.jsonl"]     # replaced, no temp file left
  assert [json.loads(line) for line in path.read_text().splitlines()] == records
  docs, sft = pipeline.load_documents(tok, [str(path)])
  assert sft
  for doc, p in zip(docs, problems, strict=True):
    want = pipeline.encode_problem(tok, p, template)
    assert doc.ids.tolist() == want.ids.tolist()
    assert doc.completion_mask.tolist() == want.completion_mask.tolist()


@pytest.mark.slow   # trains a tiny run (~40 s cold): CI's slow step
def test_sample_then_sft_from_the_run_with_held_out_eval(tiny_run, tmp_path):
  out = str(tmp_path / "samples.jsonl")
  stats = cli.sample(tiny_run, out, n_prompts=8, k=2, max_new_tokens=40, batch_size=8,
                     seed=1, log=lambda line: None)
  assert (stats["n_prompts"], stats["n_sampled"], stats["max_digits"]) == (8, 16, 1)
  assert len(open(out).read().splitlines()) == stats["n_kept"]
  data = out
  if stats["n_kept"] < 8:        # a batch of 8 rows needs 8 records: the worked solutions
    problems = tasks.generate_problems(8, seed=1, split="train", max_digits=1)
    data = str(tmp_path / "worked.jsonl")
    rejection.write_jsonl(rejection.select(problems, _worked(problems), k=1)[0], data)
  config = sft_samples.get_config()
  config.preset = "tiny"
  for name, value in dict(init_from=tiny_run, data_files=(data,), steps=2, warmup_steps=0,
                          seq_len=64, max_digits=1, n_eval_problems=8, eval_batch_size=8,
                          max_new_tokens=40, eval_every=0, ckpt_every=2,
                          fast_compile=True).items():
    config[name] = value
  model_cfg, train_cfg = build_configs(config)
  lines = []
  summary = loop.train(model_cfg, train_cfg, str(tmp_path / "sft"), log=lines.append)
  assert summary["final_step"] == 2
  assert [e["step"] for e in summary["eval"]] == [2]
  assert 0 <= summary["eval"][0]["accuracy"] <= 1
  assert any(line.startswith(f"initialised from {tiny_run}") for line in lines)
  assert any("prompt/completion records" in line and "8 held-out" in line for line in lines)
  # both recipes build, their data from the command line's override
  for name in ("sft_samples", "distill"):
    config = load_config(os.path.join(REPO, "launch", "configs", f"{name}.py"),
                         ['--config.data_files=("x.jsonl",)'])
    train_cfg = build_configs(config)[1]
    assert train_cfg.data_files == ("x.jsonl",) and train_cfg.eval_task


def test_judge_keeps_what_it_scores_at_or_above_the_threshold():
  """judge_records with an LLM judge whose 'model' is a lookup: the kept
  records are exactly those scored >= the threshold; unparsable verdicts
  reject and are counted."""
  from deepseek_jax.rl import model_rewards
  verdicts = {"good": "9", "fine": "5", "bad": "2", "weird": "no score"}

  def complete(texts):
    return [verdicts[t.split("Answer: ")[1].split("\n")[0]] for t in texts]

  judge = model_rewards.JudgeReward(complete, on="response")
  records = [{"prompt": f"p{i}", "completion": c, "answer": ""}
             for i, c in enumerate(["good", "bad", "fine", "weird", "good"])]
  kept, stats = rejection.judge_records(records, judge, threshold=0.5)
  assert kept == [records[0], records[2], records[4]]
  assert stats == {"judge_rejected": 2, "judge_unparsable": 1,
                   "judge_mean_score": pytest.approx((0.9 + 0.2 + 0.5 + 0.9) / 4)}
  assert rejection.judge_records(records, judge, threshold=0.95)[0] == []
  with pytest.raises(ValueError, match="threshold=2"):
    rejection.judge_records(records, judge, threshold=2)


def test_cli_bad_requests_exit_with_one_line(tmp_path):
  for kwargs, match in (({"k": 0}, "--k=0 must be >= 1"),
                        ({"temperature": 0.0}, "identical completions"),
                        ({"out": "x.txt"}, "must end in .jsonl"),
                        ({"judge_threshold": 1.5}, "--judge_threshold=1.5"),
                        ({"judge_rubric": "r.txt"}, "--judge_rubric needs --judge")):
    with pytest.raises(cli.USER_ERRORS, match=match):
      cli.sample(str(tmp_path), **{"out": str(tmp_path / "x.jsonl"), **kwargs})
  out = tmp_path / "samples.jsonl"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(
      [sys.executable, "-m", "launch.rejection_sample", f"--from_workdir={tmp_path / 'none'}",
       f"--out={out}", "--k=2"], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=120)
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(
      f"launch.rejection_sample: error: --from_workdir='{tmp_path / 'none'}' holds no "
      "checkpoints/")
  assert not out.exists()
