"""Mesh-sharded model and train step on 8 fake CPU devices vs one device.

Oracle: the same jitted function without a mesh (one device, the MoE
dispatch over the whole batch). Sharding changes only the order of float
sums, so a sharded forward / train step must agree within 1e-5 (float32):
logits, expert loads, balance loss, gradients (AdamW's first moment after one
step is 0.1 x the gradient), updated parameters and router biases. The
router bias is skewed so one expert takes most tokens: the dropless
expert-parallel exchange must not drop any of them.
"""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import get_preset
from deepseek_jax.model import Transformer, abstract_variables, init_variables
from deepseek_jax.parallel import (MeshConfig, activate, batch_sharding, setup,
                                   tree_shardings)
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.step import abstract_train_state, init_train_state, make_train_step

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
from train_throughput import random_batch  # noqa: E402

CFG = get_preset("tiny")
TOL = 1e-5
MESHES = {   # every used axis > 1
    "data2_expert2_tensor2": MeshConfig(data=2, expert=2, tensor=2),
    "fsdp2_expert4": MeshConfig(data=1, fsdp=2, expert=4),
}
# Every rule set runs expert parallelism on a mesh with expert > 1 (their
# shardings: the golden tests below); a train step under `fsdp`, the set that
# used to leave every expert on every device.
RULE_SET_MESHES = {
    "fsdp2_expert4_fsdp": MeshConfig(data=1, fsdp=2, expert=4, rules="fsdp"),
    # no expert parallelism: the expert kernel gathers one expert's FSDP
    # slices at a time (model/grouped_matmul.py, "Sharded weights")
    "fsdp_tp": MeshConfig(data=2, fsdp=2, tensor=2, rules="fsdp_tp"),
}


def _max_diff(a, b) -> float:
  return max(float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max())
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _skew(variables, expert=3, amount=5.0):
  """Router bias pushing (almost) every token to one expert."""
  def f(path, x):
    if "router_bias" not in jax.tree_util.keystr(path):
      return x
    return jnp.asarray(x).at[..., expert].add(amount)
  return jax.tree_util.tree_map_with_path(f, variables)


# --- MeshConfig ----------------------------------------------------------------
def test_mesh_config_fills_the_minus_one_axis_and_builds_auto_axes():
  cfg = MeshConfig(fsdp=2, expert=2)
  assert cfg.shape(8) == {"data": 2, "fsdp": 2, "tensor": 1, "expert": 2, "pipe": 1}
  mesh, _ = setup(cfg)
  assert mesh.axis_names == ("data", "fsdp", "tensor", "expert", "pipe")
  assert dict(mesh.shape) == cfg.shape(8)
  assert all(str(t).endswith("Auto") for t in mesh.axis_types)


@pytest.mark.parametrize("kwargs,n,match", [
    (dict(data=2, expert=2), 8, "multiplies to 4 devices, but there are 8"),
    (dict(fsdp=3), 8, "multiply to 3, which does not divide the 8 devices"),
    (dict(data=-1, fsdp=-1), 8, "at most one axis may fill"),
    (dict(expert=0), 8, "mesh.expert=0 must be a positive integer or -1"),
    (dict(rules="zero3"), 8, "mesh.rules='zero3' is not a rule set"),
])
def test_bad_mesh_configs_name_the_axes(kwargs, n, match):
  with pytest.raises(ValueError, match=match):
    MeshConfig(**kwargs).shape(n)


def test_a_loss_without_a_pipelined_gradient_refuses_a_pipe_axis():
  from deepseek_jax.train.step import make_update_step
  mesh, rules = setup(MeshConfig(pipe=2, data=4))
  with pytest.raises(NotImplementedError, match="mesh.pipe=2: this loss has no pipelined"):
    make_update_step(CFG, TrainConfig(), lambda p, b, batch: (0.0, {}), mesh, rules)


def test_a_dimension_the_mesh_does_not_divide_names_parameter_dimension_and_axis():
  mesh, rules = setup(MeshConfig(data=1, tensor=8, rules="fsdp_tp"))
  with pytest.raises(ValueError, match=r"wkv_b.*dimension 2 \(heads, size 4\).*\('tensor',\)"):
    tree_shardings(abstract_variables(CFG), mesh, rules)


