"""The GRPO trainer (rl/trainer.py) on a tiny trained run."""

import dataclasses
import json
import os
import signal

import jax
import numpy as np
import pytest

from deepseek_jax.data import default_tokenizer
from deepseek_jax.infer import generate
from deepseek_jax.rl.trainer import (GRPOConfig, check_inputs, completion_logprobs,
                                     rollout_batch, train_grpo)
from deepseek_jax.train import checkpoint, export, loop
from launch.configs import build_configs
from launch.configs import tiny as tiny_config


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("sft"))
  model_cfg, train_cfg = build_configs(tiny_config.get_config())
  loop.train(model_cfg, train_cfg, workdir, log=lambda s: None)
  return workdir


def test_rollout_logprobs_equal_the_trainers_recomputed_logprobs(tiny_run):
  cfg, _, variables, _ = export.load_trained_run(tiny_run)
  tok = default_tokenizer()
  prompts = [tok.encode(t, add_bos=True) for t in ("User: 1+2\nAssistant:", "User: 7*8",
                                                   "12", "User: 9-4\nAssistant: <think>")]
  gen = generate(cfg, variables, prompts, max_new_tokens=12, temperature=1.0,
                 stop_ids=(tok.eos_id,), rng=jax.random.key(3))
  batch = rollout_batch(prompts, gen, tok.pad_id)
  mask = np.arange(12)[None] < gen.lengths[:, None]
  rows, cols = np.nonzero(mask)
  # the gathered input positions predict exactly the generated tokens
  np.testing.assert_array_equal(batch["targets"][rows, batch["gather"][rows, cols]],
                                gen.tokens[rows, cols])
  logp = np.asarray(jax.jit(lambda v, b: completion_logprobs(cfg, v, b))(variables, batch))
  np.testing.assert_allclose(logp[mask], gen.logprobs[mask], atol=1e-5, rtol=0)
  assert mask.sum() > 20
  # Tempered and truncated: the sampler reports each token's log-prob in the
  # distribution it drew from, which the trainer's scoring recomputes.
  gen = generate(cfg, variables, prompts, max_new_tokens=12, temperature=0.7, top_p=0.9,
                 stop_ids=(tok.eos_id,), rng=jax.random.key(4))
  batch = rollout_batch(prompts, gen, tok.pad_id)
  mask = np.arange(12)[None] < gen.lengths[:, None]
  logp = np.asarray(jax.jit(lambda v, b: completion_logprobs(
      cfg, v, b, temperature=0.7, top_p=0.9))(variables, batch))
  np.testing.assert_allclose(logp[mask], gen.logprobs[mask], atol=1e-5, rtol=0)
  plain = np.asarray(jax.jit(lambda v, b: completion_logprobs(cfg, v, b))(variables, batch))
  assert np.abs(plain[mask] - gen.logprobs[mask]).max() > 0.05   # not the T=1 log-probs


def test_grpo_raises_a_reward_and_a_broken_reward_function_does_not_stop_it(tiny_run, tmp_path):
  def ones(completion, example):           # share of "1" characters: learnable from scratch
    return completion.count("1") / max(len(completion), 1)

  def flaky(completion, example):
    if example["answer"].endswith("3"):
      raise RuntimeError("judge offline")
    return 0.0

  gcfg = GRPOConfig(init_from=tiny_run, steps=12, prompts_per_step=4, group_size=8,
                    max_new_tokens=12, n_train_problems=40, n_eval_problems=0, max_digits=1,
                    accuracy_weight=0.0, format_weight=0.0, beta=0.0, lr=5e-3,
                    warmup_steps=0, mu=2, fast_compile=True, sample_every=5, log_every=100)
  # lr: 5e-3 climbs 0.02 -> 0.48 (mean of the first and last 3 steps) on the dev
  # machine; 1e-2 there collapsed to no "1"s at all after step 3 (it passed on
  # the CI machine: the trajectory depends on the SFT run's float rounding).
  lines = []
  out = train_grpo(gcfg, str(tmp_path / "grpo"),
                   extra_rewards={"ones": (ones, 1.0), "flaky": (flaky, 0.0)},
                   log=lines.append)
  rewards = [h["reward"] for h in out["history"]]
  assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.15, rewards
  assert any(h["invalid"] > 0 for h in out["history"])      # the flaky judge's victims
  assert out["final_step"] == 12 and out["skipped_steps"] == 0
  # a run any tool reads: metrics, samples, the config, a TrainState checkpoint
  work = str(tmp_path / "grpo")
  records = [json.loads(l) for l in open(os.path.join(work, "metrics.jsonl"))]
  assert [r["step"] for r in records if "reward" in r] == list(range(1, 13))
  assert {"reward/ones", "kl", "clip_low", "clip_high", "entropy", "zero_std_groups",
          "truncated", "completion_len_max", "grad_norm"} <= set(records[0])
  assert os.path.exists(os.path.join(work, "samples.jsonl"))
  assert json.load(open(os.path.join(work, "grpo_config.json")))["group_size"] == 8
  cfg, _, _, step = export.load_trained_run(work)
  assert step == 12 and cfg.n_layers == 3
  assert lines[0].startswith(f"GRPO from {tiny_run}")


