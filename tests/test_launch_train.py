"""`python -m launch.train` end to end: metrics, automatic resume, kill -9 at
any moment and SIGTERM (the error catalogue: tests/test_errors.py)."""

import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "launch/configs/tiny.py"


def _env():
  env = dict(os.environ)
  env.update({
      "JAX_PLATFORMS": "cpu",
      # Same compilation options as the in-process tests (tests/conftest.py),
      # so the persistent cache serves both.
      "JAX_NUM_CPU_DEVICES": "8",
      "JAX_DEFAULT_MATMUL_PRECISION": "highest",
      "JAX_COMPILATION_CACHE_DIR": os.environ["DSJ_TEST_JAX_CACHE"],
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
      "PYTHONPATH": REPO + os.pathsep + env.get("PYTHONPATH", ""),
      # As in-process (setup.cfg filterwarnings): a deprecation is a failure.
      "PYTHONWARNINGS": "error::DeprecationWarning,error::FutureWarning",
  })
  return env


def _run(*args, timeout=240):
  env = _env()
  return subprocess.run([sys.executable, "-m", "launch.train", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _tensorboard_scalars(workdir, tag):
  """{step: value} of `tag` in workdir/tb's event files (TFRecord framing:
  length u64, crc u32, payload, crc u32), later files and purges applied."""
  import struct
  from tensorboardX.proto import event_pb2
  values = {}
  tb = os.path.join(workdir, "tb")
  for name in sorted(os.listdir(tb)):
    with open(os.path.join(tb, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      if pos + 12 + length + 4 > len(data):
        break             # a record cut short by a kill: readers skip it
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      if event.HasField("session_log") and event.session_log.status == 1:   # START
        values = {s: v for s, v in values.items() if s < event.step}
      for v in event.summary.value:
        if v.tag == tag:
          values[event.step] = v.simple_value
  return values


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_train_writes_metrics_and_second_invocation_resumes(tmp_path):
  workdir = str(tmp_path / "run")
  # decay_steps fixed so the schedule (and the compiled step) is the same for
  # both invocations: the second only extends the run.
  common = [f"--config={TINY}", f"--workdir={workdir}", "--config.decay_steps=4",
            "--config.peak_tflops=0.05"]
  first = _run(*common, "--config.steps=3")
  assert first.returncode == 0, first.stderr[-3000:]
  train_lines = [r for r in _metrics(workdir) if "loss" in r]
  assert [r["step"] for r in train_lines] == [1, 2, 3]
  for r in train_lines:
    for key in ("loss", "ce", "mtp", "balance", "grad_norm", "lr", "load_imbalance",
                "tokens", "tokens_per_s"):
      assert key in r and r[key] == r[key], (key, r)      # present and not NaN
  assert train_lines[0]["lr"] == 0.0 and train_lines[1]["lr"] > 0  # warmup from 0
  evals = [r for r in _metrics(workdir) if "eval_accuracy" in r]
  assert [r["step"] for r in evals] == [3] and 0 <= evals[0]["eval_accuracy"] <= 1
  assert "step      3/3" in first.stdout
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "3"))
  assert os.path.exists(os.path.join(workdir, "loss.png"))
  # config.json (resolved configs, FLOPs) and MFU = tokens/s x FLOPs / (devices x peak)
  with open(os.path.join(workdir, "config.json")) as f:
    written = json.load(f)
  assert written["train"]["steps"] == 3 and written["model"]["n_layers"] == 3
  printed = [r for r in train_lines if "tokens_per_s" in r]
  assert printed and all(r["mfu"] == pytest.approx(
      r["tokens_per_s"] * written["train_flops_per_token"]
      / (written["devices"] * 0.05e12), rel=1e-9) for r in printed)
  assert "| mfu " in first.stdout
  # TensorBoard event files hold the same scalars
  assert _tensorboard_scalars(workdir, "loss") == {
      r["step"]: pytest.approx(r["loss"], rel=1e-6) for r in train_lines}

  second = _run(*common, "--config.steps=5")
  assert second.returncode == 0, second.stderr[-3000:]
  assert "resuming from" in second.stdout and "at step 3" in second.stdout
  assert "training steps 3 -> 5" in second.stdout
  assert "step      1/" not in second.stdout              # did not restart
  steps = [r["step"] for r in _metrics(workdir) if "loss" in r]
  assert steps == [1, 2, 3, 4, 5]
  assert sorted(_tensorboard_scalars(workdir, "loss")) == [1, 2, 3, 4, 5]
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "5"))


