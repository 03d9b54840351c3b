"""optimizer="muon" (train/optimizer.py make_muon): DeepSeek-V4's optimizer.

Oracles: optax's own `contrib.muon` applied by hand to the same gradients,
with the matrix layout of every leaf written out here (not read from
`muon_labels`), plus the decoupled weight decay of the AdamW leaves our
optimizer adds; a NumPy float64 Newton-Schulz for one stacked, multi-head
weight; the parameters' logical axes (parallel/rules.py) for which axes are
batch axes; one device for an 8-device mesh step; a straight run for a
resumed one.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib import MuonDimensionNumbers as Dims

from deepseek_jax import get_preset
from deepseek_jax.model import abstract_variables
from deepseek_jax.parallel import MeshConfig, setup
from deepseek_jax.parallel.rules import logical_axes
from deepseek_jax.train import checkpoint, optimizer
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.start import resume_or_start
from deepseek_jax.train.step import abstract_train_state, init_train_state, make_train_step

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
from train_throughput import random_batch  # noqa: E402

CFG = get_preset("tiny")
# A tree named like the model's: stacked layers [L, ...], heads, experts.
SHAPES = {
    "embed": {"embedding": (32, 12)},
    "head": {"kernel": (12, 32)},
    "norm": {"scale": (12,)},
    "moe_layers": {"attn": {"wq_b": {"kernel": (2, 8, 3, 4)}, "wo": {"kernel": (2, 3, 4, 12)}},
                   "attn_norm": {"scale": (2, 12)},
                   "ffn": {"gate": (2, 12, 4), "w1": (2, 4, 12, 6)}},
    "dense_layers": {"mlp": {"w2": {"kernel": (1, 24, 12)}}},
    "attn": {"wq": {"bias": (3, 4)}},
}
# The matrix of each leaf (None: AdamW), written out by hand.
HAND_DIMS = {
    "embed": {"embedding": None}, "head": {"kernel": None}, "norm": {"scale": None},
    "moe_layers": {"attn": {"wq_b": {"kernel": Dims((1,), (2, 3))},
                            "wo": {"kernel": Dims((1, 2), (3,))}},
                   "attn_norm": {"scale": None},
                   "ffn": {"gate": Dims((1,), (2,)), "w1": Dims((2,), (3,))}},
    "dense_layers": {"mlp": {"w2": {"kernel": Dims((1,), (2,))}}},
    "attn": {"wq": {"bias": None}},
}
LR, WD = 1e-2, 0.1


def _is_shape(x):
  return isinstance(x, tuple) and all(isinstance(n, int) for n in x)


def _tree(rng, scale=1.0):
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s) * scale, jnp.float32), SHAPES,
                      is_leaf=_is_shape)


def _newton_schulz(x):
  """Muon's orthogonalisation in float64, transcribed from Keller Jordan's."""
  a, b, c = optimizer.NS_COEFFS
  x = x / (np.linalg.norm(x) + 1e-8)
  flip = x.shape[0] > x.shape[1]
  x = x.T if flip else x
  for _ in range(5):
    g = x @ x.T
    x = a * x + (b * g + c * g @ g) @ x
  return x.T if flip else x


def test_muon_steps_equal_optax_contrib_muon_applied_by_hand():
  rng = np.random.default_rng(0)
  params = _tree(rng)
  grads_seq = [_tree(rng, 3.0 if i % 2 else 0.01) for i in range(4)]   # clipped, then not
  sched = optax.constant_schedule(LR)
  tx = optimizer.make_muon(sched, weight_decay=WD)
  step = jax.jit(lambda g, s, p, ok: optimizer.apply_update(tx, g, s, p, keep_if=ok))
  ref = optax.chain(optax.clip_by_global_norm(1.0), optax.contrib.muon(
      sched, ns_steps=5, beta=0.95, eps=1e-8, weight_decay=WD, nesterov=True, adam_b1=0.9,
      adam_b2=0.95, adam_weight_decay=0.0, muon_weight_dimension_numbers=HAND_DIMS,
      consistent_rms=0.2))
  ref_update = jax.jit(ref.update)
  p, state, want, ref_state = params, tx.init(params), params, ref.init(params)
  for i, g in enumerate(grads_seq):
    p, state = step(g, state, p, True)
    kept = step(jax.tree.map(lambda x: x * jnp.nan, g), state, p, False)   # a skipped step
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((a == b).all()), kept, (p, state))))
    u, ref_state = ref_update(g, ref_state, want)
    # AdamW's decoupled decay on the embedding and the head (not norms, biases).
    u["embed"]["embedding"] = u["embed"]["embedding"] - LR * WD * want["embed"]["embedding"]
    u["head"]["kernel"] = u["head"]["kernel"] - LR * WD * want["head"]["kernel"]
    want = optax.apply_updates(want, u)
    if i == 0:          # unclipped first step: wq_b per layer is one [8, 3 x 4] matrix
      w0, g0 = (np.asarray(t["moe_layers"]["attn"]["wq_b"]["kernel"], np.float64)
                for t in (params, g))
      ortho = np.stack([_newton_schulz(m.reshape(8, 12)).reshape(8, 3, 4) for m in g0])
      expect = w0 - LR * (0.2 * np.sqrt(12) * ortho + WD * w0)
      np.testing.assert_allclose(p["moe_layers"]["attn"]["wq_b"]["kernel"], expect, atol=1e-6)
  for got, exp in zip(jax.tree.leaves(p), jax.tree.leaves(want)):
    np.testing.assert_allclose(got, exp, rtol=0, atol=1e-6)
  # The stored state: optax's, without the Newton-Schulz constants.
  mu = [n for n in jax.tree.leaves(state, is_leaf=lambda n: isinstance(
      n, optax.contrib.MuonState)) if isinstance(n, optax.contrib.MuonState)][0]
  assert mu.ns_coeffs == () and int(mu.count) == len(grads_seq)


@pytest.mark.parametrize("preset", ["tiny", "tiny_v4", "tiny_qwen2", "tiny_v32"])
def test_adamw_trains_embedding_head_norms_and_biases_muon_the_matrices(preset):
  params = abstract_variables(get_preset(preset))["params"]
  labels = optimizer.muon_labels(params)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  dims = jax.tree.leaves(labels, is_leaf=lambda x: x is None or isinstance(x, Dims))
  adamw, muon = set(), {}
  for (path, leaf), d in zip(flat, dims):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if d is None:
      adamw.add(name)
    else:
      muon[name] = (leaf, d)
  leafname = lambda n: n.split("/")[-1]  # noqa: E731
  # AdamW: exactly the embedding, the head, norm scales, biases (V4: mHC's
  # static base and gating scale, the compressors' slot bias, attention sinks).
  allowed = {"embedding", "scale", "bias", "base", "ape", "sinks"}
  assert all(leafname(n) in allowed or n.startswith("head/") for n in adamw), adamw
  assert "embed/embedding" in adamw
  assert ("head/kernel" in adamw) != get_preset(preset).tie_word_embeddings
  assert not any(leafname(n) in allowed or n.startswith("head/") for n in muon)
  assert all(len(leaf.shape) >= 2 for leaf, _ in muon.values())
  if preset == "tiny_v4":     # mHC's dynamic projections and the router gate: Muon
    assert any(n.endswith("attn_hc/fn") for n in muon)
    assert any(n.endswith("ffn/gate") for n in muon)
  # The batch axes (neither reduction nor output) are exactly the axes the
  # rules name layers / stages / exp (V4's grouped wo_a: its groups).
  for n, (leaf, d) in muon.items():
    nd = len(leaf.shape)
    matrix = {a % nd for a in (*d.reduction_axis, *d.output_axis)}
    batch = set(range(nd)) - matrix
    if leafname(n) == "kernel" and n.split("/")[-2] == "wo_a":
      assert batch == {0}, n
      continue
    try:
      names = logical_axes([jax.tree_util.DictKey(k) for k in n.split("/")], nd)
    except ValueError:        # a V4 weight the rules do not name yet: a plain matrix
      assert nd == 2 and batch == set(), n
      continue
    assert batch == {i for i, a in enumerate(names) if a in ("layers", "stages", "exp")}, n
    if nd - len(batch) == 3:  # heads: [d, h, hd] reads d; [h, hd, d] writes d
      assert (names[min(matrix)] == "embed" or "lora" in names[min(matrix)]
              or names[max(matrix)] == "embed"), n


@pytest.fixture(scope="module")
def one_device():
  train_cfg = TrainConfig(steps=4, batch_size=8, seq_len=16, warmup_steps=0, lr=1e-2,
                          eps=1e-4, optimizer="muon", fast_compile=True)
  batch = random_batch(CFG.vocab_size, 8, 16, seed=0)
  state = init_train_state(CFG, train_cfg, jax.random.key(0))
  step = make_train_step(CFG, train_cfg)
  new, metrics = step(state, batch)
  return train_cfg, batch, jax.device_get(new), jax.device_get(metrics), step


def _max_diff(a, b) -> float:
  return max(float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max())
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_sharded_muon_step_equals_one_device_and_moments_shard_like_params(one_device):
  train_cfg, batch, ref, ref_metrics, _ = one_device
  mesh, rules = setup(MeshConfig(data=2, fsdp=2, tensor=2, rules="fsdp_tp"))
  state = init_train_state(CFG, train_cfg, jax.random.key(0), mesh, rules)
  specs = {tuple(str(k.key) for k in path): leaf.sharding.spec
           for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  n_checked = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
    if leaf.ndim == 0:
      continue
    keys = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    owner = max((p for p in specs if keys[-len(p):] == p), key=len)
    assert leaf.sharding.spec == specs[owner], keys
    n_checked += 1
  assert n_checked > len(specs)          # Muon's momenta, Adam's two moments
  assert specs[("moe_layers", "attn", "wq_b", "kernel")] != jax.sharding.PartitionSpec()
  new, metrics = make_train_step(CFG, train_cfg, mesh, rules)(state, batch)
  new, metrics = jax.device_get(new), jax.device_get(metrics)
  for key in ("loss", "grad_norm"):
    assert abs(float(metrics[key]) - float(ref_metrics[key])) < 1e-5, key
  assert _max_diff(new.params, ref.params) < 1e-5
  assert _max_diff(new.opt_state, ref.opt_state) < 1e-5


def test_muon_run_saves_and_resumes_identically_and_refuses_another_optimizer(one_device,
                                                                              tmp_path):
  train_cfg, batch, after_one, _, step = one_device
  straight, _ = step(jax.device_put(after_one), batch)
  ckpts = checkpoint.Checkpoints(str(tmp_path), CFG, train_cfg.to_dict(), async_save=False)
  ckpts.save(1, jax.device_put(after_one), {"data": 1}, force=True)
  resumed, _, at = resume_or_start(ckpts, CFG, train_cfg, None, None, fresh=None,
                                   log=lambda _: None)
  assert at == 1
  resumed, _ = step(resumed, batch)
  assert _max_diff(jax.device_get(resumed), jax.device_get(straight)) == 0
  with pytest.raises(ValueError, match="optimizer='adamw', but the checkpointed run trained "
                                       "with optimizer='muon'.*init_from"):
    resume_or_start(ckpts, CFG, TrainConfig(**{**train_cfg.to_dict(), "optimizer": "adamw"}),
                    None, None, fresh=None, log=lambda _: None)
  ckpts.close()
  # The abstract state (restore target, planner) has the same tree as the state.
  assert (jax.tree.structure(abstract_train_state(CFG, train_cfg))
          == jax.tree.structure(jax.device_put(after_one)))


@pytest.mark.parametrize("field, value, match", [
    ("optimizer", "sgd", r"optimizer='sgd' must be one of \('adamw', 'muon'\)"),
    ("muon_momentum", 1.0, "muon_momentum=1.0 must lie in"),
    ("muon_ns_steps", 0, "muon_ns_steps=0 must be an integer >= 1"),
    ("muon_rms", -0.1, "muon_rms=-0.1 must be a finite number >= 0"),
    ("muon_nesterov", "yes", "muon_nesterov='yes' must be True or False"),
])
def test_bad_optimizer_settings_are_refused(field, value, match):
  with pytest.raises(ValueError, match=match):
    TrainConfig(**{field: value})


def test_bfloat16_moments_keep_their_dtypes_through_a_step():
  params = {"embed": {"embedding": jnp.ones((8, 4))}, "w1": {"kernel": jnp.full((4, 6), 0.1)},
            "norm": {"scale": jnp.ones(4)}}
  tx = optimizer.make_muon(optax.constant_schedule(1e-2), moments_dtype="bfloat16")
  state = tx.init(params)
  grads = jax.tree.map(lambda x: x * 0.3 + 0.01, params)
  _, new = jax.jit(lambda g, s, p: optimizer.apply_update(tx, g, s, p))(grads, state, params)
  dtypes = lambda t: jax.tree.map(lambda x: str(x.dtype), t)  # noqa: E731
  assert dtypes(new) == dtypes(state)          # a donated step's buffers keep their types
  muon = [n for n in jax.tree.leaves(state, is_leaf=lambda n: isinstance(
      n, optax.contrib.MuonState)) if isinstance(n, optax.contrib.MuonState)][0]
  assert muon.mu["w1"]["kernel"].dtype == jnp.bfloat16