def test_a_rule_that_does_not_divide_gives_way_to_the_next_for_that_name():
  from deepseek_jax.parallel import RULE_SETS, spec_for
  sizes = {"data": 1, "fsdp": 32, "tensor": 2, "expert": 64, "pipe": 1}
  rules = RULE_SETS["ep_fsdp"]
  # V3's width 7168 is not a multiple of fsdp x expert = 2048: fsdp alone,
  # and the leftover rule (* -> expert) puts `expert` on the heads instead.
  assert tuple(spec_for(("embed", "heads"), rules, (7168, 128), sizes)) == (
      "fsdp", ("tensor", "expert"))
  assert tuple(spec_for(("embed", "heads"), rules, (7168, 64), sizes)) == ("fsdp", "tensor")
  assert tuple(spec_for(("layers", "norm"), rules, (64, 7168), sizes)) == (None, None)
  assert tuple(spec_for(("embed", "heads"), rules, (8192, 128), sizes)) == (
      ("fsdp", "expert"), "tensor")
  # The last rule for a name is kept, so the divisibility check can name it.
  assert tuple(spec_for(("embed",), rules, (100,), sizes)) == ("fsdp",)


# --- golden shardings ----------------------------------------------------------
GOLDEN_EP_FSDP = {   # tiny preset, rules ep_fsdp; leading None = the layer axis
    "params/embed/embedding": ("tensor", ("fsdp", "expert")),
    "params/head/kernel": (("fsdp", "expert"), "tensor"),
    "params/norm/scale": (None,),
    "params/dense_layers/attn/wq_a/kernel": (None, ("fsdp", "expert"), None),
    "params/dense_layers/attn/wq_b/kernel": (None, ("fsdp", "expert"), "tensor", None),
    "params/dense_layers/attn/wkv_a/kernel": (None, ("fsdp", "expert"), None),
    "params/dense_layers/attn/wkv_b/kernel": (None, ("fsdp", "expert"), "tensor", None),
    "params/dense_layers/attn/wo/kernel": (None, "tensor", None, ("fsdp", "expert")),
    "params/dense_layers/attn/q_norm/scale": (None, None),
    "params/dense_layers/ffn/w1/kernel": (None, ("fsdp", "expert"), "tensor"),
    "params/dense_layers/ffn/w2/kernel": (None, "tensor", ("fsdp", "expert")),
    "params/moe_layers/ffn/gate": (None, ("fsdp", "expert"), None),
    "params/moe_layers/ffn/shared_experts/w1/kernel": (None, ("fsdp", "expert"), "tensor"),
    "params/moe_layers/ffn/shared_experts/w2/kernel": (None, "tensor", ("fsdp", "expert")),
    "params/moe_layers/ffn/w1": (None, "expert", "fsdp", "tensor"),
    "params/moe_layers/ffn/w3": (None, "expert", "fsdp", "tensor"),
    "params/moe_layers/ffn/w2": (None, "expert", "tensor", "fsdp"),
    "params/mtp_0/eh_proj/kernel": (None, ("fsdp", "expert")),
    "params/mtp_0/block/ffn/w1": ("expert", "fsdp", "tensor"),
    "params/mtp_0/block/ffn/w2": ("expert", "tensor", "fsdp"),
    "router_bias/moe_layers/ffn/bias": (None, None),
    "router_bias/mtp_0/block/ffn/bias": (None,),
}


