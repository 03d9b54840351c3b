"""The GRPO trainer (rl/trainer.py) on a tiny trained run."""

import json
import os

import jax
import numpy as np
import pytest

from deepseek_jax.data import default_tokenizer
from deepseek_jax.infer import generate
from deepseek_jax.rl.trainer import (GRPOConfig, completion_logprobs, rollout_batch,
                                     train_grpo)
from deepseek_jax.train import export, loop
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


def test_grpo_raises_a_reward_and_a_broken_reward_function_does_not_stop_it(tiny_run, tmp_path):
  def ones(completion, example):           # share of "1" characters: learnable from scratch
    return completion.count("1") / max(len(completion), 1)

  def flaky(completion, example):
    if example["answer"].endswith("3"):
      raise RuntimeError("judge offline")
    return 0.0

  gcfg = GRPOConfig(init_from=tiny_run, steps=12, prompts_per_step=4, group_size=8,
                    max_new_tokens=12, n_train_problems=40, n_eval_problems=0, max_digits=1,
                    accuracy_weight=0.0, format_weight=0.0, beta=0.0, lr=1e-2,
                    warmup_steps=0, mu=2, fast_compile=True, sample_every=5, log_every=100)
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
  for flags, message in (
      (("--config.group_size=1",), "config error: group_size=1 must be >= 2"),
      (("--config.loss_type=ppo",), "loss_type='ppo' must be one of"),
      ((f"--config.init_from={tmp_path / 'nothing'}",), "holds no checkpoints/"),
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
                  "--config.fast_compile=True", "--config.n_train_problems=20")
  assert res.returncode == 0, res.stderr[-3000:]
  assert "== stage 1: cold-start SFT" in res.stdout and "== stage 2: GRPO" in res.stdout
  summary = json.load(open(work / "summary.json"))
  for key in ("sampled_accuracy_before", "sampled_accuracy_after", "greedy_accuracy_before",
              "greedy_accuracy_after", "format_rate_after", "wall_s"):
    assert summary[key] is not None, key
  assert summary["wall_s"] >= summary["grpo_wall_s"] > 0
  assert (work / "sft" / "checkpoints").is_dir() and (work / "grpo.png").exists()
