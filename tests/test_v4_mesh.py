"""DeepSeek-V4 (model/v4.py) on a mesh: sharded train steps equal one device,
a run saved and resumed continues as an unbroken one, bad configs are
refused in one line before anything compiles.

The oracle is the same model on one device (tests/test_v4.py holds that one
against transformers). Every V4 leaf resolves to logical axes
(parallel/rules.py); the meshes split the batch (data, fsdp, expert), the
width (fsdp, and expert outside the experts under ep_fsdp), heads and
output-projection groups (tensor) and the routed experts (expert: the
score-routed and the hash-routed MoE layers both dispatch through the
expert exchange).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import ModelConfig, get_preset
from deepseek_jax.model import abstract_variables
from deepseek_jax.parallel import MeshConfig, RULE_SETS, setup, tree_shardings
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.step import abstract_train_state, init_train_state, make_train_step

# tiny_v4 cut to two blocks: CSA with a hash-routed MoE, HCA with a
# score-routed one; the MTP block is a sliding-window layer. Every layer
# type and both MoE kinds, at half the compile time of the four-block preset.
CFG = get_preset("tiny_v4", n_layers=2,
                 layer_types=("compressed_sparse_attention", "heavily_compressed_attention"),
                 mlp_layer_types=("hash_moe", "moe"))
TOL = 1e-5
STEPS = 2
BATCH, SEQ = 8, 32          # past the sliding window (8) and the CSA / HCA blocks (4 / 8)
MESHES = {
    # no expert parallelism: heads, groups, hidden units and vocab over tensor
    "fsdp_tp": MeshConfig(data=2, fsdp=2, tensor=2, rules="fsdp_tp"),
    # the 8 routed experts over expert = 4 (2 a device; rows cross devices),
    # expert one more FSDP axis elsewhere
    "ep_fsdp": MeshConfig(data=1, fsdp=2, expert=4, rules="ep_fsdp"),
}
# Adam's eps = 1e-4 keeps the update Lipschitz in the gradient (as
# tests/test_parallel.py): the comparison tests the sharding, not Adam's
# amplification of a 1e-9 summation-order difference in a tiny gradient.
TRAIN = TrainConfig(steps=STEPS, batch_size=BATCH, seq_len=SEQ, warmup_steps=0, lr=1e-2,
                    eps=1e-4, bias_update_speed=0.01, fast_compile=True)


def _max_diff(a, b) -> float:
  return max(float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max())
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _batches():
  rng = np.random.default_rng(0)
  out = []
  for _ in range(STEPS):
    t = rng.integers(0, CFG.vocab_size, (BATCH, SEQ + 1)).astype(np.int32)
    out.append({"tokens": t[:, :-1], "targets": t[:, 1:],
                "segment_ids": np.ones((BATCH, SEQ), np.int32),
                "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (BATCH, SEQ)),
                "loss_mask": np.ones((BATCH, SEQ), np.float32)})
  return out


def _train(mesh=None, rules=None):
  """STEPS steps from the same init: (per-step metrics, final state, the
  initial router biases) on host."""
  state = init_train_state(CFG, TRAIN, jax.random.key(0), mesh, rules)
  bias0 = jax.device_get(state.router_bias)           # the step donates the state
  step = make_train_step(CFG, TRAIN, mesh, rules)
  history = []
  for batch in _batches():
    state, metrics = step(state, batch)
    history.append(jax.device_get(metrics))
  return history, jax.device_get(state), bias0


@pytest.fixture(scope="module")
def one_device():
  return _train()


# --- logical axes ----------------------------------------------------------------
GOLDEN = {   # tiny_v4 on fsdp 2 x tensor 2 x expert 2
    "fsdp_tp": {
        "params/layers_1/attn/wq_b/kernel": ("fsdp", "tensor", None),
        "params/layers_1/attn/wkv/kernel": ("fsdp", None),
        "params/layers_1/attn/sinks": ("tensor",),
        "params/layers_1/attn/wo_a/kernel": ("tensor", "fsdp", None),
        "params/layers_1/attn/wo_b/kernel": ("tensor", "fsdp"),
        "params/layers_0/attn/compressor/wgate/kernel": ("fsdp", None),
        "params/layers_0/attn/compressor/ape": (None, None),
        "params/layers_0/attn/indexer/wq_b/kernel": ("fsdp", "tensor", None),
        "params/layers_1/attn_hc/fn": ("fsdp", None),
        "params/layers_1/ffn_hc/base": (None,),
        "params/hc_head/fn": ("fsdp", None),
        "params/layers_0/ffn/w1": ("expert", "fsdp", "tensor"),
        "params/mtp_0/block/attn/wo_a/kernel": ("tensor", "fsdp", None),
        "router_bias/layers_0/tid2eid": (None, None),
        "router_bias/layers_1/ffn/bias": (None,),
    },
    "ep_fsdp": {
        "params/layers_1/attn/wkv/kernel": (("fsdp", "expert"), None),
        "params/layers_1/attn/wo_a/kernel": ("tensor", ("fsdp", "expert"), None),
        "params/layers_1/attn/wo_b/kernel": ("tensor", ("fsdp", "expert")),
        "params/layers_0/ffn/w1": ("expert", "fsdp", "tensor"),
        "params/layers_1/attn_hc/fn": (("fsdp", "expert"), None),
        "router_bias/layers_0/tid2eid": (None, None),
    },
}


@pytest.mark.parametrize("rule_set", sorted(RULE_SETS))
def test_every_v4_leaf_has_logical_axes(rule_set):
  """The whole train state (parameters, hash tables, router biases, Adam
  moments) resolves under every rule set (an unnamed leaf is a ValueError,
  below); golden specs for the new parameters."""
  mesh, rules = setup(MeshConfig(data=1, fsdp=2, tensor=2, expert=2, rules=rule_set))
  state = abstract_train_state(CFG, TRAIN, mesh, rules)
  got = {"/".join(str(getattr(k, "key", k)) for k in path): tuple(s.sharding.spec)
         for path, s in jax.tree_util.tree_leaves_with_path(
             {"params": state.params, "router_bias": state.router_bias})}
  for name, spec in GOLDEN.get(rule_set, {}).items():
    assert got[name] == spec, (name, got[name])
  if rule_set == "ep_fsdp":
    # As V3's: no weight of rank >= 2 is replicated over `expert` (one more
    # FSDP axis outside the routed experts); the hash tables are not weights.
    for name, spec in got.items():
      flat = [a for entry in spec for a in ((entry,) if isinstance(entry, str) else entry or ())]
      if name.startswith("params/") and len(spec) >= 2:
        assert "expert" in flat, (name, spec)


def test_an_unnamed_leaf_is_refused(monkeypatch):
  from deepseek_jax.parallel import rules as rules_lib
  monkeypatch.delitem(rules_lib._PARAM_AXES, ("wo_a", "kernel"))
  mesh, rules = setup(MESHES["fsdp_tp"])
  with pytest.raises(ValueError, match=r"no logical axis names for .*wo_a/kernel"):
    tree_shardings(abstract_variables(CFG), mesh, rules)


# --- training ----------------------------------------------------------------------
@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_sharded_v4_training_equals_one_device(one_device, mesh_name):
  """Two steps (losses, gradient norms, expert loads, the moved router
  biases and parameters) on 8 devices equal one device within 1e-5."""
  ref_history, ref, bias0 = one_device
  mesh, rules = setup(MESHES[mesh_name])
  history, state, _ = _train(mesh, rules)
  for got, want in zip(history, ref_history):
    for key in ("loss", "ce", "mtp", "balance", "grad_norm"):
      assert abs(float(got[key]) - float(want[key])) < TOL, key
    np.testing.assert_array_equal(got["expert_load"], want["expert_load"])
  assert _max_diff(state.params, ref.params) < TOL
  assert _max_diff(state.router_bias, ref.router_bias) < TOL
  np.testing.assert_array_equal(state.router_bias["layers_0"]["tid2eid"],
                                ref.router_bias["layers_0"]["tid2eid"])
  # The steps did move the score-routed layers' biases (not a frozen run).
  assert _max_diff(state.router_bias["layers_1"], bias0["layers_1"]) > 0


@pytest.mark.slow    # ~2 min: three runs of the trainer (one device, mesh, mesh resumed)
def test_v4_run_on_a_mesh_resumes_like_an_unbroken_run(tmp_path):
  """loop.train on ep_fsdp stopped after step 2 (checkpoint) and rerun:
  the resumed run's step 3 and the steps before equal an unbroken
  one-device run's."""
  from deepseek_jax.train import loop
  train_cfg = TrainConfig(steps=3, batch_size=8, seq_len=64, warmup_steps=0, lr=1e-2,
                          eps=1e-4, bias_update_speed=0.01, n_train_problems=40,
                          n_eval_problems=0, max_digits=1, ckpt_every=1, fast_compile=True)
  quiet = lambda s: None  # noqa: E731
  straight = loop.train(CFG, train_cfg, str(tmp_path / "one"), log=quiet)
  first = loop.train(CFG, train_cfg, str(tmp_path / "mesh"), stop_after=2,
                     mesh_cfg=MESHES["ep_fsdp"], log=quiet)
  second = loop.train(CFG, train_cfg, str(tmp_path / "mesh"), mesh_cfg=MESHES["ep_fsdp"],
                      log=quiet)
  assert first["final_step"] == 2 and second["resumed_from"] == 2
  history = first["history"] + second["history"]
  assert [h["step"] for h in history] == [1, 2, 3]
  for key in ("loss", "ce", "mtp", "grad_norm"):
    np.testing.assert_allclose([h[key] for h in history],
                               [h[key] for h in straight["history"]], atol=TOL, rtol=0)


