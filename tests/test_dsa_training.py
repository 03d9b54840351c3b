"""DeepSeek-V3.2's indexer training (the V3.2 report's continued
pre-training) through the trainer: train/losses.py (the indexer loss in the
total, its token-share for micro-batches), train/step.py (the warm-up's
frozen model), train/optimizer.py (trainable_mask), train/start.py
(init_from across stages and from a dense V3 run).

The per-layer loss itself (the KL from the heads' summed, L1-normalised
attention to the indexer's softmax, dense and over the selected tokens)
is held against a float64 NumPy transcription of the report's formula in
tests/test_dsa.py (test_layer_indexer_loss_matches_numpy_...); here the
model-level sum is held against a NumPy float64 sum of the per-layer
values each MLA layer reports, and the rest against invariants: padding
rows change nothing, micro-batches shared by tokens add up to the batch,
the warm-up moves only the indexer, the sparse stage's model gradient is
the LM loss's alone.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import get_preset
from deepseek_jax.model import Transformer, init_variables
from deepseek_jax.train import checkpoint, losses, optimizer, start, step
from deepseek_jax.train.config import TrainConfig

SEQ = 24


def _cfg(stage: str, **kw):
  """tiny_v32 with one dense and one MoE block (and the MTP block): top-k 6 <
  SEQ, so the sparse stage's selection matters; the naive attention path."""
  return get_preset("tiny_v32", n_layers=2, index_topk=6, dsa_stage=stage, attn_block_size=0,
                    **kw)


def _train_cfg(**kw):
  values = dict(steps=10, warmup_steps=0, lr=3e-3, end_lr=3e-3, batch_size=4, seq_len=SEQ,
                fast_compile=True)
  return TrainConfig(**{**values, **kw})


def _batch(rows: int = 4, seed: int = 0):
  """Packed and padded rows of the data contract: row 0 two documents, row 1
  padded after 17 tokens, the rest one document each."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, 200, (rows, SEQ)).astype(np.int32)
  seg = np.ones((rows, SEQ), np.int32)
  seg[0, 10:] = 2
  seg[1, 17:] = 0
  pos = np.zeros_like(seg)
  for r in range(rows):
    for s in range(1, SEQ):
      pos[r, s] = pos[r, s - 1] + 1 if seg[r, s] == seg[r, s - 1] else 0
  targets = np.roll(tokens, -1, axis=1)
  loss_mask = ((seg != 0) & (np.roll(seg, -1, axis=1) == seg)).astype(np.float32)
  loss_mask[:, -1] = 0
  return {"tokens": tokens, "targets": targets, "segment_ids": seg, "positions": pos,
          "loss_mask": loss_mask}


@pytest.fixture(scope="module")
def params():
  # init_std 0.1: attention far enough from uniform that the KL is not ~0.
  variables = init_variables(_cfg("sparse", init_std=0.1), jax.random.key(0))
  return variables["params"], variables["router_bias"]


def _jit(fn):
  return jax.jit(fn, compiler_options=step.FAST_COMPILE)


def _loss(cfg, train_cfg, params, batch):
  fn = _jit(step.pretraining_loss(cfg, train_cfg))
  return fn(params[0], params[1], {k: jnp.asarray(v) for k, v in batch.items()})


def _model_aux(cfg, params, batch):
  """The model's merged aux (Transformer.apply, training mode)."""
  def run(p, b):
    return Transformer(cfg).apply(
        {"params": p[0], "router_bias": p[1]}, b["tokens"], segment_ids=b["segment_ids"],
        positions=b["positions"], targets=b["targets"], return_aux=True)[1]["indexer_loss"]
  return _jit(run)(params, {k: jnp.asarray(v) for k, v in batch.items()})


