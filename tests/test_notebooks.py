"""Notebooks in experiments/ run end to end at tiny sizes and report true numbers.

The load-balance notebook is executed in a fresh kernel (this interpreter, cwd
= the repository root) through experiments/run_notebook.py with a few steps of
a 2-MoE-layer model. Its printed RESULT lines are then checked against
oracles computed here from the arrays it saved: MaxVio by an explicit loop
over steps and layers (the formula of the aux-loss-free paper), and the
router bias of the final checkpoint against the bias update rule summed by
hand, b = gamma * sum_t sign(mean_i load_t,i - load_t).
"""

import json
import math
import os
import sys
import time

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "experiments"))

from run_notebook import image_outputs, inject_parameters, result_records  # noqa: E402
from run_notebook import run_notebook as _execute  # noqa: E402


def run_notebook(path, params, **kwargs):
  """Executes the notebook (experiments/run_notebook.py) and checks that it
  keeps its figures: every notebook here plots, and an executed notebook
  without image outputs means a backend switch or a plot that never showed."""
  nb = _execute(path, params, **kwargs)
  assert image_outputs(nb) > 0, f"{path}: the executed notebook holds no figures"
  return nb


NOTEBOOK = os.path.join(REPO_ROOT, "experiments", "moe_load_balance.ipynb")
ARMS = ("aux_free_bias", "aux_loss", "none")
STEPS, BATCH, SEQ, GAMMA, ALPHA = 5, 4, 64, 0.05, 0.03
TOP_K = 2  # the tiny preset's n_activated_experts
CACHE = os.environ["DSJ_TEST_JAX_CACHE"]


@pytest.fixture(scope="module")
def load_balance_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("moe_load_balance"))
  params = dict(preset="tiny",
                # 2 MoE layers (the layer mean of MaxVio is exercised), no MTP: fast compiles
                model_overrides={"n_layers": 2, "n_dense_layers": 0, "n_mtp_depth": 0},
                steps=STEPS, batch_size=BATCH, seq_len=SEQ, n_train_problems=60,
                max_digits=1, gamma=GAMMA, alpha=ALPHA, seed=0, fast_compile=True,
                workdir_root=workdir, jax_cache_dir=CACHE)
  t0 = time.time()
  nb = run_notebook(NOTEBOOK, params, out=os.path.join(workdir, "executed.ipynb"),
                    timeout=600)
  print(f"notebook executed in {time.time() - t0:.1f}s")
  results = result_records(nb)
  return {r["arm"]: r for r in results}, results


def _maxvio_oracle(loads):
  """Per step: mean over layers of (max_i load_i - mean load) / mean load, by loops."""
  out = []
  for step_loads in loads:
    per_layer = []
    for layer in step_loads:
      mean = sum(float(x) for x in layer) / len(layer)
      per_layer.append((max(float(x) for x in layer) - mean) / mean)
    out.append(sum(per_layer) / len(per_layer))
  return out


def test_notebook_prints_one_finite_result_per_arm(load_balance_run):
  by_arm, results = load_balance_run
  assert [r["arm"] for r in results] == list(ARMS)
  for r in results:
    for key in ("final_ce", "maxvio_last", "maxvio_mean", "maxvio_tail", "maxvio_random",
                "bias_abs_mean"):
      assert isinstance(r[key], float) and math.isfinite(r[key]), (r["arm"], key, r[key])
    assert r["steps"] == STEPS
  assert (by_arm["aux_free_bias"]["gamma"], by_arm["aux_loss"]["gamma"],
          by_arm["none"]["gamma"]) == (GAMMA, 0.0, 0.0)
  assert by_arm["aux_loss"]["alpha"] == ALPHA and by_arm["none"]["alpha"] == 0.0


def test_saved_loads_are_token_counts_of_top_k_routing(load_balance_run):
  by_arm, _ = load_balance_run
  for arm in ARMS:
    loads = np.load(by_arm[arm]["loads_path"])               # [steps, layers, experts]
    with open(by_arm[arm]["history_path"]) as f:
      tokens = np.array([h["tokens"] for h in json.load(f)])  # non-padding tokens per step
    assert loads.shape == (STEPS, 2, 8)
    assert np.all(loads >= 0) and np.all(loads == np.round(loads))
    # every valid token picks exactly K experts in every MoE layer
    np.testing.assert_array_equal(loads.sum(-1), TOP_K * tokens[:, None] * np.ones((1, 2)))
    assert 0 < tokens.max() <= BATCH * SEQ


