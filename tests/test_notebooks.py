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

from run_notebook import inject_parameters, run_notebook, stdout_lines  # noqa: E402

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
  results = [json.loads(line[len("RESULT "):]) for line in stdout_lines(nb)
             if line.startswith("RESULT ")]
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
