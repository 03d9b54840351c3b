"""`python -m launch.train` end to end: metrics, automatic resume, config errors."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "launch/configs/tiny.py"


def _run(*args, timeout=240):
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
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
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


@pytest.mark.parametrize("flags,message", [
    ((f"--config={TINY}", "--config.model.n_activated_experts=9"),
     "config error: n_activated_experts"),
    ((f"--config={TINY}", "--preset=huge"), "config error: Unknown preset"),
    ((f"--config={TINY}", "--config.seq_len=1000"), "config error: seq_len"),
    (("--config=launch/configs/no_such.py",), "no such config file"),
    ((f"--config={TINY}", "--config.model.n_layerz=3"),
     'config does not have: n_layerz Did you mean "n_layers"'),
    ((f"--config={TINY}", "--config.init_from_hf=/no/such/ckpt"),
     "config error: '/no/such/ckpt' is not a directory"),
    ((f"--config={TINY}", "--config.init_from_hf=launch", "--preset=tiny"),
     "config error: --preset=tiny and init_from_hf='launch' both name the model"),
    ((f"--config={TINY}", "--num_processes=2", "--process_id=0"),
     "flag error: multi-process launch: num_processes, process_id given but not "
     "coordinator_address"),
    ((f"--config={TINY}", "--coordinator_address=localhost", "--num_processes=2",
      "--process_id=0"), "coordinator_address='localhost' must be HOST:PORT"),
])
def test_config_errors_exit_before_compiling(tmp_path, flags, message):
  workdir = str(tmp_path / "bad")
  result = _run(*flags, f"--workdir={workdir}", timeout=120)
  assert result.returncode != 0
  assert message in result.stderr, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert not os.path.exists(workdir)       # failed before the trainer started


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
