"""experiments/v4_hyper_connections.ipynb at tiny size: tiny V4 trained with
mHC (the preset's hc_mult streams) vs a single stream (hc_mult=1).

Oracles: the test recomputes every RESULT number from the files the runs
left behind - the training CE from each arm's metrics.jsonl (read here line
by line), the held-out CE as the token-weighted mean of the saved per-batch
(CE, target tokens) pairs, the difference line from those - and checks that
the figure was drawn and saved. A fast test checks the claim the notebook's
"off" arm rests on: with one stream the Sinkhorn mixing is the 1x1 identity.
"""

import json
import math
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.model.hyper import sinkhorn

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "experiments"))

from run_notebook import image_outputs, run_notebook, result_records  # noqa: E402

NOTEBOOK = os.path.join(REPO_ROOT, "experiments", "v4_hyper_connections.ipynb")
STEPS, BATCH = 12, 4


@pytest.fixture(scope="module")
def v4_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("v4_hyper_connections"))
  params = dict(steps=STEPS, batch_size=BATCH, n_train_problems=400, n_heldout_problems=30,
                workdir_root=workdir, jax_cache_dir=os.environ["DSJ_TEST_JAX_CACHE"])
  nb = run_notebook(NOTEBOOK, params, out=os.path.join(workdir, "executed.ipynb"), timeout=600)
  figure = os.path.join(workdir, "v4_hyper_connections.png")
  results = {r["arm"]: r for r in result_records(nb)}
  return nb, figure, results


def _train_ce(path):
  """The training steps' main-head CE, in step order, from a metrics.jsonl."""
  steps, ce = [], []
  with open(path) as f:
    for line in f:
      rec = json.loads(line)
      if "ce" in rec and "step" in rec:
        steps.append(rec["step"])
        ce.append(rec["ce"])
  assert steps == list(range(1, len(steps) + 1)), steps
  return ce


@pytest.mark.slow   # the fixture trains two tiny V4 models in a kernel: ~70 s on 2 cores
def test_figure_and_results_match_the_saved_runs(v4_run):
  nb, figure, results = v4_run
  assert image_outputs(nb) > 0 and os.path.getsize(figure) > 0
  assert set(results) == {"mhc", "single", "mhc_minus_single"}
  assert results["mhc"]["hc_mult"] == 3 and results["single"]["hc_mult"] == 1
  assert results["mhc"]["n_hc_params"] > results["single"]["n_hc_params"] > 0
  tail = max(1, STEPS // 10)
  for arm in ("mhc", "single"):
    r = results[arm]
    ce = _train_ce(r["metrics_path"])
    assert len(ce) == STEPS == r["steps"]
    assert all(math.isfinite(v) for v in ce)
    assert r["ce_final"] == pytest.approx(ce[-1], rel=1e-12)
    assert r["ce_tail"] == pytest.approx(sum(ce[-tail:]) / tail, rel=1e-12)
    assert r["ce_mean"] == pytest.approx(sum(ce) / len(ce), rel=1e-12)
    held = np.load(r["heldout_path"])
    assert held.shape == (r["heldout_batches"], 2) and (held[:, 1] > 0).all()
    weighted = sum(c * n for c, n in held.tolist()) / sum(n for _, n in held.tolist())
    assert r["heldout_ce"] == pytest.approx(weighted, rel=1e-12)
    # a few steps from a random init: the held-out CE is near the train CE, below uniform
    assert 0 < r["heldout_ce"] < math.log(256)
  diff = results["mhc_minus_single"]
  assert diff["ce_tail"] == pytest.approx(
      results["mhc"]["ce_tail"] - results["single"]["ce_tail"], abs=1e-12)
  assert diff["heldout_ce"] == pytest.approx(
      results["mhc"]["heldout_ce"] - results["single"]["heldout_ce"], abs=1e-12)


def test_one_stream_mixing_is_the_identity():
  """hc_mult=1: comb = Sinkhorn(softmax([c]) + eps) is 1 up to eps, so the
  residual path is x' = post f(pre x) + x (the notebook's "off" arm)."""
  m = jnp.array([[[1.0 + 1e-6]], [[0.3]], [[7.0]]])
  np.testing.assert_allclose(np.asarray(sinkhorn(m, 20, 1e-6)), 1.0, atol=1e-5)
