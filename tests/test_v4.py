"""DeepSeek-V4 (model/v4.py, model/hyper.py) against transformers'
DeepseekV4ForCausalLM and NumPy float64.

A tiny random V4 model with every attention type (sliding, CSA, HCA) and both
MLP types (hash_moe, moe) is built in transformers with random weights (hash
tables and router biases included), its state_dict mapped into our variables
(interop/hf_v4.py), and the logits compared on sequences of 32 tokens: past
the sliding window (8), several CSA (4) and HCA (8) windows, and more visible
compressed entries than the indexer's top-k (3). transformers builds no MTP
module (it drops V4's mtp.* weights), so MTP is checked by running and
training, not against an oracle.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import ModelConfig, get_preset
from deepseek_jax.interop.hf_v4 import config_from_hf_v4, v4_variables_from_state_dict
from deepseek_jax.model import (Transformer, abstract_variables, count_active_params,
                                count_params, init_variables)
from deepseek_jax.model.hyper import sinkhorn
from random_weights import random_hf_v4

try:
  import torch
  import transformers
except ImportError:
  torch = transformers = None

TOL = 1e-4
SEQ = 32
HF = dict(
    vocab_size=256, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=1, head_dim=32, q_lora_rank=32,
    num_experts_per_tok=2, n_routed_experts=8, n_shared_experts=1,
    routed_scaling_factor=1.5, max_position_embeddings=128,
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
    hc_mult=3, sliding_window=8, o_groups=2, o_lora_rank=16, index_n_heads=8,
    index_head_dim=16, index_topk=3, partial_rotary_factor=0.25, swiglu_limit=10.0,
    layer_types=["sliding_attention", "compressed_sparse_attention",
                 "heavily_compressed_attention", "compressed_sparse_attention"],
    mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"])


def _tokens(seq=SEQ, batch=2, seed=0):
  return np.random.default_rng(seed).integers(0, HF["vocab_size"], (batch, seq)).astype(np.int32)


@pytest.fixture(scope="module")
def hf_pair():
  """(transformers model, our cfg, our variables) with the same random weights."""
  if torch is None:
    pytest.skip("needs torch + transformers")
  model = random_hf_v4(HF)
  hf_cfg = model.config
  cfg = config_from_hf_v4(hf_cfg.to_dict(), n_mtp_depth=1)
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  base = init_variables(cfg, jax.random.key(0))
  return model, cfg, v4_variables_from_state_dict(cfg, state, base)


@pytest.mark.torch
def test_hf_config_maps_to_tiny_preset(hf_pair):
  _, cfg, _ = hf_pair
  assert cfg.replace(original_seq_len=128) == get_preset("tiny_v4")


@pytest.mark.torch
def test_logits_match_transformers(hf_pair):
  """Every layer type and both MLP types, past the window and compression blocks."""
  model, cfg, variables = hf_pair
  tokens = _tokens()
  with torch.no_grad():
    want = model(torch.from_numpy(tokens).long()).logits.numpy()
  got = np.asarray(Transformer(cfg).apply(variables, jnp.asarray(tokens)))
  err = np.abs(got - want).max()
  assert err < TOL, err
  # The compressed layers matter: without them (all sliding) the logits move.
  sliding = cfg.replace(layer_types=("sliding_attention",) * 4)
  sv = {"params": {k: ({**v, "attn": {n: a for n, a in v["attn"].items()
                                       if n not in ("compressor", "indexer")}}
                       if k.startswith("layers_") else v)
                   for k, v in variables["params"].items()},
        "router_bias": variables["router_bias"]}
  other = np.asarray(Transformer(sliding).apply(sv, jnp.asarray(tokens)))
  assert np.abs(other - want).max() > 100 * TOL


@pytest.mark.torch
def test_short_sequence_matches_transformers(hf_pair):
  """Shorter than a CSA window: no compressed entries yet."""
  model, cfg, variables = hf_pair
  tokens = _tokens(seq=3, seed=1)
  with torch.no_grad():
    want = model(torch.from_numpy(tokens).long()).logits.numpy()
  got = np.asarray(Transformer(cfg).apply(variables, jnp.asarray(tokens)))
  assert np.abs(got - want).max() < TOL


def _sinkhorn_np(m, iters, eps):
  m = np.array(m, np.float64)
  for idx in np.ndindex(m.shape[:-2]):
    a = m[idx]
    n = a.shape[0]
    for col in range(n):
      a[:, col] /= a[:, col].sum() + eps
    for _ in range(iters - 1):
      for row in range(n):
        a[row, :] /= a[row, :].sum() + eps
      for col in range(n):
        a[:, col] /= a[:, col].sum() + eps
  return m


def test_sinkhorn_against_numpy_loop():
  rng = np.random.default_rng(0)
  m = np.exp(rng.standard_normal((2, 3, 4, 4)))
  got = np.asarray(sinkhorn(jnp.asarray(m, jnp.float32), 20, 1e-6))
  want = _sinkhorn_np(m, 20, 1e-6)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(want.sum(-2), 1.0, atol=1e-5)       # doubly stochastic
  np.testing.assert_allclose(want.sum(-1), 1.0, atol=1e-3)


def test_tiny_v4_trains_one_step():
  from deepseek_jax.train.config import TrainConfig
  from deepseek_jax.train.step import init_train_state, make_train_step
  cfg = get_preset("tiny_v4")
  tcfg = TrainConfig(batch_size=2, seq_len=SEQ, warmup_steps=0, lr=1e-3)
  state = init_train_state(cfg, tcfg, jax.random.key(0))
  tokens = jnp.asarray(_tokens(seq=SEQ + 1))
  batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
           "segment_ids": jnp.ones((2, SEQ), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(SEQ, dtype=jnp.int32), (2, SEQ)),
           "loss_mask": jnp.ones((2, SEQ), jnp.float32)}
  before = jax.tree.map(np.asarray, state.params)        # the step donates the state
  step = make_train_step(cfg, tcfg)
  new, metrics = step(state, batch)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["mtp"]) > 0
  moved = jax.tree.map(lambda a, b: bool(np.any(a != np.asarray(b))), before, new.params)
  layer = dict(moved["layers_1"])
  # The indexer's top-k passes no gradient (its KL loss is not wired up for
  # V4 yet: only weight decay moves it); everything else, the compressors and
  # the MTP module included, moves.
  assert not layer["attn"].pop("indexer")["compressor"]["ape"]
  assert all(jax.tree.leaves(layer)) and all(jax.tree.leaves(moved["mtp_0"]))


@pytest.mark.parametrize("change, match", [
    (dict(hc_mult=0), "hc_mult"),
    (dict(layer_types=("sliding_attention", "full_attention", "sliding_attention",
                       "sliding_attention")), "layer_types entry 'full_attention'"),
    (dict(mlp_layer_types=("moe",) * 3), "mlp_layer_types must be a tuple of n_layers=4"),
    (dict(partial_rotary_factor=0.1), "partial_rotary_factor"),
    (dict(o_groups=3), "o_groups=3"),
    (dict(index_topk=0), "compressed_sparse_attention: it needs index_topk"),
    (dict(n_dense_layers=1), "n_dense_layers=1"),
    (dict(arch="v5"), "arch='v5'"),
])
def test_bad_v4_configs_are_refused(change, match):
  with pytest.raises(ValueError, match=match):
    get_preset("tiny_v4").replace(**change)


def test_v4_flash_parameter_count():
  """The published 284B total / 13B active (MTP module not counted, as V3's 671B)."""
  cfg = get_preset("v4_flash_284b")
  params = abstract_variables(cfg)["params"]
  main = {k: v for k, v in params.items() if not k.startswith("mtp_")}
  assert round(count_params(main) / 1e9) == 284, count_params(main)
  assert round(count_active_params(cfg, main, embedding=False) / 1e9) == 13


def test_mtp_inference_modes_refuse_v4():
  cfg = get_preset("tiny_v4")
  variables = init_variables(cfg, jax.random.key(0))
  with pytest.raises(NotImplementedError, match="V4"):
    Transformer(cfg).apply(variables, jnp.zeros((1, 4), jnp.int32), mode="mtp_prefill")


@pytest.mark.torch
def test_v4_flash_is_transformers_default_config_and_yarn_frequencies_match():
  """v4_flash_284b = DeepseekV4Config's defaults (V4-Flash) with YaRN x16 on the
  compressed layers; both RoPE frequency sets equal transformers' (no mscale)."""
  if torch is None:
    pytest.skip("needs torch + transformers")
  from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RotaryEmbedding
  from deepseek_jax.model.v4 import v4_frequencies
  hf = transformers.DeepseekV4Config(rope_parameters={
      "rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 65536,
      "beta_fast": 32.0, "beta_slow": 1.0})
  cfg = get_preset("v4_flash_284b")
  assert config_from_hf_v4(hf.to_dict(), dtype="bfloat16", remat_policy="full") == cfg
  rotary = DeepseekV4RotaryEmbedding(hf)
  for compressed, name in ((True, "compress"), (False, "main")):
    want = getattr(rotary, f"{name}_inv_freq").numpy()
    np.testing.assert_allclose(v4_frequencies(cfg, compressed), want, rtol=1e-6)
    assert getattr(rotary, f"{name}_attention_scaling") == 1.0


def test_v4_config_json_round_trip(tmp_path):
  import json
  cfg = get_preset("tiny_v4")
  path = tmp_path / "cfg.json"
  path.write_text(json.dumps(cfg.to_dict()))
  again = ModelConfig.from_json(str(path))
  assert again == cfg and hash(again) == hash(cfg)


@pytest.mark.torch
def test_swiglu_clamp_matches_transformers(hf_pair):
  """A limit (0.3) that the pre-activations cross, in every routed and shared
  expert (the parity test's 10 never binds at these sizes)."""
  model, cfg, variables = hf_pair
  mlps = [m for m in model.modules() if hasattr(m, "limit")]
  assert len(mlps) == 2 * HF["num_hidden_layers"]          # experts + shared, per layer
  tokens = _tokens(seed=2)
  try:
    for m in mlps:
      m.limit = 0.3
    with torch.no_grad():
      want = model(torch.from_numpy(tokens).long()).logits.numpy()
  finally:
    for m in mlps:
      m.limit = HF["swiglu_limit"]
  for impl in ("blocked", "ragged", "dense"):
    got = Transformer(cfg.replace(swiglu_limit=0.3, moe_impl=impl)).apply(
        variables, jnp.asarray(tokens))
    assert np.abs(np.asarray(got) - want).max() < TOL, impl
  unclamped = Transformer(cfg.replace(swiglu_limit=0.0)).apply(variables, jnp.asarray(tokens))
  assert np.abs(np.asarray(unclamped) - want).max() > 100 * TOL


def test_v4_router_bias_update_steps_each_score_routed_layer_by_its_own_load():
  """Aux-loss-free balancing on V4's unrolled layers: layer i's bias moves by
  speed * sign(mean - load_i) (the V3 rule, by hand); hash-routed layers
  (tid2eid) keep theirs; the MTP block uses its own load."""
  import jax
  import numpy as np

  from deepseek_jax.config import get_preset
  from deepseek_jax.model import init_variables
  from deepseek_jax.train.step import update_router_bias
  cfg = get_preset("tiny_v4")
  rb = init_variables(cfg, jax.random.key(0))["router_bias"]
  e = rb["layers_2"]["ffn"]["bias"].shape[0]
  load = np.random.default_rng(0).integers(0, 9, size=(cfg.n_layers, e)).astype(np.float32)
  mtp_load = np.arange(e, dtype=np.float32)[None]
  new = update_router_bias(rb, load, 0.01, mtp_load)
  for i, kind in enumerate(cfg.mlp_layer_types):
    old, got = rb[f"layers_{i}"]["ffn"]["bias"], new[f"layers_{i}"]["ffn"]["bias"]
    want = old if kind == "hash_moe" else old + 0.01 * np.sign(load[i].mean() - load[i])
    np.testing.assert_allclose(got, want, atol=1e-7)
  np.testing.assert_allclose(new["mtp_0"]["block"]["ffn"]["bias"], rb["mtp_0"]["block"]["ffn"][
      "bias"] + 0.01 * np.sign(mtp_load[0].mean() - mtp_load[0]), atol=1e-7)
  np.testing.assert_array_equal(new["layers_0"]["tid2eid"], rb["layers_0"]["tid2eid"])


# On a mesh (and refused on a pipeline): tests/test_v4_mesh.py.