def _grpo_cli(*args, timeout=600):
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=os.environ["DSJ_TEST_JAX_CACHE"],
             PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""),
             PYTHONWARNINGS="error::DeprecationWarning,error::FutureWarning")
  return subprocess.run([sys.executable, "-m", "launch.grpo", *args], cwd=repo, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_grpo_cli_refuses_bad_configs_before_compiling(tmp_path):
  demo = "--config=launch/configs/grpo_demo.py"
  bad_file = tmp_path / "p.jsonl"
  bad_file.write_text('{"prompt": "1+1"}\n')
  for flags, message in (
      (("--config.group_size=1",), "config error: group_size=1 must be >= 2"),
      (("--config.loss_type=ppo",), "loss_type='ppo' must be one of"),
      ((f"--config.init_from={tmp_path / 'nothing'}",), "holds no checkpoints/"),
      ((f"--config.prompt_files={bad_file}",), f"config error: {bad_file}:1: missing field"),
      (("--config.reward_fns=no_such_module:fn",), "cannot import module 'no_such_module'"),
      (("--config.verifier=close",), "verifier='close' must be one of"),
      ((f"--config.init_from_hf={tmp_path / 'no_hf'}", "--config.sft_config="
        "launch/configs/finetune.py"), "config error: " + repr(str(tmp_path / "no_hf")))):
    res = _grpo_cli(demo, f"--workdir={tmp_path / 'w'}", *flags, timeout=120)
    assert res.returncode != 0 and message in res.stderr, (flags, res.stderr[-2000:])
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_grpo_cli_runs_sft_then_grpo_and_writes_the_summary(tmp_path):
  work = tmp_path / "grpo"
  res = _grpo_cli("--config=launch/configs/grpo_demo.py", f"--workdir={work}",
                  "--config.sft_config=launch/configs/tiny.py", "--config.steps=2",
                  "--config.prompts_per_step=2", "--config.group_size=2",
                  "--config.max_new_tokens=8", "--config.n_eval_problems=4",
                  "--config.max_digits=1", "--config.eval_batch_size=4",
                  "--config.fast_compile=True", "--config.n_train_problems=20",
                  "--config.eval_samples=3")
  assert res.returncode == 0, res.stderr[-3000:]
  assert "== stage 1: cold-start SFT" in res.stdout and "== stage 2: GRPO" in res.stdout
  summary = json.load(open(work / "summary.json"))
  for key in ("sampled_accuracy_before", "sampled_accuracy_after", "greedy_accuracy_before",
              "greedy_accuracy_after", "format_rate_after", "wall_s"):
    assert summary[key] is not None, key
  assert summary["wall_s"] >= summary["grpo_wall_s"] > 0
  # sampled accuracy: the mean over 3 draws of each of the 4 problems
  evals = [json.loads(l) for l in open(work / "metrics.jsonl") if "eval_" in l]
  assert [r["step"] for r in evals] == [0, 2]
  for r in evals:
    assert round(r["eval_sampled_accuracy"] * 12, 6) % 1 == 0, r
    kinds = [k.split("/")[1] for k in r if k.startswith("eval_sampled_accuracy/")]
    assert kinds and all(f"eval_greedy_accuracy/{k}" in r for k in kinds), r
  assert "x 3 draws" in res.stdout
  assert (work / "sft" / "checkpoints").is_dir() and (work / "grpo.png").exists()


def test_grpo_mesh_errors_name_the_field_before_compiling(tiny_run):
  from deepseek_jax.parallel import MeshConfig
  from deepseek_jax.rl.trainer import grpo_mesh
  cfg, src_train, _, _ = export.load_trained_run(tiny_run)
  gcfg = GRPOConfig(init_from=tiny_run, prompts_per_step=3, group_size=2)
  opt = gcfg.optimizer_config(src_train)
  with pytest.raises(ValueError, match=r"prompts_per_step x group_size = 3 x 2 = 6 rollouts "
                     r"per step must be a multiple of the mesh's batch axes data\*fsdp\*"
                     r"expert=8"):
    grpo_mesh(gcfg, MeshConfig(), cfg, opt)
  with pytest.raises(NotImplementedError, match="mesh.pipe=2: the pipeline runs the "
                     "pretraining loss only"):
    grpo_mesh(gcfg, MeshConfig(pipe=2), cfg, opt)
  assert grpo_mesh(gcfg, None, cfg, opt) == (None, None)


@pytest.mark.slow   # three short GRPO runs (~1.5 min on 2 cores): CI's slow step
def test_grpo_on_a_mesh_equals_one_device_and_resumes(tiny_run, tmp_path):
  """2 steps on data2 x fsdp2 x expert2 (stopped after step 1 and resumed)
  give the one-device run's rollouts, rewards, loss, KL and gradient norm,
  with routing replay on (the replayed experts sharded with the rows)."""
  from deepseek_jax.parallel import MeshConfig
  gcfg = GRPOConfig(init_from=tiny_run, steps=2, prompts_per_step=4, group_size=4,
                    max_new_tokens=10, n_train_problems=40, n_eval_problems=0, max_digits=1,
                    beta=0.04, lr=1e-3, warmup_steps=0, fast_compile=True, log_every=100,
                    accuracy_weight=0.0, format_weight=0.0, routing_replay=True)
  # A reward the tiny model earns from the start: with all rewards equal the
  # gradient is float noise, which Adam's first step blows up to lr-sized
  # updates that differ with the summation order.
  ones = {"ones": (lambda c, e: c.count("1") / max(len(c), 1), 1.0)}
  one = train_grpo(gcfg, str(tmp_path / "one"), extra_rewards=ones,
                   log=lambda s: None)["history"]
  mesh_cfg = MeshConfig(data=2, fsdp=2, expert=2)
  lines = []
  first = train_grpo(gcfg, str(tmp_path / "mesh"), mesh_cfg=mesh_cfg, stop_after=1,
                     extra_rewards=ones, log=lines.append)["history"]
  second = train_grpo(gcfg, str(tmp_path / "mesh"), mesh_cfg=mesh_cfg, extra_rewards=ones,
                      log=lines.append)["history"]
  assert one[0]["reward"] > 0 and one[1]["kl"] > 1e-4      # a real update happened
  assert any(l.startswith("mesh: data=2 fsdp=2") for l in lines)
  assert any("resuming from" in l and "at step 1" in l for l in lines)
  got = first + second
  assert [h["step"] for h in got] == [h["step"] for h in one] == [1, 2]
  for a, b in zip(got, one):
    for key in ("reward", "completion_len", "truncated", "accuracy", "format"):
      assert a[key] == b[key], (a["step"], key)
    for key in ("loss", "kl", "grad_norm", "entropy"):
      assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)


