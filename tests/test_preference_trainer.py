"""The preference trainers (rl/preference_trainer.py) through the run harness:
the reward model and DPO on one device and on a mesh, DPO's frozen reference,
`launch.train --config.objective=...` runs that resume, the reward model read
back as a scorer, and the config errors."""

import json
import os
import subprocess
import sys
from functools import partial

import jax
import numpy as np
import pytest

from deepseek_jax.config import get_preset
from deepseek_jax.parallel import MeshConfig
from deepseek_jax.rl import dpo, preference_trainer as pt
from deepseek_jax.train import export, runner
from deepseek_jax.train.config import DPO_LOSS_TYPES, TrainConfig
from deepseek_jax.train.step import init_train_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pairs_file(path, n, seed):
  """n one-digit sums: the right answer chosen, a wrong one rejected."""
  rng = np.random.default_rng(seed)
  lines = []
  for _ in range(n):
    a, b = (int(x) for x in rng.integers(0, 5, 2))
    wrong = a + b + int(rng.integers(1, 4))
    lines.append(json.dumps({"prompt": f"{a}+{b}", "chosen": f" {a + b}",
                             "rejected": f" {wrong}", "answer": str(a + b)}))
  path.write_text("\n".join(lines) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("prefs")
  return _pairs_file(d / "train.jsonl", 32, 0), _pairs_file(d / "eval.jsonl", 6, 1)


CFG = get_preset("tiny", n_mtp_depth=0)     # no MTP: the preference losses do not read it


def _train_cfg(files, objective, **kw):
  # eps 1e-3: a float-noise gradient (~1e-9) moves no weight, so one device and
  # a mesh (another summation order) take the same first Adam step.
  values = dict(objective=objective, preference_files=(files[0],),
                eval_preference_files=(files[1],), steps=3, batch_size=8, seq_len=24,
                lr=1e-3, warmup_steps=0, end_lr=1e-4, eps=1e-3, log_every=1, eval_every=0,
                eval_batch_size=4, ckpt_every=1, keep_ckpts=3, async_checkpoints=False,
                fast_compile=True, beta=0.5, template="short")
  return TrainConfig(**{**values, **kw})


def _one_step(tc, workdir, mesh_cfg=None, cfg=CFG):
  """(trainer, state before, state after, metrics, batch) of the trainer's
  first step in `workdir` (a fresh start, or a resume)."""
  mesh, rules = pt.preference_mesh(mesh_cfg, tc, cfg)
  data = pt.load_data(cfg, tc)
  with runner.Run(workdir, cfg, tc.to_dict(), runner.Settings.of(tc), mesh=mesh,
                  log=lambda s: None) as run:
    trainer = pt.PreferenceTrainer(cfg, tc, data, mesh, rules, lambda s: None)
    state = trainer.start(run)
    before = jax.device_get(state)
    batch = trainer.batches.next(1, state)
    state, m = trainer.step(state, batch)
    return trainer, before, jax.device_get(state), jax.device_get(m), jax.device_get(batch)


@pytest.mark.parametrize("objective", ["reward_model", "dpo"])
def test_sharded_step_equals_one_device(files, tmp_path, objective):
  """expert=2 x data=2 x fsdp=2 under ep_fsdp (the value head's kernel split
  like `embed`): the same start, batch, loss, metrics and updated parameters
  as one device within 1e-5."""
  tc = _train_cfg(files, objective, eval_preference_files=())
  _, before1, after1, m1, batch1 = _one_step(tc, str(tmp_path / "one"))
  trainer, before8, after8, m8, batch8 = _one_step(
      tc, str(tmp_path / "mesh"), MeshConfig(data=2, fsdp=2, expert=2, rules="ep_fsdp"))
  if objective == "reward_model":
    kernel = trainer.abstract.params["value_head"]["kernel"].sharding.spec
    assert kernel == jax.P(("fsdp", "expert"))
  for a, b in zip(jax.tree.leaves(before1), jax.tree.leaves(before8)):
    np.testing.assert_array_equal(a, b)
  for key in batch1:
    np.testing.assert_allclose(batch1[key], batch8[key], rtol=1e-5, atol=1e-6, err_msg=key)
  assert m1["loss"] > 0.1 and m1["grad_norm"] > 1e-3                 # a real update
  for key in m1:
    np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5, atol=1e-6, err_msg=key)
  moved = 0.0
  for a, b, c in zip(jax.tree.leaves(after1.params), jax.tree.leaves(after8.params),
                     jax.tree.leaves(before1.params)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    moved = max(moved, float(np.abs(a - c).max()))
  assert moved > 1e-4


def _env():
  env = dict(os.environ)
  env.update({"JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "8",
              "JAX_DEFAULT_MATMUL_PRECISION": "highest",
              "JAX_COMPILATION_CACHE_DIR": os.environ["DSJ_TEST_JAX_CACHE"],
              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
              "PYTHONPATH": REPO + os.pathsep + env.get("PYTHONPATH", ""),
              "PYTHONWARNINGS": "error::DeprecationWarning,error::FutureWarning"})
  return env


def _flags(files, *args):
  return ["--config.init_from=", "--config.seq_len=24", "--config.batch_size=8",
          "--config.eval_batch_size=8", "--config.log_every=1", "--config.ckpt_every=2",
          "--config.eval_every=2", "--config.warmup_steps=0", "--config.decay_steps=4",
          "--config.fast_compile=True", f"--config.preference_files=('{files[0]}',)",
          f"--config.eval_preference_files=('{files[1]}',)", *args]


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _resumes(config, workdir, files, *args, between=None):
  """2 steps in-process (launch.train.run: the programs land in the test
  compilation cache), `between(model_cfg, train_cfg)`, then
  `python -m launch.train` to step 3, which resumes. (stdout, metrics.jsonl
  records, its eval records)."""
  from launch.config_flag import load_config
  from launch.configs import build_configs
  from launch.train import run
  path = os.path.join(REPO, config)
  lines = []
  run(load_config(path, _flags(files, "--config.steps=2", *args)), workdir, preset="tiny",
      log=lines.append)
  if between is not None:
    between(*build_configs(load_config(path, _flags(files, "--config.steps=3", *args)),
                           "tiny"))
  second = subprocess.run(
      [sys.executable, "-m", "launch.train", f"--config={config}", f"--workdir={workdir}",
       "--preset=tiny", *_flags(files, "--config.steps=3", *args)],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "resuming from" in second.stdout and "at step 2" in second.stdout
  assert "step      1/" not in second.stdout
  records = _metrics(workdir)
  assert [r["step"] for r in records if "grad_norm" in r] == [1, 2, 3]
  # the first step of each invocation (1 and 3) compiles (the update; DPO's
  # reference forward too), none in between
  compiles = [r["compiles"] for r in records if "grad_norm" in r]
  assert compiles[1] == 0 and compiles[0] >= 1 and compiles[2] >= 1, compiles
  evals = [r for r in records if any(k.startswith("eval_") for k in r)]
  assert [r["step"] for r in evals] == [0, 2, 3]
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "3"))
  assert os.path.exists(os.path.join(workdir, "preferences.png"))
  return "\n".join(lines) + second.stdout, records, evals


