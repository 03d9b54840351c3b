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


def test_event_records_are_the_bytes_tensorboardx_writes(tmp_path):
  """deepseek_jax.train.tfevents against tensorboardX's protobuf classes and
  its CRC-32C: the same bytes, framing included."""
  from tensorboardX import crc32c as tbx_crc
  from tensorboardX.proto.event_pb2 import Event, SessionLog
  from tensorboardX.proto.summary_pb2 import Summary
  from deepseek_jax.train import tfevents
  rng = np.random.default_rng(0)
  for n in (0, 1, 7, 100, 1000):
    data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    assert tfevents.crc32c(data) == tbx_crc.crc32c(data)
  cases = [
      (tfevents.encode_event(1.5e9, step=0, file_version="brain.Event:2"),
       Event(wall_time=1.5e9, file_version="brain.Event:2")),
      (tfevents.encode_event(2.25, step=7, session_status=tfevents.SESSION_START),
       Event(wall_time=2.25, step=7, session_log=SessionLog(status=SessionLog.START))),
      (tfevents.encode_event(3.0, step=2**40 + 3, scalars={"loss": 6.5, "lr": 0.0}),
       Event(wall_time=3.0, step=2**40 + 3, summary=Summary(value=[
           Summary.Value(tag="loss", simple_value=6.5),
           Summary.Value(tag="lr", simple_value=0.0)]))),
  ]
  for ours, theirs in cases:
    assert ours == theirs.SerializeToString()
  from tensorboardX.record_writer import RecordWriter
  path = str(tmp_path / "theirs")
  writer = RecordWriter(path)
  writer.write(cases[2][0])
  writer.close()
  with open(path, "rb") as f:
    assert f.read() == tfevents.record(cases[2][0])


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
  assert len(os.listdir(os.path.join(workdir, "tb"))) == 1     # one file per run segment

  second = _run(*common, "--config.steps=5")
  assert second.returncode == 0, second.stderr[-3000:]
  assert "resuming from" in second.stdout and "at step 3" in second.stdout
  assert "training steps 3 -> 5" in second.stdout
  assert "step      1/" not in second.stdout              # did not restart
  steps = [r["step"] for r in _metrics(workdir) if "loss" in r]
  assert steps == [1, 2, 3, 4, 5]
  assert sorted(_tensorboard_scalars(workdir, "loss")) == [1, 2, 3, 4, 5]
  assert len(os.listdir(os.path.join(workdir, "tb"))) == 2
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
  """A training command (argv) in a subprocess; its output lines arrive on a queue."""

  def __init__(self, argv):
    self.proc = subprocess.Popen(argv, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
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


def _step_reached(line):
  """The step of a progress line ("step     12/24 | ..." or GRPO's "step   12/24 | ...")."""
  m = re.match(r"step\s+(\d+)/", line or "")
  return int(m.group(1)) if m else None


def _moment_reached(what, line, elapsed, first_step, ckpt_dir, steps, rng, delay):
  """The signal to send now for the plan entry `what`, or None (not yet)."""
  s = _step_reached(line)
  if what == "start-up" and elapsed > delay:
    return signal.SIGKILL
  if what == "restore" and line and line.startswith("data:"):
    return signal.SIGKILL            # between the data and the restored state
  if what in ("mid-step", "SIGTERM") and s is not None and s >= first_step + 2:
    time.sleep(rng.uniform(0.0, 0.2))
    return signal.SIGKILL if what == "mid-step" else signal.SIGTERM
  if what == "mid-save" and _tmp_checkpoints(ckpt_dir):
    return signal.SIGKILL            # the write of a checkpoint is under way
  if what == "final eval" and s == steps:
    return signal.SIGKILL
  return None


def _interrupt_at(argv, run_dir, plan, steps, seed=0):
  """Runs the training command `argv` (writing run_dir) once per entry of
  `plan`, each stopped at that moment (SIGKILL; SIGTERM for "SIGTERM"), and
  checks what each leaves: a SIGTERM exits 0 with a checkpoint at the step
  reached, a rerun resumes from the newest whole checkpoint (a half-written
  one is never listed) and every checkpoint left on disk restores. Returns
  (what, exit code, temporary checkpoint directories left) per entry."""
  from deepseek_jax.train import checkpoint
  from deepseek_jax.train.export import load_trained_variables
  ckpt_dir = os.path.join(run_dir, checkpoint.CHECKPOINT_DIR)
  rng = random.Random(seed)
  events, listed = [], []
  for what in plan:
    run = _Training(argv)
    t0, first_step, sent = time.time(), None, None
    delay = rng.uniform(0.0, 1.5)
    while sent is None:
      line = run.next_line()
      if line is None:
        break                            # finished before the moment came
      s = _step_reached(line)
      if s is not None and first_step is None:
        first_step = s
      sent = _moment_reached(what, line, time.time() - t0, first_step, ckpt_dir, steps, rng,
                             delay)
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
    resumed = re.search(r"resuming from .* at step (\d+)", output)
    assert (int(resumed.group(1)) if resumed else None) == (max(listed) if listed else None) \
        or not resumed and what in ("start-up", "restore"), (what, listed, output[-2000:])
    listed = []
    if os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir)):
      ckpts = checkpoint.Checkpoints.existing(run_dir)
      listed = ckpts.all_steps()
      ckpts.close()
    for saved in listed:
      assert load_trained_variables(run_dir, saved)[2] == saved
  # At least one kill landed while a checkpoint was being written.
  assert any(what == "mid-save" and tmp for what, _, tmp in events), events
  return events