def test_dynamic_sampling_replaces_groups_of_equal_rewards(tiny_run, tmp_path):
  """resample_rounds (DAPO): groups whose rewards are all equal carry no
  gradient; fresh prompts' informative groups replace them, so the trained
  batch never has more such groups than the first draw, and has fewer."""
  def even(completion, example):           # ~1/2 per completion: half the pairs are equal
    return float(len(completion) % 2 == 0)

  gcfg = GRPOConfig(init_from=tiny_run, steps=3, prompts_per_step=4, group_size=2,
                    max_new_tokens=8, n_train_problems=40, n_eval_problems=0, max_digits=1,
                    accuracy_weight=0.0, format_weight=0.0, beta=0.0, lr=1e-3,
                    warmup_steps=0, fast_compile=True, log_every=100, resample_rounds=3)
  hist = train_grpo(gcfg, str(tmp_path / "g"), extra_rewards={"even": (even, 1.0)},
                    log=lambda s: None)["history"]
  drawn = [h["zero_std_groups_drawn"] for h in hist]
  kept = [h["zero_std_groups"] for h in hist]
  assert all(k <= d for k, d in zip(kept, drawn)), (kept, drawn)
  assert sum(kept) < sum(drawn) and sum(drawn) > 0, (kept, drawn)
  assert max(h["resample_rounds"] for h in hist) >= 1
  assert all(h["reward_std"] > 0 for h in hist)