# The other rule sets on the same mesh (expert = 2): the routed experts on
# `expert` in every one (DESIGN.md §4), the rest as the set decides.
GOLDEN_OTHER_SETS = {
    "dp": {              # only the batch and the routed experts are split
        "params/embed/embedding": (None, None),
        "params/head/kernel": (None, None),
        "params/dense_layers/attn/wq_b/kernel": (None, None, None, None),
        "params/moe_layers/ffn/gate": (None, None, None),
        "params/moe_layers/ffn/shared_experts/w1/kernel": (None, None, None),
        "params/moe_layers/ffn/w1": (None, "expert", None, None),
        "params/moe_layers/ffn/w2": (None, "expert", None, None),
        "params/mtp_0/block/ffn/w3": ("expert", None, None),
        "router_bias/moe_layers/ffn/bias": (None, None),
    },
    "fsdp": {            # the width over fsdp; nothing over tensor
        "params/embed/embedding": (None, "fsdp"),
        "params/head/kernel": ("fsdp", None),
        "params/dense_layers/attn/wq_b/kernel": (None, "fsdp", None, None),
        "params/moe_layers/ffn/gate": (None, "fsdp", None),
        "params/moe_layers/ffn/shared_experts/w1/kernel": (None, "fsdp", None),
        "params/moe_layers/ffn/w1": (None, "expert", "fsdp", None),
        "params/moe_layers/ffn/w2": (None, "expert", None, "fsdp"),
        "params/mtp_0/block/ffn/w3": ("expert", "fsdp", None),
        "router_bias/moe_layers/ffn/bias": (None, None),
    },
    "fsdp_tp": {         # and heads / hidden units / vocab over tensor
        "params/embed/embedding": ("tensor", "fsdp"),
        "params/head/kernel": ("fsdp", "tensor"),
        "params/dense_layers/attn/wq_b/kernel": (None, "fsdp", "tensor", None),
        "params/moe_layers/ffn/gate": (None, "fsdp", None),
        "params/moe_layers/ffn/shared_experts/w1/kernel": (None, "fsdp", "tensor"),
        "params/moe_layers/ffn/w1": (None, "expert", "fsdp", "tensor"),
        "params/moe_layers/ffn/w2": (None, "expert", "tensor", "fsdp"),
        "params/mtp_0/block/ffn/w3": ("expert", "fsdp", "tensor"),
        "router_bias/moe_layers/ffn/bias": (None, None),
    },
}


@pytest.mark.parametrize("rule_set", ["ep_fsdp", "dp", "fsdp", "fsdp_tp"])
def test_golden_shardings_of_every_rule_set_with_an_expert_axis(rule_set):
  mesh, rules = setup(MeshConfig(data=1, fsdp=2, expert=2, tensor=2, rules=rule_set))
  shardings = tree_shardings(abstract_variables(CFG), mesh, rules)
  got = {"/".join(str(k.key) for k in path): tuple(s.spec)
         for path, s in jax.tree_util.tree_leaves_with_path(
             shardings, is_leaf=lambda x: hasattr(x, "spec"))}
  golden = GOLDEN_EP_FSDP if rule_set == "ep_fsdp" else GOLDEN_OTHER_SETS[rule_set]
  for name, spec in golden.items():
    assert got[name] == spec, (name, got[name])
  # The batch rows over (data, fsdp, expert), sequences whole, in every set.
  assert tuple(batch_sharding(mesh, rules).spec) == (("data", "fsdp", "expert"), None)
  if rule_set != "ep_fsdp":
    return
  # No parameter of rank >= 2 is replicated over the expert axis (V3: the expert
  # axis is an FSDP axis outside the experts), router biases excepted (tiny).
  for name, spec in got.items():
    flat = [a for entry in spec for a in ((entry,) if isinstance(entry, str) else entry or ())]
    if name.startswith("params/") and not name.endswith("scale"):
      assert "expert" in flat, name


# --- forward and train step vs one device --------------------------------------
@pytest.fixture(scope="module")
def skewed():
  variables = _skew(init_variables(CFG, jax.random.key(0)))
  forward = jax.jit(lambda v, t: Transformer(CFG).apply(v, t, targets=t, return_aux=True))
  return variables, forward


def test_batch_not_divisible_by_the_batch_axes_is_refused(skewed):
  variables, forward = skewed
  mesh, rules = setup(MESHES["fsdp2_expert4"])
  with activate(mesh, rules), pytest.raises(ValueError, match="multiple of 8"):
    forward(variables, jnp.zeros((4, 16), jnp.int32))


