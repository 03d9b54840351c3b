"""HF interop of DeepSeek-V3.2 (DeepSeek Sparse Attention): DeepseekV32ForCausalLM <-> ours.

Oracles: transformers' DeepseekV32ForCausalLM at a tiny random size, saved
with `save_pretrained` and loaded with `from_pretrained`, with an
index_topk (6) shorter than the sequence so that the indexer's selection
changes the logits; exact equality after round trips through our writer and
reader; DeepSeek's published V3.2-Exp config.json against the v32_671b
preset. V3.2's transformers config has no MTP field: a transformers
checkpoint loads with n_mtp_depth=0, our export writes the MTP module at
layer num_hidden_layers (as DeepSeek publishes it) and transformers ignores it.
"""

import json
import os

import jax
import numpy as np
import pytest
import safetensors.numpy

from deepseek_jax import get_preset
from deepseek_jax.interop import (config_from_hf, config_to_hf, load_hf_checkpoint,
                                  load_jax_variables, save_hf_checkpoint)
from deepseek_jax.interop.safetensors_io import flatten
from deepseek_jax.model import Transformer
from launch import convert
from random_weights import random_variables, randomize_torch_model
from test_hf_interop import PUBLISHED_V3

try:
  import torch
  import transformers
except ImportError:
  torch = transformers = None

needs_torch = pytest.mark.skipif(torch is None, reason="needs torch + transformers")
TOL = 1e-4
TOPK = 6
TOKENS = np.random.default_rng(0).integers(0, 128, (2, 24)).astype(np.int32)
HF = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
    n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4,
    topk_group=2, first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16,
    qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=64,
    routed_scaling_factor=2.5, index_n_heads=8, index_head_dim=16, index_topk=TOPK,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
# DeepSeek-V3.2-Exp's config.json: V3's plus the indexer's three fields.
PUBLISHED_V32 = {**PUBLISHED_V3, "architectures": ["DeepseekV32ForCausalLM"],
                 "model_type": "deepseek_v32", "index_head_dim": 128, "index_n_heads": 64,
                 "index_topk": 2048}


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.double().numpy()


def _logits(cfg, variables, tokens=TOKENS):
  return np.asarray(jax.jit(lambda v, t: Transformer(cfg).apply(v, t))(variables, tokens))


def _tensors(directory):
  out = {}
  for name in sorted(os.listdir(directory)):
    if name.endswith(".safetensors"):
      out.update(safetensors.numpy.load_file(os.path.join(directory, name)))
  return out


def _assert_trees_equal(a, b):
  fa, fb = flatten(a), flatten(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory):
  """(transformers model, its save_pretrained directory), every weight random
  (the indexer's LayerNorm and the router bias included). With few indexer
  heads (< 8 here) many index scores are exactly 0 (every head's ReLU off),
  and torch.topk and lax.top_k break those ties differently: 8 heads keep
  the top-k sets unique, as the published model's 64 do."""
  if torch is None:
    pytest.skip("needs torch + transformers")
  torch.manual_seed(0)
  model = transformers.DeepseekV32ForCausalLM(
      transformers.DeepseekV32Config(attn_implementation="eager", **HF)).eval()
  randomize_torch_model(model)
  with torch.no_grad():
    for name, b in model.named_buffers():
      if name.endswith("e_score_correction_bias"):
        b.copy_(0.5 * torch.rand_like(b))
  path = str(tmp_path_factory.mktemp("hf_v32"))
  model.save_pretrained(path)
  return model, path


@pytest.fixture(scope="module")
def loaded(hf_ckpt):
  return load_hf_checkpoint(hf_ckpt[1])


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
  """(cfg, random variables, our HF export directory): tiny_v32 with its MTP
  module, 16 indexer heads (module doc of the HF fixture: no exact ties)."""
  cfg = get_preset("tiny_v32", vocab_size=128, max_seq_len=64, original_seq_len=64,
                   index_n_heads=16)
  assert cfg.n_mtp_depth == 1 and cfg.index_topk < TOKENS.shape[1]
  variables = random_variables(cfg, seed=11)
  path = str(tmp_path_factory.mktemp("export_v32"))
  save_hf_checkpoint(cfg, variables, path, max_shard_bytes=200_000)
  return cfg, variables, path


# ---------------------------------------------------------------------------
# transformers -> ours, ours -> transformers

