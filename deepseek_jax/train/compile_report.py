"""What the compiled train step needs per device: XLA's memory and FLOPs.

`compile_report(cfg, train_cfg, mesh, rules)` lowers and compiles the real
train step (`make_train_step(...).lower(state, batch).compile()`: any mesh,
any pipeline schedule, the program training runs) on abstract inputs (the
train state's and the data contract's shapes with the trainer's shardings),
so nothing is allocated: a 671B model compiles on fake CPU devices
(launch/plan.py --compile). Figures are per device (the SPMD-partitioned
program one device runs):

  argument_bytes  the state and batch shards the step takes
  output_bytes    the new state and the metrics it returns
  temp_bytes      XLA's temporaries (buffer assignment, with liveness):
                  activations, their gradients, collectives' buffers
  alias_bytes     outputs written into donated inputs (the state)
  total_bytes     = argument_bytes + temp_bytes + output_bytes - alias_bytes
                  (an aliased output shares its input's buffer)

FLOPs. XLA's `cost_analysis()["flops"]` counts a while loop's body once,
not once per trip, so a scanned layer stack (nn.scan), a pipeline's tick
loop or a blocked kernel's loop are undercounted by their trip counts.
`hlo_flops(text)` walks the optimized HLO text instead: every computation's
FLOPs are multiplied by the trip counts of the while loops around it (XLA
writes `backend_config={..."known_trip_count":{"n":"5"}}` on a while whose
count it proved; a loop without one counts once and is reported in
`unknown_trip_loops`). Loops whose count is data (the expert kernel's chunk
loops: how many blocks the routing filled) can carry a hint, the named scope
`model.grouped_matmul.loop_trips(n)` around them; `flops_all_trips` counts
each such loop n times: the kernel's hint is its static buffer's blocks
(every block used: an upper bound for any routing, within about one block
of padding per expert of a balanced one). Per instruction it counts only
  dot           2 * (elements of the output) * (product of the lhs
                contracting dimensions): a multiply-add is 2 FLOPs
  convolution   2 * (elements of the output) * (kernel elements / output
                features): the window times the input features per group
  library GEMMs custom-calls whose backend_config names
                dot_dimension_numbers (cuBLAS on GPU), as a dot (the
                format of XLA:GPU's own tests; not run on a GPU here)
and follows fusions, calls, async wrappers and while bodies. A conditional
counts its most expensive branch in `hlo_flops` (an upper bound: which
branch runs is data) and its cheapest in `hlo_flops_cheapest_branch` (a
lower bound). Both matter here: the expert exchange's cond that runs its
overflow rounds only when a group overflowed (parallel/expert.py), and a
pipeline's tick loop, where a rank runs one op per tick or idles (the upper
bound counts the dearest op on every tick).
Elementwise ops, reductions, softmax, sorts and collectives are NOT counted:
the figure is matmul FLOPs, the quantity `train.flops` models.

model_flops: `train_flops_per_token(cfg, seq_len) * batch * seq_len /
devices` (train/flops.py: 3 x the forward matmuls, causal attention at
(S+1)/2 positions; with a pipeline, the average over the devices).
hlo_flops_all_trips (and _over_model): `flops_all_trips`, the figure to
compare steps whose kernels loop differently (expert parallelism or not).
Also: xla_cost_analysis_flops (XLA's own figure: every op, loop bodies
once), while_loops / unknown_trip_loops / hinted_trip_loops (`hlo_flops`), devices, mesh,
batch_size, seq_len, lower_seconds and compile_seconds.

hlo_flops / model_flops above 1 is recomputation (`remat_policy="full"`
recomputes every forward: ~4/3), attention computed over the whole S x S
square (2x the causal core), padded expert buffers (the exchange's capacity),
or masked dense work (a `ragged_dot` lowered dense on CPU: x the experts).
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from deepseek_jax import parallel
from deepseek_jax.config import ModelConfig
from deepseek_jax.data.pipeline import BATCH_DTYPES
from deepseek_jax.parallel.rules import Rules, resolve
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.flops import train_flops_per_token
from deepseek_jax.train.step import abstract_train_state, make_train_step

_NAME = r"%?([\w.\-]+)"
_HEADER = re.compile(r"^(ENTRY\s+)?" + _NAME + r"\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?" + _NAME + r"\s*=\s*(.*)$")
_SHAPE = re.compile(r"^[a-z][a-z0-9]*\[([\d,]*)\]")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_METADATA = re.compile(r"metadata=\{[^}]*\}")
# A while loop's trip-count hint (model/grouped_matmul.py `loop_trips`): the
# named scope `dsj_trips=N` directly around the loop, in its op_name.
_HINT = re.compile(r'op_name="[^"]*' + "dsj_trips" + r'=(\d+)\)*/while"')


def _dims(shape: str) -> list[int] | None:
  """[8, 4096] of 'bf16[8,4096]{1,0}' (the first array of a tuple type)."""
  m = _SHAPE.match(shape.lstrip("("))
  return None if m is None else [int(d) for d in m.group(1).split(",") if d]


def _split_type(rest: str) -> tuple[str, str]:
  """('(f32[2], s32[])', 'tuple(...)...') of 'TYPE OPCODE(...)': a tuple type
  runs to its matching parenthesis."""
  if not rest.startswith("("):
    head, _, tail = rest.partition(" ")
    return head, tail
  depth = 0
  for i, ch in enumerate(rest):
    depth += (ch == "(") - (ch == ")")
    if depth == 0:
      return rest[:i + 1], rest[i + 1:].lstrip()
  return rest, ""


def _operands(call: str) -> tuple[list[str], str]:
  """(operand names, attributes) of 'OPCODE(a, b), attrs': the last token of
  each top-level operand (operands may carry their types), '%' dropped."""
  depth, parts, cur = 0, [], ""
  for i in range(call.index("("), len(call)):
    ch = call[i]
    depth += (ch in "({[") - (ch in ")}]")
    if depth == 0:
      names = [p.split()[-1].lstrip("%") for p in parts + [cur] if p.strip()]
      return names, call[i + 1:]
    if ch == "," and depth == 1:
      parts, cur = parts + [cur], ""
    elif depth > 1 or ch != "(":
      cur += ch
  return [], ""


def _parse(text: str) -> tuple[dict[str, list[tuple]], str]:
  """({computation: [(name, type, opcode, operands, attrs)]}, entry name)."""
  comps, entry, cur = {}, None, None
  for line in text.splitlines():
    if cur is None:
      m = _HEADER.match(line)
      if m and "->" in line and not line.startswith("HloModule"):
        cur = comps.setdefault(m.group(2), [])
        entry = m.group(2) if m.group(1) else entry
      continue
    if line.strip() == "}":
      cur = None
      continue
    m = _INSTR.match(line)
    if m is None:
      continue
    shape, call = _split_type(m.group(2))
    opcode = call.split("(", 1)[0].strip()
    if "(" not in call:
      continue
    operands, attrs = _operands(call)
    hint = _HINT.search(attrs) if opcode == "while" else None
    attrs = _METADATA.sub("", attrs) + (f" dsj_trips={hint.group(1)}" if hint else "")
    cur.append((m.group(1), shape, opcode, operands, attrs))
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return comps, entry


def _contracted(attrs: str, lhs: list[int] | None) -> int | None:
  """Product of the lhs contracting dimensions: `lhs_contracting_dims={1}`
  (dot) or `"lhs_contracting_dimensions":["1"]` (a GEMM's backend_config)."""
  m = (re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs)
       or re.search(r'"lhs_contracting_dimensions"\s*:\s*\[([^\]]*)\]', attrs))
  if m is None or lhs is None:
    return None
  return math.prod(lhs[int(d.strip(' "'))] for d in m.group(1).split(",") if d.strip(' "'))