# Config, flag, data, workdir and checkpoint errors (exit non-zero with one line
# before compiling): tests/test_errors.py.


def test_long_context_stages_extend_the_demo_model_with_yarn():
  from deepseek_jax.data import default_tokenizer, passkey_room
  from launch.configs import build_configs
  from launch.configs import default as demo
  from launch.configs import long_context
  base, _ = build_configs(demo.get_config())
  for stage, prev in (("1", "/tmp/demo"), ("2", "/tmp/demo_long1")):
    model_cfg, train_cfg = build_configs(long_context.get_config(stage))
    assert train_cfg.init_from == prev and "passkey" in train_cfg.task_kinds
    # the demo's model, YaRN-extended 4x past the length its RoPE was trained for
    assert model_cfg.use_yarn and model_cfg.max_seq_len == 4 * base.original_seq_len
    assert model_cfg.rope_factor * model_cfg.original_seq_len == model_cfg.max_seq_len
    diff = {k for k, v in model_cfg.to_dict().items() if base.to_dict()[k] != v}
    assert diff == {"max_seq_len", "rope_factor"}
    assert passkey_room(default_tokenizer(), train_cfg.seq_len) > train_cfg.seq_len - 64
  assert build_configs(long_context.get_config("2"))[1].seq_len == 1024
  with pytest.raises(ValueError, match="the stages are"):
    long_context.get_config("3")


class _Training:
  """launch.train in a subprocess; its output lines arrive on a queue."""

  def __init__(self, *args):
    self.proc = subprocess.Popen([sys.executable, "-m", "launch.train", *args], cwd=REPO,
                                 env=_env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    self.lines, self.out = queue.Queue(), []
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self):
    for line in self.proc.stdout:
      self.lines.put(line)
    self.lines.put(None)

  def next_line(self, timeout=0.005):
    """The next output line, "" if none came within timeout, None at exit."""
    try:
      line = self.lines.get(timeout=timeout)
    except queue.Empty:
      return ""
    if line is not None:
      self.out.append(line)
    return line

  def wait(self):
    while self.next_line(timeout=1.0) is not None:
      pass
    return self.proc.wait()


def _tmp_checkpoints(ckpt_dir):
  return [d for d in os.listdir(ckpt_dir) if "tmp" in d] if os.path.isdir(ckpt_dir) else []


