"""The pipeline executor's program: a schedule's timeline as a tick table.

`simulate`'s per-rank operation lists (parallel/schedules.py), re-timed with
every op lasting one tick (the order is the schedule's; a result is usable
the tick after it is made, on any rank), become a table: for every tick and
rank, which op (idle, F, B, I, W or DualPipe's overlapped FB pair), for
which micro-batch, reading which buffer slots, and in which slots the
activation and the gradient arriving that tick are stored. The executor
(parallel/pipeline.py) runs it as one `lax.scan` over ticks.

Slots are allocated from the timeline (a micro-batch's stage input is held
from its arrival until its backward (B, or W when split) ends), so the
activation memory per rank is what the schedule holds in flight: bounded by
PP for 1F1B / ZB1P, PP+1 for DualPipe, 2PP+1 (half-size chunks) for
DualPipeV, M for GPipe. DualPipeV's turn at rank PP-1 (chunk PP-1's output
is chunk PP's input on the same rank, and back for the gradient) is stored
from the rank's own op through the rah / rgh fields, not sent.
tests/test_pipeline.py checks a table against a message-passing interpreter.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from deepseek_jax.parallel import schedules as sched

# A tick runs a forward half and a backward half (either may be empty; an
# FB op fills both). Their codes, per direction d: F = 1 + d; B = 1 + d,
# I = 3 + d, W = 5 + d.
NO_OP = 0
F_CODES = {"F": 1}
B_CODES = {"B": 1, "I": 3, "W": 5}
_FIELDS = ("f_op", "f_mb", "f_x", "b_op", "b_mb", "b_x", "b_g", "ra0", "ra1", "rg0", "rg1",
           "rah", "rgh")
# The simulator's durations for argument checks (any valid ones do).
CHECK_TIMES = {"F": 1.0, "B": 2.0, "W": 1.0, "FB": 1.0}


@dataclasses.dataclass(frozen=True)
class Table:
  """The executor's program: int32 [ticks, PP] per field (`_FIELDS`):
  f_op / f_mb / f_x (forward half: code, micro-batch, slot of its input),
  b_op / b_mb / b_x / b_g (backward half: code, micro-batch, slots of its
  input and of its output gradient), ra{d} / rg{d} (slot storing the
  activation / gradient arriving this tick on direction d's channel; the
  trash slot when none), rah / rgh (DualPipeV's turn at rank PP-1: slot
  storing this tick's own direction-0 activation / direction-1 input
  gradient, handed to the other chunk without a message).
  n_slots: activation slots per rank (+1 trash slot in the buffers).
  v: DualPipeV (direction d of rank r is its chunk r (d = 0) or 2PP-1-r)."""
  fields: dict[str, np.ndarray]
  n_slots: int
  n_ticks: int
  directions: int
  v: bool = False


class Slots:
  """Greedy slot allocation on one rank: a slot taken at tick t (stored after
  that tick's op) is free again for an arrival at the tick of its last read."""

  def __init__(self):
    self.free_at: list[int] = []     # per slot: tick from which it may be reused

  def take(self, tick: int, release: int) -> int:
    for i, t in enumerate(self.free_at):
      if t <= tick:
        self.free_at[i] = release
        return i
    self.free_at.append(release)
    return len(self.free_at) - 1


def _ticks(timeline) -> tuple[dict, dict, dict, dict]:
  """When each (mb, chunk) is made / read: its forward's tick, its input
  gradient's tick, the tick of the op that last reads its held input; and
  each (mb, chunk)'s direction."""
  f_tick, i_tick, last_read, direction = {}, {}, {}, {}
  for ops in timeline:
    for op in ops:
      for t in op.tasks:
        key = (t.mb, t.chunk)
        direction[key] = t.direction
        if t.kind == "F":
          f_tick[key] = int(op.start)
        if t.kind in ("B", "I"):
          i_tick[key] = int(op.start)
        if t.kind in ("B", "W"):
          last_read[key] = int(op.start)
  return f_tick, i_tick, last_read, direction


def _arrivals(timeline, pp: int, n: int, v: bool):
  """Every arrival (tick, "x" | "g", mb, chunk, rank, slot, channel) with its
  slot, and the number of slots per rank. n: chunks per micro-batch; v:
  DualPipeV's chunk numbering. channel: the sender's direction, or "h" for
  DualPipeV's turn at rank PP-1 (chunk PP-1 to PP and back: same rank, no
  message)."""
  f_tick, i_tick, last_read, direction = _ticks(timeline)
  # Arrivals in tick order, so that the greedy allocation sees them in time.
  arrivals = [(t, "x", mb, chunk + 1, chunk) for (mb, chunk), t in f_tick.items()
              if chunk < n - 1]
  arrivals += [(t, "g", mb, chunk - 1, chunk) for (mb, chunk), t in i_tick.items() if chunk > 0]
  slots = {"x": [Slots() for _ in range(pp)], "g": [Slots() for _ in range(pp)]}
  placed = []
  for tick, what, mb, chunk, src in sorted(arrivals):
    rank = sched.chunk_rank(chunk, direction[(mb, chunk)], pp, v)
    slot = slots[what][rank].take(tick, last_read[(mb, chunk)])
    local = rank == sched.chunk_rank(src, direction[(mb, src)], pp, v)
    placed.append((tick, what, mb, chunk, rank, slot, "h" if local else direction[(mb, src)]))
  n_slots = max([len(s.free_at) for pool in slots.values() for s in pool] + [1])
  return placed, n_slots


def build_table(schedule: str, n_stages: int, n_microbatches: int) -> Table:
  """The executor's tick table for `schedule` (see the module doc)."""
  pp, m = n_stages, n_microbatches
  sched._check_args(schedule, pp, m, CHECK_TIMES)
  plans = sched._PLANS[schedule](pp, m)
  n = sched.n_chunks(schedule, pp)
  timeline, _ = sched._time_plans(plans, n, {k: 1.0 for k in sched.KINDS})
  n_ticks = int(max(ops[-1].end for ops in timeline if ops))
  placed, n_slots = _arrivals(timeline, pp, n, schedule == "dualpipev")
  x_slot = {(mb, c): slot for _, what, mb, c, _, slot, _ in placed if what == "x"}
  g_slot = {(mb, c): slot for _, what, mb, c, _, slot, _ in placed if what == "g"}
  trash = n_slots
  fields = {name: np.full((n_ticks, pp), trash, np.int32) for name in _FIELDS}
  for name in ("f_op", "f_mb", "b_op", "b_mb"):
    fields[name][:] = 0
  for tick, what, _, _, rank, slot, d in placed:
    fields[f"r{'a' if what == 'x' else 'g'}{d}"][tick, rank] = slot
  for r, ops in enumerate(timeline):
    for op in ops:
      t = int(op.start)
      fwd = [x for x in op.tasks if x.kind == "F"]
      bwd = [x for x in op.tasks if x.kind != "F"]
      if fwd:
        f = fwd[0]
        fields["f_op"][t, r] = F_CODES["F"] + f.direction
        fields["f_mb"][t, r] = f.mb
        fields["f_x"][t, r] = x_slot.get((f.mb, f.chunk), trash)
      if bwd:
        b = bwd[0]
        fields["b_op"][t, r] = B_CODES[b.kind] + b.direction
        fields["b_mb"][t, r] = b.mb
        fields["b_x"][t, r] = x_slot.get((b.mb, b.chunk), trash)
        fields["b_g"][t, r] = g_slot.get((b.mb, b.chunk), trash)
  return Table(fields, n_slots, n_ticks, 2 if schedule in ("dualpipe", "dualpipev") else 1,
               schedule == "dualpipev")


__all__ = ["NO_OP", "F_CODES", "B_CODES", "CHECK_TIMES", "Table", "Slots", "build_table"]