# --- refusals ----------------------------------------------------------------------
@pytest.mark.parametrize("change, match", [
    (dict(layer_types=["sliding_attention", "full_attention"]),
     "layer_types entry 'full_attention' is not a V4 layer type"),
    (dict(mlp_layer_types=["hash_moe", "dense"]), "mlp_layer_types entry 'dense'"),
    (dict(index_topk=129), "index_topk=129 exceeds max_seq_len=128"),
    (dict(hc_mult=0), "hc_mult=0 must be a positive integer"),
])
def test_bad_v4_configs_are_refused_in_one_line(change, match):
  """As a run's config.json or command line gives them (from_dict)."""
  with pytest.raises(ValueError, match=match) as info:
    ModelConfig.from_dict({**CFG.to_dict(), **change})
  assert "\n" not in str(info.value)


def test_v4_on_a_pipeline_is_refused_before_anything_compiles(monkeypatch):
  mesh, rules = setup(MeshConfig(data=2, fsdp=2, pipe=2, rules="fsdp"))
  key = jax.random.key(0)

  def no_compile(*args, **kwargs):
    raise AssertionError("compiled before refusing")
  monkeypatch.setattr(jax, "jit", no_compile)
  for make in (lambda: init_train_state(CFG, TRAIN, key, mesh, rules),
               lambda: abstract_train_state(CFG, TRAIN, mesh, rules),
               lambda: make_train_step(CFG, TRAIN, mesh, rules)):
    with pytest.raises(NotImplementedError, match="arch='v4' has no pipeline") as info:
      make()
    assert "\n" not in str(info.value)
