"""The device mesh: five named axes, sized by configuration.

  data    pure data parallelism: replicas of everything, batch split
  fsdp    batch split AND parameters/optimizer state sharded (ZeRO-3 style)
  tensor  attention heads and MLP hidden units split (Megatron style)
  expert  routed experts split (DeepSeek-V3's EP); elsewhere a batch axis
  pipe    pipeline stages (parallel/pipeline.py)

`MeshConfig(expert=4, fsdp=2)` on 8 devices gives a 1 x 2 x 1 x 4 x 1 mesh:
`data = -1` (the default) takes whatever the other axes leave. Which tensor
dimension goes on which axis is decided by a named rule set
(`deepseek_jax.parallel.rules`), not here.

The mesh is built with Auto axis types (`jax.make_mesh` defaults to Explicit,
which Linen's logical partitioning and our shard_map specs do not use) and
made current with `jax.set_mesh` by `parallel.rules.activate`; `setup` gives
the (mesh, rules) pair it takes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from deepseek_jax.parallel.rules import RULE_SETS, Rules

AXES = ("data", "fsdp", "tensor", "expert", "pipe")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Axis sizes (-1: fill the remaining devices; at most one) and a rule set."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  expert: int = 1
  pipe: int = 1
  rules: str = "ep_fsdp"

  def __post_init__(self):
    for name in AXES:
      v = getattr(self, name)
      if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not (v == -1 or v >= 1):
        raise ValueError(f"mesh.{name}={v!r} must be a positive integer or -1 (fill).")
    fills = [name for name in AXES if getattr(self, name) == -1]
    if len(fills) > 1:
      raise ValueError(f"mesh axes {fills} are all -1; at most one axis may fill the "
                       "remaining devices: give the others explicit sizes.")
    if self.rules not in RULE_SETS:
      raise ValueError(f"mesh.rules={self.rules!r} is not a rule set; choose one of "
                       f"{sorted(RULE_SETS)}.")

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> "MeshConfig":
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
      raise ValueError(f"unknown mesh fields {unknown}; fields: {names}.")
    return cls(**values)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def shape(self, n_devices: int) -> dict[str, int]:
    """{axis: size} for `n_devices`, the -1 axis resolved; clear error otherwise."""
    sizes = {name: getattr(self, name) for name in AXES}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    fill = [name for name, v in sizes.items() if v == -1]
    described = " x ".join(f"{n}={v}" for n, v in sizes.items() if v != 1)
    if fill:
      if n_devices % fixed:
        raise ValueError(f"mesh {described or '(all 1)'}: the fixed axes multiply to "
                         f"{fixed}, which does not divide the {n_devices} devices."
                         + _cpu_hint(fixed, n_devices))
      sizes[fill[0]] = n_devices // fixed
    elif fixed != n_devices:
      raise ValueError(f"mesh {described or '(all 1)'} multiplies to {fixed} devices, but "
                       f"there are {n_devices}; make the product {n_devices} or set one "
                       "axis to -1." + _cpu_hint(fixed, n_devices))
    return sizes


def _cpu_hint(wanted: int, n_devices: int) -> str:
  """How to get `wanted` fake devices, when the mesh wants more than a CPU
  backend has (one device unless told otherwise)."""
  if wanted <= n_devices or jax.default_backend() != "cpu":
    return ""
  return (f" On CPU, start with XLA_FLAGS=--xla_force_host_platform_device_count={wanted} "
          f"(or JAX_NUM_CPU_DEVICES={wanted}) for {wanted} fake devices.")


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over `devices` (default: all) with axes AXES, all of Auto type."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = cfg.shape(len(devices))
  shape = tuple(sizes[a] for a in AXES)
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES),
                       devices=devices)


def setup(mesh_cfg: MeshConfig, devices=None) -> tuple[Mesh, Rules]:
  """(mesh, rules) for a MeshConfig: the pair `parallel.rules.activate` and
  the trainer take."""
  return make_mesh(mesh_cfg, devices), RULE_SETS[mesh_cfg.rules]


def parse_axis_sizes(text: str, flag: str = "mesh") -> dict[str, int]:
  """'expert=64,fsdp=32' -> {axis: size} (command lines); unknown axes and
  sizes that are not integers are named."""
  sizes = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, sep, value = part.partition("=")
    if not sep or name not in AXES:
      raise ValueError(f"{flag} entry {part!r} must be AXIS=SIZE with AXIS in {AXES}.")
    try:
      sizes[name] = int(value)
    except ValueError:
      raise ValueError(f"{flag} entry {part!r}: size {value!r} is not an integer.") from None
  return sizes
