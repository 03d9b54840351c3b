"""An HF checkpoint directory checked from its headers alone, before any tensor is read.

`open_checkpoint` reads config.json (hf_config.py), lists the shards and the
dtype and shape of every tensor from the safetensors headers, builds the key
map for that config (hf_keys.py) and checks the two against each other:
missing, unexpected and mis-shaped tensors, FP8 weights without their block
scales, all fail here naming the key, the file and the config field to check,
so a wrong or incomplete checkpoint fails before a model is traced or a
tensor is read. `check_hf_checkpoint` is that check on its own (the trainer
runs it before compiling); hf_load.py streams the tensors of what it opens.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import warnings

from deepseek_jax.config import ModelConfig
from deepseek_jax.fp8.published import BLOCK, block_scale_shape
from deepseek_jax.interop.hf_config import (CONFIG_NAME, config_from_hf, hf_model_type,
                                            read_hf_config)
from deepseek_jax.interop.hf_keys import Slot, ignored_tensors, key_map
from deepseek_jax.interop.hf_v4 import V4_MODEL_TYPE, v4_key_map
from deepseek_jax.interop.safetensors_io import (FLOAT8_DTYPES, TensorInfo, checkpoint_files,
                                                 list_tensors)
from deepseek_jax.interop.variables import keys_error, param_dtype

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """A checked HF checkpoint directory: its config, shards, tensor headers,
  key map and FP8 weight block size."""
  cfg: ModelConfig
  files: list[str]
  infos: dict[str, TensorInfo]
  slots: list[Slot]
  block: tuple[int, int]


def check_hf_checkpoint(path: str, dtype=None) -> ModelConfig:
  """The ModelConfig of an HF checkpoint directory after checking, from the
  safetensors headers alone (no tensor is read), that every tensor the config
  implies is there with its shape: a missing, incomplete or mismatched
  checkpoint fails here, before anything is compiled."""
  return open_checkpoint(path, param_dtype(dtype)).cfg


def open_checkpoint(path: str, param_dtype_name: str) -> Checkpoint:
  """The checked checkpoint directory `path`, its cfg with `param_dtype_name`."""
  hf = read_hf_config(path)
  config_path = os.path.join(path, CONFIG_NAME)
  try:
    hf_model_type(hf)           # another architecture: say so before looking at tensors
  except ValueError as e:
    raise ValueError(f"{config_path}: {e}") from None
  files = checkpoint_files(path)
  infos = list_tensors(files)
  if hf.get("model_type") == V4_MODEL_TYPE:
    return _open_v4(path, hf, files, infos, param_dtype_name)

  n_layers = hf.get("num_hidden_layers")
  layer_ids = {int(m.group(1)) for k in infos
               if (m := re.match(r"model\.layers\.(\d+)\.", k))}
  depth = hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers"))
  if depth and isinstance(n_layers, int) and not any(i >= n_layers for i in layer_ids):
    warnings.warn(f"{path}: config.json has num_nextn_predict_layers={depth} but the "
                  "checkpoint holds no MTP weights; loading with n_mtp_depth=0.")
    hf["num_nextn_predict_layers"] = 0
    hf.pop("num_mtp_layers", None)
  try:
    cfg = config_from_hf(hf, param_dtype=param_dtype_name)
  except (ValueError, NotImplementedError) as e:   # name the file, not just "config.json"
    raise _config_error(config_path, e) from None

  fused = frozenset(i for i in layer_ids if f"model.layers.{i}.mlp.experts.gate_up_proj" in infos)
  slots = key_map(cfg, fused)
  quant = hf.get("quantization_config") or {}
  block = tuple(quant.get("weight_block_size") or BLOCK)
  if quant and quant.get("quant_method", "fp8") != "fp8":
    raise NotImplementedError(f"{config_path}: quantization {quant.get('quant_method')!r}: "
                              "only DeepSeek's block FP8 checkpoints are supported.")
  fields = (("num_hidden_layers", "tie_word_embeddings", "model_type (Qwen2 has q/k/v "
             "biases, Llama none)") if cfg.is_gqa else
            ("num_hidden_layers", "first_k_dense_replace", "q_lora_rank", "n_routed_experts",
             "n_shared_experts", "num_nextn_predict_layers", "index_n_heads / index_head_dim "
             "(deepseek_v32)"))
  _check_tensors(path, slots, infos, block, ignored_tensors(cfg), fields)
  return Checkpoint(cfg, files, infos, slots, block)


def _config_error(config_path: str, e: Exception) -> Exception:
  """`e` (from config_from_hf) re-raised naming the file, not just "config.json"."""
  text = str(e)
  text = (text[len(CONFIG_NAME):] if text.startswith(CONFIG_NAME) else f": {text}")
  kind = NotImplementedError if isinstance(e, NotImplementedError) else ValueError
  return kind(config_path + text)


def _open_v4(path: str, hf: dict, files: list[str], infos: dict[str, TensorInfo],
             param_dtype_name: str) -> Checkpoint:
  """open_checkpoint for a DeepSeek-V4 directory (hf_v4.py's key map):
  transformers' on-disk names or DeepSeek's native ones (`embed.weight`);
  no `mtp.*` tensors -> n_mtp_depth=0; quantized weights refused."""
  config_path = os.path.join(path, CONFIG_NAME)
  quant = hf.get("quantization_config")
  low = sorted(k for k, i in infos.items() if i.dtype in FLOAT8_DTYPES or i.dtype in
               ("I8", "U8", "F4", "F8_E8M0"))
  if quant or low:
    what = (f"quantization_config {quant.get('quant_method', quant)!r}" if quant
            else f"{low[0]} stored as {infos[low[0]].dtype}")
    raise NotImplementedError(f"{config_path}: {what}: quantized DeepSeek-V4 checkpoints "
                              "(FP8 / FP4 weights) are not read yet; load a float (bf16 / f32) "
                              "copy, e.g. one transformers' save_pretrained wrote.")
  depth = hf.get("num_nextn_predict_layers")
  if depth and not any(k.startswith("mtp.") for k in infos):
    hf = {**hf, "num_nextn_predict_layers": 0}   # transformers drops V4's MTP weights
    log.info("%s: num_nextn_predict_layers=%s but no mtp.* tensors; loading with "
             "n_mtp_depth=0", path, depth)
  try:
    cfg = config_from_hf(hf, param_dtype=param_dtype_name)
  except (ValueError, NotImplementedError, TypeError) as e:
    raise _config_error(config_path, e) from None
  slots = v4_key_map(cfg, native="embed.weight" in infos)
  _check_tensors(path, slots, infos, BLOCK, {},
                 ("num_hidden_layers", "layer_types", "mlp_layer_types", "n_routed_experts",
                  "compress_rates", "hc_mult", "o_groups", "num_nextn_predict_layers"))
  return Checkpoint(cfg, files, infos, slots, BLOCK)


def _check_tensors(path: str, slots: list[Slot], infos: dict[str, TensorInfo],
                   block: tuple[int, int], extra: dict[str, tuple[int, ...]],
                   fields: tuple[str, ...]) -> None:
  """Every tensor of `slots` (and the block scales of FP8 ones) is in `infos`
  with its shape, and nothing else is but `extra` and ignorable keys;
  `fields`: the config.json fields an error message points to."""
  expected = {s.key: s.shape for s in slots}
  scales = {}
  for key, info in infos.items():
    if info.dtype in FLOAT8_DTYPES:
      if len(info.shape) != 2:
        raise ValueError(f"{key} in {info.file}: {info.dtype} tensor of rank "
                         f"{len(info.shape)}; only 2-D block-quantised weights are supported.")
      scales[key + "_scale_inv"] = block_scale_shape(info.shape, block)
  ignorable = {k for k, v in infos.items()
               if k.endswith("rotary_emb.inv_freq") or (0 in v.shape and ".shared_experts." in k)}
  missing = set(expected) - set(infos) - ignorable
  missing |= set(scales) - set(infos)
  if missing:
    raise keys_error(path, "missing", missing,
                     f"check that config.json matches the weights ({', '.join(fields)}) "
                     "and that every shard is present.")
  unexpected = set(infos) - set(expected) - set(scales) - set(extra) - ignorable
  if unexpected:
    raise keys_error(path, "unexpected", unexpected,
                     f"config.json does not describe these weights (check "
                     f"{', '.join(fields)}).")
  for key, shape in list(expected.items()) + list(scales.items()) + list(extra.items()):
    if key in infos and infos[key].shape != shape:
      raise ValueError(f"{key} in {infos[key].file}: expected shape {shape} from "
                       f"config.json, got {infos[key].shape}; config.json and the "
                       "weights describe different models.")
