"""Smoke test of the throughput benchmarks: each script, run as a user runs it.

Each script runs as a subprocess on a tiny model for 2 timed steps (JAX with
--fast-compile, which only changes speed) and must
print exactly one JSON line carrying the documented fields, with numbers
that are consistent with each other (tokens/s = batch * seq / median step).
"""

import json
import math
import os
import statistics
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"preset": "tiny", "n_mtp_depth": 1, "max_seq_len": 32, "original_seq_len": 32}
BATCH, SEQ, STEPS = 2, 16, 2

COMMON_FIELDS = ("bench", "framework", "train_tokens_per_s", "step_s_median", "step_s_all",
                 "compile_s", "peak_rss_mb", "params", "active_params_per_token", "batch",
                 "seq", "steps", "backend", "moe_impl", "n_mtp_depth")


@pytest.fixture(scope="module")
def tiny_json(tmp_path_factory):
  path = tmp_path_factory.mktemp("bench") / "tiny.json"
  path.write_text(json.dumps(TINY))
  return str(path)


def _run_script(cmd: list[str]) -> subprocess.CompletedProcess:
  # The test session's persistent compilation cache: a re-run skips compiling.
  # Deprecations fail the script, as they fail in-process tests (setup.cfg).
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=os.environ["DSJ_TEST_JAX_CACHE"],
             PYTHONWARNINGS="error::DeprecationWarning,error::FutureWarning")
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _run(script: str, model_json: str, *extra: str) -> tuple[dict, str]:
  cmd = [sys.executable, os.path.join(ROOT, "bench", script), "--model-json", model_json,
         "--batch", str(BATCH), "--seq", str(SEQ), "--steps", str(STEPS), "--warmup", "1",
         *extra]
  proc = _run_script(cmd)
  lines = [l for l in proc.stdout.splitlines() if l.strip()]
  assert len(lines) == 1, f"expected one JSON line, got: {proc.stdout!r}"
  return json.loads(lines[0]), proc.stderr


def _check_common(res: dict, framework: str) -> None:
  missing = [k for k in COMMON_FIELDS if k not in res]
  assert not missing, f"missing fields {missing}"
  assert res["bench"] == "train_throughput" and res["framework"] == framework
  assert (res["batch"], res["seq"], res["steps"]) == (BATCH, SEQ, STEPS)
  assert len(res["step_s_all"]) == STEPS and all(t > 0 for t in res["step_s_all"])
  assert res["step_s_median"] == pytest.approx(statistics.median(res["step_s_all"]))
  assert res["train_tokens_per_s"] == pytest.approx(BATCH * SEQ / res["step_s_median"])
  assert res["peak_rss_mb"] > 50
  assert 0 < res["active_params_per_token"] < res["params"]
  assert math.isfinite(res["final_loss"])


def _tiny_param_counts(n_mtp_depth: int) -> tuple[int, int]:
  """(total, active) parameters of the tiny preset, counted from its shapes."""
  from deepseek_jax import get_preset
  c = get_preset("tiny", n_mtp_depth=n_mtp_depth, max_seq_len=32, original_seq_len=32)
  d, h = c.dim, c.n_heads
  attn = (d * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * h * c.qk_head_dim
          + d * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
          + c.kv_lora_rank * h * (c.qk_nope_head_dim + c.v_head_dim) + h * c.v_head_dim * d)
  routed = c.n_routed_experts * 3 * d * c.moe_inter_dim
  moe_fixed = attn + 2 * d + d * c.n_routed_experts + 3 * d * c.n_shared_experts * c.moe_inter_dim
  dense = attn + 2 * d + 3 * d * c.inter_dim
  mtp_fixed = 3 * d + 2 * d * d
  total = (2 * c.vocab_size * d + d + c.n_dense_layers * dense
           + (c.n_moe_layers + n_mtp_depth) * (moe_fixed + routed) + n_mtp_depth * mtp_fixed)
  active = total - (c.n_moe_layers + n_mtp_depth) * routed * (
      c.n_routed_experts - c.n_activated_experts) // c.n_routed_experts
  return total, active


@pytest.mark.slow   # 20-60 s on 2 cores: CI's slow step keeps the default suite under 15 min
def test_jax_train_throughput_prints_one_json_line_with_all_fields(tiny_json):
  res, _ = _run("train_throughput.py", tiny_json, "--fast-compile")
  _check_common(res, "jax")
  assert res["jax_version"] and res["compile_s"] > 0 and res["fast_compile"]
  assert res["n_mtp_depth"] == 1 and res["moe_impl"] in ("blocked", "ragged")
  assert (res["params"], res["active_params_per_token"]) == _tiny_param_counts(1)


@pytest.mark.torch
def test_hf_train_throughput_prints_one_json_line_with_all_fields(tiny_json):
  res, err = _run("hf_train_throughput.py", tiny_json)
  _check_common(res, "torch-hf")
  # HF trains no MTP: the JSON's n_mtp_depth=1 is overridden, and says so.
  assert res["n_mtp_depth"] == 0 and "n_mtp_depth=1" in err
  assert res["attn_impl"] in ("eager", "sdpa") and res["torch_threads"] >= 1
  assert res["experts_impl"] in ("eager", "batched_mm", "grouped_mm")
  # Same model as the JAX one without MTP, counted independently.
  assert (res["params"], res["active_params_per_token"]) == _tiny_param_counts(0)