def test_grpo_survives_sigterm_and_skips_nan_steps_like_pretraining(tiny_run, tmp_path):
  """The run harness's policies, in GRPO: a NaN step (the nan_steps hook) is
  skipped (the parameters stay those of the step before) and counted; the
  counters are saved with the checkpoint, so right after a resume another NaN
  step is the second in a row and max_bad_steps=2 stops the run; SIGTERM
  mid-run checkpoints the step reached and returns, and the resumed run ends
  bit-identical to an uninterrupted one (the reference model included)."""
  ones = {"ones": (lambda c, e: c.count("1") / max(len(c), 1), 1.0)}
  gcfg = GRPOConfig(init_from=tiny_run, steps=4, prompts_per_step=2, group_size=4,
                    max_new_tokens=8, n_train_problems=40, n_eval_problems=0, max_digits=1,
                    accuracy_weight=0.0, format_weight=0.0, beta=0.04, lr=1e-3,
                    warmup_steps=0, fast_compile=True, ckpt_every=1, keep_ckpts=4,
                    nan_steps=(2,), max_bad_steps=2)
  straight = str(tmp_path / "straight")
  out = train_grpo(gcfg, straight, extra_rewards=ones, log=lambda s: None)
  assert [h["skipped"] for h in out["history"]] == [0.0, 1.0, 0.0, 0.0]
  assert [h["bad_steps"] for h in out["history"]] == [0.0, 1.0, 1.0, 1.0]
  assert out["skipped_steps"] == 1 and out["stopped_by"] is None
  (_, v1, _), (_, v2, _), (_, v4, _) = (export.load_trained_variables(straight, s)
                                        for s in (1, 2, 4))
  for a, b in zip(jax.tree.leaves(v1), jax.tree.leaves(v2)):
    np.testing.assert_array_equal(a, b)                     # step 2 was skipped
  assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(v2), jax.tree.leaves(v4)))

  def sigterm_at_step_2(line):
    if line.startswith("step    2/"):
      os.kill(os.getpid(), signal.SIGTERM)
  lines, cut = [], str(tmp_path / "cut")
  first = train_grpo(gcfg, cut, extra_rewards=ones,
                     log=lambda line: (lines.append(line), sigterm_at_step_2(line)))
  assert first["stopped_by"] == "SIGTERM" and first["final_step"] == 2
  assert any(line.startswith("stopped by SIGTERM after step 2: checkpoint written")
             for line in lines), lines
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL     # handlers put back
  assert not os.path.exists(os.path.join(cut, "summary.json"))
  ckpts = checkpoint.Checkpoints.existing(cut)
  assert ckpts.latest_step() == 2
  assert ckpts.saved_meta()["data"] == {"step": 2, "bad_in_a_row": 1, "bad_steps": 1}
  ckpts.close()
  with pytest.raises(FloatingPointError, match=r"2 consecutive non-finite steps \(the last: "
                     r"step 3.*still those of step 1"):
    train_grpo(dataclasses.replace(gcfg, nan_steps=(2, 3)), cut, extra_rewards=ones,
               log=lambda s: None)
  lines.clear()
  rest = train_grpo(gcfg, cut, extra_rewards=ones, log=lines.append)
  assert any("resuming from" in line and "at step 2" in line for line in lines), lines
  assert [(h["step"], h["bad_steps"]) for h in rest["history"]] == [(3, 1.0), (4, 1.0)]
  assert rest["final_step"] == 4 and rest["skipped_steps"] == 1
  _, v_cut, _ = export.load_trained_variables(cut)
  for a, b in zip(jax.tree.leaves(v4), jax.tree.leaves(v_cut)):
    np.testing.assert_array_equal(a, b)
  rows = [[json.loads(l) for l in open(os.path.join(w, "metrics.jsonl"))] for w in (straight, cut)]
  assert [r["step"] for r in rows[1]] == [1, 2, 3, 4]
  keys = ("reward", "loss", "kl", "grad_norm")   # JSON text: step 2's NaNs compare equal
  assert [json.dumps([r[k] for k in keys]) for r in rows[0]] == \
      [json.dumps([r[k] for k in keys]) for r in rows[1]]


