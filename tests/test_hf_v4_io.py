"""DeepSeek-V4 checkpoints in and out: load_hf_checkpoint / save_hf_checkpoint /
launch.convert / init_from_hf against transformers' DeepseekV4ForCausalLM.

A tiny random V4 model (every attention type, both MLP types: tests/test_v4.py's
config) is written by transformers' own save_pretrained (DeepSeek's tensor
names, per-expert weights, int64 hash tables, no MTP) and read by us: logits
within 1e-4 of transformers'. Our own variables (perturbed, MTP on) are written
by save_hf_checkpoint and read by transformers' from_pretrained (logits within
1e-4 of ours, no missing or unexpected key) and by us (every leaf, MTP
included, bit-equal).
"""

import copy
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy

from deepseek_jax.interop import load_hf_checkpoint, save_hf_checkpoint
from deepseek_jax.interop.hf_v4 import config_from_hf_v4, config_to_hf_v4
from deepseek_jax.interop.safetensors_io import flatten, unflatten
from deepseek_jax.model import Transformer, init_variables
from test_v4 import HF, _tokens

try:
  import torch
  import transformers
except ImportError:
  torch = transformers = None

TOL = 1e-4


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.from_numpy(np.asarray(tokens)).long()).logits.numpy()


def _ours(cfg, variables, tokens):
  return np.asarray(Transformer(cfg).apply(variables, jnp.asarray(tokens)))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """(transformers model, the directory its save_pretrained wrote)."""
  if torch is None:
    pytest.skip("needs torch + transformers")
  from random_weights import random_hf_v4
  model = random_hf_v4(HF)
  path = str(tmp_path_factory.mktemp("v4") / "hf")
  model.save_pretrained(path)
  return model, path


@pytest.fixture(scope="module")
def loaded(hf_dir):
  return load_hf_checkpoint(hf_dir[1])


@pytest.fixture(scope="module")
def exported(loaded, tmp_path_factory):
  """(cfg with MTP, our perturbed variables, the directory save_hf_checkpoint wrote)."""
  cfg0, base = loaded
  cfg = cfg0.replace(n_mtp_depth=1)
  fresh = init_variables(cfg, jax.random.key(1))
  rng = np.random.default_rng(1)
  flat = flatten(fresh)
  for name, value in flatten(base).items():
    v = np.asarray(value)
    if name.endswith("tid2eid"):
      flat[name] = np.roll(v, 1, axis=0)                      # another hash table
    elif not name.endswith("ffn/bias") or not np.any(v == 0):
      flat[name] = v * (1 + 0.1 * rng.standard_normal(v.shape)).astype(v.dtype)
  flat["router_bias/mtp_0/block/ffn/bias"] = rng.uniform(0, 0.5, 8).astype(np.float32)
  variables = jax.tree.map(jnp.asarray, unflatten(flat))
  path = str(tmp_path_factory.mktemp("v4") / "ours")
  save_hf_checkpoint(cfg, variables, path)
  return cfg, variables, path


@pytest.mark.torch
def test_transformers_checkpoint_loads_with_its_logits(hf_dir, loaded):
  model, path = hf_dir
  cfg, variables = loaded
  with open(os.path.join(path, "config.json")) as f:
    assert json.load(f)["num_nextn_predict_layers"] == 1      # ... but no mtp.* tensors
  assert cfg == config_from_hf_v4(model.config.to_dict(), n_mtp_depth=0)
  assert variables["router_bias"]["layers_0"]["tid2eid"].dtype == jnp.int32
  tokens = _tokens()
  err = np.abs(_ours(cfg, variables, tokens) - _hf_logits(model, tokens)).max()
  assert err < TOL, err