@pytest.mark.slow   # 20-60 s on 2 cores: CI's slow step keeps the default suite under 15 min
def test_compare_jax_lines_interleaves_two_interpreters_and_reports_their_ratio(tiny_json):
  # Both sides on this interpreter: the script's bookkeeping is what is tested.
  cmd = [sys.executable, os.path.join(ROOT, "bench", "compare_jax_lines.py"),
         "--python-a", sys.executable, "--python-b", sys.executable,
         "--model-json", tiny_json, "--batch", str(BATCH), "--seq", str(SEQ),
         "--steps", str(STEPS), "--warmup", "1", "--rounds", "1",
         "--jax-args=--fast-compile"]
  proc = _run_script(cmd)
  res = json.loads(proc.stdout.strip())
  runs = [json.loads(line.split("  ", 1)[1]) for line in proc.stderr.splitlines()
          if line.startswith("round ")]
  assert [r["train_tokens_per_s"] for r in runs] == (
      res["a"]["train_tokens_per_s_all"] + res["b"]["train_tokens_per_s_all"])
  assert res["ratio_b_over_a"] == pytest.approx(
      runs[1]["train_tokens_per_s"] / runs[0]["train_tokens_per_s"])
  import flax
  import jax
  for side in ("a", "b"):
    assert res[side]["jax_version"] == jax.__version__
    assert res[side]["flax_version"] == flax.__version__
    assert res[side]["python_version"] == ".".join(map(str, sys.version_info[:3]))
    assert res[side]["params"] == _tiny_param_counts(1)[0]


def _decode(model_json: str, framework: str) -> dict:
  cmd = [sys.executable, os.path.join(ROOT, "bench", "decode_throughput.py"), "--model-json",
         model_json, "--batch", "2", "--prompt", "8", "--new", "6", "--repeats", "1",
         "--framework", framework]
  lines = [l for l in _run_script(cmd).stdout.splitlines() if l.strip()]
  assert len(lines) == 1, lines
  res = json.loads(lines[0])
  assert res["bench"] == "decode_throughput" and res["framework"] == framework
  assert (res["batch"], res["prompt"], res["new"]) == (2, 8, 6)
  assert res["prefill_s"] > 0 and res["total_s"] > 0
  decode_s = res["total_s"] - res["prefill_s"]
  # at this tiny size five decode steps can fall inside the noise of two separate medians
  if decode_s > 0:
    assert res["decode_tokens_per_s"] == pytest.approx(2 * 5 / decode_s)
  else:
    assert res["decode_tokens_per_s"] is None
  return res


@pytest.mark.slow   # 20-60 s on 2 cores: CI's slow step keeps the default suite under 15 min
def test_decode_throughput_prints_one_json_line(tiny_json):
  res = _decode(tiny_json, "jax")
  # the latent cache: (kv_lora_rank + qk_rope_head_dim) x n_layers x 4 bytes (float32)
  assert res["cache_bytes_per_token"] == (32 + 8) * 3 * 4
  assert res["decode_steps"] == 5
  # every weight but the embedding table (and MTP: not drafting), counted from the shapes
  from deepseek_jax import get_preset
  c = get_preset("tiny", max_seq_len=32, original_seq_len=32)
  assert res["weight_bytes_per_step"] == 4 * (_tiny_param_counts(0)[0] - c.vocab_size * c.dim)
  assert res["gemm_floor_s"] > 0


@pytest.mark.torch
def test_hf_decode_throughput_prints_one_json_line(tiny_json):
  res = _decode(tiny_json, "torch-hf")
  assert res["threads"] == 2 and "transformers" in res


@pytest.mark.slow   # two 3-step training runs (~40 s): CI's slow step
def test_fp8_loss_gap_rounding_control_computes_the_same_function(tmp_path):
  """The noise-floor control (another MoE kernel, float32) starts on the
  float32 run's loss: after 3 steps the two agree to rounding."""
  proc = _run_script([sys.executable, os.path.join(ROOT, "bench", "fp8_loss_gap.py"),
                      "--steps", "3", "--tail", "2", "--seeds", "0", "--controls", "rounding",
                      "--lr", "1e-3", "--workdir", str(tmp_path)])
  rows = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
  runs = {r["run"]: r for r in rows if "run" in r}
  assert runs["float32"]["moe_impl"] != runs["rounding"]["moe_impl"] == "ragged"
  assert runs["float32"]["lr"] == runs["rounding"]["lr"] == 1e-3
  assert runs["float32"]["first_loss"] == pytest.approx(runs["rounding"]["first_loss"],
                                                        rel=1e-6)
  gap = [r for r in rows if r.get("control") == "rounding"][0]["gap_rel"]
  assert abs(gap) < 1e-4


@pytest.mark.slow   # one schedule compiled on 2 fake devices (~20 s): CI's slow step
def test_pipeline_schedules_bench_reports_a_gradient_equal_to_the_oracle():
  proc = _run_script([sys.executable, os.path.join(ROOT, "bench", "pipeline_schedules.py"),
                      "--pipe", "2", "--data", "1", "--microbatches", "2", "--rows", "4",
                      "--seq", "16", "--layers", "3", "--repeats", "1", "--schedules", "1f1b"])
  rows = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
  assert [r["schedule"] for r in rows] == ["1f1b"]
  assert rows[0]["max_grad_diff"] < 1e-5 and rows[0]["slots"] <= 2 and rows[0]["step_s"] > 0
