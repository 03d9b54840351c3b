"""Token-level distillation through launch.train (train/distill_trainer.py): an MoE
teacher (tiny, exported as an HF checkpoint) into a dense student (tiny_llama).

Oracles: the first step's loss recomputed by hand (the run's first batch, the
teacher's top-k by a separate teacher_topk, distill_loss_fn on the seed's
start weights); the on-the-fly and cached targets against each other; one
device against a data=2 x fsdp=2 x tensor=2 mesh; a CLI run that resumes.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from deepseek_jax.config import get_preset
from deepseek_jax.interop import save_hf_checkpoint
from deepseek_jax.parallel import MeshConfig
from deepseek_jax.train import distill, distill_trainer as dt, export, loop
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.step import init_train_state
from random_weights import random_variables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = get_preset("tiny", n_mtp_depth=0)          # MoE + MLA, vocabulary 256
STUDENT = get_preset("tiny_llama")                   # dense GQA, vocabulary 256
K = 8


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("teacher") / "hf")
  save_hf_checkpoint(TEACHER, random_variables(TEACHER, seed=3), path)
  return path


def _tc(teacher, **kw):
  # eps 1e-3: float noise in a gradient moves no weight, so one device and a
  # mesh (another summation order) take the same first Adam step.
  values = dict(objective="distill", distill_teacher=teacher, distill_k=K, distill_chunk=24,
                steps=4, batch_size=8, seq_len=64, n_train_problems=64, n_eval_problems=0,
                max_digits=1, completion_only=True, lr=3e-3, warmup_steps=0, end_lr=3e-3,
                eps=1e-3, log_every=1, ckpt_every=100, async_checkpoints=False,
                fast_compile=True, mtp_weight=0.0, bias_update_speed=0.0)
  return TrainConfig(**{**values, **kw})


def _train(tc, workdir, **kw):
  return dt.train_distill(STUDENT, tc, str(workdir), log=lambda s: None, **kw)


@pytest.fixture(scope="module")
def on_the_fly(teacher_dir, tmp_path_factory):
  tc = _tc(teacher_dir)
  workdir = tmp_path_factory.mktemp("fly")
  return tc, _train(tc, workdir), str(workdir)


def _first_batch(tc):
  """The run's first batch with the teacher's top-k, computed apart."""
  teacher_cfg, teacher_vars = distill.load_teacher(tc.distill_teacher)
  batch = loop.build_data(STUDENT, tc).iterator.batch_at(0)
  ids, logp = distill.teacher_topk(teacher_cfg, teacher_vars, batch["tokens"], k=K,
                                   segment_ids=batch["segment_ids"],
                                   positions=batch["positions"])
  return dict(batch, teacher_ids=ids, teacher_logprobs=logp)


def test_first_loss_is_distill_loss_fn_by_hand_and_the_kl_falls(on_the_fly):
  tc, summary, workdir = on_the_fly
  batch = _first_batch(tc)
  loss_fn = jax.jit(distill.distill_loss_fn(STUDENT, chunk=7))
  start = init_train_state(STUDENT, tc, jax.random.key(tc.seed))
  loss, out = loss_fn(start.params, start.router_bias, batch)
  first = summary["history"][0]
  assert first["loss"] == pytest.approx(float(loss), rel=1e-5)
  assert first["kl"] == pytest.approx(float(out["metrics"]["kl"]), rel=1e-5)
  assert first["tokens"] == float((batch["segment_ids"] != 0).sum())
  assert 0 < first["teacher_mass"] < 1
  # four steps later the KL to the fixed teacher on that batch is lower
  _, _, variables, step = export.load_trained_run(workdir)
  assert step == 4
  after, _ = loss_fn(variables["params"], variables["router_bias"], batch)
  assert float(after) < 0.9 * float(loss), (float(loss), float(after))
  assert summary["history"][-1]["kl"] < summary["history"][0]["kl"]
  for key in ("kl", "ce", "teacher_mass", "grad_norm", "lr", "target_tokens"):
    assert key in summary["history"][1], key
  assert os.path.exists(os.path.join(workdir, "loss.png"))


def test_cached_targets_equal_the_on_the_fly_ones(on_the_fly, tmp_path):
  """distill_cache: shards filled once before training (a rerun computes
  none); the same losses as the jitted teacher per batch within 1e-6."""
  tc, summary, _ = on_the_fly
  cache = str(tmp_path / "cache")
  lines = []
  cached = dt.train_distill(STUDENT, _tc(tc.distill_teacher, distill_cache=cache),
                            str(tmp_path / "run"), log=lines.append)
  assert any("4 of 4 batches computed" in line for line in lines), lines
  assert sorted(os.listdir(cache)) == [distill.META_NAME] + [
      os.path.basename(distill.shard_path(cache, i)) for i in range(4)]
  for a, b in zip(summary["history"], cached["history"]):
    for key in ("loss", "kl", "ce", "teacher_mass"):
      assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-6), key


def test_sharded_step_equals_one_device(teacher_dir, tmp_path):
  """data=2 x fsdp=2 x tensor=2 (fsdp_tp): the same first-step metrics and
  updated student as one device within 1e-5 (the teacher replicated, its
  targets split with the rows)."""
  tc = _tc(teacher_dir, steps=1)
  one = _train(tc, tmp_path / "one")
  mesh = _train(tc, tmp_path / "mesh",
                mesh_cfg=MeshConfig(data=2, fsdp=2, tensor=2, rules="fsdp_tp"))
  m1, m8 = one["history"][0], mesh["history"][0]
  assert m1["loss"] > 0.1 and m1["grad_norm"] > 1e-3
  for key in ("loss", "kl", "ce", "teacher_mass", "grad_norm", "tokens", "target_tokens"):
    assert m8[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-6), key
  p1 = export.load_trained_run(str(tmp_path / "one"))[2]["params"]
  p8 = export.load_trained_run(str(tmp_path / "mesh"))[2]["params"]
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)


def _env():
  env = dict(os.environ)
  env.update({"JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "8",
              "JAX_DEFAULT_MATMUL_PRECISION": "highest",
              "JAX_COMPILATION_CACHE_DIR": os.environ["DSJ_TEST_JAX_CACHE"],
              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
              "PYTHONPATH": REPO + os.pathsep + env.get("PYTHONPATH", ""),
              "PYTHONWARNINGS": "error::DeprecationWarning,error::FutureWarning"})
  return env


def _flags(teacher, *args):
  return [f"--config.distill_teacher={teacher}", f"--config.distill_k={K}",
          "--config.model.n_dense_layers=2", "--config.seq_len=64", "--config.batch_size=8",
          "--config.n_train_problems=64", "--config.n_eval_problems=4",
          "--config.max_digits=1", "--config.max_new_tokens=8", "--config.eval_batch_size=4",
          "--config.log_every=1", "--config.ckpt_every=2", "--config.warmup_steps=0",
          "--config.decay_steps=3", "--config.fast_compile=True", *args]


def test_cli_distill_dense_resumes(teacher_dir, tmp_path):
  """launch/configs/distill_dense.py with the tiny student: 2 steps in-process
  (launch.train.run), then `python -m launch.train` to step 3, which resumes;
  held-out exact match at the end; the checkpoint is a plain run's."""
  from launch.config_flag import load_config
  from launch.train import TRAINERS, run
  assert TRAINERS["distill"] is dt.train_distill
  config, workdir = "launch/configs/distill_dense.py", str(tmp_path / "run")
  lines = []
  run(load_config(os.path.join(REPO, config), _flags(teacher_dir, "--config.steps=2")),
      workdir, preset="tiny_llama", log=lines.append)
  assert any("objective 'distill'" in line for line in lines)
  second = subprocess.run(
      [sys.executable, "-m", "launch.train", f"--config={config}", f"--workdir={workdir}",
       "--preset=tiny_llama", *_flags(teacher_dir, "--config.steps=3")],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "resuming from" in second.stdout and "at step 2" in second.stdout
  assert "held-out exact match" in second.stdout
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records if "kl" in r] == [1, 2, 3]
  assert [r["step"] for r in records if "eval_accuracy" in r] == [2, 3]    # each call's end
  steps = {r["step"]: r for r in records if "kl" in r}
  assert steps[2]["tokens_per_s"] > 0         # (a call's first step is its compile)
  cfg, train_cfg, _, step = export.load_trained_run(workdir)
  assert step == 3 and cfg.attention == "gqa" and train_cfg.objective == "distill"