@pytest.mark.slow
def test_kill_9_at_any_moment_then_resume_ends_bit_identical(tmp_path):
  """SIGKILL during start-up, mid-step, mid-checkpoint-write, during restore
  and during the final eval, and one SIGTERM (exit 0, checkpoint at the step
  reached), each followed by a rerun: the final parameters, metrics.jsonl and
  TensorBoard scalars equal those of an uninterrupted run, every checkpoint
  left on disk restores, a half-written one is never resumed from."""
  from deepseek_jax.train import checkpoint
  from deepseek_jax.train.export import load_trained_variables
  steps = 24
  flags = [f"--config={TINY}", f"--config.steps={steps}", "--config.ckpt_every=4",
           "--config.keep_ckpts=2", "--config.keep_every=8", f"--config.decay_steps={steps - 2}"]
  ref_dir, run_dir = str(tmp_path / "straight"), str(tmp_path / "killed")
  ref = _run(*flags, f"--workdir={ref_dir}")
  assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
  ckpt_dir = os.path.join(run_dir, checkpoint.CHECKPOINT_DIR)
  rng = random.Random(0)

  def step_reached(line):
    m = re.match(r"step\s+(\d+)/", line or "")
    return int(m.group(1)) if m else None

  # (what, when to stop the process): each returns True when it is time.
  plan = ["start-up", "mid-step", "mid-save", "SIGTERM", "restore", "mid-save", "mid-step",
          "final eval"]
  events, listed = [], []
  for what in plan:
    run = _Training(*flags, f"--workdir={run_dir}")
    t0, first_step, sent = time.time(), None, None
    delay = rng.uniform(0.0, 1.5)
    while sent is None:
      line = run.next_line()
      if line is None:
        break                            # finished before the moment came
      s = step_reached(line)
      if s is not None and first_step is None:
        first_step = s
      if what == "start-up" and time.time() - t0 > delay:
        sent = signal.SIGKILL
      elif what == "restore" and line and line.startswith("data:"):
        sent = signal.SIGKILL            # between the data and the restored state
      elif what in ("mid-step", "SIGTERM") and s is not None and s >= first_step + 2:
        time.sleep(rng.uniform(0.0, 0.2))
        sent = signal.SIGKILL if what == "mid-step" else signal.SIGTERM
      elif what == "mid-save" and _tmp_checkpoints(ckpt_dir):
        sent = signal.SIGKILL            # the write of a checkpoint is under way
      elif what == "final eval" and s == steps:
        sent = signal.SIGKILL
      if sent is not None:
        run.proc.send_signal(sent)
    rc = run.wait()
    output = "".join(run.out)
    assert sent is not None, (what, output[-3000:])
    events.append((what, rc, _tmp_checkpoints(ckpt_dir)))
    if sent == signal.SIGTERM:
      assert rc == 0, output[-3000:]
      stopped = re.search(r"stopped by SIGTERM after step (\d+): checkpoint written", output)
      assert stopped, output[-3000:]
      assert checkpoint.Checkpoints.existing(run_dir).latest_step() == int(stopped.group(1))
    else:
      assert rc == -signal.SIGKILL, output[-3000:]
    # It resumed from the newest whole checkpoint (a partial one is not listed).
    resumed = re.search(r"resuming from .* at step (\d+)", output)
    assert (int(resumed.group(1)) if resumed else None) == (max(listed) if listed else None) \
        or not resumed and what in ("start-up", "restore"), (what, listed, output[-2000:])
    # Every checkpoint left on disk restores.
    listed = []
    if os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir)):
      ckpts = checkpoint.Checkpoints.existing(run_dir)
      listed = ckpts.all_steps()
      ckpts.close()
    for saved in listed:
      assert load_trained_variables(run_dir, saved)[2] == saved
  # At least one kill landed while a checkpoint was being written.
  assert any(what == "mid-save" and tmp for what, _, tmp in events), events

  final = _run(*flags, f"--workdir={run_dir}")
  assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
  assert not _tmp_checkpoints(ckpt_dir)            # interrupted writes cleaned up
  kept = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  assert kept == sorted(int(d) for d in os.listdir(os.path.join(ref_dir, "checkpoints"))
                        if d.isdigit()) == [8, 16, 20, 24]
  _, a, _ = load_trained_variables(ref_dir)
  _, b, _ = load_trained_variables(run_dir)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  ra = [r for r in _metrics(ref_dir) if "loss" in r]
  rb = [r for r in _metrics(run_dir) if "loss" in r]
  assert [r["step"] for r in rb] == list(range(1, steps + 1))
  for x, y in zip(ra, rb):
    assert {k: x[k] for k in ("loss", "ce", "mtp", "grad_norm", "lr")} == \
        {k: y[k] for k in ("loss", "ce", "mtp", "grad_norm", "lr")}
  assert _tensorboard_scalars(run_dir, "loss") == _tensorboard_scalars(ref_dir, "loss")