@pytest.fixture(scope="module")
def one_device_step():
  # Adam's first update is lr * g / (|g| + eps): with eps = 1e-8 a gradient
  # entry near 1e-8 turns a 1e-9 summation-order difference into a 1e-3
  # relative change of its update. eps = 1e-4 keeps the update Lipschitz in g,
  # so the comparison tests the sharding, not that amplification.
  train_cfg = TrainConfig(steps=4, batch_size=8, seq_len=16, warmup_steps=0, lr=1e-2,
                          eps=1e-4, bias_update_speed=0.01, fast_compile=True)
  batch = random_batch(CFG.vocab_size, 8, 16, seed=0)
  state = init_train_state(CFG, train_cfg, jax.random.key(0))
  bias0 = jax.device_get(_skew({"router_bias": state.router_bias})["router_bias"])
  new, metrics = make_train_step(CFG, train_cfg)(
      state.replace(router_bias=jax.device_put(bias0)), batch)
  return train_cfg, batch, bias0, jax.device_get(new), jax.device_get(metrics)


@pytest.mark.parametrize("mesh_name", list(MESHES) + list(RULE_SET_MESHES))
def test_sharded_train_step_matches_one_device(one_device_step, mesh_name):
  train_cfg, batch, bias0, ref, ref_metrics = one_device_step
  mesh, rules = setup({**MESHES, **RULE_SET_MESHES}[mesh_name])
  state = init_train_state(CFG, train_cfg, jax.random.key(0), mesh, rules)
  w1 = state.params["moe_layers"]["ffn"]["w1"]
  assert w1.sharding.spec[1] == "expert"                          # created sharded
  assert w1.addressable_shards[0].data.shape[1] == CFG.n_routed_experts // mesh.shape["expert"]
  state = state.replace(router_bias=jax.device_put(
      bias0, jax.tree.map(lambda x: x.sharding, state.router_bias)))
  new, metrics = make_train_step(CFG, train_cfg, mesh, rules)(state, batch)
  new, metrics = jax.device_get(new), jax.device_get(metrics)
  for key in ("loss", "ce", "mtp", "balance", "grad_norm"):
    assert abs(float(metrics[key]) - float(ref_metrics[key])) < TOL, key
  np.testing.assert_array_equal(metrics["expert_load"], ref_metrics["expert_load"])
  mu = new.opt_state[1][0].mu                                    # 0.1 x gradient
  assert _max_diff(mu, ref.opt_state[1][0].mu) < TOL * 0.1
  assert _max_diff(new.params, ref.params) < TOL
  assert _max_diff(new.router_bias, ref.router_bias) < TOL
  assert _max_diff(new.router_bias, bias0) > 0                   # the bias did move


# --- the expert-parallel exchange: rounds of fixed capacity -------------------------
# Kernel level: parallel/expert.py's exchanging kernel in shard_map (rows over
# data x expert, experts over expert) against every expert on every token on
# one device. 8 devices x 16 tokens, E = 8, k = 2: R = 32 rows per device.
EXCHANGE_MESHES = {"data4_expert2": MeshConfig(data=4, expert=2),
                   "data2_expert4": MeshConfig(data=2, expert=4)}
ROUTINGS = ("balanced", "skewed", "padded", "one_group_skewed")


