"""Whole-model paths the kernel-level tests do not reach.

1. `moe_impl` at model level: a tiny Transformer (two MoE layers under
   nn.scan between the embedding and the head) run with "blocked", "ragged"
   and "dense" on the same variables gives the same logits, aux outputs and
   gradients; "dense" (every expert on every token, masked) is the oracle.
2. The bf16 compute path (`dtype="bfloat16"`, float32 params: the V3 preset's
   setting) against the float32 model on the same variables.
3. The router's gradient: the gate weight learns through the gating values
   g_i = s_i / sum_{top-k} s_j * route_scale (checked against an independent
   float64 re-implementation and a finite difference); the selection bias gets
   no gradient.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import get_preset
from deepseek_jax.model import Transformer, moe
from random_weights import random_variables
from test_moe import naive_route

IMPLS = ("dense", "blocked", "ragged")
B, S = 2, 16
# Compiling is nearly all of this file's time: LLVM at -O0 cuts it by a third
# (measured on the 2-core dev machine); the programs are too small for code
# quality to matter, and the HLO (what the numerics depend on) is unchanged.
JIT = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


# ---------------------------------------------------------------------------
# Model-level runs, shared by sections 1 and 2
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
  """The tiny preset's MoE layers (group-limited sigmoid routing, route_scale
  2.5, a shared expert), two of them, with random weights far from init and
  random router biases, and a batch whose second row ends in padding.

  Compile time sets the size (four programs, forward and backward, are
  compiled here): the MTP block roughly doubles it and a dense first layer
  adds a third, and neither goes through code these tests are about (MTP's
  block is the same MoE Block; a dense layer's MLP is the shared expert's)."""
  cfg = get_preset("tiny", n_layers=2, n_dense_layers=0, n_mtp_depth=0)
  variables = random_variables(cfg, seed=0)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, S)), jnp.int32)
  seg = jnp.ones((B, S), jnp.int32).at[1, 13:].set(0)
  return cfg, variables, (tokens, jnp.roll(tokens, -1, 1), seg)


def _ce(logits, targets, mask):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
  return (nll * mask).sum() / mask.sum()


@functools.lru_cache(maxsize=None)
def _loss_and_grad(cfg):
  """jit of (variables, batch) -> ((loss, (logits, aux)), d loss / d variables).

  The loss is next-token CE plus the balance loss (so the router's scores
  are trained through both). Gradients are taken with respect to all
  variables, `router_bias` included."""
  def loss(variables, batch):
    tokens, targets, seg = batch
    logits, aux = Transformer(cfg).apply(variables, tokens, segment_ids=seg,
                                         return_aux=True)
    mask = (seg != 0).astype(jnp.float32)
    return _ce(logits, targets, mask) + 0.01 * aux["balance_loss"], (logits, aux)
  return JIT(jax.value_and_grad(loss, has_aux=True))


@pytest.fixture(scope="module")
def runs(model):
  """{(moe_impl, dtype): ((loss, (logits, aux)), grads)} on the shared variables."""
  cfg, variables, batch = model
  out = {}
  for impl in IMPLS:
    out[impl, "float32"] = _loss_and_grad(cfg.replace(moe_impl=impl))(variables, batch)
  out["blocked", "bfloat16"] = _loss_and_grad(
      cfg.replace(moe_impl="blocked", dtype="bfloat16"))(variables, batch)
  return out


def _assert_tree_close(got, want, rtol):
  """Leaf by leaf: |got - want| <= rtol * (|want| + max|want| of the leaf).

  The absolute part scales with the leaf so that entries near zero (sums
  that cancel) are held to the leaf's precision, not to their own."""
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(want)]
  for path, g, w in zip(paths, jax.tree.leaves(got), jax.tree.leaves(want)):
    g, w = np.asarray(g), np.asarray(w)
    np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * float(np.abs(w).max()),
                               err_msg=path)


# ---------------------------------------------------------------------------
# 1. blocked / ragged / dense at model level
# ---------------------------------------------------------------------------
# The kernels order the same sums differently (sorted, padded rows;
# ragged_dot; masked dense GEMMs), so float32 results may differ by a few ulps
# per op. Measured (jax 0.10.2 and 0.12): logits, loss and balance loss
# bitwise equal, gradients <= 5e-7 of each leaf's largest entry (an earlier
# variant with a dense layer and MTP: 1.1e-6 for logits, 9e-7 for gradients).
# 1e-5 leaves ~10x room; a wrong row, gate or expert shows up at O(1).
F32_RTOL = 1e-5