REWARDS_MODULE = '''
import time

def slow(completion, answer):        # hangs on a third of the completions
  if len(completion) % 3 == 0:
    time.sleep(3)
  return 0.0

def broken(completion, answer):      # raises on another third
  if len(completion) % 3 == 1:
    raise RuntimeError("judge offline")
  return 0.0
'''


def test_grpo_on_prompt_files_with_a_verifier_user_rewards_and_one_compilation(
    tiny_run, tmp_path, monkeypatch):
  """GRPO on the user's prompt file: prompts of varying length (35 to 56 tokens
  in the run's template) compile the rollout and the update once (the
  `compiles` metric stays 0 after step 1: the sequence length is bucketed);
  user reward functions by import path count their errors and timeouts per
  function; the held-out records (drawn from the file) get greedy accuracy,
  pass@1 and cons@k; accuracy is the math verifier's."""
  from deepseek_jax.data import tasks
  from deepseek_jax.rl import verifiers
  (tmp_path / "my_rewards.py").write_text(REWARDS_MODULE)
  monkeypatch.syspath_prepend(str(tmp_path))
  problems = tasks.generate_problems(16, seed=5, split="train", max_digits=1)
  records = [{"prompt": ("please " * (2 + i % 4)) + p.prompt, "answer": p.answer,
              "kind": tasks.kind_of(p)} for i, p in enumerate(problems)]
  path = tmp_path / "prompts.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  gcfg = GRPOConfig(init_from=tiny_run, steps=6, prompts_per_step=2, group_size=4,
                    max_new_tokens=8, prompt_files=(str(path),), n_eval_problems=4,
                    eval_samples=2, reward_fns=("my_rewards:slow", "my_rewards:broken"),
                    reward_timeout_s=0.2, format_weight=0.0, beta=0.04, lr=1e-3,
                    warmup_steps=0, fast_compile=True, log_every=1, sample_every=1)
  from deepseek_jax.rl import trainer
  longest, rollout_batch = [], trainer.rollout_batch

  def spy(prompts, *args, **kw):
    longest.append(max(len(p) for p in prompts))
    return rollout_batch(prompts, *args, **kw)
  monkeypatch.setattr(trainer, "rollout_batch", spy)
  lines = []
  out = train_grpo(gcfg, str(tmp_path / "g"), log=lines.append)
  hist = out["history"]
  assert len({-(-n // 8) for n in longest}) > 1, longest   # rounding to 8 would recompile
  assert hist[0]["compiles"] > 0 and [h["compiles"] for h in hist[1:]] == [0.0] * 5, hist
  assert not any("new compilation" in l for l in lines)
  assert any(l.startswith("prompts: 12 training, 4 held-out records") for l in lines)
  assert sum(h["reward_timeouts/my_rewards:slow"] for h in hist) > 0
  assert sum(h["reward_errors/my_rewards:broken"] for h in hist) > 0
  assert all(h["reward_errors/my_rewards:slow"] == 0 for h in hist)
  assert any("TimeoutError" in l for l in lines) and any("judge offline" in l for l in lines)
  work = str(tmp_path / "g")
  evals = [json.loads(l) for l in open(os.path.join(work, "metrics.jsonl"))
           if "eval_cons@2" in l]
  assert [e["step"] for e in evals] == [0, 6]
  assert {"eval_greedy_accuracy", "eval_sampled_accuracy", "eval_pass@2",
          "eval_unscored"} <= set(evals[0])
  # accuracy is the math verifier against the record's answer (samples.jsonl:
  # the reward of a sample is its accuracy, the user functions add 0 or unscore it)
  samples = [json.loads(l) for l in open(os.path.join(work, "samples.jsonl"))]
  answers = {r["prompt"]: r["answer"] for r in records}
  assert sum(len(s["completion"]) % 3 == 2 for s in samples) > 0
  for s in samples:
    assert s["answer"] == answers[s["prompt"]]
    if len(s["completion"]) % 3 == 2:
      assert s["reward"] == verifiers.math(s["completion"], s["answer"])


def _cli(module, *args, timeout=600):
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=os.environ["DSJ_TEST_JAX_CACHE"],
             PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""),
             PYTHONWARNINGS="error::DeprecationWarning,error::FutureWarning")
  return subprocess.run([sys.executable, "-m", module, *args], cwd=repo, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_launch_evaluate_reports_pass_at_k_and_cons_at_k_per_kind(tiny_run, tmp_path):
  """launch.evaluate on a prompt file: eval.json's figures equal pass@k (the
  binomial form of Chen et al.) and majority votes recomputed with NumPy from
  completions.jsonl, each completion re-scored by the verifier; bad input
  exits before compiling, naming the file and line."""
  import math
  from deepseek_jax.rl import verifiers
  records = [{"prompt": f"{a}+{b}", "answer": pattern, "kind": kind}
             for a, b, pattern, kind in ((1, 2, ".*[0-9].*", "digit"), (3, 4, ".*[0-9].*", "digit"),
                                         (5, 6, ".*[a-z].*", "letter"), (7, 1, ".+", "any"),
                                         (2, 2, "x", "letter"))]
  path = tmp_path / "p.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  out = tmp_path / "eval"
  res = _cli("launch.evaluate", f"--workdir={tiny_run}", f"--prompt_files={path}",
             "--verifier=regex", "--samples=4", "--temperature=1.5", "--top_p=1",
             "--max_new_tokens=6", f"--out={out}")
  assert res.returncode == 0, res.stderr[-3000:]
  figures = json.loads(res.stdout.strip().splitlines()[-1])
  assert figures == json.load(open(out / "eval.json"))
  assert os.path.getsize(out / "pass_at_k.png") > 1000
  rows = [json.loads(l) for l in open(out / "completions.jsonl")]
  assert [r["prompt"] for r in rows] == [r["prompt"] for r in records]

  def pass_k(n, c, k):
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)

  def figures_of(rows):
    scores = [[verifiers.regex(t, r["answer"]) for t in r["sampled"]] for r in rows]
    for r, s in zip(rows, scores):
      assert r["scores"] == s
    got = {"n": float(len(rows)),
           "greedy_accuracy": np.mean([verifiers.regex(r["greedy"], r["answer"]) for r in rows])}
    for k in (1, 2, 4):
      got[f"pass@{k}"] = np.mean([pass_k(4, int(sum(s)), k) for s in scores])
    votes = []
    for r, s in zip(rows, scores):
      keys = [verifiers.answer_key("regex", t) for t in r["sampled"]]
      counts = {}
      for key in keys:
        if key is not None:
          counts[key] = counts.get(key, 0) + 1
      best = max(counts.values(), default=0)
      first = next((i for i, key in enumerate(keys) if key is not None and counts[key] == best),
                   None)
      votes.append(0.0 if first is None else s[first])
    got["cons@4"] = np.mean(votes)
    got["unscored"] = 0.0
    return got

  for name, want in [("overall", figures_of(rows))] + [
      (k, figures_of([r for r in rows if r["kind"] == k])) for k in ("any", "digit", "letter")]:
    have = figures["overall"] if name == "overall" else figures["by_kind"][name]
    assert have.keys() == want.keys()
    for key in want:
      assert have[key] == pytest.approx(want[key], abs=1e-12), (name, key)
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "1+1", "answer": "2"}\n{"prompt": "2+2"}\n')
  for args, message in (((f"--prompt_files={bad}",), f"{bad}:2: missing field(s) ['answer']"),
                        ((f"--prompt_files={path}", "--verifier=close"), "--verifier='close'")):
    res = _cli("launch.evaluate", f"--workdir={tiny_run}", *args, timeout=120)
    assert res.returncode != 0 and message in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "loaded" not in res.stderr


