"""Token-level distillation (train/distill.py): top-k forward KL, teacher top-k, disk cache.

Oracle: a float64 NumPy transcription of the loss (renormalised top-k
teacher, full-vocabulary student softmax, response / padding masks), fed
the same float32 logits our model produces; top-k = vocabulary against the
textbook full KL.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import get_preset
from deepseek_jax.model import Transformer
from deepseek_jax.train import distill
from random_weights import random_variables

STUDENT = get_preset("tiny_qwen2")                  # dense, tied head, q/k/v biases
TEACHER = get_preset("tiny", vocab_size=256)        # MoE + MLA (+ MTP), the same vocabulary
ROWS, SEQ, K = 3, 12, 5


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def numpy_distill(student_logits, teacher_logits, k, weights, targets, temperature=1.0,
                  ce_weight=0.0):
  """float64: T^2 * weighted-mean KL(q_topk || p_S) + ce_weight * weighted-mean CE,
  written out position by position."""
  s = np.asarray(student_logits, np.float64)
  t = np.asarray(teacher_logits, np.float64)
  w = np.asarray(weights, np.float64)
  total_kl = total_ce = 0.0
  for b in range(s.shape[0]):
    for i in range(s.shape[1]):
      if w[b, i] == 0:
        continue
      teacher_logp = _log_softmax(t[b, i])
      top = np.argsort(-teacher_logp)[:k]
      q = np.exp(teacher_logp[top] / temperature)
      q /= q.sum()
      log_ps = _log_softmax(s[b, i] / temperature)
      total_kl += w[b, i] * sum(q[j] * (np.log(q[j]) - log_ps[top[j]]) for j in range(k))
      total_ce -= w[b, i] * _log_softmax(s[b, i])[targets[b, i]]
  n = max(w.sum(), 1.0)
  return temperature ** 2 * total_kl / n + ce_weight * total_ce / n


@pytest.fixture(scope="module")
def setup():
  """Student / teacher variables and a batch: row 0 one document with a
  prompt (loss_mask 0) then a response; row 1 two packed documents; row 2
  a short document then padding (segment id 0, loss_mask left 1 there to
  check that padding never counts)."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 256, (ROWS, SEQ)).astype(np.int32)
  seg = np.ones((ROWS, SEQ), np.int32)
  seg[1, 7:] = 2
  seg[2, 5:] = 0
  pos = np.tile(np.arange(SEQ, dtype=np.int32), (ROWS, 1))
  pos[1, 7:] -= 7
  pos[2, 5:] = 0
  mask = np.ones((ROWS, SEQ), np.float32)
  mask[0, :4] = 0                     # the prompt
  mask[1, 6] = mask[1, 11] = 0        # each document's last token has no next token
  batch = {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "segment_ids": seg,
           "positions": pos, "loss_mask": mask}
  student = random_variables(STUDENT, seed=1)
  teacher = random_variables(TEACHER, seed=2)
  teacher_logits = np.asarray(Transformer(TEACHER).apply(teacher, tokens, segment_ids=seg,
                                                         positions=pos))
  student_logits = np.asarray(Transformer(STUDENT).apply(student, tokens, segment_ids=seg,
                                                         positions=pos))
  return batch, student, teacher, student_logits, teacher_logits


def _with_topk(batch, teacher_logits, k):
  logp = jax.nn.log_softmax(jnp.asarray(teacher_logits, jnp.float32), -1)
  values, ids = jax.lax.top_k(logp, k)
  return dict(batch, teacher_ids=np.asarray(ids, np.int32), teacher_logprobs=np.asarray(values))


def test_teacher_topk_is_the_moe_teachers_log_softmax_top_k(setup):
  batch, _, teacher, _, teacher_logits = setup
  ids, logp = distill.teacher_topk(TEACHER, teacher, batch["tokens"], k=K,
                                   segment_ids=batch["segment_ids"],
                                   positions=batch["positions"], chunk=5)
  want = _log_softmax(np.asarray(teacher_logits, np.float64))
  order = np.argsort(-want, -1)[..., :K]
  np.testing.assert_array_equal(np.asarray(ids), order)
  np.testing.assert_allclose(np.asarray(logp), np.take_along_axis(want, order, -1),
                             rtol=1e-5, atol=1e-5)
  assert np.all(np.diff(np.asarray(logp), axis=-1) <= 0)    # most likely first
  with pytest.raises(ValueError, match="k=300 must be an integer in"):
    distill.teacher_topk(TEACHER, teacher, batch["tokens"], k=300)


@pytest.mark.parametrize("temperature,ce_weight,chunk", [(1.0, 0.0, 5), (2.0, 0.5, 128)])
def test_loss_equals_the_float64_transcription(setup, temperature, ce_weight, chunk):
  """distill_loss_fn (student head chunked over positions) against NumPy on
  the student's own logits; padding and prompt positions do not count."""
  batch, student, _, student_logits, teacher_logits = setup
  full = _with_topk(batch, teacher_logits, K)
  loss_fn = distill.distill_loss_fn(STUDENT, temperature=temperature, ce_weight=ce_weight,
                                    chunk=chunk)
  loss, out = jax.jit(loss_fn)(student["params"], {}, full)
  weights = batch["loss_mask"] * (batch["segment_ids"] != 0)
  want = numpy_distill(student_logits, teacher_logits, K, weights, batch["targets"],
                       temperature, ce_weight)
  assert float(loss) == pytest.approx(want, rel=1e-5)
  assert float(out["metrics"]["target_tokens"]) == weights.sum()
  assert float(out["metrics"]["tokens"]) == (batch["segment_ids"] != 0).sum()
  assert 0 < float(out["metrics"]["teacher_mass"]) < 1
  # the unchunked form on full logits says the same
  kl = distill.topk_forward_kl(student_logits, full["teacher_ids"], full["teacher_logprobs"],
                               weights, temperature=temperature)
  assert float(kl) == pytest.approx(temperature ** 2 * float(out["metrics"]["kl"]), rel=1e-5)
  # garbage teacher targets on positions that do not count change nothing
  noisy = dict(full, teacher_ids=np.where(weights[..., None] > 0, full["teacher_ids"], 7),
               teacher_logprobs=np.where(weights[..., None] > 0, full["teacher_logprobs"],
                                         -3.0).astype(np.float32))
  assert float(jax.jit(loss_fn)(student["params"], {}, noisy)[0]) == pytest.approx(
      float(loss), rel=1e-6)