@needs_torch
def test_transformers_checkpoint_loads_with_its_logits(hf_ckpt, loaded):
  model, _ = hf_ckpt
  cfg, variables = loaded
  assert (cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk) == (8, 16, TOPK)
  assert cfg.n_mtp_depth == 0 and cfg.score_func == "sigmoid" and cfg.dsa_stage == "off"
  assert "indexer" in variables["params"]["moe_layers"]["attn"]
  want = _hf_logits(model, TOKENS)
  err = float(np.abs(_logits(cfg, variables) - want).max())
  gap = float(np.abs(_logits(cfg.replace(index_topk=0), variables) - want).max())
  print(f"\n[hf_v32] max|ours - hf| = {err:.3g}; dense MLA differs by {gap:.3g}")
  assert err < TOL
  assert gap > 100 * TOL            # top-6 of 24 tokens: the selection matters


@needs_torch
def test_our_export_loads_in_transformers_with_our_logits(ours):
  cfg, variables, path = ours
  with open(os.path.join(path, "config.json")) as f:
    written = json.load(f)
  assert written["architectures"] == ["DeepseekV32ForCausalLM"]
  assert (written["index_n_heads"], written["index_head_dim"], written["index_topk"]) == (
      cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk)
  assert written["num_nextn_predict_layers"] == 1 and "rope_interleave" not in written
  mtp_key = f"model.layers.{cfg.n_layers}.self_attn.indexer.wk.weight"
  assert mtp_key in _tensors(path)            # the MTP block, with its own indexer
  model = transformers.DeepseekV32ForCausalLM.from_pretrained(
      path, attn_implementation="eager", dtype=torch.float32).eval()
  assert model.config.index_topk == cfg.index_topk
  want = _logits(cfg, variables)
  np.testing.assert_allclose(_hf_logits(model, TOKENS), want, rtol=0,
                             atol=TOL * np.abs(want).max())


def test_our_export_round_trips_exactly_with_its_mtp_module(ours):
  cfg, variables, path = ours
  back_cfg, back = load_hf_checkpoint(path)
  assert back_cfg == cfg
  _assert_trees_equal(back, variables)


@needs_torch
def test_transformers_checkpoint_round_trips_exactly(hf_ckpt, loaded, tmp_path):
  cfg, variables = loaded
  save_hf_checkpoint(cfg, variables, str(tmp_path))
  original, rewritten = _tensors(hf_ckpt[1]), _tensors(str(tmp_path))
  assert sorted(rewritten) == sorted(original)
  for k, v in original.items():
    np.testing.assert_array_equal(rewritten[k], v, err_msg=k)
  with open(os.path.join(str(tmp_path), "config.json")) as f:
    assert "num_nextn_predict_layers" in json.load(f)


# ---------------------------------------------------------------------------
# launch.convert and init_from_hf

@needs_torch
def test_convert_both_ways(hf_ckpt, loaded, tmp_path):
  """launch.convert: transformers' V3.2 directory -> ours -> HF gives back
  transformers' tensors exactly."""
  jax_dir, hf_out = str(tmp_path / "jax"), str(tmp_path / "hf")
  convert.convert(from_hf=hf_ckpt[1], to_jax=jax_dir)
  cfg, variables = load_jax_variables(jax_dir)
  assert cfg == loaded[0]
  _assert_trees_equal(variables, loaded[1])
  convert.convert(from_jax=jax_dir, to_hf=hf_out)
  original, rewritten = _tensors(hf_ckpt[1]), _tensors(hf_out)
  assert sorted(rewritten) == sorted(original)
  for k, v in original.items():
    np.testing.assert_array_equal(rewritten[k], v, err_msg=k)


@needs_torch
def test_init_from_hf_starts_training_from_the_v32_weights(hf_ckpt, loaded):
  """What `launch.train --config.init_from_hf=DIR` does before its first
  step (train/hf_init.py): the checkpoint's config, with a DSA training stage
  as a shape-keeping override, and its weights in the state."""
  from deepseek_jax.train.hf_init import finetune_configs, init_state_from_hf
  cfg, train_cfg = finetune_configs(hf_ckpt[1], {"steps": 1, "warmup_steps": 1},
                                    {"dsa_stage": "sparse"})
  assert cfg == loaded[0].replace(dsa_stage="sparse")
  state = init_state_from_hf(cfg, train_cfg, hf_ckpt[1])
  _assert_trees_equal({"params": state.params, "router_bias": state.router_bias}, loaded[1])


# ---------------------------------------------------------------------------
# Config mapping and refusals

