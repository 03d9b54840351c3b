"""The vocabulary-chunked cross-entropy (train/losses.py chunked_cross_entropy)
and the training forward's hidden-state path (model/stages.py, hidden=True).

Oracles: autodiff of the textbook log_softmax loss for `cross_entropy`'s
written-out derivative; the full-vocabulary `losses.cross_entropy` of `h @ kernel` (value,
count and gradients wrt h and the kernel), the pretraining loss on the
model's logits (`pretraining_loss(..., vocab_chunk=0)`, today's path) for
the train step's loss, metrics and gradients, and the same on one device
for a pipeline whose vocabulary is split over `tensor`. Memory: XLA's
buffer assignment of the compiled value_and_grad (memory_analysis).
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax import get_preset
from deepseek_jax.model import Transformer, init_variables, stages
from deepseek_jax.parallel import MeshConfig, activate, setup
from deepseek_jax.train import losses
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.step import FAST_COMPILE, pipelined_pretraining_grad, pretraining_loss

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
from train_throughput import random_batch  # noqa: E402

TOL = 1e-5


def _case(lead=(2, 8), d=16, vocab=100, seed=0):
  r = np.random.default_rng(seed)
  h = jnp.asarray(r.normal(size=lead + (d,)), jnp.float32)
  kernel = jnp.asarray(r.normal(size=(d, vocab)) * 0.5, jnp.float32)
  targets = jnp.asarray(r.integers(0, vocab, lead), jnp.int32)
  weights = jnp.asarray(r.random(lead) > 0.3, jnp.float32)
  return h, kernel, targets, weights


def _full(h, kernel, targets, weights, total=None):
  return losses.cross_entropy(jnp.einsum("...d,dv->...v", h, kernel), targets, weights, total)


def _value_and_grads(f, h, kernel, targets, weights, total):
  (ce, count), grads = jax.value_and_grad(
      lambda h, k: f(h, k, targets, weights, total), argnums=(0, 1), has_aux=True)(h, kernel)
  return ce, count, grads


@pytest.mark.parametrize("lead,chunk,shards,total", [
    ((2, 8), 16, None, None),      # 100 = 6 x 16 + 4: the last chunk shifted back
    ((2, 8), 16, None, 23.0),      # a whole batch's count given
    ((24,), 7, 2, 11.0),           # [N, d]; the vocabulary as 2 shards of 50
    ((2, 8), 25, 4, None),         # shards of 25 = one chunk: the exact path
])
def test_chunked_cross_entropy_equals_the_full_one_with_gradients(lead, chunk, shards, total):
  h, kernel, targets, weights = _case(lead)
  total = None if total is None else jnp.float32(total)
  want = _value_and_grads(_full, h, kernel, targets, weights, total)

  def chunked(h, k, t, w, n):
    return losses.chunked_cross_entropy(h, k, t, w, n, chunk=chunk, shards=shards)
  got = jax.jit(lambda h, k: _value_and_grads(chunked, h, k, targets, weights, total))(
      h, kernel)
  np.testing.assert_allclose(got[0], want[0], rtol=0, atol=TOL)
  assert float(got[1]) == float(want[1]) == float(weights.sum())
  for g, w in zip(got[2], want[2]):
    assert float(jnp.abs(w).max()) > 1e-3            # a real gradient, not zeros
    np.testing.assert_allclose(g, w, rtol=0, atol=TOL)


@pytest.mark.parametrize("total", [None, 11.0])
def test_cross_entropy_gradient_equals_autodiff_of_log_softmax(total):
  """cross_entropy's written-out derivative (softmax - onehot, times each
  token's weight) against autodiff of the textbook form: mean over weighted
  tokens of -log_softmax at the target (take_along_axis), wrt the logits
  and the weights."""
  h, kernel, targets, weights = _case()
  logits = jnp.einsum("...d,dv->...v", h, kernel)

  def reference(logits, weights):
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return (nll * weights).sum() / (weights.sum() if total is None else total)
  want, want_g = jax.value_and_grad(reference, argnums=(0, 1))(logits, weights)
  got, got_g = jax.value_and_grad(
      lambda z, w: losses.cross_entropy(z, targets, w, total)[0], argnums=(0, 1))(logits,
                                                                                weights)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for g, g0 in zip(got_g, want_g):
    np.testing.assert_allclose(g, g0, atol=1e-6)


def test_a_vocabulary_within_one_chunk_is_the_full_cross_entropy_itself():
  h, kernel, targets, weights = _case()
  got = losses.chunked_cross_entropy(h, kernel, targets, weights, chunk=100)
  want = _full(h, kernel, targets, weights)
  assert float(got[0]) == float(want[0]) and float(got[1]) == float(want[1])
  empty = losses.chunked_cross_entropy(h, kernel, targets, jnp.zeros_like(weights), chunk=16)
  assert float(empty[0]) == 0.0 and float(empty[1]) == 0.0


def test_chunked_cross_entropy_with_the_vocabulary_split_over_tensor():
  """fsdp_tp on 8 devices (fsdp 4 x tensor 2): the kernel stored as the
  rules say ([embed -> fsdp, vocab -> tensor]); the loss scans each shard's
  own columns (vocab_shards = 2) and matches one device."""
  h, kernel, targets, weights = _case((8, 6), d=16, vocab=128)
  want = _value_and_grads(_full, h, kernel, targets, weights, None)
  mesh, rules = setup(MeshConfig(fsdp=4, tensor=2, data=1, rules="fsdp_tp"))

  def chunked(h, k, t, w, n):
    assert losses.vocab_shards(k.shape[1]) == 2
    return losses.chunked_cross_entropy(h, k, t, w, n, chunk=24)
  with activate(mesh, rules):
    fn = jax.jit(lambda h, k: _value_and_grads(chunked, h, k, targets, weights, None))
    got = fn(jax.device_put(h, NamedSharding(mesh, P("fsdp"))),
             jax.device_put(kernel, NamedSharding(mesh, P("fsdp", "tensor"))))
  np.testing.assert_allclose(got[0], want[0], rtol=0, atol=TOL)
  for g, w in zip(got[2], want[2]):
    np.testing.assert_allclose(g, w, rtol=0, atol=TOL)
  assert losses.vocab_shards(128) == 1              # outside `activate`: whole


def _temp_bytes(f, n, d, vocab):
  args = (jax.ShapeDtypeStruct((n, d), jnp.float32), jax.ShapeDtypeStruct((d, vocab), jnp.float32),
          jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((n,), jnp.float32))
  grad = jax.value_and_grad(lambda h, k, t, w: f(h, k, t, w)[0], argnums=(0, 1))
  return jax.jit(grad).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_chunked_cross_entropy_never_holds_the_logits():
  """Compiled value_and_grad at N = 1024 tokens, d = 256, V = 32768, chunk
  4096: the full CE's temporaries hold [N, V] float32 arrays (the logits,
  their log-softmax and gradient: 3 x 128 MiB), the chunked one's a few
  [N, chunk] and [d, chunk] ones (48 MiB with jax 0.10.2)."""
  n, d, vocab = 1024, 256, 32768
  logits_bytes = n * vocab * 4
  full = _temp_bytes(_full, n, d, vocab)
  chunked = _temp_bytes(lambda *a: losses.chunked_cross_entropy(*a, chunk=4096), n, d, vocab)
  assert full >= 2 * logits_bytes
  assert chunked < logits_bytes / 2, (chunked, full)


# --- the training loss: hidden path against the logits path ---------------------
@pytest.fixture(scope="module")
def tiny():
  """A 2-layer tiny model (V = 256, MTP depth 1), a batch with short rows and
  a padded tail, and today's loss (the model's logits, vocab_chunk=0):
  value, aux and gradients."""
  cfg = get_preset("tiny").replace(n_layers=2)
  v = init_variables(cfg, jax.random.key(0))
  batch = {k: jnp.asarray(x) for k, x in random_batch(cfg.vocab_size, 8, 16, 1).items()}
  batch["loss_mask"] = batch["loss_mask"].at[0, 5:].set(0.0)
  batch["segment_ids"] = batch["segment_ids"].at[1, 9:].set(0)
  batch["loss_mask"] = batch["loss_mask"].at[1, 9:].set(0.0)
  return cfg, v, batch, _loss_and_grads(cfg, v, batch, 0)


def _loss_and_grads(cfg, v, batch, vocab_chunk):
  fn = jax.value_and_grad(pretraining_loss(cfg, TrainConfig(), vocab_chunk=vocab_chunk),
                          has_aux=True)
  return jax.jit(fn, compiler_options=FAST_COMPILE)(v["params"], v["router_bias"], batch)


def _assert_same_loss(want, got):
  (loss, aux), grads = want
  (g_loss, g_aux), g_grads = got
  assert abs(float(loss) - float(g_loss)) <= TOL
  assert sorted(aux["metrics"]) == sorted(g_aux["metrics"])
  for key in ("ce", "mtp", "target_tokens", "balance", "loss", "tokens"):
    np.testing.assert_allclose(g_aux["metrics"][key], aux["metrics"][key], rtol=0, atol=TOL,
                               err_msg=key)
  assert float(aux["metrics"]["mtp"]) > 0
  np.testing.assert_array_equal(g_aux["expert_load"], aux["expert_load"])
  np.testing.assert_array_equal(g_aux["mtp_expert_load"], aux["mtp_expert_load"])
  assert jax.tree.structure(grads) == jax.tree.structure(g_grads)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(g_grads)):
    np.testing.assert_allclose(b, a, rtol=0, atol=TOL, err_msg=jax.tree_util.keystr(path))


def test_the_hidden_path_returns_what_the_head_turns_into_the_logits(tiny):
  cfg, v, batch, _ = tiny
  model = Transformer(cfg)

  @jax.jit
  def both(v, batch):
    args = dict(segment_ids=batch["segment_ids"], positions=batch["positions"],
                targets=batch["targets"], return_aux=True)
    return (model.apply(v, batch["tokens"], **args),
            model.apply(v, batch["tokens"], return_hidden=True, **args),
            stages.head_kernel(cfg, v["params"]),
            model.apply(v, batch["tokens"], segment_ids=batch["segment_ids"],
                        positions=batch["positions"]))
  (logits, aux), (h, aux_h), kernel, plain = both(v, batch)
  assert h.shape == logits.shape[:2] + (cfg.dim,) and kernel.dtype == jnp.float32
  np.testing.assert_allclose(h @ kernel, logits, rtol=0, atol=1e-5)
  assert aux_h["mtp_hidden"].shape == (cfg.n_mtp_depth,) + h.shape
  np.testing.assert_allclose(aux_h["mtp_hidden"] @ kernel, aux["mtp_logits"], rtol=0, atol=1e-5)
  assert sorted(set(aux_h) - {"mtp_hidden"}) == sorted(set(aux) - {"mtp_logits"})
  np.testing.assert_array_equal(aux_h["expert_load"], aux["expert_load"])
  np.testing.assert_array_equal(plain, logits)       # the default call: logits, as before


@pytest.mark.parametrize("chunk", [96, None])           # 256 = 2 x 96 + 64; default: one chunk
def test_pretraining_loss_with_the_chunked_head_equals_the_logits_path(tiny, chunk):
  cfg, v, batch, want = tiny
  _assert_same_loss(want, _loss_and_grads(cfg, v, batch, chunk))


def test_the_train_loss_on_the_hidden_path_never_holds_the_logits():
  """Compiled value_and_grad of the pretraining loss, tiny widths with
  V = 32768, 4 x 256 tokens, MTP depth 1: today's logits path holds several
  [N, V] float32 arrays (main and MTP logits, log-softmax, gradients: 561 MiB
  of temporaries with jax 0.10.2), the chunked head less than one (106 MiB)."""
  cfg = get_preset("tiny").replace(vocab_size=32768, n_layers=2, max_seq_len=256)
  v = jax.eval_shape(lambda: init_variables(cfg, jax.random.key(0)))
  batch = {k: jnp.asarray(x) for k, x in random_batch(cfg.vocab_size, 4, 256, 0).items()}
  logits_bytes = 4 * 256 * cfg.vocab_size * 4

  def temp_bytes(vocab_chunk):
    fn = jax.value_and_grad(pretraining_loss(cfg, TrainConfig(), vocab_chunk=vocab_chunk),
                            has_aux=True)
    compiled = jax.jit(fn, compiler_options=FAST_COMPILE).lower(
        v["params"], v["router_bias"], batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes
  full, chunked = temp_bytes(0), temp_bytes(4096)
  assert full >= 3 * logits_bytes
  assert chunked < logits_bytes, (chunked, full)


@pytest.mark.slow   # ~1-2 min to compile on 2 cores (the fsdp_tp pipeline, as test_pipeline's)
def test_pipeline_with_the_vocabulary_split_over_tensor_runs_the_chunked_head(tiny,
                                                                              monkeypatch):
  """pipe 2 x fsdp 2 x tensor 2 (fsdp_tp), 1F1B: the head stage's chunked CE
  over the tensor-split vocabulary (2 shards of 128, chunks of 96) inside the
  pipeline's shard_map equals one device's logits path."""
  cfg, v, batch, want = tiny
  monkeypatch.setattr(losses, "VOCAB_CHUNK", 96)
  shards, chunked = [], losses.chunked_cross_entropy

  def spy(h, kernel, *args, **kw):
    shards.append(losses.vocab_shards(kernel.shape[1]))
    return chunked(h, kernel, *args, **kw)
  monkeypatch.setattr(losses, "chunked_cross_entropy", spy)
  mesh, rules = setup(MeshConfig(pipe=2, fsdp=2, tensor=2, data=1, rules="fsdp_tp"))
  fn = pipelined_pretraining_grad(cfg, TrainConfig(), mesh, rules, schedule="1f1b",
                                  n_microbatches=2)
  with activate(mesh, rules):
    got = jax.jit(fn, compiler_options=FAST_COMPILE)(v["params"], v["router_bias"], batch)
  assert shards and set(shards) == {2}          # CE and MTP CE, each on its shard's columns
  _assert_same_loss(want, got)