@pytest.mark.torch
def test_our_export_loads_in_transformers_with_our_logits(exported):
  cfg, variables, path = exported
  model, info = transformers.DeepseekV4ForCausalLM.from_pretrained(
      path, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info["mismatched_keys"], info
  tokens = _tokens(seed=3)
  want = _ours(cfg, variables, tokens)
  err = np.abs(want - _hf_logits(model.eval(), tokens)).max()
  assert err < TOL, err


@pytest.mark.torch
def test_export_round_trips_exactly_mtp_included(exported):
  cfg, variables, path = exported
  with safetensors.safe_open(os.path.join(path, "model-00001-of-00001.safetensors"),
                             "np") as f:
    keys = set(f.keys())
    assert f.get_tensor("model.layers.0.ffn.gate.tid2eid").dtype == np.int64
  assert "head.weight" in keys and "model.layers.3.attn.indexer.compressor.ape" in keys
  assert "mtp.0.eh_proj.weight" in keys and "model.layers.0.ffn.gate.bias" not in keys
  cfg2, back = load_hf_checkpoint(path)
  assert cfg2 == cfg
  got, want = flatten(back), flatten(variables)
  assert set(got) == set(want)
  for name in want:
    assert got[name].dtype == want[name].dtype, name
    np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), err_msg=name)


@pytest.mark.torch
def test_bfloat16_load_and_save_and_mesh_load(exported, tmp_path):
  from deepseek_jax.parallel import MeshConfig, setup
  cfg, variables, path = exported
  cfg_bf, bf = load_hf_checkpoint(path, dtype="bfloat16")
  assert cfg_bf.param_dtype == "bfloat16"
  assert bf["params"]["layers_1"]["attn"]["wq_b"]["kernel"].dtype == jnp.bfloat16
  assert bf["router_bias"]["layers_2"]["ffn"]["bias"].dtype == jnp.float32
  np.testing.assert_array_equal(bf["router_bias"]["layers_0"]["tid2eid"],
                                variables["router_bias"]["layers_0"]["tid2eid"])
  save_hf_checkpoint(cfg, variables, str(tmp_path / "bf16"), dtype="bfloat16")
  _, bf_saved = load_hf_checkpoint(str(tmp_path / "bf16"), dtype="bfloat16")
  for name, value in flatten(bf).items():
    np.testing.assert_array_equal(np.asarray(flatten(bf_saved)[name]), np.asarray(value))
  mesh, _ = setup(MeshConfig(data=1, fsdp=2, expert=4))
  _, placed = load_hf_checkpoint(path, mesh=mesh, rules="ep_fsdp")
  for name, value in flatten(variables).items():
    np.testing.assert_array_equal(np.asarray(flatten(placed)[name]), np.asarray(value),
                                  err_msg=name)
  with pytest.raises(NotImplementedError, match="keep_fp8=True with a DeepSeek-V4"):
    load_hf_checkpoint(path, keep_fp8=True)


def _rewrite(src, dst, edit_tensors=None, edit_config=None):
  shutil.copytree(src, dst)
  if edit_tensors:
    file = os.path.join(dst, "model-00001-of-00001.safetensors")
    with safetensors.safe_open(file, "np") as f:
      tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit_tensors(tensors)
    safetensors.numpy.save_file(tensors, file)
    index = os.path.join(dst, "model.safetensors.index.json")
    with open(index) as f:
      meta = json.load(f)
    meta["weight_map"] = {k: os.path.basename(file) for k in tensors}
    with open(index, "w") as f:
      json.dump(meta, f)
  if edit_config:
    with open(os.path.join(dst, "config.json")) as f:
      hf = json.load(f)
    edit_config(hf)
    with open(os.path.join(dst, "config.json"), "w") as f:
      json.dump(hf, f)
  return str(dst)