@pytest.mark.parametrize("impl", ["blocked", "ragged"])
def test_moe_impls_agree_with_dense_at_model_level(runs, impl):
  (loss, (logits, aux)), grads = runs[impl, "float32"]
  (want_loss, (want_logits, want_aux)), want_grads = runs["dense", "float32"]
  assert set(aux) == set(want_aux) == {"balance_loss", "expert_load"}
  # Same routing in every MoE layer: the integer counts agree exactly.
  np.testing.assert_array_equal(aux["expert_load"], want_aux["expert_load"])
  _assert_tree_close((loss, logits, aux["balance_loss"]),
                     (want_loss, want_logits, want_aux["balance_loss"]), F32_RTOL)
  _assert_tree_close(grads["params"], want_grads["params"], F32_RTOL)


def test_model_level_reference_run_is_meaningful(model, runs):
  """Guards for the comparison above: routing is uneven and data-dependent,
  padding is not counted, every MoE gate learns, the router bias does not."""
  cfg, _, (_, _, seg) = model
  (_, (logits, aux)), grads = runs["dense", "float32"]
  assert logits.shape == (B, S, cfg.vocab_size)
  n_real = int((seg != 0).sum())
  k = cfg.n_activated_experts
  assert aux["expert_load"].shape == (cfg.n_moe_layers, cfg.n_routed_experts)
  np.testing.assert_array_equal(aux["expert_load"].sum(1), [n_real * k] * cfg.n_moe_layers)
  assert all(len(set(np.asarray(row).tolist())) > 2 for row in aux["expert_load"])
  gates = grads["params"]["moe_layers"]["ffn"]["gate"]
  assert all(float(jnp.abs(g).max()) > 1e-3 for g in gates)
  for impl in IMPLS:
    for g in jax.tree.leaves(runs[impl, "float32"][1]["router_bias"]):
      np.testing.assert_array_equal(g, 0.0)


# ---------------------------------------------------------------------------
# 2. bf16 compute path vs float32
# ---------------------------------------------------------------------------
def _pinned_bias(variables):
  """Router biases that fix every token's choice to experts 0 and 2. Scores
  are in (0, 1), so group {0, 1} scores > 3 (its top two, bias 3 on expert 0),
  group {2, 3} > 2 and the others < 2: those two groups are kept, and in
  them experts 0 and 2 beat 1 and 3 by more than 1. No rounding can flip the
  selection, while the gates s_i / (s_0 + s_2) * 2.5 stay token-dependent."""
  pinned = jnp.zeros((8,), jnp.float32).at[0].set(3.0).at[2].set(2.0)
  return {**variables, "router_bias": jax.tree.map(
      lambda b: jnp.broadcast_to(pinned, b.shape), variables["router_bias"])}


def _rel_err(got, want, axis=None):
  """||got - want|| / ||want|| over everything (axis None) or along `axis`."""
  if axis is None:
    got, want, axis = got.reshape(-1), want.reshape(-1), -1
  return jnp.linalg.norm(got - want, axis=axis) / jnp.linalg.norm(want, axis=axis)


def _cosine(a, b):
  a = jnp.concatenate([x.reshape(-1) for x in jax.tree.leaves(a)])
  b = jnp.concatenate([x.reshape(-1) for x in jax.tree.leaves(b)])
  return float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


def _bf16_vs_f32(got, want, seg):
  """Checks what holds however routing goes, and returns (per-token relative
  logits error over the real tokens, relative loss error, gradient cosine)."""
  (loss, (logits, _)), grads = got
  (want_loss, (want_logits, _)), want_grads = want
  # The head runs in float32 (transformer.py: "logits [b, s, vocab] f32"), and
  # gradients come in the float32 param dtype.
  assert logits.dtype == jnp.float32
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  assert np.all(np.isfinite(logits)) and np.isfinite(float(loss))
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  real = np.asarray(seg != 0)             # padding positions' logits are never used
  err = np.asarray(_rel_err(logits[real], want_logits[real], axis=-1))
  loss_err = abs(float(loss) - float(want_loss)) / abs(float(want_loss))
  return err, loss_err, _cosine(grads["params"], want_grads["params"])