def _own_flops(shape: str, opcode: str, operands: list[str], attrs: str,
               shapes: dict[str, list[int] | None]) -> int:
  """FLOPs of one instruction by itself (module doc): dots, convolutions,
  GEMM custom-calls; 0 for the rest."""
  out = _dims(shape)
  if out is None or not operands:
    return 0
  lhs = shapes.get(operands[0])
  if opcode == "dot" or (opcode == "custom-call" and "dot_dimension_numbers" in attrs):
    k = _contracted(attrs, lhs)
    return 0 if k is None else 2 * math.prod(out) * k
  if opcode == "convolution" and len(operands) > 1:
    kernel = shapes.get(operands[1])
    labels = re.search(r"dim_labels=\w+_(\w+)->", attrs)
    if kernel is None or labels is None:
      return 0
    out_features = kernel[labels.group(1).index("o")]
    return 2 * math.prod(out) * math.prod(kernel) // max(out_features, 1)
  return 0


def _callees(opcode: str, attrs: str) -> tuple[list[str], str]:
  """(called computations, how: 'while', 'branches' or 'inline')."""
  if opcode == "while":
    return re.findall(r"(?:body|condition)=" + _NAME, attrs), "while"
  if opcode == "conditional":
    m = re.search(r"branch_computations=\{([^}]*)\}", attrs)
    names = (re.findall(_NAME, m.group(1)) if m
             else re.findall(r"(?:true|false)_computation=" + _NAME, attrs))
    return names, "branches"
  names = re.findall(r"\bcalls=" + _NAME, attrs)
  m = re.search(r"called_computations=\{([^}]*)\}", attrs)
  names += re.findall(_NAME, m.group(1)) if m else []
  if opcode == "call":     # a reduce's or a sort's to_apply is per element: not followed
    names += re.findall(r"to_apply=" + _NAME, attrs)
  return names, "inline"


