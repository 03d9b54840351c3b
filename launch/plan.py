"""Will a run fit? Per-device memory of a preset on a mesh, from shapes only.

  python -m launch.plan --preset=v3_671b --mesh=expert=64,fsdp=32 \\
      [--rules=ep_fsdp --batch_size=4096 --seq_len=4096]

Axes not named in --mesh are 1; `-1` needs --devices. Prints a table of
parameters, gradients, optimizer state and an activation estimate per
device (formula: deepseek_jax/parallel/plan.py), then ONE JSON line with
devices, params_bytes_per_device, grads_bytes_per_device,
opt_state_bytes_per_device, activation_bytes_per_device. Allocates nothing:
a 671B model plans in seconds on a laptop.
"""

from __future__ import annotations

import json
import math
import sys

from absl import app, flags

from deepseek_jax.config import get_preset
from deepseek_jax.parallel import AXES, MeshConfig
from deepseek_jax.parallel.mesh import parse_axis_sizes
from deepseek_jax.parallel.plan import memory_plan
from deepseek_jax.parallel.rules import BATCH_AXES, axes_size

_PRESET = flags.DEFINE_string("preset", "v3_671b", "Model preset.")
_MESH = flags.DEFINE_string("mesh", "", "Axis sizes, e.g. expert=64,fsdp=32 (others 1).")
_RULES = flags.DEFINE_string("rules", "ep_fsdp", "Rule set: dp, fsdp, fsdp_tp, ep_fsdp.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global batch in sequences "
                              "(default: one sequence per batch-axis device).")
_SEQ = flags.DEFINE_integer("seq_len", 4096, "Tokens per sequence.")
_MOMENTS = flags.DEFINE_enum("moments_dtype", "float32", ["float32", "bfloat16"],
                             "Storage of AdamW's two moments (V3: bfloat16).")
_DEVICES = flags.DEFINE_integer("devices", None, "Device count (only with a -1 axis).")


def gib(n: int) -> str:
  return f"{n / 2**30:10.2f} GiB"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    given = parse_axis_sizes(_MESH.value, flag="--mesh")
    mesh_cfg = MeshConfig(**{"data": 1, **given, "rules": _RULES.value})
    n = _DEVICES.value
    if n is None:
      if -1 in given.values():
        raise ValueError("an axis is -1: give --devices to resolve it.")
      n = math.prod(getattr(mesh_cfg, a) for a in AXES)
    sizes = mesh_cfg.shape(n)
    rows = axes_size(sizes, BATCH_AXES)
    cfg = get_preset(_PRESET.value)
    plan = memory_plan(cfg, sizes, _RULES.value, batch_size=_BATCH.value or rows,
                       moments_dtype=_MOMENTS.value,
                       seq_len=_SEQ.value)
  except (ValueError, NotImplementedError) as e:
    sys.exit(f"launch.plan: error: {e}")
  print(f"{_PRESET.value} on {plan['devices']} devices "
        f"({' '.join(f'{a}={s}' for a, s in sizes.items() if s > 1) or 'one device'}), "
        f"rules {_RULES.value}, batch {plan['batch_size']} x {plan['seq_len']} tokens")
  rows_out = [("parameters", plan["params_bytes_per_device"]),
              ("gradients", plan["grads_bytes_per_device"]),
              ("optimizer state", plan["opt_state_bytes_per_device"]),
              ("activations (estimate)", plan["activation_bytes_per_device"])]
  for name, value in rows_out:
    print(f"  {name:24s}{gib(value)}")
  print(f"  {'total per device':24s}{gib(sum(v for _, v in rows_out))}")
  print(json.dumps(plan), flush=True)


if __name__ == "__main__":
  app.run(main)
