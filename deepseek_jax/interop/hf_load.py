"""Streaming an HF checkpoint's tensors into our variables: on the host or onto a mesh.

Loading streams: the directory is checked from its headers first
(hf_check.py: missing, unexpected and mis-shaped keys fail before anything
is read or traced), then tensors are read one at a time, put through their
key-map slot (transpose, reshape, expert slice; hf_keys.py) and written into
preallocated stacked arrays, so peak host memory is about one copy of the
model. With mesh= / rules= no host holds even that: each device shard is
built from the HF tensors that overlap it.

FP8 checkpoints (published V3) store float8_e4m3fn weights with a
`weight_scale_inv` [ceil(out/128), ceil(in/128)]: w = w_fp8 * scale_inv per
128x128 block. They are dequantised to float32 while loading
(fp8/published.py), or, with `keep_fp8=True`, kept as they are: the kernel
leaf holds the float8 values in our layout and a sibling `<leaf>_scale` the
block scales of the transposed [in, out] matrix (scale_inv.T), which the
model's FP8 layers use directly.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import warnings
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import safetensors

from deepseek_jax import parallel
from deepseek_jax.config import ModelConfig
from deepseek_jax.fp8.published import BLOCK, block_scale_shape, dequantize_fp8_blocks
from deepseek_jax.interop.hf_check import Checkpoint, open_checkpoint
from deepseek_jax.interop.hf_keys import Slot, slots_by, unmapped_router_biases
from deepseek_jax.interop.safetensors_io import (FLOAT8_DTYPES, TensorInfo, flatten, read_raw,
                                                 unflatten)
from deepseek_jax.interop.variables import np_dtype, param_dtype
from deepseek_jax.model import abstract_variables

log = logging.getLogger(__name__)


def load_hf_checkpoint(path: str, *, dtype=None, mesh=None, rules=None,
                       keep_fp8: bool = False) -> tuple[ModelConfig, dict]:
  """Reads an HF DeepSeek-V4 / V3.2 / V3 / V2, Llama or Qwen2 checkpoint directory into
  (cfg, variables); Llama and Qwen2 load as dense GQA models (hf_dense.py),
  V4 (the tensor names transformers writes, hf_v4.py) as arch="v4".

  Tensors are streamed one at a time into preallocated stacked arrays of
  `dtype` (default float32; FP8 weights are dequantised first), so peak host
  memory is about one copy of the model. Every key and shape is checked
  against config.json before any tensor is read. A checkpoint without MTP
  weights (transformers' save_pretrained drops them) loads with n_mtp_depth=0.

  mesh, rules (parallel.setup; rules may be a rule-set name): place every
  leaf straight onto the mesh in its sharding under `rules`, shard by shard
  (`jax.make_array_from_callback`): each process builds only the shards of
  its own devices, from the HF tensors that overlap them, so no host ever
  holds a whole leaf, let alone the model (peak: one device shard plus one HF
  tensor). An HF tensor split over several shards (a leaf sharded along a
  non-stacked dimension, e.g. the embedding over `vocab`) is read once per
  shard that needs it.

  keep_fp8: keep a block-FP8 checkpoint's projection and expert weights as
  FP8 (1 byte per weight instead of 4) for FP8 inference: each such kernel
  leaf holds the float8 values (our layout) and a sibling `<name>_scale`
  [..., ceil(in/128), ceil(out/128)] its float32 block scales (the
  checkpoint's weight_scale_inv, transposed), and the returned cfg has
  fp8=True, so those layers run FP8 GEMMs on the blocks as published (with
  cfg.replace(fp8=False) they are dequantized on the fly instead). The FP8
  weights are frozen: gradients flow through them to the inputs and to the
  high-precision parameters (norms, router, embedding, head) but not into
  them; load with keep_fp8=False for float master weights to train. Needs
  128 x 128 blocks and no mesh; a checkpoint without FP8 weights loads as
  usual (with a warning).
  """
  dtype_name = param_dtype(dtype)
  ckpt = open_checkpoint(path, dtype_name)
  if keep_fp8 and ckpt.cfg.is_v4:
    raise NotImplementedError(f"{path}: keep_fp8=True with a DeepSeek-V4 checkpoint: V4 "
                              "checkpoints are read as float weights only; drop keep_fp8.")
  abstract = flatten(abstract_variables(ckpt.cfg))
  kept = _fp8_leaves(ckpt.slots, ckpt.infos, abstract) if keep_fp8 else {}
  cfg = ckpt.cfg
  if keep_fp8:
    if mesh is not None:
      raise NotImplementedError("load_hf_checkpoint(keep_fp8=True) loads onto one device for "
                                "now; drop mesh= or load with keep_fp8=False.")
    if not kept:
      warnings.warn(f"{path}: keep_fp8=True but the checkpoint has no block-FP8 projection "
                    "weights; loaded as usual.")
    elif ckpt.block != BLOCK:
      raise ValueError(f"{path}: keep_fp8=True needs 128 x 128 weight blocks (the FP8 GEMMs "
                       f"tile by 128); quantization_config.weight_block_size is "
                       f"{list(ckpt.block)}. Load with keep_fp8=False to dequantize.")
    else:
      cfg = cfg.replace(fp8=True)
  if mesh is not None:
    return cfg, _load_onto_mesh(ckpt, dtype_name, mesh, rules)
  return cfg, _load_on_host(ckpt, abstract, dtype_name, kept)


def _leaf_dtype(name: str, dtype_name: str, abstract_dtype=None):
  """An integer leaf (V4's hash table) keeps its dtype, the router bias stays
  float32; every other leaf takes the load dtype."""
  if abstract_dtype is not None and np.issubdtype(abstract_dtype, np.integer):
    return np.dtype(abstract_dtype)
  return np.float32 if name.startswith("router_bias/") else np_dtype(dtype_name)


def _load_on_host(ckpt: Checkpoint, abstract: Mapping[str, Any], dtype_name: str,
                  kept: Mapping[str, tuple[Any, tuple[int, ...]]]) -> dict:
  """Every leaf filled file by file into a preallocated stacked array, then
  put on the default device; `kept` leaves (_fp8_leaves) stay float8."""
  arrays = {name: np.empty(a.shape, _leaf_dtype(name, dtype_name, a.dtype))
            for name, a in abstract.items()}
  by_key = slots_by(ckpt.slots, "key")
  for name, (fp8_dtype, scale_shape) in kept.items():
    arrays[name] = np.empty(abstract[name].shape, fp8_dtype)
    arrays[name + "_scale"] = np.empty(scale_shape, np.float32)
  filled = dict.fromkeys(arrays, 0)
  for name in unmapped_router_biases(ckpt.slots, arrays):   # V2: no router bias stored
    arrays[name] = np.zeros(arrays[name].shape, np.float32)
    filled[name] = arrays[name].size
  for n, file in enumerate(ckpt.files):
    keys = [k for k, info in ckpt.infos.items() if info.file == file and k in by_key]
    with safetensors.safe_open(file, framework="numpy") as f:
      for key in keys:
        if by_key[key][0].leaf in kept:
          w, scale_inv = _read_fp8(ckpt.infos, key)
          for s in by_key[key]:
            arrays[s.leaf + "_scale"][s.index] = scale_inv.T
            filled[s.leaf + "_scale"] += scale_inv.size
        else:
          w = _read_tensor(f, ckpt.infos, key, ckpt.block)
        for s in by_key[key]:
          target = arrays[s.leaf]
          target[s.index] = s.to_ours(w)
          filled[s.leaf] += math.prod(target.shape[len(s.index):])
        del w
    log.info("read %s (%d/%d shards, %d tensors)", os.path.basename(file), n + 1,
             len(ckpt.files), len(keys))
  unfilled = [k for k, a in arrays.items() if filled[k] != a.size]
  if unfilled:  # the key map does not match the model tree: a bug, not bad input
    raise AssertionError(f"key map left leaves partially filled: {unfilled}")
  variables = {}
  for name in list(arrays):
    variables[name] = jnp.asarray(arrays.pop(name))
  return unflatten(variables)


def _fp8_leaves(slots: list[Slot], infos: dict[str, TensorInfo], shapes: Mapping[str, Any]
                ) -> dict[str, tuple[Any, tuple[int, ...]]]:
  """Leaves keep_fp8 keeps as FP8 blocks -> (float8 dtype, scale leaf shape):
  projection kernels and routed-expert weights whose every HF tensor is a
  block-FP8 Linear weight of one float8 format."""
  kept = {}
  for leaf, group in slots_by(slots, "leaf").items():
    dtypes = {infos[s.key].dtype for s in group if s.key in infos}
    if (not re.search(r"/kernel$|/ffn/w[123]$", leaf) or len(dtypes) != 1
        or not dtypes <= set(FLOAT8_DTYPES) or any(s.to_hf is None for s in group)):
      continue
    n_out, n_in = group[0].shape
    stack = tuple(shapes[leaf].shape[:len(group[0].index)])
    kept[leaf] = (FLOAT8_DTYPES[dtypes.pop()], stack + block_scale_shape((n_in, n_out)))
  return kept


def _read_fp8(infos: dict[str, TensorInfo], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(float8 values [out, in], float32 weight_scale_inv) of a block-FP8 weight."""
  info, scale_info = infos[key], infos[key + "_scale_inv"]
  with safetensors.safe_open(scale_info.file, framework="numpy") as g:
    scale_inv = g.get_tensor(key + "_scale_inv").astype(np.float32)
  return read_raw(info.file, key, FLOAT8_DTYPES[info.dtype]), scale_inv


def _read_tensor(f, infos: dict[str, TensorInfo], key: str, block: tuple[int, int]) -> np.ndarray:
  """Tensor `key` from the open safetensors file `f` that holds it (FP8
  weights dequantised with their scales, which may sit in another file)."""
  if infos[key].dtype in FLOAT8_DTYPES:
    return dequantize_fp8_blocks(*_read_fp8(infos, key), block)
  return f.get_tensor(key)


def _load_onto_mesh(ckpt: Checkpoint, dtype_name: str, mesh, rules) -> dict:
  """Every leaf as a global array in its sharding, built shard by shard."""
  if rules is None:
    raise ValueError("load_hf_checkpoint(mesh=...) needs rules= too (a rule-set name "
                     f"from {tuple(parallel.RULE_SETS)} or parallel.setup's rules).")
  abstract = abstract_variables(ckpt.cfg)
  shardings = flatten(parallel.tree_shardings(abstract, mesh, parallel.rules.resolve(rules)))
  by_leaf = slots_by(ckpt.slots, "leaf")
  zero = set(unmapped_router_biases(ckpt.slots, flatten(abstract)))
  out = {}
  with contextlib.ExitStack() as stack:
    handles: dict[str, Any] = {}

    def read(key):
      file = ckpt.infos[key].file
      if file not in handles:
        handles[file] = stack.enter_context(safetensors.safe_open(file, framework="numpy"))
      return _read_tensor(handles[file], ckpt.infos, key, ckpt.block)

    for name, a in flatten(abstract).items():
      done: dict[tuple, np.ndarray] = {}     # replicas of one shard are built once

      def shard(index, name=name, shape=a.shape, dtype=_leaf_dtype(name, dtype_name, a.dtype),
                done=done):
        bounds = tuple(sl.indices(n)[:2] for sl, n in zip(index, shape))
        bounds += tuple((0, n) for n in shape[len(bounds):])
        if bounds not in done:
          done[bounds] = (np.zeros([hi - lo for lo, hi in bounds], dtype) if name in zero
                          else _build_shard(name, by_leaf[name], bounds, dtype, read))
        return done[bounds]

      out[name] = jax.make_array_from_callback(a.shape, shardings[name], shard)
      done.clear()
  return unflatten(out)


def _build_shard(name: str, slots: list[Slot], bounds: tuple[tuple[int, int], ...], dtype,
                 read) -> np.ndarray:
  """The block `bounds` ((lo, hi) per axis) of leaf `name`, from the HF
  tensors (read(key)) of its `slots` that overlap it."""
  buf = np.zeros([hi - lo for lo, hi in bounds], dtype)
  filled = 0
  for s in slots:
    k = len(s.index)
    if not all(lo <= i < hi for i, (lo, hi) in zip(s.index, bounds)):
      continue
    w = s.to_ours(read(s.key))[tuple(slice(lo, hi) for lo, hi in bounds[k:])]
    buf[tuple(i - lo for i, (lo, _) in zip(s.index, bounds))] = w
    filled += w.size
  if filled != buf.size:   # the key map does not cover the leaf: a bug
    raise AssertionError(f"{name}: shard {bounds} left partially filled")
  return buf
