"""Two processes x 4 CPU devices on 127.0.0.1 (two simulated hosts), run
through `python -m launch.train` as a user would on two machines.

Oracles: the same training run in this (one) process on its 8 devices, and
the batch iterator's whole global batch. Each behaviour costs one pair of
subprocesses (they compile the step in parallel on the 2 cores).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from deepseek_jax.data import pipeline
from deepseek_jax.data.tokenizer import default_tokenizer
from deepseek_jax.parallel import MeshConfig, batch_sharding, distributed, setup
from deepseek_jax.train import checkpoint, loop
from deepseek_jax.train.step import abstract_train_state
from launch.configs import build_configs, build_mesh_config
from launch.configs import tiny as tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "launch/configs/tiny.py"
MESH_FLAGS = ("--config.mesh.expert=4", "--config.mesh.fsdp=2")
TOL = 1e-5


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir, *flags, port):
  """Starts the two processes of one run; returns their Popen objects."""
  env = dict(os.environ)
  env.update({
      "JAX_PLATFORMS": "cpu",
      # 4 devices per "host", and the suite's compile flags (tests/conftest.py)
      "XLA_FLAGS": (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip(),
      "JAX_DEFAULT_MATMUL_PRECISION": "highest",
      "PYTHONPATH": REPO + os.pathsep + env.get("PYTHONPATH", ""),
      "PYTHONWARNINGS": "error::DeprecationWarning,error::FutureWarning",
  })
  env.pop("JAX_NUM_CPU_DEVICES", None)
  procs = []
  for pid in (0, 1):
    log = open(os.path.join(os.path.dirname(workdir), f"process{pid}.log"), "w")
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "launch.train", f"--config={TINY}", f"--workdir={workdir}",
         *MESH_FLAGS, *flags, f"--coordinator_address=127.0.0.1:{port}",
         "--num_processes=2", f"--process_id={pid}", "--heartbeat_timeout_s=20",
         "--shutdown_timeout_s=30"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True))
    log.close()
  return procs


def _wait_for_step(procs, workdir, step, timeout=300):
  """Waits until process 0 prints step `step`, both processes still alive."""
  deadline = time.time() + timeout
  while f"step {step:>6d}/" not in _output(workdir, 0):
    assert procs[0].poll() is None and procs[1].poll() is None, _output(workdir, 0)[-3000:]
    assert time.time() < deadline, f"the run did not reach step {step}"
    time.sleep(0.2)


def _output(workdir, pid) -> str:
  with open(os.path.join(os.path.dirname(workdir), f"process{pid}.log")) as f:
    return f.read()


def _tiny_configs(**overrides):
  config = tiny_config.get_config()
  for key, value in overrides.items():
    setattr(config, key, value)
  config.mesh.expert, config.mesh.fsdp = 4, 2
  model_cfg, train_cfg = build_configs(config)
  return model_cfg, train_cfg, build_mesh_config(config)


def test_each_process_reads_only_its_rows_of_the_global_batch():
  rows = pipeline.make_task_dataset(
      default_tokenizer(), n_train=60, n_test=0, seq_len=64, seed=0, max_digits=1).train_rows
  it = pipeline.BatchIterator(rows, 8, seed=3)
  for step in (0, 5, 17):
    whole = it.batch_at(step)
    parts = [it.rows_at(step, lo, lo + 4) for lo in (0, 4)]
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
  with pytest.raises(ValueError, match=r"rows \[4, 9\) are not inside a batch of 8"):
    it.rows_at(0, 4, 9)
  # One process holds every row of the mesh's batch; put_batch makes the global array.
  mesh, rules = setup(MeshConfig(data=2, expert=2, tensor=2))
  sharding = batch_sharding(mesh, rules)
  assert distributed.process_rows(sharding, (8, 64)) == (0, 8)
  batch = distributed.put_batch(it.batch_at(1), sharding, 8)
  assert batch["tokens"].sharding == sharding
  np.testing.assert_array_equal(np.asarray(batch["tokens"]), it.batch_at(1)["tokens"])


@pytest.mark.parametrize("args,match", [
    (("127.0.0.1:1", 2, None, False), "given but not process_id"),
    (("127.0.0.1", 2, 0, False), "must be HOST:PORT"),
    (("127.0.0.1:1234", 2, 2, False), r"process_id=2 must be in \[0, num_processes=2\)"),
    (("127.0.0.1:1234", 0, 0, False), "num_processes=0 must be a positive integer"),
])
def test_bad_multiprocess_arguments_are_refused_before_joining(args, match):
  with pytest.raises(ValueError, match=match):
    distributed.check_args(*args)
  assert distributed.check_args(None, None, None, False) is False
  assert distributed.check_args(None, None, None, True) is True


@pytest.mark.slow   # ~100 s: two processes + the oracle run; CI's slow step
def test_two_processes_train_like_one_process_on_eight_devices(tmp_path):
  # Three steps with a checkpoint every step, then the greedy-decode eval.
  flags = ("--config.steps=3", "--config.ckpt_every=1", "--config.n_eval_problems=4",
           "--config.eval_batch_size=4", "--config.max_new_tokens=6")
  two = str(tmp_path / "two" / "run")
  os.makedirs(os.path.dirname(two))
  procs = _launch(two, *flags, port=_free_port())

  # Meanwhile the oracle: the same run in this process on its 8 devices.
  model_cfg, train_cfg, mesh_cfg = _tiny_configs(
      steps=3, ckpt_every=1, n_eval_problems=4, eval_batch_size=4, max_new_tokens=6)
  one = str(tmp_path / "one")
  ref = loop.train(model_cfg, train_cfg, one, mesh_cfg=mesh_cfg, log=lambda s: None)

  for p in procs:
    p.wait(timeout=400)
  outs = [_output(two, pid) for pid in (0, 1)]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert "process 0 of 2: 4 local of 8 devices" in outs[0]
  assert "step      3/3" in outs[0] and "eval step 3" in outs[0]
  assert "step      1/3" not in outs[1] and "model config" not in outs[1]  # process 0 logs

  with open(os.path.join(two, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  train_lines = [r for r in records if "loss" in r]
  assert [r["step"] for r in train_lines] == [1, 2, 3]            # written once, by process 0
  for key in ("loss", "ce", "mtp", "balance", "grad_norm"):
    np.testing.assert_allclose([r[key] for r in train_lines],
                               [h[key] for h in ref["history"]], atol=TOL, rtol=0)
  evals = [r for r in records if "eval_accuracy" in r]
  assert [(e["step"], e["eval_accuracy"]) for e in evals] == \
      [(e["step"], e["accuracy"]) for e in ref["eval"]]

  # The checkpoint two processes wrote restores onto this one process's mesh
  # and equals the oracle's final state.
  mesh, rules = setup(mesh_cfg)
  target = abstract_train_state(model_cfg, train_cfg, mesh, rules)
  states = []
  for workdir in (two, one):
    ckpts, _ = checkpoint.open_checkpoints(workdir, model_cfg, train_cfg.to_dict(),
                                           every=1, keep=3)
    assert ckpts.latest_step() == 3
    states.append(ckpts.restore(target)[0])
    ckpts.close()
  for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL, rtol=0)


@pytest.mark.slow    # CI runs it in leg 1's slow step (.ci/run)
def test_a_process_whose_peer_dies_exits_with_a_clear_message_in_bounded_time(tmp_path):
  workdir = str(tmp_path / "kill" / "run")
  os.makedirs(os.path.dirname(workdir))
  procs = _launch(workdir, "--config.steps=10000", "--config.ckpt_every=2",
                  "--config.n_eval_problems=0", port=_free_port())
  try:
    _wait_for_step(procs, workdir, 3)
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.time()
    rc = procs[0].wait(timeout=60)     # heartbeat 20 s: the bound, were it idle
    elapsed = time.time() - t0
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  out = _output(workdir, 0)
  assert rc != 0
  assert elapsed < 30, elapsed
  # Two ways out, both bounded: the collective in flight fails (our message),
  # or it waits and JAX's heartbeat aborts the process with its own message.
  ours = "launch.train: error: process 0 of 2 lost contact with another process"
  heartbeat = "JAX distributed service detected fatal errors. This most likely " \
              "indicates that another task died"
  assert ours in out or heartbeat in out, out[-3000:]
  if ours in out:
    assert "Relaunch all processes with the same workdir to resume from step" in out
    assert "Traceback" not in out


@pytest.mark.slow    # CI runs it in leg 1's slow step (.ci/run)
def test_sigterm_to_one_process_stops_both_at_the_same_step_with_a_checkpoint(tmp_path):
  """Under jax.distributed JAX's preemption service catches SIGTERM; every
  process polls reached_preemption, so both save the same step and exit 0."""
  workdir = str(tmp_path / "term" / "run")
  os.makedirs(os.path.dirname(workdir))
  procs = _launch(workdir, "--config.steps=10000", "--config.ckpt_every=1000",
                  "--config.n_eval_problems=0", "--config.log_every=1", port=_free_port())
  try:
    _wait_for_step(procs, workdir, 3)
    procs[1].send_signal(signal.SIGTERM)
    rcs = [p.wait(timeout=120) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  out = _output(workdir, 0)
  assert rcs == [0, 0], (rcs, out[-3000:], _output(workdir, 1)[-3000:])
  stopped = [line for line in out.splitlines() if line.startswith("stopped by SIGTERM")]
  assert len(stopped) == 1, out[-3000:]
  step = int(stopped[0].split("after step ")[1].split(":")[0])
  assert step >= 3 and os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))
