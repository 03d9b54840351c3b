"""Writing our variables as an HF checkpoint: config.json, shards, index.

DeepSeek-V3.2 / V3 / V2 for the MLA models, Llama / Qwen2 for the dense GQA ones
(a tied model writes no lm_head.weight: transformers ties it on load),
DeepSeek-V4 for arch="v4" under the tensor names transformers' own
save_pretrained writes (hf_v4.py; MTP under `mtp.{k}.`, which transformers
skips on load).
What transformers' `from_pretrained` (and vLLM) read: per-expert keys as
published (hf_keys.py), MTP module k at layer num_hidden_layers + k,
`model-0000i-of-0000n.safetensors` shards of at most max_shard_bytes and the
`model.safetensors.index.json` weight map. A sigmoid-routed model is written
as DeepSeek-V3, a softmax-routed one as DeepSeek-V2, one with DeepSeek
Sparse Attention as DeepSeek-V3.2, indexers included (hf_config.py). Every
file goes through `deepseek_jax.files` (temp file, then rename), so a failed
save never leaves a half-written file, and an earlier save into the same
directory stays whole until the new index replaces it.
"""

from __future__ import annotations

import functools
import glob
import logging
import math
import os
from typing import Any, Callable, Mapping

import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.files import atomic_json, atomic_write
from deepseek_jax.interop.hf_config import CONFIG_NAME, config_to_hf
from deepseek_jax.interop.hf_keys import Slot, key_map, unmapped_router_biases
from deepseek_jax.interop.hf_v4 import v4_key_map
from deepseek_jax.interop.safetensors_io import INDEX_NAME, write_safetensors
from deepseek_jax.interop.variables import check_variables, np_dtype, param_dtype

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 4 * 2**30


def save_hf_checkpoint(cfg: ModelConfig, variables: Mapping[str, Any], path: str, *,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                       dtype=None) -> None:
  """Writes an HF checkpoint (config.json, shards, index): DeepSeek-V4 for
  arch="v4" (hf_v4.py), V3 for a sigmoid router, V2 for a softmax one (its
  router bias must be 0), Qwen2 / Llama for a dense GQA model with / without
  q/k/v biases (config_to_hf).

  Per-expert keys as published; MTP module k at layer num_hidden_layers + k.
  Tensors keep their dtype unless `dtype` is given (the router bias stays
  float32). Every file is written to a temp file and renamed into place;
  the index is written last, then shards of an earlier save into `path`
  (`model.safetensors`, `model-*-of-*.safetensors`) that it no longer lists
  are removed so that no reader picks them up.
  """
  hf_config = config_to_hf(cfg)
  flat = check_variables(cfg, variables)
  slots = v4_key_map(cfg) if cfg.is_v4 else key_map(cfg)
  # V4's hash layers route by their table: their (unused) router bias is not stored.
  for name in [] if cfg.is_v4 else unmapped_router_biases(slots, flat):
    if np.any(np.asarray(flat[name]) != 0):
      raise ValueError(
          f"{name} is not zero, but a softmax-routed (DeepSeek-V2) checkpoint has no router "
          "bias to hold it: the exported model would route differently. Train V2-shaped "
          "models with bias_update_speed=0 (V2's balance losses instead), or export a "
          "sigmoid-routed model as V3.")
  os.makedirs(path, exist_ok=True)
  out_dtype = None if dtype is None else np_dtype(param_dtype(dtype))

  def tensor_dtype(s: Slot):
    if s.leaf.endswith("/tid2eid"):          # V4's hash table: int64 (torch long)
      return np.dtype(np.int64)
    if out_dtype is None or s.leaf.startswith("router_bias/"):
      return np.dtype(flat[s.leaf].dtype)
    return np.dtype(out_dtype)

  shards = _plan_shards(slots, tensor_dtype, max_shard_bytes)
  host = functools.lru_cache(maxsize=4)(lambda leaf: np.asarray(flat[leaf]))
  weight_map, total = {}, 0
  for n, shard in enumerate(shards):
    name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
    tensors = {}
    for s in shard:
      tensors[s.key] = np.ascontiguousarray(
          s.to_hf(host(s.leaf)[s.index]).astype(tensor_dtype(s)))
      weight_map[s.key] = name
      total += tensors[s.key].nbytes
    atomic_write(os.path.join(path, name),
                 lambda tmp, t=tensors: write_safetensors(t, tmp, {"format": "pt"}))
    log.info("wrote %s (%d tensors)", name, len(tensors))
    del tensors
  hf_config["dtype"] = (str(np.dtype(out_dtype)) if out_dtype is not None
                        else str(np.dtype(flat["params/embed/embedding"].dtype)))
  atomic_json(hf_config, os.path.join(path, CONFIG_NAME))
  atomic_json({"metadata": {"total_size": total}, "weight_map": weight_map},
              os.path.join(path, INDEX_NAME))
  _remove_stale_shards(path, set(weight_map.values()))


def _plan_shards(slots: list[Slot], tensor_dtype: Callable[[Slot], np.dtype],
                 max_shard_bytes: int) -> list[list[Slot]]:
  """`slots` in order, cut into shards of at most max_shard_bytes (a tensor
  larger than that gets a shard of its own)."""
  shards: list[list[Slot]] = [[]]
  size = 0
  for s in slots:
    nbytes = math.prod(s.shape) * tensor_dtype(s).itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(s)
    size += nbytes
  return shards


def _remove_stale_shards(path: str, kept: set[str]) -> None:
  """Deletes shards of an earlier save into `path` that the new index does not list."""
  stale = glob.glob(os.path.join(path, "model-*-of-*.safetensors"))
  stale += glob.glob(os.path.join(path, "model.safetensors"))
  for file in stale:
    if os.path.basename(file) not in kept:
      os.remove(file)
