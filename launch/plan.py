"""Will a run fit? Per-device memory of a preset on a mesh, from shapes only.

  python -m launch.plan --preset=v3_671b --mesh=expert=64,fsdp=32 \\
      [--rules=ep_fsdp --batch_size=4096 --seq_len=4096]
  # DeepSeek-V3's own layout: 16-way pipeline (DualPipe), 64-way EP, 2-way DP
  python -m launch.plan --preset=v3_671b --mesh=pipe=16,expert=64,data=2 \\
      --schedule=dualpipe --num_microbatches=32 --moments_dtype=bfloat16

Axes not named in --mesh are 1; `-1` needs --devices. Prints a table of
parameters, gradients, optimizer state and an activation estimate per device
(formula: deepseek_jax/parallel/plan.py; with a pipeline, each row is the
largest pipeline rank's, and the total the largest rank total), then ONE JSON
line with devices, params_bytes_per_device, grads_bytes_per_device,
opt_state_bytes_per_device, activation_bytes_per_device,
total_bytes_per_device, pipe, pipeline_schedule, num_microbatches,
layers_per_stage, layers_per_rank, peak_activations, param_copies and the
per-rank lists. Allocates nothing: the train state is measured from its
shapes (`abstract_train_state`), so a 671B model plans in seconds on a
laptop. The layout planned is the one the trainer runs (`launch.train` with
`--config.mesh.*`, `--config.pipeline_schedule`, `--config.num_microbatches`).
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
from deepseek_jax.parallel.schedules import SCHEDULES
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.step import abstract_train_state

_PRESET = flags.DEFINE_string("preset", "v3_671b", "Model preset.")
_MESH = flags.DEFINE_string("mesh", "", "Axis sizes, e.g. expert=64,fsdp=32 (others 1).")
_RULES = flags.DEFINE_string("rules", "ep_fsdp", "Rule set: dp, fsdp, fsdp_tp, ep_fsdp.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global batch in sequences (default: one "
                              "sequence per batch-axis device per micro-batch).")
_SEQ = flags.DEFINE_integer("seq_len", 4096, "Tokens per sequence.")
_MOMENTS = flags.DEFINE_enum("moments_dtype", "float32", ["float32", "bfloat16"],
                             "Storage of AdamW's two moments (V3: bfloat16).")
_DEVICES = flags.DEFINE_integer("devices", None, "Device count (only with a -1 axis).")
_SCHEDULE = flags.DEFINE_enum("schedule", None, list(SCHEDULES),
                              "Pipeline schedule (needs mesh pipe > 1; V3: dualpipe).")
_MICRO = flags.DEFINE_integer("num_microbatches", None,
                              "Micro-batches per step of the pipeline schedule.")


def gib(n: int) -> str:
  return f"{n / 2**30:10.2f} GiB"


def mesh_sizes(given: dict[str, int], rules: str, devices: int | None) -> dict[str, int]:
  """{axis: size} for --mesh: axes not named are 1, a -1 axis takes what
  --devices leaves."""
  mesh_cfg = MeshConfig(**{"data": 1, **given, "rules": rules})
  if devices is None:
    if -1 in given.values():
      raise ValueError("an axis is -1: give --devices to resolve it.")
    devices = math.prod(getattr(mesh_cfg, a) for a in AXES)
  return mesh_cfg.shape(devices)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    sizes = mesh_sizes(parse_axis_sizes(_MESH.value, flag="--mesh"), _RULES.value,
                       _DEVICES.value)
    rows = axes_size(sizes, BATCH_AXES)
    cfg = get_preset(_PRESET.value)
    state = abstract_train_state(cfg, TrainConfig(moments_dtype=_MOMENTS.value))
    plan = memory_plan(cfg, sizes, _RULES.value, state=state,
                       batch_size=_BATCH.value or rows * (_MICRO.value or 1),
                       seq_len=_SEQ.value, pipeline_schedule=_SCHEDULE.value,
                       num_microbatches=_MICRO.value)
  except (ValueError, NotImplementedError) as e:
    sys.exit(f"launch.plan: error: {e}")
  print(f"{_PRESET.value} on {plan['devices']} devices "
        f"({' '.join(f'{a}={s}' for a, s in sizes.items() if s > 1) or 'one device'}), "
        f"rules {_RULES.value}, batch {plan['batch_size']} x {plan['seq_len']} tokens")
  if plan["pipe"] > 1:
    print(f"  pipeline: {plan['pipeline_schedule']}, {plan['pipe']} stages, "
          f"{plan['num_microbatches']} micro-batches of {plan['microbatch_size']} sequences")
    print(f"  layers per stage (chunk): {plan['layers_per_stage']}")
    if plan["param_copies"] > 1:
      print(f"  layers per rank ({plan['param_copies']} chunks: r and pipe-1-r): "
            f"{plan['layers_per_rank']}")
    print(f"  in flight: up to {plan['peak_activations']} micro-batch chunks of activations "
          "on a rank; rows below: the largest rank")
  rows_out = [("parameters", plan["params_bytes_per_device"]),
              ("gradients", plan["grads_bytes_per_device"]),
              ("optimizer state", plan["opt_state_bytes_per_device"]),
              ("activations (estimate)", plan["activation_bytes_per_device"])]
  for name, value in rows_out:
    print(f"  {name:24s}{gib(value)}")
  print(f"  {'total per device':24s}{gib(plan['total_bytes_per_device'])}")
  print(json.dumps(plan), flush=True)


if __name__ == "__main__":
  app.run(main)
