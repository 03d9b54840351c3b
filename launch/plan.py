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

--layers=N cuts the depth and keeps every width (and the MTP modules): the
preset with n_layers=N, one dense layer then MoE layers (none dense for
N = 1; all dense for a dense preset), so a few layers of a 671B model
compile on a laptop.

--compile also compiles the real train step on fake CPU devices (as many as
the mesh has; created here, so run it in a fresh process, or start Python
with XLA_FLAGS=--xla_force_host_platform_device_count=N) and prints what XLA
needs per device beside the planner's estimate: arguments, temporaries and
the total (arguments + temporaries + outputs - aliased), the HLO's matmul
FLOPs (while loops counted once per trip; each conditional's dearest and
cheapest branch) beside the model's FLOPs, then ONE
JSON line instead of the plan's: the keys of
`deepseek_jax.train.compile_report.compile_report` plus planner_*_bytes,
planner_total_bytes, compiled_over_planner and, with
--device_memory_gib=G, fits (total <= G GiB); --fast_compile compiles at XLA
backend optimisation level 0 (the trainer's fast_compile). Compiling takes minutes and
several GiB of host memory at V3 widths:

  python -m launch.plan --preset=v3_671b --layers=4 --mesh=expert=8 \\
      --batch_size=8 --moments_dtype=bfloat16 --compile --device_memory_gib=141
"""

from __future__ import annotations

import json
import math
import sys

import jax
from absl import app, flags

from launch.config_flag import begin_main

from deepseek_jax.config import PRESETS, ModelConfig, get_preset
from deepseek_jax.parallel import AXES, MeshConfig, setup
from deepseek_jax.parallel.mesh import parse_axis_sizes
from deepseek_jax.parallel.plan import memory_plan
from deepseek_jax.parallel.rules import BATCH_AXES, axes_size
from deepseek_jax.parallel.schedules import SCHEDULES
from deepseek_jax.train.compile_report import compile_report
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.scaling import non_embedding_flops_per_token, optimal
from deepseek_jax.train.step import abstract_train_state

_PRESET = flags.DEFINE_enum("preset", "v3_671b", sorted(PRESETS), "Model preset.")
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
_LAYERS = flags.DEFINE_integer("layers", None, "Cut the preset to this many layers, every "
                               "width kept (one dense layer, the rest MoE; MTP kept).")
_COMPILE = flags.DEFINE_bool("compile", False, "Also compile the train step on fake CPU "
                             "devices and print XLA's per-device memory and FLOPs.")
_FAST = flags.DEFINE_bool("fast_compile", False, "With --compile: compile as the trainer "
                          "does with fast_compile (XLA backend optimisation level 0).")
_COMPUTE = flags.DEFINE_float("compute", None, "A compute budget in FLOPs: print DeepSeek "
                              "LLM's scaling-law optima (batch tokens, learning rate, model "
                              "and data scale) instead of a memory plan.")
_DEVICE_GIB = flags.DEFINE_float("device_memory_gib", None, "With --compile: memory of one "
                                 "device in GiB; the JSON line gets fits = total <= it.")


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


def model_config(preset: str, layers: int | None) -> ModelConfig:
  """The preset, cut to `layers` layers when given (module doc)."""
  cfg = get_preset(preset)
  if layers is None:
    return cfg
  if layers < 1:
    raise ValueError(f"--layers={layers} must be >= 1.")
  dense = layers if cfg.n_dense_layers >= cfg.n_layers else min(cfg.n_dense_layers,
                                                                  int(layers >= 2))
  return get_preset(preset, n_layers=layers, n_dense_layers=dense)


def fake_devices(n: int) -> list:
  """n devices for --compile: the backend's, else n fake CPU devices created
  here (jax_num_cpu_devices, before the backend starts)."""
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:       # the backend is up already: use what it has
    pass
  for devices in (jax.devices(), jax.devices("cpu")):
    if len(devices) >= n:
      return devices[:n]
  raise ValueError(
      f"--compile needs {n} devices for this mesh, but the JAX backend was started with "
      f"{len(jax.devices('cpu'))} CPU devices before launch.plan could create them; "
      f"start Python with XLA_FLAGS=--xla_force_host_platform_device_count={n} (and "
      "JAX_PLATFORMS=cpu), or run launch.plan in a fresh process.")


def _largest_rank(plan: dict) -> int:
  """The pipe rank whose parameters + gradients + optimizer state +
  activations are the largest (0 without a pipeline)."""
  if "params_bytes_per_rank" not in plan:
    return 0
  totals = [2 * p + o + a for p, o, a in zip(plan["params_bytes_per_rank"],
                                             plan["opt_state_bytes_per_rank"],
                                             plan["activation_bytes_per_rank"])]
  return max(range(len(totals)), key=totals.__getitem__)


def print_plan(plan: dict, sizes: dict[str, int]) -> None:
  print(f"{_PRESET.value} on {plan['devices']} devices "
        f"({' '.join(f'{a}={s}' for a, s in sizes.items() if s > 1) or 'one device'}), "
        f"rules {_RULES.value}, batch {plan['batch_size']} x {plan['seq_len']} tokens")
  if plan["pipe"] > 1:
    print(f"  pipeline: {plan['pipeline_schedule']}, {plan['pipe']} stages, "
          f"{plan['num_microbatches']} micro-batches of {plan['microbatch_size']} sequences")
    print(f"  layers per stage (chunk): {plan['layers_per_stage']}")
    if plan["param_copies"] > 1:
      pair = ("r and 2*pipe-1-r" if plan["pipeline_schedule"] == "dualpipev"
              else "r and pipe-1-r")
      print(f"  layers per rank ({plan['param_copies']} chunks: {pair}): "
            f"{plan['layers_per_rank']}")
  # The rows of one rank, the one with the largest total, so that they add up
  # to the total (each row's own maximum may sit on another rank).
  r = _largest_rank(plan)
  if plan["pipe"] > 1:
    print(f"  in flight: up to {plan['peak_activations']} micro-batch chunks of activations "
          f"on a rank; rows below: pipe rank {r}, the largest total")
  params = plan.get("params_bytes_per_rank", [plan["params_bytes_per_device"]])[r]
  rows_out = [("parameters", params), ("gradients", params),
              ("optimizer state",
               plan.get("opt_state_bytes_per_rank", [plan["opt_state_bytes_per_device"]])[r]),
              ("activations", plan.get("activation_bytes_per_rank",
                                       [plan["activation_bytes_per_device"]])[r])]
  for name, value in rows_out:
    print(f"  {name:24s}{gib(value)}")
  print(f"  {'total per device':24s}{gib(plan['total_bytes_per_device'])}")


def compiled(cfg: ModelConfig, plan: dict, sizes: dict[str, int], devices: list) -> dict:
  """compile_report of the planned run, with the planner's figures and `fits`."""
  train_cfg = TrainConfig(batch_size=plan["batch_size"], seq_len=plan["seq_len"],
                          moments_dtype=_MOMENTS.value,
                          pipeline_schedule=_SCHEDULE.value or "1f1b",
                          num_microbatches=_MICRO.value or 0, fast_compile=_FAST.value)
  mesh, rules = None, None
  if len(devices) > 1:
    mesh, rules = setup(MeshConfig(**sizes, rules=_RULES.value), devices)
  report = compile_report(cfg, train_cfg, mesh, rules, plan=plan)
  for key in ("params", "grads", "opt_state", "activation"):
    report[f"planner_{key}_bytes"] = plan[f"{key}_bytes_per_device"]
  if _DEVICE_GIB.value is not None:
    report["fits"] = report["total_bytes"] <= _DEVICE_GIB.value * 2**30
  return report


def size(n: int) -> str:
  """n bytes in GiB, MiB or KiB, whichever leaves a number >= 1."""
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if abs(n) >= scale:
      return f"{n / scale:10.2f} {unit}"
  return f"{n:10d} B  "


def print_compiled(r: dict) -> None:
  p = {k: r[f"planner_{k}_bytes"] for k in ("params", "grads", "opt_state", "activation")}
  print(f"compiled train step, per device (XLA; lowered in {r['lower_seconds']:.1f} s, "
        f"compiled in {r['compile_seconds']:.1f} s), beside the planner:")
  rows = [("arguments", r["argument_bytes"], "params + optimizer", p["params"] + p["opt_state"]),
          ("temporaries", r["temp_bytes"], "grads + activations", p["grads"] + p["activation"]),
          ("outputs - aliased", r["output_bytes"] - r["alias_bytes"], "", None),
          ("total", r["total_bytes"], "total", r["planner_total_bytes"])]
  for name, value, plan_name, plan_value in rows:
    tail = "" if plan_value is None else f"   planner {plan_name:20s}{size(plan_value)}"
    print(f"  {name:24s}{size(value)}{tail}")
  print(f"  compiled / planner total: {r['compiled_over_planner']:.2f}x"
        + (f"; fits in {_DEVICE_GIB.value:g} GiB: {'yes' if r['fits'] else 'NO'}"
           if "fits" in r else ""))
  model = r["model_flops"]
  print(f"  {'model FLOPs':24s}{model:10.4g}   (train.flops: 3 x forward matmuls)")
  for name, key in (("HLO FLOPs, dearest", "hlo_flops"),
                    ("HLO FLOPs, cheapest", "hlo_flops_cheapest_branch")):
    print(f"  {name:24s}{r[key]:10.4g}   ({r[key] / model:.2f}x model; matmuls, loops x trips, "
          "each conditional's " + name.split(", ")[1] + " branch)")
  print(f"  ({r['while_loops']} loop runs, {r['unknown_trip_loops']} of unknown trip count "
        "counted once)")
  all_trips = r["hlo_flops_all_trips"]
  print(f"  {'HLO FLOPs, all trips':24s}{all_trips:10.4g}   ({all_trips / model:.2f}x model; "
        f"dearest, the {r['hinted_trip_loops']} hinted loop runs of unknown count x their "
        "hints: the expert kernel's full buffer)")
  cheap = r["hlo_flops_all_trips_cheapest_branch"]
  print(f"  {'HLO FLOPs, all, cheapest':24s}{cheap:10.4g}   ({cheap / model:.2f}x model; the same "
        "with each conditional's cheapest branch: the exchange without overflow rounds)")


def scaling(compute: float) -> dict:
  """--compute: the scaling-law optima (train/scaling.py) and, for a dense
  preset, its own M and the tokens the budget buys it."""
  out = optimal(compute)
  cfg = get_preset(_PRESET.value)
  print(f"compute {compute:.3g} FLOPs (DeepSeek LLM scaling laws):")
  print(f"  batch size       {out['batch_tokens_opt']:.4g} tokens "
        f"({out['batch_tokens_opt'] / _SEQ.value:.0f} sequences of {_SEQ.value})")
  print(f"  learning rate    {out['lr_opt']:.4g}")
  print(f"  model scale M    {out['model_flops_per_token_opt']:.4g} non-embedding FLOPs/token")
  print(f"  data scale D     {out['tokens_opt']:.4g} tokens")
  if cfg.attention == "gqa" and not cfg.n_moe_layers:
    m = non_embedding_flops_per_token(cfg.n_layers, cfg.dim, _SEQ.value)
    out.update(preset=_PRESET.value, preset_model_flops_per_token=m, preset_tokens=compute / m)
    print(f"  {_PRESET.value}: M = {m:.4g}, so the budget trains it on {compute / m:.4g} tokens")
  return out


def main(argv):
  begin_main(argv, "launch.plan")             # no "Unable to initialize backend 'tpu'"
  if _COMPUTE.value is not None:
    try:
      print(json.dumps(scaling(_COMPUTE.value)), flush=True)
    except ValueError as e:
      sys.exit(f"launch.plan: error: {e}")
    return
  try:
    sizes = mesh_sizes(parse_axis_sizes(_MESH.value, flag="--mesh"), _RULES.value,
                       _DEVICES.value)
    devices = fake_devices(math.prod(sizes.values())) if _COMPILE.value else None
    rows = axes_size(sizes, BATCH_AXES)
    cfg = model_config(_PRESET.value, _LAYERS.value)
    state = abstract_train_state(cfg, TrainConfig(moments_dtype=_MOMENTS.value))
    plan = memory_plan(cfg, sizes, _RULES.value, state=state,
                       batch_size=_BATCH.value or rows * (_MICRO.value or 1),
                       seq_len=_SEQ.value, pipeline_schedule=_SCHEDULE.value,
                       num_microbatches=_MICRO.value)
  except (ValueError, NotImplementedError) as e:
    sys.exit(f"launch.plan: error: {e}")
  print_plan(plan, sizes)
  if not _COMPILE.value:
    print(json.dumps(plan), flush=True)
    return
  sys.stdout.flush()
  try:
    report = compiled(cfg, plan, sizes, devices)
  except (ValueError, NotImplementedError) as e:
    sys.exit(f"launch.plan: error: {e}")
  print_compiled(report)
  print(json.dumps(report), flush=True)


if __name__ == "__main__":
  app.run(main)