def test_bf16_matches_float32_with_routing_pinned(model, runs):
  """bf16 rounding alone. Measured (jax 0.10.2 / 0.12), relative logits error
  per real token: RMS 1.2e-2 / 1.1e-2, max 1.8e-2; loss 5e-5 / 3.7e-4; grad
  cosine 0.99987 / 0.99990. Bounds ~4x those (1 - cosine: ~8x). bf16 keeps 8
  significant bits (2^-9 = 2e-3 per rounding), compounded over the layers."""
  cfg, variables, batch = model
  pinned = _pinned_bias(variables)
  want = _loss_and_grad(cfg.replace(moe_impl="blocked"))(pinned, batch)
  got = _loss_and_grad(cfg.replace(moe_impl="blocked", dtype="bfloat16"))(pinned, batch)
  # The pin holds in both runs: every real token at experts 0 and 2 only.
  n_real = int((batch[2] != 0).sum())
  for (_, (_, aux)), _ in (got, want):
    for load in aux["expert_load"]:
      np.testing.assert_array_equal(load, [n_real, 0, n_real, 0, 0, 0, 0, 0])
  err, loss_err, cosine = _bf16_vs_f32(got, want, batch[2])
  assert float(np.sqrt(np.mean(err ** 2))) < 0.05 and err.max() < 0.07
  assert loss_err < 2e-3
  assert cosine > 0.999


def test_bf16_matches_float32_with_free_routing(model, runs):
  """The random router biases: bf16 rounding of the router's input can flip a
  near tie. jax 0.10.2 flips one selection (the last token of row 0, in one
  layer): that token's logits move by 80%, the loss by 3.3e-3, the grad
  cosine drops to 0.9895; every other token stays within 1.7e-2 (median 1.0e-2).
  jax 0.12 flips none (like the pinned run). So: bounds on the typical token
  (median 4x, 3 in 4 tokens) and loose ones on the rest, which still catch a
  broken bf16 path (NaNs, O(1) errors) without betting on where ties fall."""
  cfg, _, batch = model
  err, loss_err, cosine = _bf16_vs_f32(runs["blocked", "bfloat16"], runs["blocked", "float32"],
                                       batch[2])
  assert np.median(err) < 0.04 and np.mean(err < 0.05) >= 0.75
  assert loss_err < 2e-2
  assert cosine > 0.95
  # Every token still picks k experts; few selections change.
  aux = runs["blocked", "bfloat16"][0][1][1]
  want_aux = runs["blocked", "float32"][0][1][1]
  n_sel = int((batch[2] != 0).sum()) * cfg.n_activated_experts
  np.testing.assert_array_equal(aux["expert_load"].sum(1), [n_sel] * cfg.n_moe_layers)
  moved = float(jnp.abs(aux["expert_load"] - want_aux["expert_load"]).sum()) / 2
  assert moved <= 0.05 * n_sel * cfg.n_moe_layers


# ---------------------------------------------------------------------------
# 3. Router gradient into the gate weight, none into the bias
# ---------------------------------------------------------------------------
def _reference_moe(x, p, mask, route_scale):
  """The V3 MoE output written from the paper, differentiable in everything
  but the (given) selection: s = sigmoid(x W_gate), g_i = s_i / sum_{chosen}
  s_j * route_scale on the chosen experts, out = shared(x) + sum_i g_i FFN_i(x)."""
  silu = jax.nn.silu
  s = jax.nn.sigmoid(x @ p["gate"])                                    # [n, E]
  g = s * mask / (s * mask).sum(-1, keepdims=True) * route_scale
  h = silu(jnp.einsum("nd,edf->nef", x, p["w1"])) * jnp.einsum("nd,edf->nef", x, p["w3"])
  routed = jnp.einsum("ne,nef,efd->nd", g, h, p["w2"])
  sh = p["shared_experts"]
  shared = (silu(x @ sh["w1"]["kernel"]) * (x @ sh["w3"]["kernel"])) @ sh["w2"]["kernel"]
  return shared + routed


