"""HF checkpoint interop: config mapping, FP8, streaming, errors, CLI, atomicity.

Logit parity with transformers lives in test_hf_parity.py; here the oracles
are transformers' own config/RoPE code, a naive FP8 loop, and exact equality
of arrays that went through a save/load cycle.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy

from deepseek_jax import get_preset
from deepseek_jax.interop import (config_from_hf, config_to_hf, dequantize_fp8_blocks,
                                  load_hf_checkpoint, load_jax_variables,
                                  save_hf_checkpoint, save_jax_variables)
from deepseek_jax.interop import hf_load, hf_save, jax_format
from deepseek_jax.interop.safetensors_io import flatten
from deepseek_jax.model import abstract_variables
from deepseek_jax.model.rope import rope_frequencies
from launch import convert

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The published DeepSeek-V3 config.json (legacy `rope_scaling` form, FP8).
PUBLISHED_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "attention_bias": False, "attention_dropout": 0.0, "aux_loss_alpha": 0.001,
    "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02,
    "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840,
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8,
    "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61,
    "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "pretraining_tp": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                            "quant_method": "fp8", "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                     "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
    "seq_aux": True, "tie_word_embeddings": False, "topk_group": 4,
    "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "use_cache": True,
    "v_head_dim": 128, "vocab_size": 129280,
}

# The published DeepSeek-V2-Lite and DeepSeek-V2 config.json files (as on the Hub).
PUBLISHED_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
    "attention_bias": False, "attention_dropout": 0.0, "aux_loss_alpha": 0.001,
    "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 10944, "kv_lora_rank": 512, "max_position_embeddings": 163840,
    "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1,
    "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False,
    "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27,
    "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                     "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
                     "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax",
    "seq_aux": True, "tie_word_embeddings": False, "topk_group": 1,
    "topk_method": "greedy", "torch_dtype": "bfloat16", "use_cache": True,
    "v_head_dim": 128, "vocab_size": 102400,
}
PUBLISHED_V2 = {
    **PUBLISHED_V2_LITE, "hidden_size": 5120, "intermediate_size": 12288,
    "moe_intermediate_size": 1536, "n_group": 8, "n_routed_experts": 160,
    "num_attention_heads": 128, "num_key_value_heads": 128, "num_hidden_layers": 60,
    "q_lora_rank": 1536, "routed_scaling_factor": 16.0, "topk_group": 3,
    "topk_method": "group_limited_greedy",
}
RUNTIME = {"dtype": "bfloat16", "param_dtype": "float32", "remat_policy": "full"}


def _random_variables(cfg, seed=0):
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    scale = 0.5 if "router_bias" in jax.tree_util.keystr(path) else 0.1
    return jnp.asarray(scale * rng.standard_normal(leaf.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract_variables(cfg))


def _assert_trees_equal(a, b):
  flat_a, flat_b = flatten(a), flatten(b)
  assert sorted(flat_a) == sorted(flat_b)
  for k in flat_a:
    assert flat_a[k].dtype == flat_b[k].dtype, k
    np.testing.assert_array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k]), err_msg=k)


def _read_all(directory):
  out = {}
  for name in sorted(os.listdir(directory)):
    if name.endswith(".safetensors"):
      out.update(safetensors.numpy.load_file(os.path.join(directory, name)))
  return out


def _write_single_file(directory, tensors, config):
  """A checkpoint as one model.safetensors + config.json (no index)."""
  os.makedirs(directory, exist_ok=True)
  safetensors.numpy.save_file(tensors, os.path.join(directory, "model.safetensors"),
                              metadata={"format": "pt"})
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)


@pytest.fixture(scope="module")
def tiny():
  cfg = get_preset("tiny", n_mtp_depth=1)
  return cfg, _random_variables(cfg, seed=3)


@pytest.fixture(scope="module")
def tiny_ckpt(tiny, tmp_path_factory):
  """(cfg, variables, dir) of a single-file HF checkpoint (no index)."""
  cfg, variables = tiny
  sharded = str(tmp_path_factory.mktemp("sharded"))
  save_hf_checkpoint(cfg, variables, sharded)
  single = str(tmp_path_factory.mktemp("single"))
  with open(os.path.join(sharded, "config.json")) as f:
    _write_single_file(single, _read_all(sharded), json.load(f))
  return cfg, variables, single


# ---------------------------------------------------------------------------
# Config mapping
# ---------------------------------------------------------------------------
def test_published_v3_config_maps_to_the_671b_preset():
  cfg = config_from_hf(PUBLISHED_V3, dtype="bfloat16", remat_policy="full")
  # The preset keeps a 16k context and V3's 0.006 init std; HF says 160k / 0.02.
  assert cfg == get_preset("v3_671b").replace(max_seq_len=163840, init_std=0.02)
  # transformers-5 `rope_parameters` form of the same config maps identically.
  modern = {k: v for k, v in PUBLISHED_V3.items() if k not in ("rope_scaling", "rope_theta")}
  rope = {k: v for k, v in PUBLISHED_V3["rope_scaling"].items() if k != "type"}
  modern["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, **rope}
  assert config_from_hf(modern, dtype="bfloat16", remat_policy="full") == cfg


@pytest.mark.parametrize("name,changes", [
    ("tiny", {}),
    ("tiny", {"q_lora_rank": 0, "n_shared_experts": 2, "n_mtp_depth": 0}),
    ("tiny", {"max_seq_len": 512, "original_seq_len": 64, "rope_factor": 8.0,
              "mscale": 0.707, "beta_fast": 16.0, "beta_slow": 2.0, "rope_theta": 500.0}),
    ("v3_671b", {}),
])
@pytest.mark.torch
def test_config_round_trips_and_transformers_agrees_on_rope(name, changes):
  import transformers
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale
  cfg = get_preset(name, **changes)
  hf = config_to_hf(cfg)
  runtime = {k: getattr(cfg, k) for k in ("dtype", "param_dtype", "remat_policy")}
  assert config_from_hf(hf, **runtime) == cfg
  assert hf["q_lora_rank"] == (cfg.q_lora_rank or None)

  hf_cfg = transformers.DeepseekV3Config.from_dict(json.loads(json.dumps(hf)))
  assert config_from_hf(hf_cfg.to_dict(), **runtime) == cfg     # as HF re-saves it
  assert hf_cfg.rope_parameters["rope_type"] == ("yarn" if cfg.use_yarn else "default")
  scaling = yarn_apply_mscale(hf_cfg.rope_parameters, hf_cfg.qk_head_dim ** -0.5)
  assert scaling == pytest.approx(cfg.softmax_scale, rel=1e-12)
  if cfg.use_yarn:
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg)
    assert attention_factor == pytest.approx(1.0)      # no extra cos/sin scaling
    np.testing.assert_allclose(inv_freq.numpy(), rope_frequencies(cfg), rtol=1e-6)


@pytest.mark.parametrize("change,error,match", [
    ({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}, ValueError,
     "unknown architecture"),     # (Llama / Qwen2 load as dense models: test_hf_dense.py)
    ({"tie_word_embeddings": True}, ValueError, "tie_word_embeddings"),
    ({"rope_scaling": {**PUBLISHED_V3["rope_scaling"], "mscale": 0.707}},
     NotImplementedError, "mscale == mscale_all_dim"),
    ({"max_position_embeddings": 4096}, NotImplementedError,
     "original_max_position_embeddings"),
    ({"norm_topk_prob": False}, NotImplementedError, "norm_topk_prob"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, NotImplementedError, "linear"),
])
def test_unsupported_hf_configs_fail_with_the_reason(change, error, match):
  with pytest.raises(error, match=match):
    config_from_hf({**PUBLISHED_V3, **change})


def test_config_without_a_model_dimension_is_rejected():
  broken = {k: v for k, v in PUBLISHED_V3.items() if k != "kv_lora_rank"}
  with pytest.raises(ValueError, match="lacks.*kv_lora_rank"):
    config_from_hf(broken)


@pytest.mark.parametrize("published,preset,total,active", [
    (PUBLISHED_V2_LITE, "v2_lite_16b", 15.7e9, 2.4e9),
    (PUBLISHED_V2, "v2_236b", 236e9, 21e9),
])
def test_published_v2_configs_are_the_presets(published, preset, total, active):
  from deepseek_jax.model import count_active_params, count_params
  cfg = config_from_hf(published, **RUNTIME)
  assert cfg == get_preset(preset)
  params = abstract_variables(cfg)["params"]
  # The V2 report's counts: total, and active without the input embedding.
  assert count_params(params) == pytest.approx(total, rel=0.01)
  assert count_active_params(cfg, params, embedding=False) == pytest.approx(active, rel=0.03)
  hf = config_to_hf(cfg)
  assert (hf["architectures"], hf["topk_method"]) == (
      published["architectures"], published["topk_method"])
  assert "num_nextn_predict_layers" not in hf and hf["norm_topk_prob"] is False
  assert config_from_hf(hf, **RUNTIME) == cfg


@pytest.mark.parametrize("change,error,match", [
    ({"model_type": "deepseek", "architectures": ["DeepseekForCausalLM"]}, ValueError,
     "DeepSeekMoE 16B"),
    ({"architectures": ["DeepseekV3ForCausalLM"]}, ValueError, "unknown architecture"),
    ({"topk_method": "noaux_tc"}, NotImplementedError, "topk_method='noaux_tc'"),
    ({"norm_topk_prob": True}, NotImplementedError, "norm_topk_prob"),
    ({"scoring_func": "sigmoid"}, NotImplementedError, "softmax"),
    ({"num_nextn_predict_layers": 1}, NotImplementedError, "no MTP"),
    ({"topk_method": "group_limited_greedy", "n_group": None}, ValueError, "n_group"),
    ({"num_key_value_heads": 8}, NotImplementedError, "num_key_value_heads"),
    ({"mlp_bias": True}, NotImplementedError, "mlp_bias"),
])
def test_unsupported_v2_configs_fail_naming_the_field(change, error, match):
  with pytest.raises(error, match=match):
    config_from_hf({**PUBLISHED_V2_LITE, **change})


def test_v2_export_refuses_what_v2_cannot_hold(tmp_path):
  with pytest.raises(NotImplementedError, match="no MTP"):
    config_to_hf(get_preset("tiny", score_func="softmax", route_scale=1.0))
  cfg = get_preset("tiny", score_func="softmax", route_scale=1.0, n_mtp_depth=0)
  variables = _random_variables(cfg)       # router bias random: not representable
  with pytest.raises(ValueError, match="bias_update_speed=0"):
    save_hf_checkpoint(cfg, variables, str(tmp_path / "v2"))
  assert not os.path.exists(tmp_path / "v2" / "config.json")
  variables["router_bias"] = jax.tree.map(jnp.zeros_like, variables["router_bias"])
  save_hf_checkpoint(cfg, variables, str(tmp_path / "v2"))
  assert not any("e_score_correction_bias" in k for k in _read_all(tmp_path / "v2"))
  cfg2, loaded = load_hf_checkpoint(str(tmp_path / "v2"))
  assert cfg2 == cfg
  _assert_trees_equal(loaded, variables)
  # launch.convert reads and writes the V2 family too
  convert.convert(from_hf=str(tmp_path / "v2"), to_jax=str(tmp_path / "jax"))
  convert.convert(from_jax=str(tmp_path / "jax"), to_hf=str(tmp_path / "back"))
  with open(tmp_path / "back" / "config.json") as f:
    assert json.load(f)["model_type"] == "deepseek_v2"
  _assert_trees_equal(load_hf_checkpoint(str(tmp_path / "back"))[1], variables)
  # shard-by-shard loading onto a mesh fills the absent router bias with zeros
  from deepseek_jax.parallel import MeshConfig, setup
  mesh, _ = setup(MeshConfig(data=1, fsdp=2, expert=4))
  _, placed = load_hf_checkpoint(str(tmp_path / "v2"), mesh=mesh, rules="ep_fsdp")
  _assert_trees_equal(jax.device_get(placed), jax.device_get(variables))


# ---------------------------------------------------------------------------
# FP8
# ---------------------------------------------------------------------------
def test_fp8_block_dequantisation_matches_naive_loop():
  rng = np.random.default_rng(0)
  w = (rng.standard_normal((300, 200)) * 100).astype(ml_dtypes.float8_e4m3fn)
  scale_inv = rng.uniform(0.01, 2.0, (3, 2)).astype(np.float32)   # ceil(300/128), ceil(200/128)
  got = dequantize_fp8_blocks(w, scale_inv)
  want = np.empty((300, 200), np.float32)
  for i in range(300):
    for j in range(200):
      want[i, j] = np.float32(w[i, j]) * scale_inv[i // 128, j // 128]
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match="weight_scale_inv shape"):
    dequantize_fp8_blocks(w, scale_inv[:2])


def _quantize_like_v3(tensors, block):
  """(FP8 checkpoint tensors, their dequantised values) quantised like the
  published V3: every projection but the router, embedding and head, one
  amax/448 scale per block x block tile (edge tiles partial)."""
  fp8, reference = {}, {}
  for key, w in tensors.items():
    if (w.ndim == 2 and key.endswith("proj.weight") and "embed" not in key):
      rows, cols = -(-w.shape[0] // block), -(-w.shape[1] // block)
      padded = np.zeros((rows * block, cols * block), np.float32)
      padded[:w.shape[0], :w.shape[1]] = w
      amax = np.abs(padded.reshape(rows, block, cols, block)).max(axis=(1, 3))
      scale_inv = (np.maximum(amax, 1e-12) / 448.0).astype(np.float32)
      expand = np.kron(scale_inv, np.ones((block, block), np.float32))[:w.shape[0], :w.shape[1]]
      q = (w / expand).astype(ml_dtypes.float8_e4m3fn)
      fp8[key], fp8[key + "_scale_inv"] = q, scale_inv
      reference[key] = q.astype(np.float32) * expand
    else:
      fp8[key] = reference[key] = w
  return fp8, reference


def _write_fp8_checkpoint(directory, tensors, config, block):
  """One tensor per shard, so scales sit in other files than their weights."""
  os.makedirs(directory)
  weight_map = {}
  for n, (key, t) in enumerate(sorted(tensors.items())):
    name = f"model-{n:05d}.safetensors"
    safetensors.numpy.save_file({key: t}, os.path.join(directory, name), metadata={"format": "pt"})
    weight_map[key] = name
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump({**config, "quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [block, block]}}, f)
  return weight_map


def test_fp8_checkpoint_loads_as_its_dequantised_weights(tiny_ckpt, tmp_path):
  cfg, variables, src = tiny_ckpt
  block = 16                    # several blocks per tiny weight, with partial edges
  with open(os.path.join(src, "config.json")) as f:
    config = json.load(f)
  fp8, reference = _quantize_like_v3(_read_all(src), block)
  assert sum(k.endswith("_scale_inv") for k in fp8) > 20
  quant_dir, ref_dir = str(tmp_path / "fp8"), str(tmp_path / "ref")
  weight_map = _write_fp8_checkpoint(quant_dir, fp8, config, block)
  with safetensors.safe_open(os.path.join(quant_dir, weight_map[
      "model.layers.0.self_attn.q_a_proj.weight"]), "numpy") as f:
    assert f.get_slice("model.layers.0.self_attn.q_a_proj.weight").get_dtype() == "F8_E4M3"
  _write_single_file(ref_dir, reference, config)

  _, from_fp8 = load_hf_checkpoint(quant_dir)
  _, from_ref = load_hf_checkpoint(ref_dir)
  _assert_trees_equal(from_fp8, from_ref)
  # ...and the scales are applied the right way round: close to the originals.
  w = np.asarray(from_fp8["params"]["moe_layers"]["attn"]["wkv_b"]["kernel"])
  orig = np.asarray(variables["params"]["moe_layers"]["attn"]["wkv_b"]["kernel"])
  assert np.abs(w - orig).max() < 0.07 * np.abs(orig).max()
  # keep_fp8 needs the 128 x 128 blocks the FP8 GEMMs tile by.
  with pytest.raises(ValueError, match="keep_fp8=True needs 128 x 128 weight blocks.*"
                     "weight_block_size is \\[16, 16\\]"):
    load_hf_checkpoint(quant_dir, keep_fp8=True)
  with pytest.warns(UserWarning, match="keep_fp8=True but the checkpoint has no block-FP8"):
    cfg_ref, kept_ref = load_hf_checkpoint(ref_dir, keep_fp8=True)
  _assert_trees_equal(kept_ref, from_ref)
  assert not cfg_ref.fp8


@pytest.mark.slow   # 20-60 s on 2 cores: CI's slow step keeps the default suite under 15 min
def test_keep_fp8_keeps_published_blocks_and_the_model_runs_on_them(tmp_path):
  """dim 256, so weights span several 128-blocks along either axis and a
  scale put the wrong way round would show. Oracles: the dequantised load
  (weight-only path: equal logits), the FP8 model on the dequantised weights
  (re-quantising reproduces the published blocks: equal logits and input
  gradients), and 1 byte per kept weight."""
  from deepseek_jax.model import Transformer
  cfg = get_preset("tiny", dim=256, n_mtp_depth=1)
  src = str(tmp_path / "src")
  save_hf_checkpoint(cfg, _random_variables(cfg, seed=5), src)
  with open(os.path.join(src, "config.json")) as f:
    config = json.load(f)
  fp8_tensors, reference = _quantize_like_v3(_read_all(src), 128)
  quant_dir, ref_dir = str(tmp_path / "fp8"), str(tmp_path / "ref")
  _write_fp8_checkpoint(quant_dir, fp8_tensors, config, 128)
  _write_single_file(ref_dir, reference, config)
  cfg_k, kept = load_hf_checkpoint(quant_dir, keep_fp8=True)
  cfg_r, deq = load_hf_checkpoint(ref_dir)
  assert cfg_k.fp8 and not cfg_r.fp8

  flat_k, flat_r = flatten(kept), flatten(deq)
  fp8_leaves = sorted(k for k, v in flat_k.items() if v.dtype == jnp.float8_e4m3fn)
  assert set(flat_k) == set(flat_r) | {k + "_scale" for k in fp8_leaves}
  assert "params/moe_layers/ffn/w1" in fp8_leaves                    # routed experts
  assert "params/moe_layers/attn/wo/kernel" in fp8_leaves
  assert "params/dense_layers/ffn/w2/kernel" in fp8_leaves
  assert "params/mtp_0/block/ffn/shared_experts/w3/kernel" in fp8_leaves
  for name in ("params/head/kernel", "params/moe_layers/ffn/gate", "params/embed/embedding"):
    assert flat_k[name].dtype == jnp.float32
  # wo [L, heads, v, dim] = [2, 4, 16, 256]: K = heads*v = 64, N = 256.
  assert flat_k["params/moe_layers/attn/wo/kernel_scale"].shape == (2, 1, 2)
  # experts w1 [L, E, dim, moe_inter] = [2, 8, 256, 32]: K = 256, N = 32.
  assert flat_k["params/moe_layers/ffn/w1_scale"].shape == (2, 8, 2, 1)
  for name in fp8_leaves:
    assert flat_k[name].nbytes == flat_r[name].size

  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
  targets = jnp.roll(tokens, -1, axis=1)

  def run(c, v):
    def loss(v):
      logits, aux = Transformer(c).apply(v, tokens, targets=targets, return_aux=True)
      return logits.sum() + aux["mtp_logits"].sum(), logits
    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(v)
    return np.asarray(logits), flatten(grads)

  weight_only, _ = run(cfg_k.replace(fp8=False), kept)
  reference_logits, _ = run(cfg_r, deq)
  np.testing.assert_allclose(weight_only, reference_logits, rtol=1e-5, atol=1e-5)
  fp8_kept, g_kept = run(cfg_k, kept)
  fp8_deq, g_deq = run(cfg_r.replace(fp8=True), deq)
  np.testing.assert_allclose(fp8_kept, fp8_deq, rtol=1e-5, atol=1e-5)
  assert np.abs(fp8_kept - reference_logits).max() > 1e-4         # FP8 activations: not a no-op
  _, g_float = run(cfg_r, deq)
  for name in ("params/embed/embedding", "params/norm/scale", "params/moe_layers/ffn/gate",
               "params/moe_layers/attn/kv_norm/scale"):
    kept_g, deq_g, float_g = (np.asarray(g[name]) for g in (g_kept, g_deq, g_float))
    # equal up to the last bits of the scales (amax / 448 vs amax * (1/448))
    assert np.linalg.norm(kept_g - deq_g) < 1e-4 * np.linalg.norm(deq_g), name
    assert np.linalg.norm(kept_g - float_g) > 1e-3 * np.linalg.norm(float_g), name
  for name in fp8_leaves:               # frozen
    assert not np.asarray(g_kept[name], np.float32).any(), name

  with pytest.raises(NotImplementedError, match="keep_fp8=True.*one device"):
    load_hf_checkpoint(quant_dir, keep_fp8=True, mesh=object(), rules="dp")


# ---------------------------------------------------------------------------
# Streaming loader
# ---------------------------------------------------------------------------
def test_sharded_checkpoint_streams_each_tensor_once_and_round_trips(tiny, tmp_path, monkeypatch):
  cfg, variables = tiny
  path = str(tmp_path)
  save_hf_checkpoint(cfg, variables, path, max_shard_bytes=60_000)
  shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  with open(os.path.join(path, "model.safetensors.index.json")) as f:
    index = json.load(f)
  assert len(shards) > 5 and sorted(set(index["weight_map"].values())) == shards
  # Published layout: per-expert keys, MTP at layer num_hidden_layers.
  assert "model.layers.1.mlp.experts.7.down_proj.weight" in index["weight_map"]
  assert "model.layers.3.shared_head.norm.weight" in index["weight_map"]

  reads = []
  real_open = safetensors.safe_open

  class CountingOpen:
    def __init__(self, file, framework):
      self._f = real_open(file, framework=framework)

    def __enter__(self):
      self._h = self._f.__enter__()
      return self

    def __exit__(self, *exc):
      return self._f.__exit__(*exc)

    def __getattr__(self, name):
      return getattr(self._h, name)

    def get_tensor(self, key):
      reads.append(key)
      return self._h.get_tensor(key)

  monkeypatch.setattr(safetensors, "safe_open", CountingOpen)
  loaded_cfg, loaded = load_hf_checkpoint(path)
  assert loaded_cfg == cfg
  assert sorted(reads) == sorted(index["weight_map"])          # each tensor read once
  _assert_trees_equal(loaded, variables)

  os.remove(os.path.join(path, "model.safetensors.index.json"))   # glob fallback
  _assert_trees_equal(load_hf_checkpoint(path)[1], variables)

  save_hf_checkpoint(cfg, variables, path)       # re-save: stale shards are removed
  assert [f for f in os.listdir(path) if f.endswith(".safetensors")] == [
      "model-00001-of-00001.safetensors"]
  _assert_trees_equal(load_hf_checkpoint(path)[1], variables)


def test_bfloat16_load_keeps_router_bias_float32(tiny_ckpt):
  cfg, variables, path = tiny_ckpt
  loaded_cfg, loaded = load_hf_checkpoint(path, dtype="bfloat16")
  assert loaded_cfg.param_dtype == "bfloat16"
  flat, want = flatten(loaded), flatten(variables)
  for k, v in flat.items():
    expected = np.asarray(want[k])
    if k.startswith("router_bias/"):
      assert v.dtype == jnp.float32
      np.testing.assert_array_equal(np.asarray(v), expected)
    else:
      assert v.dtype == jnp.bfloat16, k
      np.testing.assert_array_equal(np.asarray(v), expected.astype(ml_dtypes.bfloat16))


# ---------------------------------------------------------------------------
# Malformed checkpoints: each fails before tracing, naming the problem
# ---------------------------------------------------------------------------
@pytest.fixture
def broken(tiny_ckpt, tmp_path, monkeypatch):
  """A writable copy of the tiny checkpoint; tracing the model is an error."""
  _, _, src = tiny_ckpt
  dst = str(tmp_path / "ckpt")
  shutil.copytree(src, dst)

  def no_tracing(cfg):
    raise AssertionError("validation must fail before the model is traced")

  monkeypatch.setattr(hf_load, "abstract_variables", no_tracing)
  return dst


def _rewrite(path, edit):
  file = os.path.join(path, "model.safetensors")
  tensors = safetensors.numpy.load_file(file)
  edit(tensors)
  safetensors.numpy.save_file(tensors, file, metadata={"format": "pt"})


def test_missing_config_json(broken):
  os.remove(os.path.join(broken, "config.json"))
  with pytest.raises(FileNotFoundError, match="config.json not found"):
    load_hf_checkpoint(broken)


def test_no_safetensors_files(broken):
  os.remove(os.path.join(broken, "model.safetensors"))
  with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors files"):
    load_hf_checkpoint(broken)


def test_index_naming_a_missing_shard(broken):
  with open(os.path.join(broken, "model.safetensors.index.json"), "w") as f:
    json.dump({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}, f)
  with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
    load_hf_checkpoint(broken)


def test_corrupt_safetensors_header(broken):
  with open(os.path.join(broken, "model.safetensors"), "r+b") as f:
    f.seek(8)
    f.write(b"#garbage#")
  with pytest.raises(ValueError, match=r"model\.safetensors: corrupt safetensors header"):
    load_hf_checkpoint(broken)


def test_missing_keys_are_listed(broken):
  _rewrite(broken, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
  with pytest.raises(ValueError, match=r"1 missing tensors: model\.layers\.2\.mlp\.experts\.5"):
    load_hf_checkpoint(broken)


def test_unexpected_keys_are_listed(broken):
  _rewrite(broken, lambda t: t.update({"model.layers.7.mlp.gate.weight": np.zeros((8, 64))}))
  with pytest.raises(ValueError, match=r"1 unexpected tensors: model\.layers\.7\.mlp\.gate"):
    load_hf_checkpoint(broken)


def test_wrong_shape_names_key_expected_and_got(broken):
  key = "model.layers.0.self_attn.kv_b_proj.weight"
  _rewrite(broken, lambda t: t.update({key: t[key][:-1]}))
  with pytest.raises(ValueError, match=rf"{key} in .*expected shape \(128, 32\).*got \(127, 32\)"):
    load_hf_checkpoint(broken)


def test_unknown_architecture(broken):
  with open(os.path.join(broken, "config.json"), "w") as f:
    json.dump({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}, f)
  with pytest.raises(ValueError, match="unknown architecture"):
    load_hf_checkpoint(broken)


# ---------------------------------------------------------------------------
# CLI and atomic writes
# ---------------------------------------------------------------------------
def test_convert_cli_round_trip(tiny_ckpt, tmp_path):
  cfg, variables, hf_dir = tiny_ckpt
  jax_dir, hf_out = str(tmp_path / "jax"), str(tmp_path / "hf")
  result = subprocess.run(
      [sys.executable, "-m", "launch.convert", f"--from_hf={hf_dir}", f"--to_jax={jax_dir}"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert "done in" in result.stderr
  # our progress lines, not the libraries' INFO chatter (absl format:
  # "I1203 12:00:00.0 123 file.py:10] ...")
  ours = {f for d in ("deepseek_jax", "launch") for _, _, fs in os.walk(os.path.join(REPO, d))
          for f in fs if f.endswith(".py")}
  info = [line.split("] ")[0].split()[-1].split(":")[0]
          for line in result.stderr.splitlines() if line[:2] in ("I0", "I1")]
  assert info and set(info) <= ours, result.stderr
  with open(os.path.join(jax_dir, "model_config.json")) as f:
    assert json.load(f) == cfg.to_dict()
  jax_cfg, jax_vars = load_jax_variables(jax_dir)
  assert jax_cfg == cfg
  _assert_trees_equal(jax_vars, variables)

  convert.convert(from_jax=jax_dir, to_hf=hf_out, dtype="bfloat16", max_shard_bytes=100_000)
  back_cfg, back = load_hf_checkpoint(hf_out)
  assert back_cfg == cfg
  for k, v in flatten(back).items():
    want = np.asarray(flatten(variables)[k])
    if not k.startswith("router_bias/"):        # weights went through bfloat16
      want = want.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(v), want, err_msg=k)

  from absl import app
  with pytest.raises(app.UsageError, match="either --from_hf"):
    convert.convert(from_hf=hf_dir, to_hf=hf_out)
  with pytest.raises(app.UsageError, match="does not exist"):
    convert.convert(from_jax=str(tmp_path / "nope"), to_hf=hf_out)


def _read_dir(path):
  """{file name: bytes} of every file in `path`."""
  contents = {}
  for name in os.listdir(path):
    with open(os.path.join(path, name), "rb") as f:
      contents[name] = f.read()
  return contents


def test_failed_save_leaves_no_partial_files(tiny, tmp_path, monkeypatch):
  cfg, variables = tiny
  good = str(tmp_path / "good")
  save_hf_checkpoint(cfg, variables, good)
  before = _read_dir(good)

  def disk_full(tensors, path, metadata=None):
    with open(path, "wb") as f:
      f.write(b"\0" * 1000)
    raise OSError("No space left on device")

  monkeypatch.setattr(hf_save, "write_safetensors", disk_full)
  monkeypatch.setattr(jax_format, "write_safetensors", disk_full)
  fresh = str(tmp_path / "fresh")
  with pytest.raises(OSError, match="No space"):
    save_hf_checkpoint(cfg, variables, fresh)
  assert os.listdir(fresh) == []
  with pytest.raises(OSError, match="No space"):
    save_hf_checkpoint(cfg, variables, good)          # overwrite fails: old files intact
  assert _read_dir(good) == before
  with pytest.raises(OSError, match="No space"):
    save_jax_variables(cfg, variables, str(tmp_path / "jax"))
  assert os.listdir(tmp_path / "jax") == []


def test_loading_onto_a_mesh_builds_each_shard_from_the_tensors_it_overlaps(tiny, tmp_path,
                                                                            monkeypatch):
  """Oracle: the plain (host) load. Sharded: every leaf carries the rule
  set's sharding and every device's shard equals that slice of the host
  load; no callback ever builds more than one device's shard."""
  from deepseek_jax.parallel import MeshConfig, setup, tree_shardings
  cfg, variables = tiny
  path = str(tmp_path)
  save_hf_checkpoint(cfg, variables, path, max_shard_bytes=60_000)
  _, host = load_hf_checkpoint(path)
  mesh, rules = setup(MeshConfig(data=1, fsdp=2, expert=4))
  built = []
  real = jax.make_array_from_callback

  def spy(shape, sharding, callback):
    def wrapped(index):
      shard = callback(index)
      built.append((shape, shard.shape))
      return shard
    return real(shape, sharding, wrapped)

  monkeypatch.setattr(jax, "make_array_from_callback", spy)
  _, placed = load_hf_checkpoint(path, mesh=mesh, rules="ep_fsdp")
  want = flatten(tree_shardings(abstract_variables(cfg), mesh, rules))
  flat_host, flat_placed = flatten(host), flatten(placed)
  assert sorted(flat_placed) == sorted(flat_host)
  for name, arr in flat_placed.items():
    assert arr.sharding == want[name], name
    assert arr.dtype == flat_host[name].dtype, name
    for shard in arr.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data),
                                    np.asarray(flat_host[name])[shard.index], err_msg=name)
  experts = flat_placed["params/moe_layers/ffn/w1"]
  assert experts.addressable_shards[0].data.shape[1] == cfg.n_routed_experts // 4
  assert any(full != part for full, part in built)       # sharded leaves came in pieces
  with pytest.raises(ValueError, match="needs rules="):
    load_hf_checkpoint(path, mesh=mesh)