def test_reward_model_cli_resumes_and_reads_back_as_a_scorer(files, tmp_path):
  """launch/configs/reward_model.py on the tiny preset: 2 steps, then a second
  invocation (the CLI) to 3; the checkpoint's scorer ranks the held-out pairs as the
  last eval did and scores a row alike at any padding."""
  workdir = str(tmp_path / "rm")
  out, records, evals = _resumes("launch/configs/reward_model.py", workdir, files,
                                 "--config.lr=3e-3")
  assert "objective 'reward_model'" in out and "held-out pairwise accuracy" in out
  for key in ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward", "tokens"):
    assert key in records[1], key
  rm = pt.load_reward_model(workdir)
  assert rm.step == 3
  held = [json.loads(line) for line in open(files[1])]
  chosen = rm([r["prompt"] for r in held], [r["chosen"] for r in held])
  rejected = rm([r["prompt"] for r in held], [r["rejected"] for r in held])
  assert chosen.shape == (6,) and chosen.dtype == np.float32
  assert np.mean(chosen > rejected) == pytest.approx(evals[-1]["eval_accuracy"])
  assert np.mean(chosen - rejected) == pytest.approx(evals[-1]["eval_margin"], abs=1e-4)
  assert rm.score(held[0]["prompt"], held[0]["chosen"]) == pytest.approx(chosen[0], abs=1e-5)
  with pytest.raises(ValueError, match="is a reward-model run"):
    export.load_trained_run(workdir)        # generate / evaluate / init_from refuse it
  # as a GRPO reward (R1 stage 4: a reward model for general prompts)
  from deepseek_jax.rl import trainer
  gcfg = trainer.GRPOConfig(reward_models=(f"helpful={workdir}",),     # on the response
                            kind_rewards=("general=helpful", "math=accuracy"))
  trainer.check_inputs(gcfg)
  fn, weight = trainer.reward_functions(gcfg)["helpful"]
  texts = [r["chosen"] for r in held[:3]]
  examples = [{"prompt": r["prompt"], "answer": "", "kind": "general"} for r in held[:3]]
  np.testing.assert_allclose(fn.score_batch(texts, examples), chosen[:3], rtol=1e-5, atol=1e-5)
  assert weight == 1.0 and fn.kinds == {"general"}
  with pytest.raises(ValueError, match=r"reward_models \(rm\): .* does not exist"):
    trainer.check_inputs(trainer.GRPOConfig(reward_models=(f"rm={tmp_path}",)))
  long = rm([held[0]["prompt"]], [held[0]["chosen"] + " " * 40])      # a 64-wide bucket
  assert np.isfinite(long).all()