def test_top_k_equal_to_the_vocabulary_is_the_full_kl(setup):
  batch, student, _, student_logits, teacher_logits = setup
  full = _with_topk(batch, teacher_logits, STUDENT.vocab_size)
  loss, out = distill.distill_loss_fn(STUDENT, chunk=4)(student["params"], {}, full)
  p, log_p = (np.exp(_log_softmax(teacher_logits.astype(np.float64))),
              _log_softmax(teacher_logits.astype(np.float64)))
  kl = (p * (log_p - _log_softmax(student_logits.astype(np.float64)))).sum(-1)
  w = batch["loss_mask"] * (batch["segment_ids"] != 0)
  assert float(loss) == pytest.approx((kl * w).sum() / w.sum(), rel=1e-5)
  assert float(out["metrics"]["teacher_mass"]) == pytest.approx(1.0, abs=1e-5)


def test_gradient_is_the_unchunked_losss_and_a_step_lowers_it(setup):
  """The chunked head's gradient equals the gradient of topk_forward_kl on the
  full logits; a small gradient step lowers the loss."""
  batch, student, _, _, teacher_logits = setup
  full = _with_topk(batch, teacher_logits, K)
  weights = batch["loss_mask"] * (batch["segment_ids"] != 0)
  loss_fn = distill.distill_loss_fn(STUDENT, chunk=5)

  def reference(params):
    logits = Transformer(STUDENT).apply({"params": params}, batch["tokens"],
                                        segment_ids=batch["segment_ids"],
                                        positions=batch["positions"])
    return distill.topk_forward_kl(logits, full["teacher_ids"], full["teacher_logprobs"],
                                   weights)

  (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(student["params"], {}, full)
  ref_grads = jax.grad(reference)(student["params"])
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  stepped = jax.tree.map(lambda p, g: p - 0.05 * g, student["params"], grads)
  assert float(loss_fn(stepped, {}, full)[0]) < float(loss)


def test_cache_round_trip_resume_and_mismatches(setup, tmp_path):
  batch, _, teacher, _, _ = setup
  batches = [batch, dict(batch, tokens=np.roll(batch["tokens"], 1, 0))]
  directory = str(tmp_path / "cache")
  lines = []
  assert distill.cache_teacher_topk(TEACHER, teacher, batches, directory, k=K,
                                    chunk=5, log=lines.append) == 2
  assert len(lines) == 2
  assert not [f for f in os.listdir(directory) if f.endswith(".tmp")]
  cache = distill.TopKCache(directory, student=STUDENT)
  for i, b in enumerate(batches):
    got = cache.add(i, b)
    ids, logp = distill.teacher_topk(TEACHER, teacher, b["tokens"], k=K,
                                     segment_ids=b["segment_ids"], positions=b["positions"])
    np.testing.assert_array_equal(got["teacher_ids"], np.asarray(ids))
    np.testing.assert_allclose(got["teacher_logprobs"], np.asarray(logp), rtol=0, atol=1e-5)
    assert got["teacher_ids"].dtype == np.int32 and got["tokens"] is b["tokens"]
  # a rerun keeps the shards it finds (resume); only a missing one is computed
  os.remove(distill.shard_path(directory, 1))
  lines.clear()
  distill.cache_teacher_topk(TEACHER, teacher, batches, directory, k=K, log=lines.append)
  assert len(lines) == 1 and "shard 1" in lines[0]
  with pytest.raises(ValueError, match="cached for other tokens than batch 0"):
    cache.add(0, batches[1])
  with pytest.raises(FileNotFoundError, match="batch 2 is not in the teacher cache"):
    cache.add(2, batch)
  with pytest.raises(ValueError, match=r"another teacher top-k \(\['k'\] differ\)"):
    distill.cache_teacher_topk(TEACHER, teacher, batches, directory, k=K + 1)
  with pytest.raises(ValueError, match="teacher vocab_size=256 > student vocab_size=128"):
    distill.TopKCache(directory, student=STUDENT.replace(vocab_size=128))


def test_on_the_fly_teacher_and_bad_inputs(setup):
  batch, student, teacher, _, teacher_logits = setup
  fn = distill.make_teacher_fn(TEACHER, K, chunk=7)
  out = fn(teacher, batch)
  want = _with_topk(batch, teacher_logits, K)
  np.testing.assert_array_equal(np.asarray(out["teacher_ids"]), want["teacher_ids"])
  loss_fn = distill.distill_loss_fn(STUDENT)
  with pytest.raises(ValueError, match=r"teacher_ids .* must both be \[rows, seq, k\]"):
    loss_fn(student["params"], {}, dict(out, teacher_ids=out["teacher_ids"][:, :, :2]))
  with pytest.raises(ValueError, match="temperature=0"):
    distill.distill_loss_fn(STUDENT, temperature=0)