@pytest.fixture(scope="module")
def layer():
  """One MoE layer of the tiny preset (blocked kernel), random weights at the
  scale of `random_variables`, random router bias, a batch with padding, and
  one jitted evaluation shared by the tests below:

    run(variables, balance_weight) -> (out, aux, loss, (d loss/d variables, d loss/d x))

  with loss = <out, cotangent> + balance_weight * balance_loss. With weight 0
  the gate's only way into the loss is the gating values (selection is
  integer-valued); the balance loss reaches it through the scores."""
  cfg = get_preset("tiny", moe_impl="blocked")
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(2, 6, cfg.dim)), jnp.float32)
  valid = jnp.array([[1] * 6, [1] * 4 + [0] * 2], bool)
  mod = moe.MoE(cfg)
  variables = jax.eval_shape(mod.init, jax.random.key(0), x, valid)
  variables = jax.tree.map(
      lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), jnp.float32), variables)
  variables["router_bias"]["bias"] = jnp.asarray(rng.uniform(0, 0.5, 8), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

  def loss(variables, x, balance_weight):
    out, aux = mod.apply(variables, x, valid)
    return jnp.sum(out * cotangent) + balance_weight * aux["balance_loss"], (out, aux)

  @JIT
  def run(variables, balance_weight):
    (value, (out, aux)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        variables, x, balance_weight)
    return out, aux, value, grads

  return cfg, variables, x, valid, cotangent, run


def test_gate_gradient_matches_reference_gating_formula(layer):
  cfg, variables, x, valid, cotangent, run = layer
  _, aux, _, (grads, dx) = run(variables, 0.0)
  params = variables["params"]
  assert set(params) == {"gate", "w1", "w2", "w3", "shared_experts"}   # no bias param
  assert float(jnp.abs(grads["params"]["gate"]).max()) > 1e-2

  # Selection by the paper's routing in float64 (group-limited top-k of s + b),
  # checked against the layer's: same per-expert counts.
  tokens = np.asarray(x, np.float64).reshape(-1, cfg.dim)
  _, chosen = naive_route(tokens @ np.asarray(params["gate"], np.float64),
                          variables["router_bias"]["bias"], cfg)
  mask = np.zeros((tokens.shape[0], cfg.n_routed_experts))
  np.put_along_axis(mask, chosen, 1.0, axis=1)
  np.testing.assert_array_equal(aux["load"], (mask * np.asarray(valid).reshape(-1, 1)).sum(0))

  with jax.enable_x64(True):
    ct = np.asarray(cotangent, np.float64).reshape(-1, cfg.dim)

    def ref_loss(p, t):
      return jnp.sum(_reference_moe(t, p, mask, cfg.route_scale) * ct)
    ref_p, ref_dx = jax.tree.map(np.asarray, JIT(jax.grad(ref_loss, argnums=(0, 1)))(
        jax.tree.map(lambda a: np.asarray(a, np.float64), params), tokens))
  assert ref_dx.dtype == np.float64
  # float32 library vs float64 reference: measured <= 5.2e-7 of each leaf's
  # largest entry (gate, experts, shared experts, and the input gradient,
  # which also flows through the router logits).
  _assert_tree_close(grads["params"], ref_p, 1e-5)
  _assert_tree_close(dx.reshape(-1, cfg.dim), ref_dx, 1e-5)


def test_gate_gradient_matches_finite_difference(layer):
  """Central difference of the library's own float32 loss along random unit
  directions in gate space. eps = 3e-3 moves the sigmoid scores by ~3e-4,
  ~10x below the smallest top-k margin here (2.9e-3), so selection stays put
  (checked: same loads); the difference then matches <grad, d> to a measured
  <= 5e-5 of |grad| (float32 rounding of the loss / 2 eps); bound 5e-4."""
  _, variables, _, _, _, run = layer
  _, aux, _, (grads, _) = run(variables, 0.0)
  grad = np.asarray(grads["params"]["gate"])
  rng = np.random.default_rng(3)
  eps = 3e-3
  for _ in range(3):
    d = rng.standard_normal(grad.shape).astype(np.float32)
    d /= np.linalg.norm(d)
    values = []
    for sign in (1, -1):
      p = {**variables["params"], "gate": variables["params"]["gate"] + sign * eps * d}
      _, aux_eps, value, _ = run({**variables, "params": p}, 0.0)
      np.testing.assert_array_equal(aux_eps["load"], aux["load"])
      values.append(float(value))
    fd = (values[0] - values[1]) / (2 * eps)
    assert abs(fd - float(np.sum(grad * d))) < 5e-4 * np.linalg.norm(grad)


def test_router_bias_gets_no_gradient_but_steers_selection(layer):
  """The bias is a `router_bias` variable (moved by the trainer), not a param,
  and enters only top-k selection: its gradient is exactly zero, with the
  balance loss in the objective too, although changing it changes outputs."""
  _, variables, _, valid, _, run = layer
  assert "bias" not in variables["params"]
  out, aux, _, (g_out, _) = run(variables, 0.0)
  _, _, _, (g_all, _) = run(variables, 1.0)
  for g in (g_out, g_all):
    np.testing.assert_array_equal(g["router_bias"]["bias"], 0.0)
  # The balance loss alone (the difference) reaches the gate through the scores.
  assert float(jnp.abs(g_all["params"]["gate"] - g_out["params"]["gate"]).max()) > 1e-4
  moved = {**variables, "router_bias": {"bias": variables["router_bias"]["bias"].at[5].add(5.0)}}
  out2, aux2, _, _ = run(moved, 0.0)
  assert aux2["load"][5] == int(valid.sum()) > aux["load"][5]
  assert float(jnp.abs(out - out2).max()) > 1e-3