def _assert_same_run(ref_dir, run_dir, keys, tb_tag):
  """Both runs' final parameters, checkpoint steps, metrics (train lines'
  `keys` and every eval line) and TensorBoard `tb_tag` scalars are equal."""
  from deepseek_jax.train.export import load_trained_variables
  ckpt_dirs = [os.path.join(d, "checkpoints") for d in (ref_dir, run_dir)]
  assert not _tmp_checkpoints(ckpt_dirs[1])            # interrupted writes cleaned up
  kept = [sorted(int(d) for d in os.listdir(c) if d.isdigit()) for c in ckpt_dirs]
  assert kept[0] == kept[1], kept
  _, a, _ = load_trained_variables(ref_dir)
  _, b, _ = load_trained_variables(run_dir)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  ra, rb = _metrics(ref_dir), _metrics(run_dir)
  train_a, train_b = ([r for r in rs if keys[0] in r] for rs in (ra, rb))
  assert [r["step"] for r in train_b] == [r["step"] for r in train_a]
  for x, y in zip(train_a, train_b):
    assert {k: x[k] for k in keys} == {k: y[k] for k in keys}, (x["step"], x, y)
  assert [r for r in ra if any(k.startswith("eval_") for k in r)] == \
      [r for r in rb if any(k.startswith("eval_") for k in r)]
  assert _tensorboard_scalars(run_dir, tb_tag) == _tensorboard_scalars(ref_dir, tb_tag)
  return kept[0]


@pytest.mark.slow
def test_kill_9_at_any_moment_then_resume_ends_bit_identical(tmp_path):
  """SIGKILL during start-up, mid-step, mid-checkpoint-write, during restore
  and during the final eval, and one SIGTERM (exit 0, checkpoint at the step
  reached), each followed by a rerun: the final parameters, metrics.jsonl and
  TensorBoard scalars equal those of an uninterrupted run, every checkpoint
  left on disk restores, a half-written one is never resumed from."""
  steps = 24
  flags = [f"--config={TINY}", f"--config.steps={steps}", "--config.ckpt_every=4",
           "--config.keep_ckpts=2", "--config.keep_every=8", f"--config.decay_steps={steps - 2}"]
  ref_dir, run_dir = str(tmp_path / "straight"), str(tmp_path / "killed")
  ref = _run(*flags, f"--workdir={ref_dir}")
  assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
  argv = [sys.executable, "-m", "launch.train", *flags, f"--workdir={run_dir}"]
  _interrupt_at(argv, run_dir, ["start-up", "mid-step", "mid-save", "SIGTERM", "restore",
                                "mid-save", "mid-step", "final eval"], steps)
  final = _run(*flags, f"--workdir={run_dir}")
  assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
  kept = _assert_same_run(ref_dir, run_dir, ("loss", "ce", "mtp", "grad_norm", "lr"), "loss")
  assert kept == [8, 16, 20, 24]
  assert [r["step"] for r in _metrics(run_dir) if "loss" in r] == list(range(1, steps + 1))


# A GRPO run with a reward the tiny SFT model earns from the start (so every
# update moves the parameters): train_grpo as launch.grpo calls it.
_GRPO_SCRIPT = """
import json, sys
from deepseek_jax.rl.trainer import GRPOConfig, train_grpo
ones = {"ones": (lambda c, e: c.count("1") / max(len(c), 1), 1.0)}
train_grpo(GRPOConfig.from_dict(json.loads(sys.argv[1])), sys.argv[2], extra_rewards=ones,
           log=lambda line: print(line, flush=True))
"""


@pytest.mark.slow
def test_grpo_killed_at_any_moment_resumes_bit_identical(tmp_path):
  """GRPO under the same harness: SIGKILL during start-up, mid-step, twice
  mid-checkpoint-write and during the final checkpoint / eval, one SIGTERM
  (exit 0, checkpoint at the step reached), each followed by a rerun: the
  final parameters, metrics (rollout rewards, loss, KL, evals) and
  TensorBoard scalars equal an uninterrupted run's."""
  from deepseek_jax.train import loop
  from launch.configs import build_configs
  from launch.configs import tiny as tiny_config
  sft = str(tmp_path / "sft")
  loop.train(*build_configs(tiny_config.get_config()), sft, log=lambda s: None)
  steps = 20
  gcfg = dict(init_from=sft, steps=steps, prompts_per_step=2, group_size=4, max_new_tokens=8,
              n_train_problems=40, n_eval_problems=2, eval_batch_size=2, max_digits=1,
              accuracy_weight=0.0, format_weight=0.0, beta=0.04, lr=1e-3, warmup_steps=0,
              fast_compile=True, ckpt_every=2, keep_ckpts=2, sample_every=100)
  script = tmp_path / "grpo_run.py"
  script.write_text(_GRPO_SCRIPT)
  ref_dir, run_dir = str(tmp_path / "straight"), str(tmp_path / "killed")

  def argv(workdir):
    return [sys.executable, str(script), json.dumps(gcfg), workdir]
  ref = subprocess.run(argv(ref_dir), cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=600)
  assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
  _interrupt_at(argv(run_dir), run_dir, ["start-up", "mid-step", "mid-save", "SIGTERM",
                                         "mid-save", "mid-step", "final eval"], steps)
  final = subprocess.run(argv(run_dir), cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=600)
  assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
  kept = _assert_same_run(ref_dir, run_dir, ("reward", "loss", "kl", "grad_norm", "lr"),
                          "reward")
  assert kept == [steps - 2, steps]
  rewards = [r["reward"] for r in _metrics(ref_dir) if "reward" in r]
  assert len(rewards) == steps and max(r["kl"] for r in _metrics(ref_dir) if "kl" in r) > 0
  evals = [r["step"] for r in _metrics(run_dir) if "eval_greedy_accuracy" in r]
  assert evals == [0, steps]
