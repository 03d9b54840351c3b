"""DeepSeek-V2's expert-, device- and communication-level balance losses.

Oracles: the V2 report's formulas written out as plain Python loops over
sequences, tokens, experts and devices (float64), hand-computed small cases,
and, for the trainer, the step's own metrics (the loss is recomputed from
them) and the same computation on one device vs an 8-device CPU mesh.
Everything that compiles a model shares one small configuration (one MoE
layer plus one MoE MTP block).
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import get_preset
from deepseek_jax.model import Transformer, moe
from deepseek_jax.parallel import MeshConfig, activate, batch_sharding, setup, tree_shardings
from deepseek_jax.train import loop, losses, step
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.loop import check_compatible

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
from train_throughput import random_batch  # noqa: E402

# E = 8 experts in n_expert_groups = 4 groups, 2 of them per token: the
# trainer's default D = 4, M = 2. One MoE layer and one MoE MTP block.
CFG = get_preset("tiny", n_layers=1, n_dense_layers=0, dim=32, vocab_size=128)
D, M = 4, 2
TOL = 1e-5
WEIGHTS = dict(expert_balance_weight=0.1, device_balance_weight=0.2, comm_balance_weight=0.3)


# ---------------------------------------------------------------------------
# The formulas, transcribed
# ---------------------------------------------------------------------------
def loop_losses(scores, topk, valid, n_dev, max_dev):
  """V2 report eqs. (expert, device, communication balance), one sequence at a time."""
  b, t_len, n_exp = scores.shape
  k = topk.shape[-1]
  per_dev = n_exp // n_dev
  groups = [list(range(d * per_dev, (d + 1) * per_dev)) for d in range(n_dev)]
  totals = {"expert": 0.0, "device": 0.0, "comm": 0.0}
  n_seqs = 0
  for i in range(b):
    toks = [t for t in range(t_len) if valid[i, t]]
    if not toks:
      continue
    n_seqs += 1
    T = len(toks)
    f = [n_exp / (k * T) * sum(1 for t in toks if e in list(topk[i, t])) for e in range(n_exp)]
    p = [sum(float(scores[i, t, e]) for t in toks) / T for e in range(n_exp)]
    totals["expert"] += sum(f[e] * p[e] for e in range(n_exp))
    for d, members in enumerate(groups):
      f_dev = sum(f[j] for j in members) / len(members)
      p_dev = sum(p[j] for j in members)
      sends = sum(1 for t in toks if any(int(e) in members for e in topk[i, t]))
      f_comm = n_dev / (max_dev * T) * sends
      totals["device"] += f_dev * p_dev
      totals["comm"] += f_comm * p_dev
  return {key: v / max(n_seqs, 1) for key, v in totals.items()}


def _random_case(seed, b=4, t=9, n_exp=8, k=3):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(b, t, n_exp)) * 2
  scores = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
  topk = np.stack([[rng.permutation(n_exp)[:k] for _ in range(t)] for _ in range(b)])
  valid = np.ones((b, t), bool)
  valid[1, 5:] = False          # padding at the end of a row
  valid[2, :] = False           # a fully padded row: not counted
  valid[3, ::2] = False         # holes
  return scores, topk.astype(np.int32), valid


@pytest.mark.parametrize("n_dev,max_dev", [(4, 2), (2, 1), (8, 3)])
def test_losses_match_loop_transcription(n_dev, max_dev):
  scores, topk, valid = _random_case(n_dev * 10 + max_dev)
  got = moe.v2_balance_losses(jnp.asarray(scores), jnp.asarray(topk), n_devices=n_dev,
                              max_devices=max_dev, valid=jnp.asarray(valid))
  want = loop_losses(scores, topk, valid, n_dev, max_dev)
  for key in ("expert", "device", "comm"):
    np.testing.assert_allclose(float(got[key]), want[key], rtol=1e-6, atol=1e-6, err_msg=key)
  # The terms form: sums over the non-empty sequences and their number.
  sums, n_seqs = moe.v2_balance_terms(jnp.asarray(scores), jnp.asarray(topk),
                                      n_devices=n_dev, max_devices=max_dev,
                                      valid=jnp.asarray(valid))
  assert float(n_seqs) == 3
  np.testing.assert_allclose(float(sums["comm"]) / 3, want["comm"], rtol=1e-6, atol=1e-6)
  # valid=None: every token counts.
  everything = np.ones_like(valid)
  got = moe.v2_balance_losses(jnp.asarray(scores), jnp.asarray(topk), n_devices=n_dev,
                              max_devices=max_dev)
  want = loop_losses(scores, topk, everything, n_dev, max_dev)
  np.testing.assert_allclose(float(got["device"]), want["device"], rtol=1e-6, atol=1e-6)


def test_a_token_with_two_experts_on_one_device_counts_once_for_that_device():
  # E = 4 on D = 2 devices ({0, 1}, {2, 3}), K = 2, uniform scores, M = 1.
  # Token 0 picks experts 0 and 1 (both on device 0), token 1 picks 0 and 2.
  scores = jnp.full((1, 2, 4), 0.25)
  topk = jnp.array([[[0, 1], [0, 2]]])
  got = moe.v2_balance_losses(scores, topk, n_devices=2, max_devices=1)
  # f'' = D / (M T) x tokens sending = 2 / 2 x (2, 1) = (2, 1); P'' = (0.5, 0.5).
  assert float(got["comm"]) == pytest.approx(2 * 0.5 + 1 * 0.5, abs=1e-6)
  # f = 4 / (2 x 2) x (2, 1, 1, 0) = (2, 1, 1, 0), P_i = 0.25: expert = 1.
  assert float(got["expert"]) == pytest.approx(1.0, abs=1e-6)
  # f' = (1.5, 0.5), P' = (0.5, 0.5): device = 1.
  assert float(got["device"]) == pytest.approx(1.0, abs=1e-6)
  np.testing.assert_allclose(
      float(got["comm"]), loop_losses(np.asarray(scores), np.asarray(topk),
                                      np.ones((1, 2), bool), 2, 1)["comm"], rtol=1e-6)


def test_perfectly_balanced_routing_with_uniform_scores_gives_one():
  # 8 tokens, E = 8, K = 1: token t takes expert t; every f_i = 1, P_i = 1/8.
  scores = jnp.full((2, 8, 8), 1 / 8)
  topk = jnp.tile(jnp.arange(8)[None, :, None], (2, 1, 1))
  for n_dev in (1, 2, 4, 8):
    got = moe.v2_balance_losses(scores, topk, n_devices=n_dev, max_devices=1)
    for key in ("expert", "device", "comm"):
      assert float(got[key]) == pytest.approx(1.0, abs=1e-6), (n_dev, key)
  # All tokens on expert 0 (device 0): expert loss = E x P_0 = 8 / 8 = 1 with
  # uniform scores, the comm loss with D = 4, M = 1: f''_0 = 4, P''_0 = 1/4.
  got = moe.v2_balance_losses(scores, jnp.zeros((2, 8, 1), jnp.int32), n_devices=4,
                              max_devices=1)
  assert float(got["comm"]) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("n_dev,max_dev,match", [
    (3, 1, "n_devices=3 must be a positive divisor of the 8 routed experts"),
    (0, 1, "n_devices=0"),
    (4, 0, r"max_devices=0 must be in \[1, n_devices=4\]"),
    (4, 5, r"max_devices=5 must be in \[1, n_devices=4\]")])
def test_bad_devices_are_refused(n_dev, max_dev, match):
  scores, topk, valid = _random_case(0)
  with pytest.raises(ValueError, match=match):
    moe.v2_balance_losses(jnp.asarray(scores), jnp.asarray(topk), n_devices=n_dev,
                          max_devices=max_dev, valid=jnp.asarray(valid))


def test_train_config_validates_weights_and_balance_devices():
  with pytest.raises(ValueError, match="comm_balance_weight=-1"):
    TrainConfig(comm_balance_weight=-1.0)
  with pytest.raises(ValueError, match="balance_devices"):
    TrainConfig(balance_devices=-2)
  bad = TrainConfig(expert_balance_weight=0.1, balance_devices=3, seq_len=16)
  with pytest.raises(ValueError, match="balance_devices=3 must divide n_routed_experts=8"):
    check_compatible(CFG, bad)
  # D and M the trainer uses: groups of the router = devices -> M = n_limited_groups.
  tc = TrainConfig(seq_len=16, **WEIGHTS)
  assert step.v2_balance_devices(CFG, tc) == (4, 2)
  assert step.v2_balance_devices(CFG, TrainConfig(seq_len=16, balance_devices=2,
                                                  **WEIGHTS)) == (2, 2)
  assert step.v2_balance_devices(CFG, TrainConfig(seq_len=16)) == (0, 0)     # off
  mesh, rules = setup(MeshConfig(data=1, fsdp=4, expert=2))
  assert step.v2_balance_devices(CFG, tc, mesh, rules) == (2, 2)   # the EP degree


def test_total_loss_adds_alpha_weighted_layer_sums():
  rng = np.random.default_rng(1)
  batch = random_batch(32, 2, 8, seed=0)
  logits = jnp.asarray(rng.normal(size=(2, 8, 32)), jnp.float32)
  v2 = {"expert": jnp.array([1.1, 1.3]), "device": jnp.array([0.9, 1.2]),
        "comm": jnp.array([0.7, 0.4])}
  aux = {"balance_loss": jnp.float32(2.0), "v2_balance": v2}
  loss, m = losses.total_loss(logits, aux, batch, mtp_weight=0.3, balance_weight=0.01,
                              **WEIGHTS)
  ce = losses.cross_entropy(logits, batch["targets"], batch["loss_mask"])[0]
  want = ce + 0.01 * 2.0 + 0.1 * 2.4 + 0.2 * 2.1 + 0.3 * 1.1
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
  np.testing.assert_allclose(m["balance_device_per_layer"], [0.9, 1.2])
  assert float(m["balance_comm"]) == pytest.approx(1.1)
  # Without the model's V2 losses the weights cannot be honoured.
  with pytest.raises(ValueError, match="balance_devices"):
    losses.total_loss(logits, {"balance_loss": jnp.float32(0.0)}, batch, mtp_weight=0.0,
                      balance_weight=0.0, expert_balance_weight=0.1)


# ---------------------------------------------------------------------------
# The model: per-layer values, gradient to the router, mesh == one device
# ---------------------------------------------------------------------------
def test_moe_layer_reports_the_losses_of_its_own_routing(steps):
  layer = moe.MoE(CFG, balance_devices=D, balance_max_devices=M)
  x = jax.random.normal(jax.random.key(0), (3, 6, CFG.dim))
  valid = jnp.array([[1] * 6, [1, 1, 1, 1, 0, 0], [0] * 6], bool)
  # The model's MoE layer (layer axis dropped), with a bias that moves the choice.
  variables = {"params": jax.tree.map(lambda a: a[0], steps[2]["params"]["moe_layers"]["ffn"]),
               "router_bias": {"bias": jnp.linspace(-0.3, 0.2, CFG.n_routed_experts)}}
  _, aux = jax.jit(layer.apply)(variables, x, valid)
  logits = x.reshape(-1, CFG.dim) @ variables["params"]["gate"]
  _, experts, scores = moe.route(logits, variables["router_bias"]["bias"], CFG)
  scores = scores / scores.sum(-1, keepdims=True)      # sigmoid router: normalised
  want = loop_losses(np.asarray(scores).reshape(3, 6, -1),
                     np.asarray(experts).reshape(3, 6, -1), np.asarray(valid), D, M)
  for key in ("expert", "device", "comm"):
    np.testing.assert_allclose(float(aux["v2_balance"][key]), want[key], rtol=1e-5)


@pytest.fixture(scope="module")
def model_case(steps):
  variables = steps[2]          # the train steps' initial variables (one init compile)
  batch = random_batch(CFG.vocab_size, 8, 16, seed=1)
  seg = batch["segment_ids"].copy()
  seg[2, 10:] = 0                # padding
  seg[5, :] = 0                  # a fully padded row
  model = Transformer(CFG, balance_devices=D, balance_max_devices=M)

  def expert_loss(params, router_bias, tokens, segment_ids):
    _, aux = model.apply({"params": params, "router_bias": router_bias}, tokens,
                         segment_ids=segment_ids, targets=tokens, return_aux=True)
    return aux["v2_balance"]["expert"].sum(), aux["v2_balance"]

  fn = jax.jit(jax.value_and_grad(expert_loss, has_aux=True))
  args = (variables["params"], variables["router_bias"], batch["tokens"], seg)
  return fn, args, jax.device_get(fn(*args))


def test_expert_loss_gradient_reaches_the_router_gates_only_upstream(model_case):
  _, _, ((total, per_layer), grads) = model_case
  assert per_layer["expert"].shape == (2,)          # the MoE layer, then the MTP block
  np.testing.assert_allclose(per_layer["expert"].sum(), total, rtol=1e-6)
  assert np.abs(grads["moe_layers"]["ffn"]["gate"]).max() > 1e-4
  assert np.abs(grads["mtp_0"]["block"]["ffn"]["gate"]).max() > 1e-4
  # The loss reads routing scores only: no gradient to the head, nor to the
  # last MoE layer's experts (nothing routes after them).
  assert np.abs(grads["head"]["kernel"]).max() == 0
  assert np.abs(grads["mtp_0"]["block"]["ffn"]["w1"]).max() == 0


def test_mesh_values_equal_one_device(model_case):
  # Each device routes its own rows; the sums over sequences and their count
  # are psum-ed over the batch axes (gradients: the slow train-step test).
  _, args, ((_, ref), _) = model_case
  model = Transformer(CFG, balance_devices=D, balance_max_devices=M)
  forward = jax.jit(lambda v, t, s: model.apply(v, t, segment_ids=s, targets=t,
                                                return_aux=True)[1]["v2_balance"])
  mesh, rules = setup(MeshConfig(data=1, fsdp=2, expert=4))
  variables = {"params": args[0], "router_bias": args[1]}
  rows = batch_sharding(mesh, rules)
  with activate(mesh, rules):
    got = forward(jax.device_put(variables, tree_shardings(variables, mesh, rules)),
                  jax.device_put(args[2], rows), jax.device_put(args[3], rows))
  for key in ("expert", "device", "comm"):
    np.testing.assert_allclose(np.asarray(got[key]), ref[key], atol=TOL, err_msg=key)


# ---------------------------------------------------------------------------
# The train step
# ---------------------------------------------------------------------------
def _train_cfg(**weights):
  # eps = 1 and no clipping or decay: the first AdamW update is ~lr x gradient
  # (not lr x sign), so a change of gradient shows in the parameters.
  return TrainConfig(steps=2, batch_size=8, seq_len=16, warmup_steps=0, lr=1e-2, eps=1.0,
                     weight_decay=0.0, clip_norm=0.0, mtp_weight=0.3, balance_weight=0.01,
                     bias_update_speed=0.01, fast_compile=True, **weights)


@pytest.fixture(scope="module")
def steps():
  batch = random_batch(CFG.vocab_size, 8, 16, seed=2)
  batch["segment_ids"][3, 12:] = 0
  batch["loss_mask"][3, 12:] = 0
  out = {}
  for name, weights in (("off", {}), ("v2", WEIGHTS)):
    tc = _train_cfg(**weights)
    state = step.init_train_state(CFG, tc, jax.random.key(0))
    init = jax.device_get({"params": state.params, "router_bias": state.router_bias})
    out[name] = jax.device_get(step.make_train_step(CFG, tc)(state, batch))
  return batch, out, init


def test_step_loss_is_the_sum_of_its_weighted_metrics(steps):
  _, out, _ = steps
  _, m = out["v2"]
  want = (m["ce"] + 0.3 * m["mtp"] + 0.01 * m["balance"] + 0.1 * m["balance_expert"]
          + 0.2 * m["balance_device"] + 0.3 * m["balance_comm"])
  np.testing.assert_allclose(m["loss"], want, rtol=1e-6)
  for key in ("balance_expert", "balance_device", "balance_comm"):
    per_layer = m[f"{key}_per_layer"]
    assert per_layer.shape == (CFG.n_moe_layers + CFG.n_mtp_depth,)
    np.testing.assert_allclose(per_layer.sum(), m[key], rtol=1e-6)
    assert np.isfinite(per_layer).all() and (per_layer > 0).all()
  # Sigmoid scores normalised per token: V2's expert loss is V3's balance loss.
  np.testing.assert_allclose(m["balance_expert"], m["balance"], rtol=1e-5)
  # All weights 0: no V2 metric, same V3 numbers.
  _, m_off = out["off"]
  assert not any(k.startswith("balance_") for k in m_off)
  for key in ("ce", "mtp", "balance"):
    np.testing.assert_allclose(m_off[key], m[key], rtol=1e-6)
  np.testing.assert_array_equal(m_off["expert_load"], m["expert_load"])


def test_v2_gradient_moves_the_router_gates(steps):
  _, out, _ = steps
  (off, _), (v2, _) = out["off"], out["v2"]
  gate_diff = [np.abs(a["ffn"]["gate"] - b["ffn"]["gate"]).max() for a, b in (
      (v2.params["moe_layers"], off.params["moe_layers"]),
      (v2.params["mtp_0"]["block"], off.params["mtp_0"]["block"]))]
  assert min(gate_diff) > 1e-6, gate_diff
  # The head is downstream of routing only through the expert outputs,
  # which the V2 losses do not read: its update is unchanged.
  np.testing.assert_allclose(v2.params["head"]["kernel"], off.params["head"]["kernel"],
                             atol=1e-7)


@pytest.mark.slow
def test_sharded_train_step_v2_metrics_equal_one_device(steps):
  batch, out, _ = steps
  ref_state, ref = out["v2"]
  tc = _train_cfg(**WEIGHTS)
  mesh, rules = setup(MeshConfig(data=1, fsdp=2, expert=4))
  state = step.init_train_state(CFG, tc, jax.random.key(0), mesh, rules)
  new, m = jax.device_get(step.make_train_step(CFG, tc, mesh, rules)(state, batch))
  for key in ("loss", "balance", "balance_expert", "balance_device", "balance_comm"):
    np.testing.assert_allclose(m[key], ref[key], atol=TOL, err_msg=key)
  for key in ("balance_expert_per_layer", "balance_device_per_layer", "balance_comm_per_layer"):
    np.testing.assert_allclose(m[key], ref[key], atol=TOL, err_msg=key)
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(ref_state.params)):
    np.testing.assert_allclose(a, b, atol=TOL)       # same gradients, same update


def test_trainer_logs_layer_sums_and_per_layer_lists(tmp_path, monkeypatch):
  # The loop's handling of the V2 metrics, with a stand-in step (no compile).
  per_layer = {"balance_expert_per_layer": np.array([1.25, 1.5], np.float32),
               "balance_device_per_layer": np.array([1.0, 1.125], np.float32),
               "balance_comm_per_layer": np.array([0.5, 0.75], np.float32)}
  metrics = {"loss": 3.0, "ce": 2.5, "mtp": 2.75, "balance": 2.0, "grad_norm": 1.0,
             "lr": 1e-3, "load_imbalance": 1.5, "tokens": 128.0, "target_tokens": 100.0,
             "expert_load": np.ones((CFG.n_moe_layers, CFG.n_routed_experts), np.float32),
             "balance_expert": 2.75, "balance_device": 2.125, "balance_comm": 1.25,
             **per_layer}

  def fake_step(state, batch):
    return state.replace(step=state.step + 1), dict(metrics)
  monkeypatch.setattr(loop, "make_train_step", lambda *args: fake_step)
  monkeypatch.setattr(loop.metrics, "plot_losses", lambda workdir: None)   # not tested here
  tc = TrainConfig(steps=2, warmup_steps=1, batch_size=8, seq_len=64, n_train_problems=16,
                   n_eval_problems=0,
                   max_digits=1, ckpt_every=2, keep_ckpts=1, log_every=1, **WEIGHTS)
  lines = []
  summary = loop.train(CFG, tc, str(tmp_path), log=lines.append)
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in records] == [1, 2]
  for key, want in per_layer.items():
    assert records[-1][key] == want.tolist(), key
  assert records[-1]["balance_comm"] == 1.25
  assert summary["history"][-1]["balance_expert"] == 2.75
  assert any("v2 2.750/2.125/1.250" in line for line in lines), lines