def test_dpo_cli_resumes_with_the_start_weights_as_reference(files, tmp_path):
  """launch/configs/dpo.py on the tiny preset (IPO, to cover the variant):
  resumes, and the reference stays the start weights in a resumed call; at
  step 0 the policy is the reference (implicit rewards 0); the checkpoint is
  a plain run's."""
  workdir = str(tmp_path / "dpo")

  def reference_after_resume(cfg, tc):
    """batch["ref_logp"] of a call resuming at step 2 equals a separate
    forward of the start weights (the seed's random init), not the policy's."""
    start = init_train_state(cfg, tc, jax.random.key(tc.seed))
    start_vars = {"params": start.params, "router_bias": start.router_bias}
    trainer, policy, _, _, batch = _one_step(tc, workdir, cfg=cfg)
    forward = jax.jit(partial(dpo.response_token_logprobs, cfg))
    rows = {k: v for k, v in batch.items() if k != "ref_logp"}
    want = forward(start_vars, rows)
    np.testing.assert_allclose(batch["ref_logp"], want, rtol=1e-5, atol=1e-5)
    assert np.all(batch["ref_logp"][batch["response_mask"] == 0] == 0)
    moved = forward({"params": policy.params, "router_bias": policy.router_bias}, rows)
    assert np.abs(np.asarray(moved) - np.asarray(want)).max() > 1e-3
    # the reference's held-out values: the start weights' summed log-probs
    held = {k: v.reshape(-1, v.shape[-1]) for k, v in trainer.data.eval.items()}
    ref_eval = np.asarray(forward(start_vars, held)).sum(axis=1)
    np.testing.assert_allclose(trainer.ref_eval, ref_eval, rtol=1e-5, atol=1e-5)

  out, records, evals = _resumes("launch/configs/dpo.py", workdir, files,
                                 "--config.dpo_loss_type=ipo", "--config.lr=3e-3",
                                 between=reference_after_resume)
  assert "DPO reference: the start weights" in out and "implicit reward accuracy" in out
  assert evals[0]["eval_margin"] == 0.0 and evals[0]["eval_reward_accuracy"] == 0.0
  assert evals[-1]["eval_margin"] != 0.0
  for key in ("chosen_logp", "rejected_logp", "logp_margin", "reward_accuracy"):
    assert key in records[1], key
  cfg, train_cfg, _, step = export.load_trained_run(workdir)
  assert step == 3 and train_cfg.objective == "dpo" and train_cfg.dpo_loss_type == "ipo"
  with pytest.raises(ValueError, match="objective='dpo', not a reward model"):
    pt.load_reward_model(workdir)