def test_published_v32_config_maps_to_the_671b_preset():
  cfg = config_from_hf(PUBLISHED_V32, dtype="bfloat16", remat_policy="full")
  preset = get_preset("v32_671b")
  assert cfg == preset.replace(max_seq_len=163840, init_std=0.02)
  assert cfg.n_mtp_depth == 1                     # the published field, read
  runtime = {k: getattr(cfg, k) for k in ("dtype", "param_dtype", "remat_policy")}
  assert config_from_hf(config_to_hf(cfg), **runtime) == cfg
  # transformers' own form has no MTP field: 0 MTP modules.
  no_mtp = {k: v for k, v in PUBLISHED_V32.items() if k != "num_nextn_predict_layers"}
  assert config_from_hf(no_mtp).n_mtp_depth == 0
  # An index_topk past the context selects every earlier token: the context's length.
  assert config_from_hf({**PUBLISHED_V32, "index_topk": 10**6}).index_topk == 163840


@needs_torch
def test_transformers_reads_our_config_as_we_do():
  cfg = get_preset("tiny_v32")
  hf = config_to_hf(cfg)
  hf_cfg = transformers.DeepseekV32Config.from_dict(json.loads(json.dumps(hf)))
  assert hf_cfg.mlp_layer_types == ["dense"] + ["sparse"] * (cfg.n_layers - 1)
  runtime = {k: getattr(cfg, k) for k in ("dtype", "param_dtype", "remat_policy")}
  assert config_from_hf(hf_cfg.to_dict(), **runtime) == cfg     # as HF re-saves it


@pytest.mark.parametrize("change,error,match", [
    ({"scoring_func": "softmax", "norm_topk_prob": False}, NotImplementedError,
     "scoring_func='softmax' in a DeepSeek-V3.2 config"),
    ({"topk_method": "greedy"}, NotImplementedError, "topk_method='greedy'"),
    ({"mlp_layer_types": ["sparse"] * 61}, NotImplementedError,
     "mlp_layer_types \\(dense at layers \\[\\]\\)"),
    ({"layer_types": ["full_attention"] * 61}, NotImplementedError,
     "layer_types with \\['full_attention'\\]"),
    ({"q_lora_rank": None}, NotImplementedError, "q_lora_rank=None"),
    ({"index_topk": 0}, ValueError, "index_topk=0"),
    ({"index_head_dim": 32}, ValueError, "index_head_dim=32"),
    ({"rope_interleave": False}, NotImplementedError, "rope_interleave=False"),
    ({"norm_topk_prob": False}, NotImplementedError, "norm_topk_prob"),
])
def test_what_we_cannot_hold_is_refused_naming_the_field(change, error, match):
  with pytest.raises(error, match=match) as e:
    config_from_hf({**PUBLISHED_V32, **change})
  assert "\n" not in str(e.value)


def test_export_refuses_a_softmax_routed_dsa_model(tmp_path):
  cfg = get_preset("tiny_v32", score_func="softmax", route_scale=1.0, n_mtp_depth=0)
  with pytest.raises(NotImplementedError, match="score_func='softmax' with index_topk=8"):
    save_hf_checkpoint(cfg, random_variables(cfg, seed=0), str(tmp_path))
  assert not os.listdir(tmp_path)


def test_loading_onto_a_mesh_builds_each_indexer_shard_from_its_slice(ours, monkeypatch):
  """fsdp 2 x tensor 2 x expert 2 (ep_fsdp): every leaf, the indexers' and
  the MTP block's included, in its sharding, each device's shard that slice
  of the host load. parallel/rules.py lacks the indexer's three new
  parameters for now (test_dsa.py's INDEXER_AXES, set here the same way)."""
  from deepseek_jax.model import abstract_variables
  from deepseek_jax.parallel import MeshConfig, setup, tree_shardings
  from deepseek_jax.parallel import rules as rules_lib
  from test_dsa import INDEXER_AXES
  for key, names in INDEXER_AXES.items():
    monkeypatch.setitem(rules_lib._PARAM_AXES, key, names)
  cfg, variables, path = ours
  mesh, rules = setup(MeshConfig(data=1, fsdp=2, tensor=2, expert=2, rules="ep_fsdp"))
  _, placed = load_hf_checkpoint(path, mesh=mesh, rules="ep_fsdp")
  want = flatten(tree_shardings(abstract_variables(cfg), mesh, rules))
  host = flatten(variables)
  for name, arr in flatten(placed).items():
    assert arr.sharding == want[name], name
    for shard in arr.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(host[name])[shard.index],
                                    err_msg=name)
  wq_b = flatten(placed)["params/moe_layers/attn/indexer/wq_b/kernel"]   # [L, q_lora, H, D]
  assert wq_b.addressable_shards[0].data.shape[2] < cfg.index_n_heads    # heads split
