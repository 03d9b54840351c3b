"""Transformer-level properties: shapes, errors, packing, causality, RoPE, MTP, 671B."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import ModelConfig, get_preset
from deepseek_jax.model import (Transformer, abstract_variables, count_params,
                                init_variables)
from deepseek_jax.model import rope
from deepseek_jax.model.mtp import shift_left


@functools.lru_cache(maxsize=None)
def fwd(cfg):
  """Jitted apply (eager Flax apply runs op by op: slow)."""
  return jax.jit(Transformer(cfg).apply, static_argnames=("return_aux",))


@pytest.fixture(scope="module")
def tiny():
  cfg = get_preset("tiny")
  return cfg, init_variables(cfg, jax.random.key(0))


def _tokens(cfg, shape, seed=1):
  return jax.random.randint(jax.random.key(seed), shape, 0, cfg.vocab_size)


def test_logits_are_float32_batch_seq_vocab(tiny):
  cfg, v = tiny
  logits = fwd(cfg)(v, _tokens(cfg, (2, 12)))
  assert logits.shape == (2, 12, cfg.vocab_size) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))


@pytest.mark.parametrize("bad,msg", [(-1, "token id -1"), (256, "token id 256")])
def test_out_of_range_token_ids_raise_before_compilation(tiny, bad, msg):
  cfg, v = tiny
  tokens = np.zeros((2, 8), np.int32)
  tokens[1, 3] = bad
  with pytest.raises(ValueError, match=msg + r".*\[batch, pos\]=\(1, 3\).*vocab_size=256"):
    Transformer(cfg).apply(v, tokens)


def test_sequence_longer_than_context_raises(tiny):
  cfg, v = tiny
  with pytest.raises(ValueError, match="exceeds max_seq_len=128"):
    Transformer(cfg).apply(v, np.zeros((1, 129), np.int32))


def test_float_tokens_and_mismatched_segment_ids_raise(tiny):
  cfg, v = tiny
  with pytest.raises(ValueError, match="integer ids"):
    Transformer(cfg).apply(v, np.zeros((1, 4), np.float32))
  with pytest.raises(ValueError, match="segment_ids shape"):
    Transformer(cfg).apply(v, np.zeros((1, 4), np.int32),
                           segment_ids=np.ones((1, 5), np.int32))


def test_future_tokens_do_not_change_past_logits(tiny):
  cfg, v = tiny
  a = np.asarray(_tokens(cfg, (1, 16)))
  b = a.copy()
  b[0, 10:] = (b[0, 10:] + 7) % cfg.vocab_size
  la, lb = (fwd(cfg)(v, t) for t in (a, b))
  np.testing.assert_allclose(la[0, :10], lb[0, :10], atol=1e-5)
  assert not np.allclose(la[0, 10:], lb[0, 10:], atol=1e-3)


def test_packed_documents_match_separate_forward_passes(tiny):
  """Attention must not cross segments; positions restart per document."""
  cfg, v = tiny
  doc1, doc2 = np.asarray(_tokens(cfg, (1, 9), 2)), np.asarray(_tokens(cfg, (1, 5), 3))
  packed = np.concatenate([doc1, doc2, np.zeros((1, 2), np.int32)], 1)
  seg = np.array([[1] * 9 + [2] * 5 + [0] * 2], np.int32)
  pos = np.array([list(range(9)) + list(range(5)) + [0, 1]], np.int32)
  both = fwd(cfg)(v, packed, segment_ids=seg, positions=pos)
  # The MoE is dropless and per-token, so the only coupling is attention.
  np.testing.assert_allclose(both[0, :9], fwd(cfg)(v, doc1)[0], atol=2e-5)
  np.testing.assert_allclose(both[0, 9:14], fwd(cfg)(v, doc2)[0], atol=2e-5)


def test_rope_matches_complex_multiplication():
  """Official model.py: view pairs as complex numbers, multiply by e^{i pos freq}."""
  cfg = get_preset("tiny")
  x = np.random.default_rng(0).normal(size=(2, 5, 3, cfg.qk_rope_head_dim)).astype(np.float32)
  pos = np.array([[0, 1, 2, 3, 4], [7, 3, 9, 0, 1]], np.int32)
  freqs = rope.rope_frequencies(cfg).astype(np.float64)
  z = x[..., 0::2] + 1j * x[..., 1::2]
  rot = z * np.exp(1j * pos[..., None, None] * freqs)
  want = np.stack([rot.real, rot.imag], -1).reshape(x.shape)
  np.testing.assert_allclose(
      rope.apply_rope(jnp.asarray(x), jnp.asarray(pos)[:, :, None], cfg), want, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
  cfg = get_preset("tiny")
  rng = np.random.default_rng(1)
  q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, cfg.qk_rope_head_dim)), jnp.float32)
          for _ in range(2))
  def score(m, n):
    return float(jnp.sum(rope.apply_rope(q, jnp.array([[m]]), cfg)
                         * rope.apply_rope(k, jnp.array([[n]]), cfg)))
  np.testing.assert_allclose(score(5, 2), score(103, 100), rtol=1e-4)


def test_yarn_frequencies_follow_the_ramp_formula():
  """YaRN (official precompute_freqs_cis): interpolate pairs below the
  correction range by 1/factor, keep pairs above it, linear ramp between."""
  cfg = get_preset("v3_671b")   # 64 rope dims, factor 40, from 4096, beta 32/1
  dim, base = 64, 10000.0
  def corr(rot):
    return dim * math.log(4096 / (rot * 2 * math.pi)) / (2 * math.log(base))
  low, high = max(math.floor(corr(32)), 0), min(math.ceil(corr(1)), dim - 1)
  assert rope.yarn_correction_range(cfg) == (low, high)
  got = rope.rope_frequencies(cfg)
  for j in range(dim // 2):
    f = base ** (-2 * j / dim)
    ramp = min(max((j - low) / (high - low), 0.0), 1.0)
    want = f * (1 - ramp) + (f / 40.0) * ramp
    np.testing.assert_allclose(got[j], want, rtol=1e-6)
  # mscale enters the softmax scale squared: (0.1 * 1.0 * ln 40 + 1)^2 / sqrt(192).
  np.testing.assert_allclose(cfg.softmax_scale,
                             (0.1 * math.log(40) + 1) ** 2 / math.sqrt(192), rtol=1e-12)
  short = cfg.replace(max_seq_len=4096)   # no extension -> plain RoPE, plain scale
  np.testing.assert_allclose(rope.rope_frequencies(short),
                             base ** (-np.arange(0, dim, 2) / dim), rtol=1e-6)
  assert short.softmax_scale == 192 ** -0.5


def test_mtp_logits_depend_on_the_right_future_token(tiny):
  """Depth k at position i reads t_{i+k} = targets[i+k-1] and nothing later."""
  cfg, v = tiny
  cfg2 = cfg.replace(n_mtp_depth=2)
  v2 = init_variables(cfg2, jax.random.key(4))
  tokens = np.asarray(_tokens(cfg2, (1, 10), 5))
  targets = np.roll(tokens, -1, 1)
  _, aux = fwd(cfg2)(v2, tokens, targets=targets, return_aux=True)
  assert aux["mtp_logits"].shape == (2, 1, 10, cfg2.vocab_size)
  changed = targets.copy()
  changed[0, 6] = (changed[0, 6] + 1) % cfg2.vocab_size
  _, aux2 = fwd(cfg2)(v2, tokens, targets=changed, return_aux=True)
  diff = np.abs(np.asarray(aux["mtp_logits"] - aux2["mtp_logits"])).max(-1)[:, 0]
  # depth 1 sees targets[6] first at position 6, depth 2 at position 5.
  assert np.all(diff[0, :6] < 1e-6) and diff[0, 6] > 1e-4
  assert np.all(diff[1, :5] < 1e-6) and diff[1, 5] > 1e-4
  # The main logits never read targets.
  main1, _ = fwd(cfg2)(v2, tokens, targets=targets, return_aux=True)
  main2, _ = fwd(cfg2)(v2, tokens, targets=changed, return_aux=True)
  np.testing.assert_array_equal(main1, main2)


def test_shift_left_pads_with_fill():
  x = jnp.arange(10).reshape(2, 5)
  np.testing.assert_array_equal(shift_left(x, 2, fill=-1),
                                [[2, 3, 4, -1, -1], [7, 8, 9, -1, -1]])


def test_aux_outputs_report_loads_and_balance(tiny):
  cfg, v = tiny
  tokens = _tokens(cfg, (2, 16))
  seg = jnp.ones((2, 16), jnp.int32).at[1, 12:].set(0)
  _, aux = fwd(cfg)(v, tokens, segment_ids=seg, return_aux=True)
  assert aux["expert_load"].shape == (cfg.n_moe_layers, cfg.n_routed_experts)
  # Every real token is routed to k experts in every MoE layer; padding is not counted.
  np.testing.assert_array_equal(aux["expert_load"].sum(1), [28 * 2] * cfg.n_moe_layers)
  assert aux["balance_loss"] > 0


@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_remat_does_not_change_gradients(policy):
  cfg = get_preset("tiny", n_layers=2, n_mtp_depth=0)
  v = init_variables(cfg, jax.random.key(0))
  tokens = _tokens(cfg, (1, 8))
  def grads(c):
    f = lambda p: Transformer(c).apply({**v, "params": p}, tokens).sum()
    return jax.jit(jax.grad(f))(v["params"])
  for a, b in zip(jax.tree_util.tree_leaves(grads(cfg)),
                  jax.tree_util.tree_leaves(grads(cfg.replace(remat_policy=policy)))):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_v3_671b_parameter_count_by_eval_shape():
  v = abstract_variables(get_preset("v3_671b"))
  total = count_params(v["params"])
  mtp = count_params({k: x for k, x in v["params"].items() if k.startswith("mtp_")})
  main = total - mtp
  # Published: 671B main-model parameters (+14B MTP incl. its copies of the
  # embedding and head, which we share instead of storing twice).
  assert abs(main - 671e9) / 671e9 < 0.005, main
  assert 11e9 < mtp < 12.5e9, mtp
  assert v["router_bias"]["moe_layers"]["ffn"]["bias"].shape == (58, 256)