@pytest.mark.parametrize("values, message", [
    (dict(objective="ppo"),
     r"objective='ppo' must be one of \('lm', 'dpo', 'reward_model', 'distill'\)"),
    (dict(objective="dpo"), "objective='dpo' trains on preference pairs: set preference_files"),
    (dict(objective="reward_model"), "objective='reward_model' trains on preference pairs"),
    (dict(preference_files=("p.jsonl",)), "are read by objective 'dpo' or 'reward_model'"),
    (dict(objective="dpo", preference_files="p.jsonl", beta=0.0), "beta=0.0 must be"),
    (dict(objective="dpo", preference_files="p.jsonl", beta=-1), "beta=-1 must be"),
    (dict(objective="dpo", preference_files="p.jsonl", dpo_loss_type="hinge"),
     r"dpo_loss_type='hinge' must be one of \('sigmoid', 'ipo'\)"),
    (dict(objective="reward_model", preference_files="p.jsonl", rm_margin=-0.5),
     "rm_margin=-0.5 must be"),
    (dict(objective="dpo", preference_files="p.jsonl", data_files=("d.jsonl",)),
     "data_files=.* are documents for objective='lm'"),
])
def test_config_errors_name_the_field(values, message):
  with pytest.raises(ValueError, match=message):
    TrainConfig(**values)
  assert DPO_LOSS_TYPES == dpo.LOSS_TYPES
  assert TrainConfig(objective="dpo", preference_files="a.jsonl,b.jsonl").preference_files == (
      "a.jsonl", "b.jsonl")


def test_launch_errors_before_compiling(files, tmp_path):
  """launch.train.run: config errors and a bad mesh are one line before
  anything compiles; loop.train refuses a preference objective."""
  from launch.config_flag import load_config
  from launch.train import LaunchError, run
  from deepseek_jax.train import loop
  config = "launch/configs/dpo.py"
  with pytest.raises(LaunchError, match="config error: beta=0.0 must be"):
    run(load_config(os.path.join(REPO, config), ["--config.beta=0.0"]), str(tmp_path / "a"))
  with pytest.raises(NotImplementedError, match="mesh.pipe=2: .* objective='dpo'"):
    pt.train_preferences(CFG, _train_cfg(files, "dpo"), str(tmp_path / "b"),
                         mesh_cfg=MeshConfig(data=4, pipe=2))
  with pytest.raises(ValueError, match="batch_size=6 must be a multiple of the batch mesh"):
    pt.train_preferences(CFG, _train_cfg(files, "reward_model", batch_size=6),
                         str(tmp_path / "c"), mesh_cfg=MeshConfig(data=8))
  with pytest.raises(ValueError, match="batch_size=40 pairs exceeds the 32 pairs"):
    pt.train_preferences(CFG, _train_cfg(files, "reward_model", batch_size=40),
                         str(tmp_path / "d"))
  with pytest.raises(ValueError, match="loop.train trains objective='lm'"):
    loop.train(CFG, _train_cfg(files, "dpo"), str(tmp_path / "e"))
  with pytest.raises(FileNotFoundError, match="init_from="):
    pt.train_preferences(CFG, _train_cfg(files, "dpo", init_from=str(tmp_path / "none")),
                         str(tmp_path / "f"))
  assert not os.path.exists(tmp_path / "f")