def hlo_flops(text: str) -> dict[str, int]:
  """Matmul FLOPs of an HLO module's text with while bodies counted once per
  trip (module doc): {"flops", "flops_cheapest_branch", "flops_all_trips",
  "while_loops", "unknown_trip_loops", "hinted_trip_loops"}. flops takes
  every conditional's dearest branch (an upper bound), flops_cheapest_branch
  its cheapest (a lower bound: e.g. an exchange's common path, or a pipeline
  rank's idle tick); loops are counted as often as they run (a loop in a
  4-trip loop counts 4), along the dearest branches. A loop of unknown trip
  count counts once in both, and its hinted trips (`loop_trips`) in
  flops_all_trips (dearest branches) and flops_all_trips_cheapest_branch
  (e.g. the expert exchange without its overflow rounds)."""
  comps, entry = _parse(text)
  memo: dict[str, tuple[int, ...]] = {}

  def walk(name: str) -> tuple[int, ...]:
    if name in memo:
      return memo[name]
    memo[name] = (0,) * 7                  # a cycle (none in valid HLO) counts 0
    instrs = comps.get(name, [])
    shapes = {n: _dims(s) for n, s, *_ in instrs}
    # dearest, cheapest, loops, unknown loops, dearest with hinted trips, hinted
    # loops, cheapest with hinted trips
    total = [0] * 7
    for _, shape, opcode, operands, attrs in instrs:
      own = _own_flops(shape, opcode, operands, attrs, shapes)
      for i in (0, 1, 4, 6):
        total[i] += own
      callees, how = _callees(opcode, attrs)
      inner = [walk(c) for c in callees]
      if how == "branches" and inner:
        dear, cheap = max(inner), min(inner, key=lambda t: t[1])
        total = [total[0] + dear[0], total[1] + cheap[1], total[2] + dear[2],
                 total[3] + dear[3], total[4] + max(t[4] for t in inner), total[5] + dear[5],
                 total[6] + min(t[6] for t in inner)]
        continue
      trips = hinted = 1
      if how == "while":
        m, h = _TRIP.search(attrs), re.search(r"dsj_trips=(\d+)", attrs)
        trips = int(m.group(1)) if m else 1
        hinted = trips if m else (int(h.group(1)) if h else 1)
        total[2], total[3] = total[2] + 1, total[3] + (m is None)
        total[5] += m is None and h is not None
      for t in inner:
        total = [a + (hinted if i in (4, 6) else trips) * b
                 for i, (a, b) in enumerate(zip(total, t))]
    memo[name] = tuple(total)
    return memo[name]

  dear, cheap, loops, unknown, all_trips, hinted, all_cheap = walk(entry)
  return {"flops": dear, "flops_cheapest_branch": cheap, "flops_all_trips": all_trips,
          "flops_all_trips_cheapest_branch": all_cheap, "while_loops": loops,
          "unknown_trip_loops": unknown, "hinted_trip_loops": hinted}