def test_maxvio_matches_formula_recomputed_from_saved_loads(load_balance_run):
  by_arm, _ = load_balance_run
  for arm in ARMS:
    r = by_arm[arm]
    mv = _maxvio_oracle(np.load(r["loads_path"]))
    assert r["maxvio_last"] == pytest.approx(mv[-1], rel=1e-5)
    assert r["maxvio_mean"] == pytest.approx(sum(mv) / len(mv), rel=1e-5)
    assert r["maxvio_tail"] == pytest.approx(mv[-1], rel=1e-5)  # tail = 1 step at 5 steps


def test_bias_arm_moves_the_router_bias_by_the_sign_rule(load_balance_run):
  by_arm, _ = load_balance_run
  r = by_arm["aux_free_bias"]
  loads = np.load(r["loads_path"]).astype(np.float64)         # [steps, layers, experts]
  bias = np.load(r["bias_path"])                               # from the final checkpoint
  expected = GAMMA * np.sign(loads.mean(-1, keepdims=True) - loads).sum(0)
  np.testing.assert_allclose(bias, expected, atol=1e-6)
  assert r["bias_abs_mean"] > 0
  assert r["bias_abs_mean"] == pytest.approx(np.abs(expected).mean(), abs=1e-6)
  for arm in ("aux_loss", "none"):
    np.testing.assert_array_equal(np.load(by_arm[arm]["bias_path"]), 0.0)


def test_arms_share_the_first_step_and_the_bias_changes_routing(load_balance_run):
  by_arm, _ = load_balance_run
  loads = {arm: np.load(by_arm[arm]["loads_path"]) for arm in ARMS}
  # same model, data and seed: before any update the routing is identical
  for arm in ARMS[1:]:
    np.testing.assert_array_equal(loads[arm][0], loads["none"][0])
  # after a bias update it is not
  assert not np.array_equal(loads["aux_free_bias"][1:], loads["none"][1:])


def test_unknown_notebook_parameter_is_refused():
  import nbformat
  nb = nbformat.read(NOTEBOOK, as_version=4)
  with pytest.raises(ValueError, match="unknown parameters.*stepz"):
    inject_parameters(nb, {"stepz": 3})


# ---------------------------------------------------------------------------
# experiments/expert_parallel.ipynb
EP_NOTEBOOK = os.path.join(REPO_ROOT, "experiments", "expert_parallel.ipynb")
EP_DEGREES, EP_BATCH, EP_SEQ = [1, 4], 8, 64


@pytest.fixture(scope="module")
def expert_parallel_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("expert_parallel"))
  params = dict(plan_expert_degrees=[8, 64], preset="tiny",
                model_overrides={"n_layers": 2, "n_dense_layers": 0, "n_mtp_depth": 0},
                expert_degrees=EP_DEGREES, steps=3, batch_size=EP_BATCH, seq_len=EP_SEQ,
                workdir_root=workdir, jax_cache_dir=CACHE)
  nb = run_notebook(EP_NOTEBOOK, params, out=os.path.join(workdir, "executed.ipynb"),
                    timeout=600)
  results = result_records(nb)
  return ([r for r in results if r["part"] == "plan"],
          {r["expert"]: r for r in results if r["part"] == "train"})


