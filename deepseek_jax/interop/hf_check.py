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
import os
import re
import warnings

from deepseek_jax.config import ModelConfig
from deepseek_jax.fp8.published import BLOCK, block_scale_shape
from deepseek_jax.interop.hf_config import (CONFIG_NAME, config_from_hf, hf_model_type,
                                            read_hf_config)
from deepseek_jax.interop.hf_keys import Slot, ignored_tensors, key_map
from deepseek_jax.interop.safetensors_io import (FLOAT8_DTYPES, TensorInfo, checkpoint_files,
                                                 list_tensors)
from deepseek_jax.interop.variables import keys_error, param_dtype


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
    text = str(e)
    text = (text[len(CONFIG_NAME):] if text.startswith(CONFIG_NAME) else f": {text}")
    kind = NotImplementedError if isinstance(e, NotImplementedError) else ValueError
    raise kind(config_path + text) from None

  fused = frozenset(i for i in layer_ids if f"model.layers.{i}.mlp.experts.gate_up_proj" in infos)
  slots = key_map(cfg, fused)
  quant = hf.get("quantization_config") or {}
  block = tuple(quant.get("weight_block_size") or BLOCK)
  if quant and quant.get("quant_method", "fp8") != "fp8":
    raise NotImplementedError(f"{config_path}: quantization {quant.get('quant_method')!r}: "
                              "only DeepSeek's block FP8 checkpoints are supported.")
  _check_tensors(path, slots, infos, block, ignored_tensors(cfg), cfg.is_gqa)
  return Checkpoint(cfg, files, infos, slots, block)


def _check_tensors(path: str, slots: list[Slot], infos: dict[str, TensorInfo],
                   block: tuple[int, int], extra: dict[str, tuple[int, ...]],
                   dense: bool = False) -> None:
  """Every tensor of `slots` (and the block scales of FP8 ones) is in `infos`
  with its shape, and nothing else is but `extra` and ignorable keys."""
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
  fields = (("num_hidden_layers", "tie_word_embeddings", "model_type (Qwen2 has q/k/v "
             "biases, Llama none)") if dense else
            ("num_hidden_layers", "first_k_dense_replace", "q_lora_rank", "n_routed_experts",
             "n_shared_experts", "num_nextn_predict_layers", "index_n_heads / index_head_dim "
            "(deepseek_v32)"))
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