def _paths(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("stage", ["warmup", "sparse"])
def test_indexer_loss_in_the_total_is_the_layers_sum_over_valid_tokens(params, stage):
  """metrics["indexer_loss"] = sum over the MLA layers (dense, MoE, MTP) of
  their per-token-mean KL, in float64; the total adds w_I times it; padding
  rows leave it as it is (a mean over non-padding tokens, as the CE is over
  targets)."""
  cfg, batch = _cfg(stage), _batch()
  w = 0.5
  loss, aux = _loss(cfg, _train_cfg(indexer_loss_weight=w), params, batch)
  m = aux["metrics"]
  model = float(_model_aux(cfg, params, batch))     # every layer's, summed by the model
  assert model > 1e-2
  np.testing.assert_allclose(float(m["indexer_loss"]), model, rtol=1e-6)
  want = (np.float64(m["ce"]) + 0.3 * np.float64(m["mtp"])
          + 1e-4 * np.float64(m["balance"]) + w * np.float64(m["indexer_loss"]))
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)
  # Two all-padding rows more: the same mean.
  padded = {k: np.concatenate([v, np.zeros_like(v[:2])]) for k, v in batch.items()}
  _, aux_p = _loss(cfg, _train_cfg(indexer_loss_weight=w), params, padded)
  np.testing.assert_allclose(float(aux_p["metrics"]["indexer_loss"]),
                             float(m["indexer_loss"]), rtol=1e-5)


def test_micro_batches_shared_by_tokens_add_up_to_the_batch(params):
  """The pipeline's additive pieces: each micro-batch's indexer loss (a mean
  over its own tokens) times its token share sums to the whole batch's."""
  cfg, batch = _cfg("sparse"), _batch()
  whole = float(_model_aux(cfg, params, batch))
  totals = losses.batch_totals({k: jnp.asarray(v) for k, v in batch.items()}, cfg.n_mtp_depth)
  parts = []
  for half in (slice(0, 2), slice(2, 4)):       # unequal tokens: row 1 is padded
    mb = {k: jnp.asarray(v[half]) for k, v in batch.items()}
    aux = {"balance_loss": jnp.zeros(()), "indexer_loss": _model_aux(cfg, params, mb)}
    shared = losses.share_aux(aux, losses.sequence_share(mb, totals),
                              losses.token_share(mb, totals))
    parts.append(np.float64(shared["indexer_loss"]))
  np.testing.assert_allclose(sum(parts), whole, rtol=1e-5)


def _changed(a, b):
  pa, pb = _paths(a), _paths(b)
  return {k for k in pa if not np.array_equal(np.asarray(pa[k]), np.asarray(pb[k]))}


@pytest.mark.parametrize("opt", ["adamw", "muon"])
def test_warmup_trains_only_the_indexer_and_lowers_its_loss(params, opt):
  cfg = _cfg("warmup")
  tcfg = _train_cfg(optimizer=opt, lr=1e-2, end_lr=1e-2)
  state = step.init_train_state(cfg, tcfg, jax.random.key(0))
  state = state.replace(params=params[0], router_bias=params[1])
  before = jax.tree.map(np.asarray, (state.params, state.opt_state, state.router_bias))
  train_step = step.make_train_step(cfg, tcfg)
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  history = []
  for i in range(6):
    state, metrics = train_step(state, batch)
    history.append(float(metrics["indexer_loss"]))
    if i == 0:
      changed = _changed(before[0], state.params)
      indexer = {k for k in _paths(before[0]) if "/indexer/" in k}
      assert changed == indexer, sorted(changed ^ indexer)
      assert not _changed(before[2], state.router_bias)           # no bias balancing either
      # The frozen leaves' moments: still exactly the fresh optimizer's zeros.
      frozen = [v for k, v in _paths(state.opt_state).items()
                if "indexer" not in k and np.ndim(v) > 0]
      assert frozen and all(not np.any(np.asarray(v)) for v in frozen)
  print(f"\n[dsa warm-up, {opt}] indexer loss over 6 steps: "
        + " ".join(f"{v:.4f}" for v in history))
  assert history[-1] < 0.7 * history[0], history