@pytest.mark.slow   # ~35 s cold: CI's slow step (test_parallel covers EP by default)
def test_expert_parallel_plan_accounts_for_every_v3_parameter_byte(expert_parallel_run):
  from deepseek_jax.config import get_preset
  from deepseek_jax.model import abstract_variables, count_params
  plans, _ = expert_parallel_run
  assert [p["expert"] for p in plans] == [8, 64]
  n_params = count_params(abstract_variables(get_preset("v3_671b"))["params"])
  for p in plans:
    # Sharding loses no byte: devices x per-device bytes >= the model's float32
    # bytes; what exceeds them is replication (weights a rule could not split
    # over every axis), reported as such and small under ep_fsdp.
    total = p["params_bytes_per_device"] * p["devices"]
    assert math.isclose(p["params_replication"], total / (4 * n_params), rel_tol=1e-12)
    assert 1.0 <= p["params_replication"] < 1.1, p
    assert p["grads_bytes_per_device"] == p["params_bytes_per_device"]
    assert 2 * p["params_bytes_per_device"] <= p["opt_state_bytes_per_device"]


@pytest.mark.slow   # ~35 s cold: CI's slow step (test_parallel covers EP by default)
def test_expert_parallel_runs_train_identically_and_report_true_loads(expert_parallel_run):
  _, runs = expert_parallel_run
  assert sorted(runs) == EP_DEGREES
  for ep, r in runs.items():
    assert r["max_loss_diff_vs_first"] < 1e-4, r      # sharding changes sums' order only
    assert r["fsdp"] * ep == 8
    loads = np.load(r["loads_path"])                  # [steps, layers, E]
    t, k, n_exp = EP_BATCH * EP_SEQ // 8, TOP_K, loads.shape[-1]
    # buffers by hand: room for every row per destination, or 2x the even share
    assert r["fallback_rows_per_device"] == ep * t * k
    assert r["buffer_rows_per_device"] == ep * min(t * k, math.ceil(2 * t * k / ep / 8) * 8)
    assert r["routed_rows_per_device"] == t * k
    ratios, busiest = [], []
    for step in loads:
      for layer in step:
        per_rank = [sum(float(x) for x in layer[i * n_exp // ep:(i + 1) * n_exp // ep])
                    for i in range(ep)]
        ratios.append(max(per_rank) / (sum(per_rank) / ep))
        busiest.append(max(per_rank) / (8 // ep))
    assert math.isclose(r["rank_imbalance"], sum(ratios) / len(ratios), rel_tol=1e-6)
    assert math.isclose(r["busiest_rank_rows"], sum(busiest) / len(busiest), rel_tol=1e-6)


# ---------------------------------------------------------------------------
# experiments/fp8_recipe.ipynb
FP8_NOTEBOOK = os.path.join(REPO_ROOT, "experiments", "fp8_recipe.ipynb")


@pytest.fixture(scope="module")
def fp8_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("fp8_recipe"))
  params = dict(outlier_factors=[1, 1e5], m=128, k=256, n=128, preset="tiny",
                model_overrides={"n_layers": 2, "n_dense_layers": 1, "n_mtp_depth": 0},
                steps=4, batch_size=4, seq_len=64, fast_compile=True,
                workdir_root=workdir, jax_cache_dir=CACHE)
  nb = run_notebook(FP8_NOTEBOOK, params, out=os.path.join(workdir, "executed.ipynb"),
                    timeout=600)
  results = result_records(nb)
  return workdir, [r for r in results if r["part"] == "gemm"], [
      r for r in results if r["part"] == "train"][0]


@pytest.mark.slow   # ~35 s cold: CI's slow step (test_fp8 covers the recipe by default)
def test_fp8_notebook_per_tensor_error_recomputes_with_ml_dtypes(fp8_run):
  import ml_dtypes
  workdir, gemm, _ = fp8_run
  w = np.load(os.path.join(workdir, "w.npy"))
  for row in gemm:
    x = np.load(row["x_path"])
    ordinary = np.ones(len(x), bool)
    ordinary[::37] = False
    # Oracle: one scale for the tensor, amax * (1/448), clip, cast, scale back.
    scale = np.float32(np.abs(x).max()) * np.float32(1 / 448)
    xq = np.clip(x / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale
    y, yq = x @ w, xq @ w
    want = np.linalg.norm(yq[ordinary] - y[ordinary]) / np.linalg.norm(y[ordinary])
    assert math.isclose(row["per tensor"], want, rel_tol=1e-3), (row, want)
    assert row["1x128 tiles"] < 0.05 and row["fp8_dot"] < 0.06
  big = gemm[-1]
  assert big["outlier_factor"] == 1e5
  assert big["per tensor"] > 10 * big["1x128 tiles"] and big["per tensor zeros"] > 0.3


@pytest.mark.slow   # ~35 s cold: CI's slow step (test_fp8 covers the recipe by default)
def test_fp8_notebook_trains_both_runs_and_reports_their_gap(fp8_run):
  _, _, train = fp8_run
  ref, low = (np.load(train["loss_paths"][k]) for k in ("float32", "fp8"))
  assert len(ref) == len(low) == 4 and np.isfinite(low).all()
  assert math.isclose(train["relative_gap"], (low[-1:].mean() - ref[-1:].mean())
                      / ref[-1:].mean(), rel_tol=1e-6)
  assert abs(train["relative_gap"]) < 0.05 and train["slowdown"] > 0


# ---------------------------------------------------------------------------
# experiments/inference.ipynb
INFER_NOTEBOOK = os.path.join(REPO_ROOT, "experiments", "inference.ipynb")


@pytest.mark.slow   # 20-60 s on 2 cores: CI's slow step keeps the default suite under 15 min
def test_inference_notebook_reports_cache_sizes_and_mtp_acceptance(tmp_path):
  """Memory figures against the formula written out here; per temperature:
  greedy speculative tokens equal plain greedy (the saved arrays), counts
  consistent (accepted <= drafted, acceptance = accepted / drafted)."""
  params = dict(context_lengths=[1024, 131072], train_steps=40, temperatures=[0.0, 1.0],
                n_prompts=4, max_new_tokens=8, workdir_root=str(tmp_path),
                jax_cache_dir=CACHE)
  nb = run_notebook(INFER_NOTEBOOK, params, out=str(tmp_path / "executed.ipynb"), timeout=600)
  results = result_records(nb)
  memory = [r for r in results if r["part"] == "memory"][0]
  per_layer = 512 + 64                                  # kv_lora_rank + qk_rope_head_dim
  assert memory["mla_bytes_per_token"] == per_layer * 61 * 2
  assert memory["full_bytes_per_token"] == 128 * (128 + 64 + 128) * 61 * 2
  assert memory["alloc_bytes_4096"] == per_layer * 61 * 2 * 4096
  assert math.isclose(memory["gib_at"]["131072"], per_layer * 61 * 2 * 131072 / 2**30)
  spec = [r for r in results if r["part"] == "spec"]
  assert [r["temperature"] for r in spec] == [0.0, 1.0]
  for r in spec:
    assert 0 <= r["accepted"] <= r["drafted"]
    assert math.isclose(r["acceptance"], r["accepted"] / r["drafted"])
    assert r["tokens_plain"] == r["tokens_spec"] == 4 * 8
    assert r["steps_spec"] <= r["steps_plain"] == 7
  greedy = spec[0]
  assert greedy["identical"]
  np.testing.assert_array_equal(np.load(greedy["plain_path"]), np.load(greedy["spec_path"]))


GRPO_NOTEBOOK = os.path.join(REPO_ROOT, "experiments", "grpo_loss_types.ipynb")


@pytest.mark.slow   # ~90 s on 2 cores: in CI's slow step, to keep the default suite short
def test_grpo_notebook_runs_each_loss_type_and_its_rewards_recompute(tmp_path):
  """One run per loss type from a tiny SFT stage: the config each run recorded,
  per-step metrics behind the RESULT lines, and every logged sample's reward
  recomputed here from its text with the rule-based functions (accuracy +
  0.5 x format)."""
  from deepseek_jax.rl import rewards
  params = dict(sft_config="launch/configs/tiny.py", sft_overrides={"steps": 4},
                steps=2, prompts_per_step=2, group_size=2, max_new_tokens=8, max_digits=1,
                n_train_problems=40,
                n_eval_problems=4, eval_every=0, eval_batch_size=4, fast_compile=True,
                workdir_root=str(tmp_path), jax_cache_dir=CACHE)
  nb = run_notebook(GRPO_NOTEBOOK, params, out=str(tmp_path / "executed.ipynb"), timeout=900)
  results = result_records(nb)
  assert [r["loss_type"] for r in results] == ["grpo", "dr_grpo", "dapo", "gspo"]
  for r in results:
    cfg = json.load(open(os.path.join(r["workdir"], "grpo_config.json")))
    assert cfg["loss_type"] == r["loss_type"]
    assert cfg["scale"] == ("none" if r["loss_type"] == "dr_grpo" else "group")
    assert cfg["eps_high"] == (4e-4 if r["loss_type"] == "gspo" else 0.2)
    records = [json.loads(l) for l in open(os.path.join(r["workdir"], "metrics.jsonl"))]
    steps = [x for x in records if "reward" in x]
    assert r["steps"] == len(steps) == 2
    assert math.isclose(r["length_mean"], np.mean([x["completion_len"] for x in steps]))
    for x in steps:
      assert math.isfinite(x["reward"]) and math.isfinite(x["grad_norm"])
    samples = [json.loads(l) for l in open(os.path.join(r["workdir"], "samples.jsonl"))]
    assert samples
    for s in samples:
      ex = {"answer": s["answer"]}
      want = rewards.accuracy(s["completion"], ex) + 0.5 * rewards.format_reward(
          s["completion"], ex)
      assert math.isclose(s["reward"], want), s
  assert os.path.exists(tmp_path / "grpo_loss_types.png")


# ---------------------------------------------------------------------------
# experiments/v2_balance_losses.ipynb
V2_NOTEBOOK = os.path.join(REPO_ROOT, "experiments", "v2_balance_losses.ipynb")
V2_ARMS = ("none", "v3_bias", "v2_losses", "v2_unlimited")
V2_STEPS, V2_BATCH, V2_SEQ = 4, 4, 64
V2_E, V2_K, V2_D, V2_M = 16, 4, 4, 2            # experts, top-k, devices, device limit
V2_ALPHAS = (0.01, 0.1, 0.05)                   # alpha1-3, not V2's: the test sees them flow


@pytest.fixture(scope="module")
def v2_balance_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("v2_balance_losses"))
  params = dict(preset="tiny", model_overrides={"n_layers": 2, "n_dense_layers": 0},
                n_routed_experts=V2_E, n_activated_experts=V2_K, n_devices=V2_D,
                max_devices=V2_M, steps=V2_STEPS, batch_size=V2_BATCH, seq_len=V2_SEQ,
                n_train_problems=60, max_digits=1, gamma=1e-3,
                alpha1=V2_ALPHAS[0], alpha2=V2_ALPHAS[1], alpha3=V2_ALPHAS[2], seed=0,
                fast_compile=True, workdir_root=workdir, jax_cache_dir=CACHE)
  nb = run_notebook(V2_NOTEBOOK, params, out=os.path.join(workdir, "executed.ipynb"),
                    timeout=600)
  results = result_records(nb)
  assert [r["arm"] for r in results] == list(V2_ARMS)
  for name in ("device_maxvio_ce.png", "traffic.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  return {r["arm"]: r for r in results}


def _v2_records(result):
  with open(result["metrics_path"]) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow   # 20-60 s on 2 cores: CI's slow step keeps the default suite under 15 min
def test_v2_notebook_device_maxvio_recomputes_from_saved_expert_loads(v2_balance_run):
  """Device load = the token-expert pairs of a device's E/D contiguous experts;
  MaxVio = max/mean - 1 per layer, then the layer mean, by loops."""
  loads = {arm: np.load(v2_balance_run[arm]["loads_path"]) for arm in V2_ARMS}
  for arm, r in v2_balance_run.items():
    with open(r["history_path"]) as f:
      tokens = [h["tokens"] for h in json.load(f)]
    assert loads[arm].shape == (V2_STEPS, 2, V2_E) and r["steps"] == V2_STEPS
    per_step = []
    for step_loads, n_tok in zip(loads[arm], tokens):
      vios = []
      for layer in step_loads:
        assert sum(float(x) for x in layer) == V2_K * n_tok      # every token picks K experts
        per_device = [sum(float(x) for x in layer[d * V2_E // V2_D:(d + 1) * V2_E // V2_D])
                      for d in range(V2_D)]
        vios.append(max(per_device) / (sum(per_device) / V2_D) - 1)
      per_step.append(sum(vios) / len(vios))
    assert r["device_maxvio_final"] == pytest.approx(per_step[-1], rel=1e-5)
    assert r["device_maxvio_tail"] == pytest.approx(per_step[-1], rel=1e-5)   # 1-step tail
    assert r["device_maxvio_mean"] == pytest.approx(sum(per_step) / V2_STEPS, rel=1e-5)
    for key in ("ce_final", "device_maxvio_random", "expert_maxvio_tail"):
      assert math.isfinite(r[key]), (arm, key)
  # Same seed, data and router at step 1 (the bias starts at 0, the losses act
  # through the gradient): the three device-limited arms route identically;
  # lifting the device limit changes the routing.
  for arm in ("v3_bias", "v2_losses"):
    np.testing.assert_array_equal(loads[arm][0], loads["none"][0])
  assert not np.array_equal(loads["v2_unlimited"][0], loads["v2_losses"][0])


@pytest.mark.slow   # 20-60 s on 2 cores: CI's slow step keeps the default suite under 15 min
def test_v2_notebook_traffic_recomputes_from_metrics_jsonl(v2_balance_run):
  """devices per token = sum_d device_tokens_d / tokens per sequence; the limited
  arm never exceeds M devices per token, the unlimited one does; a device
  receives no more tokens than token-expert pairs and no fewer than
  pairs / min(K, E/D)."""
  for arm in ("none", "v3_bias"):      # honest arms: no V2 loss, so no traffic logged
    r = v2_balance_run[arm]
    assert r["devices_per_token"] is None and r["alpha1"] == r["alpha2"] == r["alpha3"] == 0
    assert not any("device_tokens_per_layer" in rec for rec in _v2_records(r))
  per_dev = V2_E // V2_D
  first = {}
  for arm, limit in (("v2_losses", V2_M), ("v2_unlimited", V2_D)):
    r = v2_balance_run[arm]
    assert r["max_devices"] == limit
    loads = np.load(r["loads_path"])
    ratios = []
    for step, rec in enumerate(_v2_records(r)):
      sent = np.array(rec["device_tokens_per_layer"]) * V2_BATCH   # [layers, D], whole batch
      np.testing.assert_allclose(sent, np.round(sent), atol=1e-3)  # counts of tokens
      layer_ratios = []
      for layer in range(2):
        pairs = loads[step, layer].reshape(V2_D, per_dev).sum(-1)
        assert np.all(sent[layer] <= pairs + 1e-3)
        assert np.all(sent[layer] >= pairs / min(V2_K, per_dev) - 1e-3)
        layer_ratios.append(sent[layer].sum() / rec["tokens"])
        assert 1 <= layer_ratios[-1] <= limit + 1e-6
      ratios.append(sum(layer_ratios) / 2)
    assert r["devices_per_token"] == pytest.approx(ratios[-1], rel=1e-6)
    assert r["devices_per_token_first"] == pytest.approx(ratios[0], rel=1e-6)
    first[arm] = ratios[0]
  # the limit binds: without it top-4 of 16 experts spread over more than M devices
  assert first["v2_unlimited"] > V2_M >= first["v2_losses"]


@pytest.mark.slow   # 20-60 s on 2 cores: CI's slow step keeps the default suite under 15 min
def test_v2_notebook_loss_is_ce_plus_each_arms_weighted_balance_losses(v2_balance_run):
  """metrics.jsonl of every step: loss = CE + alpha * V3 seq. loss + alpha1-3 *
  the V2 losses (layer sums of the logged per-layer values), with the weights
  each arm reported: the arms trained on the objectives they claim."""
  for arm, r in v2_balance_run.items():
    alphas = (r["alpha1"], r["alpha2"], r["alpha3"])
    assert alphas == (V2_ALPHAS if arm.startswith("v2_") else (0.0, 0.0, 0.0))
    assert r["alpha"] == (1e-4 if arm == "v3_bias" else 0.0)
    records = _v2_records(r)
    assert len(records) == V2_STEPS
    for rec in records:
      want = rec["ce"] + r["alpha"] * rec["balance"]
      for key, alpha in zip(("balance_expert", "balance_device", "balance_comm"), alphas):
        if alpha:
          assert rec[key] == pytest.approx(sum(rec[key + "_per_layer"]), rel=1e-5)
          want += alpha * rec[key]
        else:
          assert key not in rec
      assert rec["loss"] == pytest.approx(want, rel=1e-5), (arm, rec["step"])
    if arm.startswith("v2_"):
      assert r["balance_comm_final"] == records[-1]["balance_comm"]


# ---------------------------------------------------------------------------
# experiments/pipeline_schedules.ipynb
PIPE_NOTEBOOK = os.path.join(REPO_ROOT, "experiments", "pipeline_schedules.ipynb")


def test_pipeline_schedules_notebook_matches_the_simulator_and_table2(tmp_path):
  """Pure Python, no JAX (~8 s, mostly the kernel start): the Gantt runs'
  numbers recompute with parallel.schedules.simulate, and at the notebook's
  times (F = B - W = W) every bubble equals Table 2's formula written out here,
  for every PP and M of the sweeps."""
  from deepseek_jax.parallel.schedules import simulate
  F, B, W, FB = 1.0, 2.0, 1.0, 2.5
  params = dict(n_stages=4, n_microbatches=8, F=F, B=B, W=W, FB=FB, stages_sweep=[2, 4],
                sweep_microbatches=8, microbatch_sweep=[8, 12], workdir_root=str(tmp_path))
  nb = run_notebook(PIPE_NOTEBOOK, params, out=str(tmp_path / "executed.ipynb"), timeout=300)
  results = result_records(nb)
  with open(tmp_path / "results.json") as f:
    assert json.load(f) == results
  formula = {"gpipe": lambda pp: (pp - 1) * (F + B), "1f1b": lambda pp: (pp - 1) * (F + B),
             "zb1p": lambda pp: (pp - 1) * (F + B - 2 * W),
             "dualpipe": lambda pp: (pp / 2 - 1) * (FB + B - 3 * W),
             "dualpipev": lambda pp: (pp - 1) * (FB + B - 3 * W)}   # 2 PP chunks on PP ranks
  gantt = {r["schedule"]: r for r in results if r["part"] == "gantt"}
  assert list(gantt) == ["gpipe", "1f1b", "zb1p", "dualpipe", "dualpipev"]
  for name, r in gantt.items():
    sim = simulate(name, 4, 8, F=F, B=B, W=W, FB=FB)
    assert r["makespan"] == sim["makespan"] and r["idle"] == sim["idle"]
    assert r["bubble"] == max(r["idle"]) == formula[name](4) == r["table2_bubble"]
    # an activation and a gradient per boundary between ranks (DualPipeV: 2 PP chunks,
    # its turn at rank PP-1 is local: 2 (PP-1) boundaries)
    assert r["n_transfers"] == 2 * 8 * (6 if name == "dualpipev" else 3)
  assert [r["peak_activations"] for r in gantt.values()] == [8, 4, 4, 5, 9]   # ..., 2PP+1
  assert [r["param_copies"] for r in gantt.values()] == [1, 1, 1, 2, 2]
  assert gantt["1f1b"]["makespan"] == (8 + 4 - 1) * (F + B)
  parts = [r["part"] for r in results]
  assert parts.count("sweep_pp") == parts.count("sweep_m") == 5 and parts.count("regime") == 2
  for r in results:
    if r["part"] == "sweep_pp":
      assert r["n_stages"] == [2, 4]
      assert r["bubble"] == [formula[r["schedule"]](pp) for pp in (2, 4)]
    elif r["part"] == "sweep_m":                # the bubble does not depend on M
      assert r["n_microbatches"] == [8, 12]
      assert r["bubble"] == [formula[r["schedule"]](4)] * 2
      assert r["bubble_fraction"] == pytest.approx(
          [b / t for b, t in zip(r["bubble"], r["makespan"])])
    elif r["part"] == "regime":
      assert r["inside_exact"] == r["inside"] > 0 and r["outside_exact"] == 0
