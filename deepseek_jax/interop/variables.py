"""Our side of every checkpoint format: the leaves a ModelConfig builds, and their dtypes.

Each reader and writer (HF and the JAX-side format) checks a variables tree
against the one `cfg` builds before it touches a file, and stores weights in
one of the parameter dtypes; the checks and their error messages live here
so that every format says the same thing about the same mistake.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.interop.safetensors_io import flatten
from deepseek_jax.model import abstract_variables

PARAM_DTYPES = ("float32", "bfloat16", "float16")


def param_dtype(dtype) -> str:
  """The name of a parameter dtype (None: float32); ValueError for any other."""
  name = "float32" if dtype is None else jnp.dtype(dtype).name
  if name not in PARAM_DTYPES:
    raise ValueError(f"dtype={dtype!r} must be one of {PARAM_DTYPES}.")
  return name


def np_dtype(name: str):
  """The numpy dtype of a PARAM_DTYPES name (bfloat16 from ml_dtypes)."""
  return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def keys_error(path: str, what: str, keys: Iterable[str], fix: str) -> ValueError:
  """ValueError listing (the first five of) `keys`, `what` they are and the fix."""
  keys = sorted(keys)
  shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
  return ValueError(f"{path}: {len(keys)} {what} tensors: {shown}; {fix}")


def check_shapes(cfg: ModelConfig, shapes: Mapping[str, tuple[int, ...]], where: str) -> None:
  """Flattened variable shapes must be exactly those `cfg` builds."""
  want = {k: tuple(v.shape) for k, v in flatten(abstract_variables(cfg)).items()}
  missing, extra = set(want) - set(shapes), set(shapes) - set(want)
  if missing:
    raise keys_error(where, "missing", missing, "the variables do not match the config.")
  if extra:
    raise keys_error(where, "unexpected", extra, "the variables do not match the config.")
  for k, shape in want.items():
    if tuple(shapes[k]) != shape:
      raise ValueError(f"{where}: {k} has shape {tuple(shapes[k])}, the config needs {shape}.")


def check_variables(cfg: ModelConfig, variables: Mapping[str, Any]) -> dict[str, Any]:
  """flatten(variables), after checking it has exactly the leaves `cfg` builds."""
  flat = flatten(variables)
  check_shapes(cfg, {k: np.shape(v) for k, v in flat.items()}, "variables")
  return flat