@pytest.mark.torch
@pytest.mark.parametrize("tensors, config, error, match", [
    (lambda t: t.pop("model.layers.2.attn.compressor.ape"), None, ValueError,
     "1 missing tensors: model.layers.2.attn.compressor.ape"),
    (lambda t: t.update(extra=np.zeros(2, np.float32)), None, ValueError,
     "1 unexpected tensors: extra"),
    (None, lambda c: c.update(sliding_window=16, o_lora_rank=8), ValueError,
     r"model.layers.0.attn.wo_a.weight in .*: expected shape \(16, 64\)"),
    (lambda t: t.update({"head.weight": t["head.weight"].astype(ml_dtypes.float8_e4m3fn)}),
     None, NotImplementedError, "quantized DeepSeek-V4 checkpoints"),
    (None, lambda c: c.update(num_key_value_heads=2), NotImplementedError,
     "num_key_value_heads=2"),
])
def test_bad_v4_checkpoints_are_refused_naming_the_key(exported, tmp_path, tensors, config,
                                                        error, match):
  path = _rewrite(exported[2], tmp_path / "bad", tensors, config)
  with pytest.raises(error, match=match):
    load_hf_checkpoint(path)


@pytest.mark.torch
def test_convert_both_ways_and_init_from_hf(exported, tmp_path):
  """launch.convert HF -> ours -> HF keeps every tensor; a fine-tune starts
  from the checkpoint's weights (train.hf_init, as --config.init_from_hf)."""
  from deepseek_jax.train.config import TrainConfig
  from deepseek_jax.train.hf_init import finetune_configs, init_state_from_hf
  from launch import convert
  cfg, variables, path = exported
  convert.convert(from_hf=path, to_jax=str(tmp_path / "jax"))
  convert.convert(from_jax=str(tmp_path / "jax"), to_hf=str(tmp_path / "hf"))
  for name in ("model-00001-of-00001.safetensors",):
    with safetensors.safe_open(os.path.join(path, name), "np") as a, \
        safetensors.safe_open(str(tmp_path / "hf" / name), "np") as b:
      assert set(a.keys()) == set(b.keys())
      for k in a.keys():
        np.testing.assert_array_equal(a.get_tensor(k), b.get_tensor(k), err_msg=k)
  model_cfg, train_cfg = finetune_configs(path, {"batch_size": 2, "seq_len": 16})
  assert model_cfg == cfg
  state = init_state_from_hf(model_cfg, train_cfg, path)
  for name, value in flatten({"params": state.params,
                              "router_bias": state.router_bias}).items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(flatten(variables)[name]))


@pytest.mark.torch
def test_deepseek_native_names_load_too(exported, tmp_path):
  """DeepSeek's own layout (no `model.` prefix: embed.weight, norm.weight,
  hc_head_fn, layers.N.*) reads as the same variables."""
  cfg, variables, path = exported

  def native(t):
    for k in list(t):
      new = k.replace("model.embed_tokens.", "embed.").replace("model.hc_head.hc_", "hc_head_")
      t[new.removeprefix("model.")] = t.pop(k)
  cfg2, back = load_hf_checkpoint(_rewrite(path, tmp_path / "native", native))
  assert cfg2 == cfg
  for name, value in flatten(variables).items():
    np.testing.assert_array_equal(np.asarray(flatten(back)[name]), np.asarray(value))


@pytest.mark.torch
@pytest.mark.parametrize("legacy", [
    # DeepSeek's own config.json keys, which DeepseekV4Config folds in
    dict(compress_ratios=[0, 4, 128, 4], num_hash_layers=1, qk_rope_head_dim=8,
         compress_rate_hca=8),
    # a sparse config: transformers' defaults fill the rest (V4-Pro layer pattern)
    dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0,
                          "beta_slow": 1.0, "original_max_position_embeddings": 64}),
])
def test_config_json_as_transformers_reads_it(legacy):
  """Our reading of a config.json = our reading of what transformers makes of it."""
  hf = dict(vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
            head_dim=32, q_lora_rank=32, o_groups=2, o_lora_rank=16, index_head_dim=16,
            index_n_heads=8, max_position_embeddings=128, **legacy)
  want = config_from_hf_v4(transformers.DeepseekV4Config(**copy.deepcopy(hf)).to_dict())
  assert config_from_hf_v4(hf) == want
  assert config_from_hf_v4(config_to_hf_v4(want)) == want