def _exchange_case(routing, ep, n=16, d=8, f=4, e=8, k=2):
  """x, experts, gates, valid, w1, w3, w2 for 8 devices of n tokens (device
  j holds rows [j n, (j+1) n); data group g: devices [g ep, (g+1) ep))."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((8 * n, d)).astype(np.float32)
  i = np.arange(8 * n) % n
  # balanced: token i -> experts 2i, 2i+1 (mod E): R/P rows per destination.
  experts = np.stack([(2 * i) % e, (2 * i + 1) % e], 1).astype(np.int32)
  valid = np.ones(8 * n, bool)
  skew = {"skewed": slice(None), "padded": slice(None),
          "one_group_skewed": slice(0, ep * n)}.get(routing)
  if skew is not None:        # experts 0 and 1: every row of these devices to rank 0
    experts[skew] = [0, 1]
  if routing == "padded":     # a quarter of the tokens are padding: not sent, output 0
    valid = i % 4 != 0        # 3R/4 rows to rank 0: fewer overflow rounds than the bound
  gates = rng.uniform(0.2, 1.0, (8 * n, k)).astype(np.float32)
  w1, w3 = (rng.standard_normal((e, d, f)).astype(np.float32) * 0.3 for _ in range(2))
  w2 = rng.standard_normal((e, f, d)).astype(np.float32) * 0.3
  return x, experts, gates, valid, w1, w3, w2


@functools.lru_cache(maxsize=None)
def _exchange_value_and_grad(mesh_name, capacity, kernel_name):
  """jit(value_and_grad) of sum(out * probe) over (x, gates, w1, w3, w2): the
  sharded exchange, or (mesh_name None) the one-device dense oracle."""
  from deepseek_jax.model import moe
  from deepseek_jax.parallel import expert as ep_lib
  kernel = getattr(moe, kernel_name)
  P = jax.sharding.PartitionSpec
  if mesh_name is None:
    def run(x, gates, w1, w3, w2, experts, valid):
      return moe.experts_dense(x, experts, jnp.where(valid[:, None], gates, 0), w1, w3, w2)
  else:
    mesh, _ = setup(EXCHANGE_MESHES[mesh_name])
    ep = mesh.shape["expert"]
    rows = P(("data", "expert"))

    def local(x, gates, w1, w3, w2, experts, valid):
      return ep_lib._exchanging_kernel(x, experts, gates, w1, w3, w2, axis="expert", ep=ep,
                                       kernel=kernel, capacity=capacity, token_valid=valid,
                                       batch_axes=("data", "expert"))
    run = jax.shard_map(local, mesh=mesh, out_specs=rows, in_specs=(
        rows, rows, P("expert"), P("expert"), P("expert"), rows, rows))

  def loss(x, gates, w1, w3, w2, experts, valid, probe):
    out = run(x, gates, w1, w3, w2, experts, valid)
    return (out * probe).sum(), out
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))


def _busiest(experts, valid, ep, e=8, n=16):
  """Largest number of rows one device sends to one destination."""
  dest = np.where(valid[:, None], experts // (e // ep), ep).reshape(8, n * 2)
  return max(np.bincount(row, minlength=ep + 1)[:ep].max() for row in dest)


@pytest.mark.parametrize("capacity", [2.0, 1.0, 0.0])
@pytest.mark.parametrize("mesh_name", list(EXCHANGE_MESHES))
def test_expert_exchange_is_exact_for_any_skew(mesh_name, capacity):
  """Forward and gradients (x, gates, w1, w3, w2) within 1e-5 of the dense
  one-device oracle for balanced routing (round 0 only), every row of every
  device to rank 0 (overflow rounds up to the static bound), padding tokens
  (never sent: output and gradient 0) and one data group skewed while the
  other is balanced (expert groups take different branches)."""
  from deepseek_jax.parallel import expert as ep_lib
  ep = EXCHANGE_MESHES[mesh_name].expert
  cap = ep_lib.exchange_capacity(32, ep, capacity)
  sharded = _exchange_value_and_grad(mesh_name, capacity, "experts_dense")
  oracle = _exchange_value_and_grad(None, None, "experts_dense")
  for routing in ROUTINGS:
    case = _exchange_case(routing, ep)
    probe = np.random.default_rng(1).standard_normal(case[0].shape).astype(np.float32)
    x, experts, gates, valid, w1, w3, w2 = case
    # The cases reach the overflow rounds wherever the capacity leaves any.
    busiest = _busiest(experts, valid, ep)
    assert (busiest > cap) == (routing != "balanced" and cap < 32), (routing, busiest, cap)
    args = (x, gates, w1, w3, w2, experts, valid, probe)
    (_, out), grads = sharded(*args)
    (_, want), want_grads = oracle(*args)
    np.testing.assert_allclose(out, want, atol=TOL, rtol=TOL, err_msg=routing)
    assert not np.asarray(out)[~valid].any()                      # padding: exactly 0
    for name, g, w in zip(("x", "gates", "w1", "w3", "w2"), grads, want_grads):
      np.testing.assert_allclose(g, w, atol=TOL, rtol=TOL, err_msg=f"{routing} d{name}")


def test_expert_exchange_with_the_blocked_kernel_skips_empty_slots():
  """The CPU kernel on the exchange's buffers (empty slots: the sentinel
  expert id): max skew through the overflow rounds and padding, exact."""
  sharded = _exchange_value_and_grad("data2_expert4", 1.0, "experts_blocked")
  oracle = _exchange_value_and_grad(None, None, "experts_dense")
  for routing in ("skewed", "padded", "one_group_skewed"):
    x, experts, gates, valid, w1, w3, w2 = _exchange_case(routing, 4)
    probe = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    args = (x, gates, w1, w3, w2, experts, valid, probe)
    (_, out), grads = sharded(*args)
    (_, want), want_grads = oracle(*args)
    np.testing.assert_allclose(out, want, atol=TOL, rtol=TOL, err_msg=routing)
    for g, w in zip(grads, want_grads):
      np.testing.assert_allclose(g, w, atol=TOL, rtol=TOL, err_msg=routing)


@pytest.fixture(scope="module")
def padded_skewed():
  """Capacity 1.0 (C = R/P), the router skewed to expert 3, and padding:
  row r ends in 2 r padding positions, row 7 is all padding. Returns the
  inputs and a jitted value_and_grad of a loss of a usual scale (the mean
  over valid positions of the logits projected on a random unit direction)
  plus the balance loss, with the one-device result."""
  cfg = get_preset("tiny", moe_ep_capacity=1.0)
  variables = _skew(init_variables(cfg, jax.random.key(0)))
  tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, cfg.vocab_size)
  pad = np.arange(16)[None, :] >= 16 - 2 * np.arange(8)[:, None]
  pad[7] = True
  segment_ids = np.where(pad, 0, 1).astype(np.int32)
  probe = np.random.default_rng(2).standard_normal((8, 16, cfg.vocab_size)).astype(np.float32)
  probe = probe / np.sqrt(cfg.vocab_size) / (~pad).sum()

  def loss(params, rest, tokens, segment_ids):
    logits, aux = Transformer(cfg).apply({"params": params, **rest}, tokens,
                                         segment_ids=segment_ids, targets=tokens,
                                         return_aux=True)
    valid = (segment_ids != 0)[..., None]
    return (jnp.where(valid, logits * probe, 0).sum() + aux["balance_loss"],
            (logits, aux["mtp_logits"], aux["expert_load"], aux["balance_loss"]))
  fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
  params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}
  ref = jax.device_get(fn(params, rest, tokens, segment_ids))
  return variables, tokens, segment_ids, fn, ref


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sharded_padding_and_overflow_rounds_match_one_device(padded_skewed, mesh_name):
  """Padding tokens are not dispatched (their routed output is 0) and C =
  R/P sends the skewed rows in several rounds; the loss over valid
  positions, the logits there, the loads, the balance loss and every
  parameter gradient agree with one device (which dispatches padding)."""
  variables, tokens, segment_ids, fn, ((ref_loss, (ref_logits, ref_mtp, ref_load, ref_bal)),
                                       ref_grads) = padded_skewed
  assert (ref_load[:, 3] > 0.4 * ref_load.sum(-1)).all()         # one expert takes most rows
  mesh, rules = setup(MESHES[mesh_name])
  with activate(mesh, rules):
    v = jax.device_put(variables, tree_shardings(variables, mesh, rules))
    rows = batch_sharding(mesh, rules)
    args = (v["params"], {k: x for k, x in v.items() if k != "params"},
            jax.device_put(tokens, rows), jax.device_put(segment_ids, rows))
    (loss, (logits, mtp, load, bal)), grads = jax.device_get(fn(*args))
    hlo = fn.lower(*args).as_text()
  # The dispatch runs in shard_map; with experts split, rows cross devices.
  assert "all_to_all" in hlo or "all-to-all" in hlo
  valid = segment_ids != 0
  assert abs(float(loss) - float(ref_loss)) < TOL
  assert _max_diff(logits[valid], ref_logits[valid]) < TOL
  assert _max_diff(mtp[:, valid], ref_mtp[:, valid]) < TOL         # [depth, b, s, vocab]
  np.testing.assert_array_equal(load, ref_load)
  assert abs(float(bal) - float(ref_bal)) < TOL
  assert _max_diff(grads, ref_grads) < TOL


def _exchange_temp_bytes(n=128, k=4, d=128, e=16, f=32, ep=8):
  """(forward, gradient) temp bytes of the exchange compiled (not run) on
  8 devices (expert=8), and the bytes B of one [ep, C, d] f32 buffer."""
  from deepseek_jax.parallel import expert as ep_lib
  P = jax.sharding.PartitionSpec
  mesh, _ = setup(MeshConfig(data=1, expert=ep))

  def scale(x, ex, g, w1, w3, w2):    # a per-row kernel: its working set is its output
    i = jnp.clip(ex[:, 0], 0, w1.shape[0] - 1)
    return x * (g[:, 0] * w1[i, 0, 0] * w3[i, 0, 0] * w2[i, 0, 0])[:, None]

  def local(x, ex, g, w1, w3, w2):
    return ep_lib._exchanging_kernel(x, ex, g, w1, w3, w2, axis="expert", ep=ep, kernel=scale,
                                     capacity=2.0, batch_axes=("expert",))
  run = jax.shard_map(local, mesh=mesh, in_specs=(P("expert"),) * 6, out_specs=P("expert"))

  def arg(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.NamedSharding(mesh, P("expert")))
  args = (arg((ep * n, d)), arg((ep * n, k), jnp.int32), arg((ep * n, k)), arg((e, d, f)),
          arg((e, d, f)), arg((e, f, d)))
  grad = jax.grad(lambda x, *a: (run(x, *a) ** 2).sum(), argnums=(0, 2, 3, 4, 5))
  fwd_bytes, grad_bytes = (jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes
                           for fn in (run, grad))
  return fwd_bytes, grad_bytes, ep * ep_lib.exchange_capacity(n * k, ep, 2.0) * d * 4


def test_expert_exchange_memory_is_a_few_round_buffers():
  """No buffer for every row, no residuals stacked over rounds. With C = 2R/P
  (default capacity) and m = 3 overflow rounds at ep = 8, B = one [P, C, d]
  buffer. Forward: send buffer, XLA:CPU's per-destination slices of it (its
  all_to_all splits and concatenates), the receive buffer: ~3 B (+ [n, d]).
  Backward, one round at a time: that round's residuals (the kernel's input
  and the returned results, 2 B) while its cotangents cross an all_to_all
  (in, slices, out: 3 B) and the kernel's: ~6-7 B. The bounds 4 B and 8 B
  fail for the old fallback (room for every row: 8.6 B and 17.5 B), for
  un-remat'd rounds (residuals of all m rounds: 14 B) and for round 0's
  residuals held through the overflow rounds' backward (10.5 B)."""
  fwd_bytes, grad_bytes, buffer = _exchange_temp_bytes()
  assert fwd_bytes < 4 * buffer, fwd_bytes / buffer
  assert grad_bytes < 8 * buffer, grad_bytes / buffer