def test_grpo_routing_replay_and_the_rollout_trainer_mismatch(tiny_run, tmp_path):
  """routing_replay: pi_old from the training forward replays the rollout's
  experts, so the sampler's log-probs (tempered, top-p) and the trainer's agree
  to float rounding (logp_mismatch_max); tis_cap runs the truncated
  importance-weighted loss (its weights ~1 here); without replay the metric is
  still reported. Two steps each, beta > 0 (the reference routes itself)."""
  kw = dict(init_from=tiny_run, steps=2, prompts_per_step=2, group_size=4, max_new_tokens=10,
            n_train_problems=40, n_eval_problems=0, max_digits=1, beta=0.04, lr=1e-3,
            warmup_steps=0, fast_compile=True, log_every=100, temperature=0.8, top_p=0.95)
  from deepseek_jax.rl import trainer
  seen, token_logprobs = [], trainer.token_logprobs

  def spy(*args, routing=None, **kwargs):     # traced once per compiled program
    seen.append(None if routing is None else routing.shape)
    return token_logprobs(*args, routing=routing, **kwargs)
  trainer.token_logprobs = spy
  try:
    replay = train_grpo(GRPOConfig(**kw, routing_replay=True, tis_cap=2.0),
                        str(tmp_path / "replay"), log=lambda s: None)["history"]
  finally:
    trainer.token_logprobs = token_logprobs
  # pi_old and the update replay [N, S, n_moe_layers, k]; the reference does not
  assert None in seen and any(r is not None and r[0] == 8 and r[2:] == (2, 2) for r in seen), seen
  plain = train_grpo(GRPOConfig(**kw), str(tmp_path / "plain"), log=lambda s: None)["history"]
  for h in replay + plain:
    assert 0 <= h["logp_mismatch_mean"] <= h["logp_mismatch_max"] < 1e-3, h
  assert all(np.isfinite(h["loss"]) and np.isfinite(h["grad_norm"]) for h in replay)
  assert replay[0]["reward"] == plain[0]["reward"]    # same rollouts at step 1