@pytest.mark.parametrize("values, message", [
    (dict(objective="distill"), "objective='distill' needs a teacher: set distill_teacher"),
    (dict(distill_teacher="t"), "distill_teacher / distill_cache are read by objective"),
    (dict(objective="distill", distill_teacher="t", distill_k=0), "distill_k=0 must be"),
    (dict(objective="distill", distill_teacher="t", distill_temperature=0.0),
     "distill_temperature=0.0 must be"),
    (dict(objective="distill", distill_teacher="t", distill_ce_weight=-1.0),
     "distill_ce_weight=-1.0 must be"),
    (dict(objective="distill", distill_teacher="t", distill_chunk=0), "distill_chunk=0 must"),
])
def test_config_errors_name_the_field(values, message):
  with pytest.raises(ValueError, match=message):
    TrainConfig(**values)


def test_teacher_errors_before_compiling(teacher_dir, tmp_path):
  with pytest.raises(ValueError, match="neither a training run directory"):
    _train(_tc(str(tmp_path / "nothing")), tmp_path / "a")
  small = get_preset("tiny_llama", vocab_size=128)
  with pytest.raises(ValueError, match="teacher vocab_size=256 > student vocab_size=128"):
    dt.train_distill(small, _tc(teacher_dir), str(tmp_path / "b"), log=lambda s: None)
  with pytest.raises(ValueError, match="distill_k=300 exceeds the teacher's vocab_size=256"):
    _train(_tc(teacher_dir, distill_k=300), tmp_path / "c")
  with pytest.raises(NotImplementedError, match="mesh.pipe=2: .* objective='distill'"):
    _train(_tc(teacher_dir), tmp_path / "d", mesh_cfg=MeshConfig(data=4, pipe=2))
  with pytest.raises(ValueError, match="loop.train trains objective='lm'"):
    loop.train(STUDENT, _tc(teacher_dir), str(tmp_path / "e"))
  assert not any(os.path.exists(tmp_path / d) for d in "abcde")
