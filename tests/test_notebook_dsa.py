"""experiments/sparse_attention.ipynb at tiny size: a dense V3 model, its
lightning-indexer warm-up, then sparse vs dense training from the same weights.

Oracles: the notebook computes the recall from a NumPy float64 transcription
of layer 0's MLA (the head-summed, L1-normalised dense attention) and the
indexer's top-k (model/dsa.py), and saves the last measurement's arrays; the
test recomputes that recall and top-k mass from them by its own loop (each
query: k chosen allowed keys, the target a distribution over allowed keys),
and checks that the warm-up raises the recall, lowers its KL and leaves
every non-indexer weight bit-identical, and that both arms' held-out CE are
finite and close.
"""

import math
import os
import sys

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "experiments"))

from run_notebook import image_outputs, run_notebook, result_records  # noqa: E402

NOTEBOOK = os.path.join(REPO_ROOT, "experiments", "sparse_attention.ipynb")
WARMUP, SPARSE = 8, 3


@pytest.fixture(scope="module")
def dsa_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("sparse_attention"))
  params = dict(dense_steps=12, warmup_steps=WARMUP, sparse_steps=SPARSE, recall_every=4,
                workdir_root=workdir, jax_cache_dir=os.environ["DSJ_TEST_JAX_CACHE"])
  nb = run_notebook(NOTEBOOK, params, out=os.path.join(workdir, "executed.ipynb"), timeout=600)
  assert image_outputs(nb) > 0 and os.path.getsize(os.path.join(workdir, "sparse_attention.png"))
  results = {r["stage"]: r for r in result_records(nb)}
  return results


@pytest.mark.slow   # the fixture runs the notebook: ~2-3 min on 2 busy cores
def test_warmup_raises_recall_and_freezes_the_model(dsa_run):
  warm = dsa_run["warmup"]
  steps = [i for i, _ in warm["recall"]]
  recalls = [r for _, r in warm["recall"]]
  assert steps == [0, 4, 8]
  assert all(0 < r <= 1 + 1e-9 for r in recalls), recalls
  assert recalls[-1] > recalls[0], recalls
  assert 0 < warm["topk_mass"] <= 1 + 1e-9
  assert warm["model_frozen"] is True
  assert warm["recall"][-1][1] == pytest.approx(_recall_oracle(warm["arrays"])[0], rel=1e-9)
  assert warm["topk_mass"] == pytest.approx(_recall_oracle(warm["arrays"])[1], rel=1e-9)


def _recall_oracle(path):
  """(recall, top-k mass) from the saved layer-0 arrays, query by query."""
  a = np.load(path)
  target, chosen, allowed, rows = a["target"], a["chosen"], a["allowed"], a["rows"]
  k = int(chosen[rows].sum(-1).max())
  recalls, masses = [], []
  for b, t in zip(*np.nonzero(rows)):
    assert chosen[b, t].sum() == k and not (chosen[b, t] & ~allowed[b, t]).any()
    assert abs(target[b, t].sum() - 1) < 1e-9 and not target[b, t][~allowed[b, t]].any()
    best = sorted(target[b, t], reverse=True)[:k]
    recalls.append(target[b, t][chosen[b, t]].sum() / sum(best))
    masses.append(sum(best))
  return float(np.mean(recalls)), float(np.mean(masses))
  kl = warm["indexer_loss"]
  assert len(kl) == WARMUP and all(math.isfinite(v) and v >= 0 for v in kl)
  assert kl[-1] < kl[0], kl


@pytest.mark.slow
def test_sparse_and_dense_arms_train_from_the_same_weights(dsa_run):
  dense, sparse = dsa_run["dense"], dsa_run["sparse"]
  for arm in (dense, sparse):
    assert len(arm["train_ce"]) == SPARSE and all(math.isfinite(v) for v in arm["train_ce"])
  assert 0 < sparse["recall_after"] <= 1 + 1e-9
  assert len(sparse["indexer_loss"]) == SPARSE
  assert abs(sparse["held_out_ce"] - dense["held_out_ce"]) < 0.5, (sparse, dense)