def test_sparse_stage_detaches_the_indexer_from_the_model(params):
  """Sparse training: every parameter trains; the main model's gradient is
  the LM loss's alone (the same with indexer_loss_weight 0), and the
  indexer's gradient comes only from its KL (zero with weight 0)."""
  cfg, batch = _cfg("sparse"), _batch()

  def grads(w):
    fn = step.pretraining_loss(cfg, _train_cfg(indexer_loss_weight=w))
    g = _jit(jax.grad(lambda p, b: fn(p, params[1], b)[0]))(
        params[0], {k: jnp.asarray(v) for k, v in batch.items()})
    return _paths(g)
  with_kl, without = grads(1.0), grads(0.0)
  for k, g in with_kl.items():
    if "/indexer/" in k:
      assert float(jnp.abs(g).max()) > 0 and not np.any(np.asarray(without[k])), k
    else:
      np.testing.assert_array_equal(np.asarray(g), np.asarray(without[k]), err_msg=k)
  assert any(float(jnp.abs(g).max()) > 0 for k, g in without.items() if "/indexer/" not in k)


def _save_run(workdir, cfg, tcfg, seed):
  state = step.init_train_state(cfg, tcfg, jax.random.key(seed))
  ckpts = checkpoint.Checkpoints(workdir, cfg, tcfg.to_dict(), async_save=False)
  ckpts.save(3, state, {"step": 3}, force=True)
  ckpts.close()
  return state


def test_init_from_a_dense_v3_run_and_from_warmup_to_sparse(tmp_path):
  dense = _cfg("off").replace(index_topk=0, index_n_heads=0, index_head_dim=0)
  tcfg = _train_cfg()
  src = _save_run(str(tmp_path / "v3"), dense, tcfg, seed=1)
  warm = _cfg("warmup")
  lines = []
  state = start.fresh_state(warm, dataclasses.replace(tcfg, init_from=str(tmp_path / "v3")),
                            None, None, lines.append)
  got, had = _paths(state.params), _paths(src.params)
  assert set(got) - set(had) == {k for k in got if "/indexer/" in k} != set()
  for k, v in had.items():
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(v), err_msg=k)
  assert int(state.step) == 0
  # The warm-up's run -> the sparse stage (dsa_stage changes through init_from).
  _save_run(str(tmp_path / "warm"), warm, tcfg, seed=2)
  sparse = start.fresh_state(warm.replace(dsa_stage="sparse"),
                             dataclasses.replace(tcfg, init_from=str(tmp_path / "warm")),
                             None, None, lines.append)
  assert set(_paths(sparse.params)) == set(got)
  # A V3.2 run's indexer shape is not free to change.
  with pytest.raises(ValueError, match=r"differs in index_head_dim: 16 -> 32"):
    start.fresh_state(warm.replace(index_head_dim=32),
                      dataclasses.replace(tcfg, init_from=str(tmp_path / "warm")),
                      None, None, lines.append)


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), True])
def test_bad_indexer_loss_weight_is_refused(value):
  with pytest.raises(ValueError, match=r"^indexer_loss_weight=.* must be a finite number >= 0"):
    _train_cfg(indexer_loss_weight=value)


def test_warmup_without_indexer_loss_is_refused():
  with pytest.raises(ValueError, match=r"indexer_loss_weight=0.0: model.dsa_stage='warmup' "
                                       r"trains only the indexer"):
    step.make_train_step(_cfg("warmup"), _train_cfg(indexer_loss_weight=0.0))


def test_trainable_mask_marks_only_indexer_leaves():
  shapes = jax.eval_shape(lambda: init_variables(_cfg("warmup"), jax.random.key(0)))["params"]
  assert optimizer.trainable_mask(shapes, "sparse") is None
  mask = _paths(optimizer.trainable_mask(shapes, "warmup"))
  assert {k for k, v in mask.items() if v} == {k for k in mask if "/indexer/" in k} != set()