def abstract_batch(train_cfg: TrainConfig, mesh: Mesh | None, rules: Rules | None) -> dict:
  """The data contract's arrays ([batch_size, seq_len], data.pipeline's
  dtypes) as ShapeDtypeStructs, in the trainer's batch sharding."""
  sharding = None if mesh is None else parallel.batch_sharding(mesh, rules)
  shape = (train_cfg.batch_size, train_cfg.seq_len)
  return {k: jax.ShapeDtypeStruct(shape, np.dtype(d), sharding=sharding)
          for k, d in BATCH_DTYPES.items()}


def compile_report(cfg: ModelConfig, train_cfg: TrainConfig, mesh: Mesh | None,
                   rules: Rules | str | None, *, plan: dict | None = None) -> dict[str, Any]:
  """Compile the train step for `mesh` (None: one device) and report its
  per-device memory and FLOPs (module doc for every key); `plan`: a
  `parallel.plan.memory_plan` result for the same run, which adds
  planner_total_bytes and compiled_over_planner (total_bytes / it)."""
  rules = None if rules is None else resolve(rules)
  state = abstract_train_state(cfg, train_cfg, mesh, rules)
  batch = abstract_batch(train_cfg, mesh, rules)
  step = make_train_step(cfg, train_cfg, mesh, rules)
  t0 = time.perf_counter()
  lowered = step.lower(state, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  mem = compiled.memory_analysis()
  args, out, temp, alias = (int(n) for n in (mem.argument_size_in_bytes,
                                             mem.output_size_in_bytes,
                                             mem.temp_size_in_bytes, mem.alias_size_in_bytes))
  report = dict(argument_bytes=args, output_bytes=out, temp_bytes=temp, alias_bytes=alias,
                total_bytes=args + temp + out - alias)
  devices = 1 if mesh is None else mesh.size
  counted = hlo_flops(compiled.as_text())
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  model = (train_flops_per_token(cfg, train_cfg.seq_len) * train_cfg.batch_size
           * train_cfg.seq_len / devices)
  report.update(
      hlo_flops=counted["flops"], hlo_flops_cheapest_branch=counted["flops_cheapest_branch"],
      model_flops=model, hlo_flops_over_model=counted["flops"] / model,
      hlo_flops_all_trips=counted["flops_all_trips"],
      hlo_flops_all_trips_over_model=counted["flops_all_trips"] / model,
      hlo_flops_all_trips_cheapest_branch=counted["flops_all_trips_cheapest_branch"],
      xla_cost_analysis_flops=float((cost or {}).get("flops", 0.0)),
      while_loops=counted["while_loops"], unknown_trip_loops=counted["unknown_trip_loops"],
      hinted_trip_loops=counted["hinted_trip_loops"], devices=devices, mesh={} if mesh is None else dict(mesh.shape),
      batch_size=train_cfg.batch_size, seq_len=train_cfg.seq_len,
      lower_seconds=round(t1 - t0, 2), compile_seconds=round(t2 - t1, 2))
  if plan is not None:
    report.update(planner_total_bytes=int(plan["total_bytes_per_device"]),
                  compiled_over_planner=report["total_bytes"] / plan["total_bytes_per_device"])
  return report