def test_capacity_knob_is_validated():
  with pytest.raises(ValueError, match="moe_ep_capacity=0.5 must be 0"):
    get_preset("tiny", moe_ep_capacity=0.5)


# --- the trainer on a mesh -------------------------------------------------------
@pytest.mark.slow    # CI runs it in leg 1's slow step (.ci/run)
def test_trainer_on_a_mesh_resumes_on_one_device_like_an_unsharded_run(tmp_path):
  from deepseek_jax.train import loop
  train_cfg = TrainConfig(steps=3, batch_size=8, seq_len=64, warmup_steps=0, lr=3e-3,
                          eps=1e-4, n_train_problems=40, n_eval_problems=0, max_digits=1,
                          ckpt_every=1, fast_compile=True)
  quiet = lambda s: None  # noqa: E731
  straight = loop.train(CFG, train_cfg, str(tmp_path / "one"), log=quiet)
  lines = []
  first = loop.train(CFG, train_cfg, str(tmp_path / "mesh"), stop_after=2,
                     mesh_cfg=MESHES["fsdp2_expert4"], log=lines.append)
  assert any("mesh: data=1 fsdp=2 tensor=1 expert=4" in l for l in lines)
  second = loop.train(CFG, train_cfg, str(tmp_path / "mesh"), log=quiet)   # one device
  assert second["resumed_from"] == 2
  history = first["history"] + second["history"]
  for key in ("loss", "ce", "grad_norm"):
    np.testing.assert_allclose([h[key] for h in history],
                               [h[key] for h in straight["history"]], atol=TOL, rtol=0)