def test_grpo_with_a_judge_routed_by_prompt_kind(tiny_run, tmp_path):
  """R1's fourth stage in small: math prompts scored by the verifier, general
  ones by an LLM judge (here the tiny run itself, through our generate). The
  judge's output is mostly not a number: those rows score None and are
  counted (reward_unparsable/judge), the run goes on; per-kind reward curves
  are logged. Oracle: each logged sample's reward recomputed by hand (the
  verifier for math rows, the same greedy judge for general ones)."""
  from deepseek_jax.data import tasks
  from deepseek_jax.rl import model_rewards, verifiers
  problems = tasks.generate_problems(8, seed=3, split="train", max_digits=1)
  records = [{"prompt": p.prompt, "answer": p.answer, "kind": "math" if i % 2 else "general"}
             for i, p in enumerate(problems)]
  path = tmp_path / "mixed.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  gcfg = GRPOConfig(init_from=tiny_run, steps=2, prompts_per_step=4, group_size=2,
                    max_new_tokens=8, prompt_files=(str(path),), n_eval_problems=2,
                    format_weight=0.0, judges=(f"judge={tiny_run}",), judge_max_new_tokens=3,
                    kind_rewards=("math=accuracy", "general=judge"), lr=1e-3, warmup_steps=0,
                    fast_compile=True, sample_every=1, eval_every=0)
  lines = []
  hist = train_grpo(gcfg, str(tmp_path / "g"), log=lines.append)["history"]
  assert all({"reward_kind/math", "reward_kind/general", "reward_unparsable/judge"} <= set(h)
             for h in hist)
  cfg, train_cfg, variables, _ = export.load_trained_run(tiny_run)
  from deepseek_jax.data.tokenizer import default_tokenizer, load_tokenizer
  tok = (load_tokenizer(train_cfg.tokenizer_path) if train_cfg.tokenizer_path
         else default_tokenizer())
  judge = model_rewards.JudgeReward(model_rewards.judge_completer(cfg, variables, tok,
                                                                  max_new_tokens=3))
  samples = [json.loads(l) for l in open(tmp_path / "g" / "samples.jsonl")]
  assert {s["kind"] for s in samples} == {"math", "general"}
  for s in samples:
    if s["kind"] == "math":
      want = verifiers.math(s["completion"], s["answer"])
    else:
      want = judge(s["completion"], {"prompt": s["prompt"]}) or 0.0   # None: unscored, 0
    assert s["reward"] == pytest.approx(want), s
  with pytest.raises(ValueError, match="names reward 'helpful'"):
    check_inputs(dataclasses.replace(gcfg, kind_rewards=("general=helpful",)))
  with pytest.raises(ValueError, match="neither a training run"):
    check_inputs(dataclasses.replace(gcfg, judges=(f"judge={tmp_path}",)))
  with pytest.raises(ValueError, match="NAME=PATH"):
    GRPOConfig(judges=("just_a_path",))
