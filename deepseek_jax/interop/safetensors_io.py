"""safetensors files: listing, headers, raw tensor reads, writes and flat keys.

This module knows the file format and nothing about DeepSeek: which files a
checkpoint directory holds (the `model.safetensors.index.json` weight map,
else `*.safetensors`), what each tensor's dtype and shape are (headers only,
nothing read), how to read a tensor numpy's safetensors reader cannot decode
(float8) straight from its byte range, and how to write one file.
`flatten` / `unflatten` turn a nested variables tree into the flat "a/b/c"
keys a safetensors file holds and back.

Writers make each file atomic with `deepseek_jax.files.atomic_write` (temp
file in the same directory, then rename), so a reader never sees one half
written. Which HF key is which of our leaves (and its transpose / reshape /
FP8 dequantization) is the business of hf_keys.py and hf_load.py; they read
and write through here.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import struct
from typing import Any, Mapping

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

INDEX_NAME = "model.safetensors.index.json"
# safetensors dtype strings of the float8 formats -> numpy dtypes (read_raw).
FLOAT8_DTYPES = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Where one tensor lives and what its header says about it."""
  file: str
  dtype: str                     # safetensors dtype string, e.g. "BF16", "F8_E4M3"
  shape: tuple[int, ...]


def corrupt_error(file: str, err: Exception) -> ValueError:
  """The error for a safetensors file whose header cannot be parsed."""
  return ValueError(
      f"{file}: corrupt safetensors header ({err}); the file is truncated or not a "
      "safetensors file: re-download or re-save it.")


def list_tensors(files: list[str]) -> dict[str, TensorInfo]:
  """Every tensor key in `files` -> its TensorInfo, from the headers alone."""
  infos: dict[str, TensorInfo] = {}
  for file in files:
    try:
      with safetensors.safe_open(file, framework="numpy") as f:
        for key in f.keys():
          sl = f.get_slice(key)
          if key in infos:
            raise ValueError(f"tensor {key} appears in both {infos[key].file} and {file}; "
                             "remove the stale shard.")
          infos[key] = TensorInfo(file, sl.get_dtype(), tuple(sl.get_shape()))
    except safetensors.SafetensorError as e:
      raise corrupt_error(file, e) from None
  return infos


@functools.lru_cache(maxsize=4)
def _raw_header(file: str, mtime_ns: int, size: int) -> tuple[dict, int]:
  """(parsed JSON header, byte offset of the data section) of `file`."""
  del mtime_ns, size  # cache key only: a rewritten file gets re-read
  with open(file, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    return json.loads(f.read(n)), 8 + n


def read_raw(file: str, key: str, dtype) -> np.ndarray:
  """A tensor numpy's safetensors reader cannot decode (float8), via its header."""
  st = os.stat(file)
  header, base = _raw_header(file, st.st_mtime_ns, st.st_size)
  start, end = header[key]["data_offsets"]
  shape = tuple(header[key]["shape"])
  arr = np.memmap(file, dtype=np.uint8, mode="r", offset=base + start, shape=(end - start,))
  return np.array(arr).view(dtype).reshape(shape)


def checkpoint_files(path: str) -> list[str]:
  """The safetensors files of directory `path`: its index's shards, else *.safetensors."""
  index = os.path.join(path, INDEX_NAME)
  if os.path.exists(index):
    with open(index) as f:
      try:
        weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{index}: not a safetensors index ({e!r}); delete it to "
                         "fall back to globbing *.safetensors.") from None
    files = sorted({os.path.join(path, v) for v in weight_map.values()})
    for file in files:
      if not os.path.exists(file):
        raise FileNotFoundError(f"{index} lists shard {os.path.basename(file)}, which is "
                                f"missing from {path}; download or copy all shards.")
    return files
  files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if not files:
    raise FileNotFoundError(
        f"no *.safetensors files in {path}; only safetensors checkpoints are read "
        "(re-save pytorch *.bin weights with save_pretrained(safe_serialization=True)).")
  return files


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------
def write_safetensors(tensors: dict[str, np.ndarray], path: str, metadata=None) -> None:
  """Writes `tensors` to the safetensors file `path` (not atomic: see files.atomic_write)."""
  safetensors.numpy.save_file(tensors, path, metadata=metadata)


# ---------------------------------------------------------------------------
# Nested trees <-> flat "a/b/c" keys
# ---------------------------------------------------------------------------
def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested mappings -> {"a/b/c": leaf}, in the tree's iteration order."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten(value, name + "/"))
    else:
      out[name] = value
  return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{"a/b/c": leaf} -> nested dicts: the inverse of flatten."""
  tree: dict[str, Any] = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree
