"""Pipeline-parallel schedules as explicit per-rank timelines (DESIGN.md §4).

`simulate(schedule, n_stages, n_microbatches, F=, B=, W=, FB=)` builds, for
every pipeline rank, the ordered list of operations the schedule runs, gives
each one its earliest start under the data dependencies, and reports the
bubble, the activation peak and the transfers between ranks. The pipeline
executor (shard_map + ppermute) consumes these timelines: the order here is
the order executed, and `transfers` says which rank sends which activation or
gradient to which, produced by which op and consumed by which.

Model of a pipeline
-------------------
The model is cut into PP = n_stages layer chunks 0..PP-1. A micro-batch runs
the chunks in order (forward), then in reverse order (backward). Work items
(`Task`) on one chunk for one micro-batch:

  F  forward                           time F
  B  whole backward (input + weights)  time B
  I  input-gradient part of B          time B - W   (zero-bubble split)
  W  weight-gradient part of B         time W

An `Op` is what one rank runs at a time: one task, or (DualPipe) "FB", a
forward of one micro-batch mutually overlapped with the whole backward of
another, time FB (the report's "F&B"). Dependencies (and nothing else: zero
communication time, a result is usable by any rank when its op ends):

  F of chunk c  after F of chunk c-1 (same micro-batch);
  B / I of c    after F of c, and after B / I of chunk c+1;
  W of c        after I of c.

Each rank runs its ops in the listed order, one at a time, each as early as
its dependencies and the rank's previous op allow. All ranks start at t = 0.

Schedules
---------
  gpipe     all forwards (micro-batch order), then all backwards (reverse
            order, as autodiff of a loop runs them); rank s holds chunk s.
  1f1b      rank s: min(PP-1-s, M) warm-up forwards, then one forward / one
            backward alternately, then the remaining backwards.
  zb1p      ZB-H1 of the zero-bubble paper (Qi et al. 2023): the order of
            1f1b with each B split into I and W; rank s keeps up to s W's
            pending (issues W of its oldest micro-batch once more than s are
            waiting) and runs the rest after its last I. Every rank then holds
            PP micro-batches in flight, as rank 0 of 1f1b does.
  dualpipe  DeepSeek-V3's DualPipe, in the operation order of DeepSeek's
            published implementation (deepseek-ai/DualPipe, `step`): two
            chunks per rank (rank r holds chunk r of direction 0 and chunk
            PP-1-r of direction 1: 2x parameters); M/2 micro-batches enter at
            rank 0 (direction 0, ids 0..M/2-1), M/2 at rank PP-1 (direction 1,
            ids M/2..M-1). With h = min(r, PP-1-r), H = PP/2, "phase 0" the
            direction whose first chunks this rank holds (direction 0 on ranks
            < H) and "phase 1" the other, rank r runs:
              1. 2(H-h-1)         F0
              2. h+1              F0, F1
              3. H-h-1            I1, W, F1             (zero-bubble: W deferred)
              4. M/2-PP+h+1       FB(F0,B1), FB(F1,B0)  (the first pair as
                                  F0 then B1, not overlapped, on the two
                                  middle ranks)
              5. H-h-1            B1, FB(F1,B0)
              6. h+1              B1, B0  (the last h+1 of these as I)
              7. H-h-1            W, I0
              8. h+1              W
            (Fk/Bk/Ik: the next micro-batch of phase k in order; W: the oldest
            deferred weight gradient.) Needs PP even and M >= 2 PP (step 4 is
            empty on the outer ranks otherwise), M even. That implementation
            posts some sends only after the next op; here, as everywhere, a
            result is usable the moment its op ends.
  dualpipev DeepSeek's DualPipeV ("cut-in-half" DualPipe, deepseek-ai/DualPipe):
            the model is cut into 2 PP chunks 0..2PP-1 (Task.chunk is the
            global chunk; direction 0 for chunks < PP, 1 for the others);
            rank r holds chunks r and 2PP-1-r (one parameter copy, 2 chunks
            of half a stage), every micro-batch runs chunks 0..PP-1 on ranks
            0..PP-1, turns at rank PP-1 (locally) and runs PP..2PP-1 back
            down to rank 0, where the loss is. Rank r runs, with "phase 0"
            chunk r and "phase 1" chunk 2PP-1-r, micro-batches 0..M-1 each:
              1. 2(PP-r-1) F0;  2. r+1 F0, F1;  3. PP-r-1 I1, W, F1;
              4. M-2PP+r+1 FB(F0,B1), FB(F1,B0) (the first pair as F0 then
                 B1 on rank PP-1);  5. PP-r-1 B1, FB(F1,B0);
              6. r+1 B1, B0 (the last r+1 of these as I);
              7. PP-r-1 W, I0;  8. r+1 W.
            Needs M >= 2 PP. Times F, B, W, FB are per chunk (L / 2PP layers).

Measures (the columns of the V3 report's Table 2)
-------------------------------------------------
  bubble            max over ranks of (makespan - the rank's busy time): the
                    longest a rank sits idle between t = 0 and the end of the
                    last op on any rank. Busy time counts an FB op once (FB).
  peak_activations  max over ranks and time of the number of (micro-batch,
                    chunk) activations held, in units of one micro-batch's
                    activations of one chunk (= one stage of 1f1b: L/PP
                    layers). A forward's activations are held from the start
                    of its op to the end of the op that completes the chunk's
                    backward (B, or W when split): so during an FB op both its
                    forward's and its backward's micro-batch count, which is
                    where DualPipe's "+1" comes from.
  param_copies      parameter copies per rank in units of one chunk: 2 for
                    DualPipe and DualPipeV (whose chunks are half a stage:
                    together one copy of the model), 1 otherwise.

Table 2 against the timelines (`table2` gives the formulas; tests/test_schedules.py
checks where they hold). The formulas are idealised counts; the timelines meet
them exactly only under these conditions (found by simulating a grid of PP, M
and times; outside them the measured bubble differs, in either direction, and
the formula can even go negative when W is large):
  gpipe, 1f1b  (PP-1)(F+B); activations M, resp. min(M, PP): every F, B, M.
  zb1p         (PP-1)(F+B-2W); activations PP: exactly when M >= PP and
               W <= min(F, B-W), i.e. every W fits in the gap it is meant to
               fill (the zero-bubble paper's F = B-W = W is one such case).
               With M < PP too few W's exist: the bubble is (PP-M) W larger.
  dualpipe     (PP/2-1)(F&B+B-3W); activations PP+1; 2x parameters: exactly
               when M >= 2 PP (even), F = B-W (forward = input-gradient part),
               W <= F and max(F, B) <= FB <= F+B (FB between full and no
               overlap). The DESIGN.md case W = F = B/2 is one such point. What
               the number counts: the idle time, from t = 0 to the end of the
               step, of the two middle ranks and their outer neighbours (all
               four ranks at PP = 4): they run the most FB pairs (M-PP-1 each),
               so their busy time is the smallest while every rank's idle is
               counted to the same end of the step; each rank further out runs
               one pair fewer and idles (F+B-FB) less. On the middle ranks the
               idle is their late start ((PP/2-1) F) plus short waits during
               the cool-down.
  dualpipev    DualPipeV's published row with its PP = 2 n_stages chunk
               stages: (n_stages-1)(F&B+B-3W); activations 2 n_stages + 1
               chunks; 2 chunks of parameters: exactly, on every grid point
               tests/test_schedules.py tries with F = B-W, W <= F,
               max(F, B) <= FB <= F+B and M >= 2 n_stages (even or odd).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

SCHEDULES = ("gpipe", "1f1b", "zb1p", "dualpipe", "dualpipev")
KINDS = ("F", "B", "I", "W", "FB")


@dataclasses.dataclass(frozen=True)
class Task:
  """One unit of work: `kind` ("F", "B", "I", "W") of layer chunk `chunk` for
  micro-batch `mb` (global id 0..M-1) travelling in `direction` (0: enters at
  rank 0; 1: DualPipe's reverse direction, enters at rank PP-1)."""
  kind: str
  mb: int
  direction: int
  chunk: int


@dataclasses.dataclass(frozen=True)
class Op:
  """What `rank` runs during [start, end): `kind` is one of KINDS; one task,
  or for kind "FB" a forward task and a whole-backward task overlapped
  (tasks = (F, B)). `index` is the op's position in its rank's list."""
  kind: str
  rank: int
  index: int
  tasks: tuple[Task, ...]
  start: float
  end: float

  @property
  def duration(self) -> float:
    return self.end - self.start

  @property
  def label(self) -> str:
    """Micro-batch ids, "f/b" for an FB op (used in the Gantt boxes)."""
    return "/".join(str(t.mb) for t in self.tasks)


@dataclasses.dataclass(frozen=True)
class Transfer:
  """A point-to-point message: `what` ("activation": a forward's output, or
  "gradient": a backward's input gradient) of micro-batch `mb` leaves rank
  `src` when op `src_op` (an index into the timeline of `src`) ends, at
  `time`, for rank `dst`, where op `dst_op` consumes it. `chunk` is the
  producing chunk; the consumer's chunk is chunk + 1 (activation) or
  chunk - 1 (gradient) of the same direction."""
  what: str
  mb: int
  direction: int
  chunk: int
  src: int
  dst: int
  src_op: int
  dst_op: int
  time: float


# ---------------------------------------------------------------------------
# Operation orders. A plan is, per rank, a list of (kind, tasks).

def _task(kind: str, mb: int, direction: int, rank: int, n_stages: int) -> Task:
  """The task of `direction` on `rank`: chunk r of direction 0, PP-1-r of 1."""
  chunk = rank if direction == 0 else n_stages - 1 - rank
  return Task(kind, mb, direction, chunk)


def _plan_gpipe(pp: int, m: int) -> list[list[tuple[str, tuple[Task, ...]]]]:
  plans = []
  for s in range(pp):
    ops = [("F", (Task("F", i, 0, s),)) for i in range(m)]
    ops += [("B", (Task("B", i, 0, s),)) for i in reversed(range(m))]
    plans.append(ops)
  return plans


def _one_f_one_b_order(pp: int, m: int, s: int) -> list[tuple[str, int]]:
  """("F" | "B", micro-batch) in 1F1B order on rank s."""
  warmup = min(pp - 1 - s, m)
  order = [("F", i) for i in range(warmup)]
  for i in range(m - warmup):
    order += [("F", warmup + i), ("B", i)]
  order += [("B", i) for i in range(m - warmup, m)]
  return order


def _plan_1f1b(pp: int, m: int):
  return [[(k, (Task(k, i, 0, s),)) for k, i in _one_f_one_b_order(pp, m, s)]
          for s in range(pp)]


def _plan_zb1p(pp: int, m: int):
  plans = []
  for s in range(pp):
    ops, pending = [], []
    for kind, i in _one_f_one_b_order(pp, m, s):
      if kind == "F":
        ops.append(("F", (Task("F", i, 0, s),)))
        continue
      ops.append(("I", (Task("I", i, 0, s),)))
      pending.append(i)
      if len(pending) > s:                      # rank s keeps s weight gradients waiting
        ops.append(("W", (Task("W", pending.pop(0), 0, s),)))
    ops += [("W", (Task("W", i, 0, s),)) for i in pending]
    plans.append(ops)
  return plans


def _plan_dualpipe(pp: int, m: int):
  return [_dualpipe_rank(pp, m, r) for r in range(pp)]


def _dualpipe_rank(pp: int, m: int, r: int) -> list[tuple[str, tuple[Task, ...]]]:
  """Rank r's DualPipe order: the eight steps of the module doc."""
  half, per_dir = pp // 2, m // 2
  h = min(r, pp - 1 - r)
  middle = h == half - 1
  phase_dir = (0, 1) if r < half else (1, 0)     # phase -> direction
  next_f, next_b = [0, 0], [0, 0]                # per phase: next micro-batch (in order)
  deferred: list[Task] = []                      # I's whose W is still to run (FIFO)
  ops: list[tuple[str, tuple[Task, ...]]] = []

  def fwd(phase):
    k, next_f[phase] = next_f[phase], next_f[phase] + 1
    return _task("F", k + per_dir * phase_dir[phase], phase_dir[phase], r, pp)

  def bwd(phase, split=False):
    k, next_b[phase] = next_b[phase], next_b[phase] + 1
    t = _task("I" if split else "B", k + per_dir * phase_dir[phase], phase_dir[phase], r, pp)
    if split:
      deferred.append(t)
    return t

  def single(t):
    ops.append((t.kind, (t,)))

  def weight():
    t = deferred.pop(0)
    single(Task("W", t.mb, t.direction, t.chunk))

  for _ in range(2 * (half - h - 1)):                          # 1: nF0
    single(fwd(0))
  for _ in range(h + 1):                                       # 2: nF0F1
    single(fwd(0))
    single(fwd(1))
  for _ in range(half - h - 1):                                # 3: nB1W1F1
    single(bwd(1, split=True))
    weight()
    single(fwd(1))
  for i in range(per_dir - pp + h + 1):                        # 4: nF0B1F1B0
    if i == 0 and middle:
      single(fwd(0))
      single(bwd(1))
    else:
      ops.append(("FB", (fwd(0), bwd(1))))
    ops.append(("FB", (fwd(1), bwd(0))))
  for _ in range(half - h - 1):                                # 5: nB1F1B0
    single(bwd(1))
    ops.append(("FB", (fwd(1), bwd(0))))
  n6 = 2 * (h + 1)                                             # 6: nB1B0, 2nd half split
  for j in range(n6):
    single(bwd(1 if j % 2 == 0 else 0, split=j >= n6 - (h + 1)))
  for _ in range(half - h - 1):                                # 7: nWB0
    weight()
    single(bwd(0, split=True))
  for _ in range(h + 1):                                       # 8: nW
    weight()
  assert not deferred and next_f == next_b == [per_dir, per_dir], (r, next_f, next_b)
  return ops


def _plan_dualpipev(pp: int, m: int):
  return [_dualpipev_rank(pp, m, r) for r in range(pp)]


def _dualpipev_rank(pp: int, m: int, r: int) -> list[tuple[str, tuple[Task, ...]]]:
  """Rank r's DualPipeV order (module doc): phase 0 is chunk r (direction
  0), phase 1 chunk 2PP-1-r (direction 1); every micro-batch 0..M-1 runs
  both, in order."""
  chunk = (r, 2 * pp - 1 - r)
  next_f, next_b = [0, 0], [0, 0]
  deferred: list[Task] = []
  ops: list[tuple[str, tuple[Task, ...]]] = []

  def fwd(p):
    k, next_f[p] = next_f[p], next_f[p] + 1
    return Task("F", k, p, chunk[p])

  def bwd(p, split=False):
    k, next_b[p] = next_b[p], next_b[p] + 1
    t = Task("I" if split else "B", k, p, chunk[p])
    if split:
      deferred.append(t)
    return t

  def single(t):
    ops.append((t.kind, (t,)))

  def weight():
    t = deferred.pop(0)
    single(Task("W", t.mb, t.direction, t.chunk))

  for _ in range(2 * (pp - r - 1)):                            # 1: nF0
    single(fwd(0))
  for _ in range(r + 1):                                       # 2: nF0F1
    single(fwd(0))
    single(fwd(1))
  for _ in range(pp - r - 1):                                  # 3: nB1W1F1
    single(bwd(1, split=True))
    weight()
    single(fwd(1))
  for i in range(m - 2 * pp + r + 1):                          # 4: nF0B1F1B0
    if i == 0 and r == pp - 1:
      single(fwd(0))
      single(bwd(1))
    else:
      ops.append(("FB", (fwd(0), bwd(1))))
    ops.append(("FB", (fwd(1), bwd(0))))
  for _ in range(pp - r - 1):                                  # 5: nB1F1B0
    single(bwd(1))
    ops.append(("FB", (fwd(1), bwd(0))))
  n6 = 2 * (r + 1)                                             # 6: nB1B0, 2nd half split
  for j in range(n6):
    single(bwd(1 if j % 2 == 0 else 0, split=j >= n6 - (r + 1)))
  for _ in range(pp - r - 1):                                  # 7: nWB0
    weight()
    single(bwd(0, split=True))
  for _ in range(r + 1):                                       # 8: nW
    weight()
  assert not deferred and next_f == next_b == [m, m], (r, next_f, next_b)
  return ops


_PLANS = {"gpipe": _plan_gpipe, "1f1b": _plan_1f1b, "zb1p": _plan_zb1p,
          "dualpipe": _plan_dualpipe, "dualpipev": _plan_dualpipev}


def n_chunks(schedule: str, n_stages: int) -> int:
  """Layer chunks a micro-batch runs: 2 PP for DualPipeV, PP otherwise."""
  return 2 * n_stages if schedule == "dualpipev" else n_stages


def chunk_rank(chunk: int, direction: int, n_stages: int, v: bool = False) -> int:
  """The rank running `chunk` of `direction`: DualPipeV (v) numbers its 2 PP
  chunks 0..2PP-1 (chunk c on rank c, then 2PP-1-c); DualPipe's direction 1
  runs its chunk c on rank PP-1-c; otherwise chunk c is on rank c."""
  if v:
    return chunk if chunk < n_stages else 2 * n_stages - 1 - chunk
  return chunk if direction == 0 else n_stages - 1 - chunk


# ---------------------------------------------------------------------------
# Timing: earliest start of every op under the dependencies.

def _deps(t: Task, n: int) -> list[tuple[str, int, int]]:
  """Keys (what, mb, chunk) the task waits for: "F" = forward done, "I" = input
  gradient done (by B, I or an FB's B); n: the chunks a micro-batch runs."""
  if t.kind == "F":
    return [("F", t.mb, t.chunk - 1)] if t.chunk > 0 else []
  if t.kind in ("B", "I"):
    deps = [("F", t.mb, t.chunk)]
    return deps + ([("I", t.mb, t.chunk + 1)] if t.chunk < n - 1 else [])
  return [("I", t.mb, t.chunk)]


def _provides(t: Task) -> list[tuple[str, int, int]]:
  """Keys the task completes (nothing waits for a weight gradient)."""
  return {"F": [("F", t.mb, t.chunk)], "B": [("I", t.mb, t.chunk)],
          "I": [("I", t.mb, t.chunk)], "W": []}[t.kind]


def _time_plans(plans, n: int, durations: dict[str, float]):
  """Places every op at max(end of the rank's previous op, end of its inputs);
  n: the chunks a micro-batch runs (`n_chunks`). Returns (timeline,
  transfers)."""
  done: dict[tuple[str, int, int], tuple[int, int, float]] = {}   # key -> (rank, op, end)
  timeline: list[list[Op]] = [[] for _ in plans]
  clock = [0.0] * len(plans)
  pos = [0] * len(plans)
  transfers = []
  remaining = sum(len(p) for p in plans)
  while remaining:
    progressed = False
    for r, plan in enumerate(plans):
      while pos[r] < len(plan):
        kind, tasks = plan[pos[r]]
        deps = [d for t in tasks for d in _deps(t, n)]
        if any(d not in done for d in deps):
          break
        start = max([clock[r]] + [done[d][2] for d in deps])
        end = start + durations[kind]
        op = Op(kind, r, pos[r], tasks, start, end)
        timeline[r].append(op)
        for t in tasks:
          for d in _deps(t, n):
            src, src_op, ready = done[d]
            if src != r:                         # same-rank inputs need no message
              transfers.append(Transfer("activation" if d[0] == "F" else "gradient", t.mb,
                                        t.direction, d[2], src, r, src_op, pos[r], ready))
        for t in tasks:
          for key in _provides(t):
            done[key] = (r, pos[r], end)
        clock[r] = end
        pos[r] += 1
        remaining -= 1
        progressed = True
    if not progressed:
      stuck = {r: plans[r][pos[r]] for r in range(len(plans)) if pos[r] < len(plans[r])}
      raise RuntimeError(f"schedule deadlocks: every rank waits; next ops {stuck}")
  transfers.sort(key=lambda x: (x.time, x.src, x.dst))
  return timeline, transfers


# ---------------------------------------------------------------------------
# Public API

def _check_args(schedule, n_stages, n_microbatches, times) -> None:
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule={schedule!r} is not a known pipeline schedule; "
                     f"use one of {list(SCHEDULES)}.")
  for name, value in (("n_stages", n_stages), ("n_microbatches", n_microbatches)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}={value!r} must be a positive integer.")
  for name, value in times.items():
    if (isinstance(value, bool) or not isinstance(value, (int, float))
        or not math.isfinite(value) or value <= 0):
      raise ValueError(f"{name}={value!r}: pass a positive, finite time for one chunk's "
                       f"{_TIME_MEANING[name]}.")
  if times["W"] >= times["B"]:
    raise ValueError(f"W={times['W']!r} must be smaller than B={times['B']!r}: W is the "
                     "weight-gradient part of a chunk's whole backward B, whose input-gradient "
                     "part B - W must take some time.")
  if schedule == "dualpipe":
    if n_stages % 2:
      raise ValueError(f"n_stages={n_stages}: DualPipe pairs rank r with rank PP-1-r (two "
                       "chunks per rank, two directions), so it needs an even number of "
                       "stages; use an even n_stages.")
    if n_microbatches % 2 or n_microbatches < 2 * n_stages:
      raise ValueError(
          f"n_microbatches={n_microbatches} with n_stages={n_stages}: DualPipe feeds half "
          "the micro-batches from each end and its steady phase (FB pairs) exists on every "
          "rank only when each direction has at least PP micro-batches, so it needs an even "
          f"n_microbatches >= 2 * n_stages = {2 * n_stages}.")


  if schedule == "dualpipev" and n_microbatches < 2 * n_stages:
    raise ValueError(
        f"n_microbatches={n_microbatches} with n_stages={n_stages}: DualPipeV's steady phase "
        "(FB pairs) exists on every rank only with at least 2 PP micro-batches, so it needs "
        f"n_microbatches >= 2 * n_stages = {2 * n_stages}.")


_TIME_MEANING = {"F": "forward", "B": "whole backward (input + weight gradients)",
                 "W": "weight-gradient backward",
                 "FB": "forward and whole backward overlapped (DualPipe's F&B)"}


def simulate(schedule: str, n_stages: int, n_microbatches: int, *, F: float = 1.0,
             B: float = 2.0, W: float = 1.0, FB: float | None = None) -> dict[str, Any]:
  """Builds the per-rank timeline of `schedule` and measures it (module doc).

  F, B, W, FB: times of one chunk's forward, whole backward, weight-gradient
    part of the backward, and of one overlapped forward + backward pair
    (DualPipe only; None: F + B, i.e. overlap saves nothing).

  Returns a dict:
    schedule, n_stages, n_microbatches, times ({"F","B","I","W","FB"})
    timeline       per rank, its ops in execution order (`Op`)
    transfers      every rank-to-rank message (`Transfer`), by time
    makespan       end of the last op
    busy, idle     per rank: summed op time; makespan - busy
    bubble         max(idle)
    activations    per rank, the peak activations held (units: module doc)
    peak_activations  max(activations)
    param_copies   chunk copies of parameters per rank (2 for DualPipe)
    table2         the report's formulas for these arguments (`table2`)
  """
  FB = F + B if FB is None else FB
  times = {"F": F, "B": B, "W": W, "FB": FB}
  _check_args(schedule, n_stages, n_microbatches, times)
  durations = {**times, "I": B - W}
  plans = _PLANS[schedule](n_stages, n_microbatches)
  timeline, transfers = _time_plans(plans, n_chunks(schedule, n_stages), durations)
  makespan = max(ops[-1].end for ops in timeline if ops)
  busy = [sum(op.duration for op in ops) for ops in timeline]
  activations = []
  for ops in timeline:
    held = peak = 0
    for op in ops:
      held += sum(t.kind == "F" for t in op.tasks)
      peak = max(peak, held)
      held -= sum(t.kind in ("B", "W") for t in op.tasks)
    assert held == 0, held
    activations.append(peak)
  idle = [makespan - b for b in busy]
  return {"schedule": schedule, "n_stages": n_stages, "n_microbatches": n_microbatches,
          "times": durations, "timeline": timeline, "transfers": transfers,
          "makespan": makespan, "busy": busy, "idle": idle, "bubble": max(idle),
          "activations": activations, "peak_activations": max(activations),
          "param_copies": 2 if schedule in ("dualpipe", "dualpipev") else 1,
          "table2": table2(schedule, n_stages, n_microbatches, F=F, B=B, W=W, FB=FB)}


def table2(schedule: str, n_stages: int, n_microbatches: int, *, F: float = 1.0,
           B: float = 2.0, W: float = 1.0, FB: float | None = None) -> dict[str, float]:
  """The V3 report's Table 2 (and GPipe's textbook row) for these arguments:
  {"bubble", "activations", "param_copies"}.

    gpipe     (PP-1)(F+B)            M      1
    1f1b      (PP-1)(F+B)            PP     1
    zb1p      (PP-1)(F+B-2W)         PP     1
    dualpipe  (PP/2-1)(F&B+B-3W)     PP+1   2
    dualpipev (PP-1)(F&B+B-3W)       2PP+1  2   (chunks of L / 2PP layers)

  Idealised counts: see the module doc for when the simulated timelines meet
  them exactly.
  """
  FB = F + B if FB is None else FB
  _check_args(schedule, n_stages, n_microbatches, {"F": F, "B": B, "W": W, "FB": FB})
  pp, m = n_stages, n_microbatches
  if schedule == "gpipe":
    return {"bubble": (pp - 1) * (F + B), "activations": m, "param_copies": 1}
  if schedule == "1f1b":
    return {"bubble": (pp - 1) * (F + B), "activations": pp, "param_copies": 1}
  if schedule == "zb1p":
    return {"bubble": (pp - 1) * (F + B - 2 * W), "activations": pp, "param_copies": 1}
  if schedule == "dualpipev":
    return {"bubble": (pp - 1) * (FB + B - 3 * W), "activations": 2 * pp + 1,
            "param_copies": 2}
  return {"bubble": (pp // 2 - 1) * (FB + B - 3 * W), "activations": pp + 1,
          "param_copies": 2}


_COLORS = {"F": "#4c72b0", "B": "#55a868", "I": "#a6dcb0", "W": "#dd8452"}
_NAMES = {"F": "F forward", "B": "B backward (input + weights)", "I": "I input gradient",
          "W": "W weight gradient"}


def plot_timeline(result: dict[str, Any], ax=None):
  """Gantt chart of `simulate(...)`'s result: one row per rank (rank 0 on top),
  time on x, one box per op coloured by kind with its micro-batch id inside
  (boxes too narrow for a number stay blank). An FB op is drawn as its two
  halves, forward above and backward below, inside one thick border (the
  report's Figure 5 convention); DualPipe's reverse direction is lighter.
  Returns the Axes.

  ax: where to draw; None draws on a new `matplotlib.figure.Figure` (not
  pyplot: the caller's backend and open figures are left alone; the figure is
  `ax.figure`).
  """
  from matplotlib.patches import Patch, Rectangle
  timeline, makespan = result["timeline"], result["makespan"]
  n = len(timeline)
  if ax is None:
    from matplotlib.figure import Figure
    ax = Figure(figsize=(12, 0.45 * n + 1.3)).add_subplot()
  min_text = makespan / 80

  def box(x, y0, w, height, task, kind, fontsize):
    ax.add_patch(Rectangle((x, y0), w, height, facecolor=_COLORS[kind], edgecolor="black",
                           linewidth=0.4, alpha=1.0 if task.direction == 0 else 0.55))
    if w >= min_text:
      ax.text(x + w / 2, y0 + height / 2, str(task.mb), ha="center", va="center",
              fontsize=fontsize)

  for r, ops in enumerate(timeline):
    for op in ops:
      if op.kind == "FB":
        fwd, bwd = op.tasks
        box(op.start, r - 0.4, op.duration, 0.4, fwd, "F", 5.5)
        box(op.start, r, op.duration, 0.4, bwd, "B", 5.5)
        ax.add_patch(Rectangle((op.start, r - 0.4), op.duration, 0.8, fill=False,
                               edgecolor="black", linewidth=1.6))
      else:
        box(op.start, r - 0.4, op.duration, 0.8, op.tasks[0], op.kind, 7)
  ax.set_xlim(0, makespan)
  ax.set_ylim(n - 0.5, -0.5)
  ax.set_yticks(range(n))
  ax.set_yticklabels([f"rank {r}" for r in range(n)])
  ax.set_xlabel("time")
  used = {t.kind for ops in timeline for op in ops for t in op.tasks}
  handles = [Patch(facecolor=_COLORS[k], edgecolor="black", label=_NAMES[k])
             for k in ("F", "B", "I", "W") if k in used]
  if any(op.kind == "FB" for ops in timeline for op in ops):
    handles.append(Patch(fill=False, edgecolor="black", linewidth=1.6,
                         label="F&B: overlapped pair"))
  if any(t.direction == 1 for ops in timeline for op in ops for t in op.tasks):
    handles.append(Patch(facecolor=_COLORS["F"], alpha=0.55, edgecolor="black",
                         label="reverse direction"))
  ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
  ax.set_title(f"{result['schedule']}: PP={result['n_stages']}, "
               f"M={result['n_microbatches']}, makespan {result['makespan']:g}, "
               f"bubble {result['bubble']:g}, peak activations "
               f"{result['peak_activations']}", fontsize=9)
  return ax
