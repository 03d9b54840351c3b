"""Memory of the pipeline executor (deepseek_jax/parallel/pipeline.py) as XLA
compiles it, on 8 fake CPU devices.

XLA copies every array that a conditional's branch passes through unchanged
(its copy insertion cannot let a conditional's result share the operand's
buffer). The executor runs each tick's ops as `lax.switch` branches, so any
gradient accumulator carried through a switch is copied on every tick: at
DeepSeek-V3 widths on DualPipe that was 57 GiB of copies at the step's peak.
Oracle: the compiled program itself: no branch of any conditional copies an
array shaped like a rank's layer stack (its weights' and gradient
accumulators' shape) out of the branch's operands.
"""

import re

import jax
import numpy as np
import pytest

from deepseek_jax import get_preset
from deepseek_jax.model import init_variables
from deepseek_jax.parallel import MeshConfig, activate, setup
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.step import FAST_COMPILE, pipelined_pretraining_grad


def _branch_operand_copies(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
  """(branch computation, dims) of every `copy(get-tuple-element(...))` (a
  branch's operands arrive as one tuple) in each computation that some
  conditional calls."""
  branches = set()
  for names in re.findall(r"branch_computations=\{([^}]*)\}", hlo):
    branches.update(n.strip().lstrip("%") for n in names.split(","))
  for names in re.findall(r"true_computation=%?([\w.\-]+).*?"
                          r"false_computation=%?([\w.\-]+)", hlo):
    branches.update(names)
  found, comp, gtes = [], None, set()
  for line in hlo.splitlines():
    head = re.match(r"^%?([\w.\-]+) .*\{$", line)
    if head and not line.startswith(" "):
      comp, gtes = head.group(1), set()
      continue
    if comp not in branches:
      continue
    m = re.match(r"\s+(?:ROOT )?%?([\w.\-]+) = \w+\[([\d,]*)\]\S* (get-tuple-element|copy)"
                 r"\(%?([\w.\-]+)\)", line)
    if not m:
      continue
    name, dims, op, operand = m.groups()
    if op == "get-tuple-element":
      gtes.add(name)
    elif operand in gtes:
      found.append((comp, tuple(int(d) for d in dims.split(",") if d)))
  return found


@pytest.mark.slow   # one DualPipe compile (~2 min on 2 cores, cold)
@pytest.mark.parametrize("schedule", ["dualpipe", "dualpipev"])
def test_dualpipe_ticks_copy_no_layer_stack_through_a_switch(schedule):
  """DualPipe / DualPipeV on pipe=2 x expert=2 x data=2: weight gradients for
  both chunks, the MTP block and input gradients (I ops). Looks for the
  arrays a rank holds per layer stack ([slots, ...], the accumulators' and
  the weights' shape) among the copies; the previous executor made 30 such
  copies in this program. DualPipeV stores both of a rank's chunks: no
  collective-permute moves a stack-shaped array (DualPipe gathers its
  reversed chunk and sends its gradients home)."""
  cfg = get_preset("tiny").replace(n_layers=4)
  v = jax.eval_shape(lambda: init_variables(cfg, jax.random.key(0)))
  mesh, rules = setup(MeshConfig(pipe=2, expert=2, data=2))
  fn = pipelined_pretraining_grad(cfg, TrainConfig(), mesh, rules, schedule=schedule,
                                  n_microbatches=4)
  batch = {k: jax.ShapeDtypeStruct((16, 16), np.int32)
           for k in ("tokens", "targets", "segment_ids", "positions")}
  batch["loss_mask"] = jax.ShapeDtypeStruct((16, 16), np.float32)
  with activate(mesh, rules):
    hlo = jax.jit(fn, compiler_options=FAST_COMPILE).lower(
        v["params"], v["router_bias"], batch).compile().as_text()
  copies = _branch_operand_copies(hlo)
  assert copies, "no branch copies at all: the HLO parser finds nothing"
  # A rank's MoE stack: [slots, ...] with a stack leaf's trailing dims (the
  # expert axis may be split over `expert`).
  slots = fn.layout.slots(True)
  tails = {a.shape[-2:] for a in jax.tree.leaves(v["params"]["moe_layers"]) if a.ndim >= 3}
  stacked = [(c, d) for c, d in copies if len(d) >= 3 and d[0] == slots and d[-2:] in tails]
  assert not stacked, stacked[:10]
  moved = [tuple(int(x) for x in d.split(",")) for d in
           re.findall(r"= \w+\[([\d,]+)\]\S* collective-permute(?:-start)?\(", hlo)]
  moved = [d for d in moved if len(d) >= 3 and d[0] == slots and d[-2:] in tails]
  assert bool(moved) == (schedule == "dualpipe"), moved[:10]