def test_trainer_refuses_a_batch_the_mesh_cannot_split(tmp_path):
  from deepseek_jax.train import loop
  train_cfg = TrainConfig(steps=1, batch_size=4, seq_len=64, n_train_problems=8, warmup_steps=0,
                          n_eval_problems=0)
  with pytest.raises(ValueError, match=r"batch_size=4 must be a multiple of .*=8"):
    loop.train(CFG, train_cfg, str(tmp_path / "run"), mesh_cfg=MeshConfig(expert=8),
               log=lambda s: None)
  with pytest.raises(ValueError, match="multiplies to 2 devices, but there are 8"):
    loop.train(CFG, train_cfg, str(tmp_path / "run"), mesh_cfg=MeshConfig(data=2),
               log=lambda s: None)


# --- the memory planner ----------------------------------------------------------
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_planner_bytes_equal_the_shards_a_sharded_state_puts_on_a_device(mesh_name):
  from deepseek_jax.parallel.plan import memory_plan
  train_cfg = TrainConfig(steps=1, batch_size=8, seq_len=16, warmup_steps=0)
  mesh, rules = setup(MESHES[mesh_name])
  state = init_train_state(CFG, train_cfg, jax.random.key(0), mesh, rules)
  device = jax.devices()[0]

  def on_device(tree):   # oracle: what the real arrays hold on one device
    return sum(s.data.nbytes for leaf in jax.tree.leaves(tree)
               for s in leaf.addressable_shards if s.device == device)

  plan = memory_plan(CFG, dict(mesh.shape), MESHES[mesh_name].rules,
                     state=abstract_train_state(CFG, train_cfg), batch_size=8, seq_len=16)
  assert plan["devices"] == 8
  assert plan["params_bytes_per_device"] == on_device(state.params)
  assert plan["grads_bytes_per_device"] == on_device(state.params)
  assert plan["opt_state_bytes_per_device"] == on_device(state.opt_state)
  assert plan["activation_bytes_per_device"] > 0


def test_plan_cli_prints_v3_figures_as_one_json_line():
  import json
  import subprocess
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, "-m", "launch.plan", "--preset=v3_671b",
         "--mesh=expert=64,fsdp=32", "--seq_len=4096"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONWARNINGS="error::DeprecationWarning")
  out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  plan = json.loads(out.stdout.strip().splitlines()[-1])
  assert plan["devices"] == 2048 and plan["batch_size"] == 2048
  # Routed experts (256 x 3 x 7168 x 2048 per MoE layer, 58 layers + 1 MTP) are
  # split 2048 ways; everything else at least 32 ways (fsdp).
  routed = 59 * 256 * 3 * 7168 * 2048 * 4
  assert routed // 2048 < plan["params_bytes_per_device"] < routed // 2048 + 30e9 // 32 * 4
  assert plan["opt_state_bytes_per_device"] >= 2 * plan["params_bytes_per_device"]
  bad = subprocess.run(cmd[:3] + ["--mesh=experts=64"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0 and "'experts=64' must be AXIS=SIZE" in bad.stderr
