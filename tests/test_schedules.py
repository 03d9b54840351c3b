"""Pipeline schedule simulator (deepseek_jax/parallel/schedules.py).

Every timeline is checked here by code written independently of the
simulator: each rank runs one op at a time; every micro-batch gets F and
either B or I + W exactly once per chunk, on the rank that holds the chunk;
no op starts before its inputs are done, and each starts as early as they
and its rank allow (re-timed by a tick-by-tick simulation); transfers, idle
times and activation peaks are recounted from the ops. Then the bubble and
activation columns of the V3 report's Table 2 are compared with the timelines
in the regimes where the module doc says they hold, and shown to differ
outside them; 1F1B and GPipe are also rebuilt from their textbook rule.
"""

import itertools
import math

import pytest

from deepseek_jax.parallel.schedules import SCHEDULES, plot_timeline, simulate, table2


def _holder(pp, direction, chunk, v=False):
  """The rank of a chunk; DualPipeV (v): chunks 0..2PP-1, chunk c on rank c,
  then 2PP-1-c."""
  if v:
    return chunk if chunk < pp else 2 * pp - 1 - chunk
  return chunk if direction == 0 else pp - 1 - chunk


def _chunks(result):
  """(chunks a micro-batch runs, DualPipeV?)."""
  v = result["schedule"] == "dualpipev"
  return (2 if v else 1) * result["n_stages"], v


def _duration(result, kind):
  t = result["times"]
  return {"F": t["F"], "B": t["B"], "I": t["B"] - t["W"], "W": t["W"], "FB": t["FB"]}[kind]


def _inputs(task, pp):
  """(kind set, mb, chunk) entries whose completion the task needs."""
  if task.kind == "F":
    return [({"F"}, task.mb, task.chunk - 1)] if task.chunk else []
  if task.kind in ("B", "I"):
    out = [({"F"}, task.mb, task.chunk)]
    return out + ([({"B", "I"}, task.mb, task.chunk + 1)] if task.chunk < pp - 1 else [])
  return [({"I"}, task.mb, task.chunk)]


def check_timeline(result):
  """All structural and timing invariants of one simulate() result."""
  pp, m = result["n_stages"], result["n_microbatches"]
  n, v = _chunks(result)
  timeline = result["timeline"]
  assert len(timeline) == pp
  ends = {}                                    # (kind, mb, chunk) -> end time
  seen = {}
  for r, ops in enumerate(timeline):
    prev_end = 0.0
    for i, op in enumerate(ops):
      assert op.rank == r and op.index == i
      assert op.start >= prev_end - 1e-9, f"rank {r} runs two ops at once at {op}"
      assert math.isclose(op.end - op.start, _duration(result, op.kind), abs_tol=1e-9), op
      prev_end = op.end
      if op.kind == "FB":
        assert [t.kind for t in op.tasks] == ["F", "B"], op
        assert op.tasks[0].mb != op.tasks[1].mb
      else:
        assert [t.kind for t in op.tasks] == [op.kind], op
      for t in op.tasks:
        assert _holder(pp, t.direction, t.chunk, v) == r, f"{t} does not belong on rank {r}"
        key = (t.kind, t.mb, t.chunk)
        assert key not in ends, f"{key} runs twice"
        ends[key] = op.end
        seen.setdefault((t.mb, t.chunk), []).append(t.kind)
  # every micro-batch: F and (B or I + W) exactly once on every chunk
  assert sorted(seen) == sorted(itertools.product(range(m), range(n)))
  for key, kinds in seen.items():
    assert sorted(kinds) in (["B", "F"], ["F", "I", "W"]), (key, kinds)
  # dependencies, and each op starts exactly when the later of its inputs and
  # its rank's previous op are done
  for ops in timeline:
    prev_end = 0.0
    for op in ops:
      ready = prev_end
      for t in op.tasks:
        for kinds, mb, chunk in _inputs(t, n):
          done = min(ends[(k, mb, chunk)] for k in kinds if (k, mb, chunk) in ends)
          assert op.start >= done - 1e-9, f"{op} starts before its input {kinds, mb, chunk}"
          ready = max(ready, done)
      assert math.isclose(op.start, ready, abs_tol=1e-9), f"{op} could start at {ready}"
      prev_end = op.end
  # measures recounted
  makespan = max(ops[-1].end for ops in timeline)
  assert math.isclose(result["makespan"], makespan)
  idle = [makespan - sum(op.end - op.start for op in ops) for ops in timeline]
  assert result["idle"] == pytest.approx(idle) and math.isclose(result["bubble"], max(idle))
  assert result["activations"] == [_peak_activations(ops) for ops in timeline]
  assert result["peak_activations"] == max(result["activations"])
  _check_transfers(result)


def _peak_activations(ops):
  """Sweep over intervals [start of the op running F, end of the op finishing
  the backward (B or W)) of every (mb, chunk) activation on the rank."""
  born, freed = {}, {}
  for op in ops:
    for t in op.tasks:
      if t.kind == "F":
        born[(t.mb, t.chunk)] = op.start
      elif t.kind in ("B", "W"):
        freed[(t.mb, t.chunk)] = op.end
  intervals = [(born[k], freed[k]) for k in born]
  return max(sum(1 for s, e in intervals if s <= t < e) for t, _ in intervals)


def _check_transfers(result):
  pp, m = result["n_stages"], result["n_microbatches"]
  n, v = _chunks(result)
  timeline = result["timeline"]
  got = set()
  for x in result["transfers"]:
    src_op, dst_op = timeline[x.src][x.src_op], timeline[x.dst][x.dst_op]
    assert x.time == src_op.end <= dst_op.start + 1e-9
    step = 1 if x.what == "activation" else -1
    assert x.src == _holder(pp, x.direction, x.chunk, v)
    assert x.dst == _holder(pp, x.direction, x.chunk + step, v) and abs(x.src - x.dst) == 1
    made = {t.kind for t in src_op.tasks if t.mb == x.mb and t.chunk == x.chunk}
    used = {t.kind for t in dst_op.tasks if t.mb == x.mb and t.chunk == x.chunk + step}
    if x.what == "activation":
      assert made == {"F"} and used == {"F"}
    else:
      assert made <= {"B", "I"} and len(made) == 1 and used <= {"B", "I"} and len(used) == 1
    got.add((x.what, x.mb, x.chunk))
  # one activation out of every chunk but the last, one gradient out of every chunk but the first
  # (DualPipeV: but across its turn at rank PP-1, chunks PP-1 <-> PP, no message)
  want = {("activation", mb, c) for mb in range(m) for c in range(n - 1)
          if not (v and c == pp - 1)}
  want |= {("gradient", mb, c) for mb in range(m) for c in range(1, n) if not (v and c == pp)}
  assert got == want and len(result["transfers"]) == len(want)
  times = [x.time for x in result["transfers"]]
  assert times == sorted(times)


def _retime_by_ticks(result):
  """Independent timing for integer durations: advance a clock one unit at a
  time; a rank that is free starts its next op once every input has finished.
  Returns {(rank, index): (start, end)}."""
  pp, timeline = result["n_stages"], result["timeline"]
  pos, free_at, finished, times = [0] * pp, [0] * pp, {}, {}
  total = sum(len(ops) for ops in timeline)
  t = 0
  while len(times) < total:
    for r, ops in enumerate(timeline):
      if pos[r] == len(ops) or free_at[r] > t:
        continue
      op = ops[pos[r]]
      needs = [(kinds, mb, c) for task in op.tasks
               for kinds, mb, c in _inputs(task, _chunks(result)[0])]
      if all(any(finished.get((k, mb, c), math.inf) <= t for k in kinds)
             for kinds, mb, c in needs):
        end = t + int(_duration(result, op.kind))
        times[(r, pos[r])] = (t, end)
        for task in op.tasks:
          finished[(task.kind, task.mb, task.chunk)] = end
        free_at[r], pos[r] = end, pos[r] + 1
    t += 1
    assert t < 10_000, "tick simulation does not finish"
  return times


CASES = [("gpipe", 4, 6), ("gpipe", 3, 2), ("1f1b", 4, 8), ("1f1b", 5, 3), ("1f1b", 1, 3),
         ("zb1p", 4, 8), ("zb1p", 6, 6), ("zb1p", 4, 2), ("dualpipe", 2, 4),
         ("dualpipe", 4, 8), ("dualpipe", 6, 14), ("dualpipe", 8, 16), ("dualpipev", 1, 2),
         ("dualpipev", 2, 4), ("dualpipev", 2, 5), ("dualpipev", 3, 7), ("dualpipev", 4, 8),
         ("dualpipev", 8, 20)]


@pytest.mark.parametrize("schedule,pp,m", CASES)
@pytest.mark.parametrize("times", [(1, 2, 1, 2), (2, 3, 1, 4), (1, 4, 3, 5)])
def test_timelines_respect_dependencies_and_are_as_early_as_possible(schedule, pp, m, times):
  f, b, w, fb = times
  result = simulate(schedule, pp, m, F=f, B=b, W=w, FB=fb)
  check_timeline(result)
  ticks = _retime_by_ticks(result)
  for ops in result["timeline"]:
    for op in ops:
      assert ticks[(op.rank, op.index)] == (op.start, op.end), op


def _one_f_one_b_by_rule(pp, m):
  """The textbook rule: rank s keeps at most pp - s micro-batches in flight;
  it runs a forward while it may, otherwise the oldest pending backward."""
  orders = []
  for s in range(pp):
    order, fwd, bwd = [], 0, 0
    while bwd < m:
      if fwd < m and fwd - bwd < pp - s:
        order.append(("F", fwd))
        fwd += 1
      else:
        order.append(("B", bwd))
        bwd += 1
    orders.append(order)
  return orders


@pytest.mark.parametrize("pp,m", [(2, 2), (4, 4), (4, 9), (6, 3), (8, 16)])
def test_1f1b_and_gpipe_match_their_textbook_construction(pp, m):
  f, b = 2, 3
  one = simulate("1f1b", pp, m, F=f, B=b, W=1)
  orders = [[(op.kind, op.tasks[0].mb) for op in ops] for ops in one["timeline"]]
  assert orders == _one_f_one_b_by_rule(pp, m)
  # closed forms: the pipeline fills in (pp-1) F and drains in (pp-1) B
  assert one["makespan"] == (m + pp - 1) * (f + b)
  gpipe = simulate("gpipe", pp, m, F=f, B=b, W=1)
  assert gpipe["makespan"] == (m + pp - 1) * (f + b)
  assert all([op.kind for op in ops] == ["F"] * m + ["B"] * m for ops in gpipe["timeline"])


# ---------------------------------------------------------------------------
# Table 2

@pytest.mark.parametrize("pp,m", [(1, 3), (2, 5), (4, 2), (4, 8), (7, 21), (8, 16)])
@pytest.mark.parametrize("f,b", [(1, 2), (1.5, 2.5), (3, 2)])
def test_gpipe_and_1f1b_bubble_is_pp_minus_1_times_f_plus_b(pp, m, f, b):
  for schedule, act in (("gpipe", m), ("1f1b", min(m, pp))):
    r = simulate(schedule, pp, m, F=f, B=b, W=0.5)
    assert r["bubble"] == pytest.approx((pp - 1) * (f + b))
    assert r["peak_activations"] == act and r["param_copies"] == 1
    # every rank idles the same
    assert r["idle"] == pytest.approx([(pp - 1) * (f + b)] * pp)
    assert r["table2"]["bubble"] == pytest.approx(r["bubble"])


ZB_TIMES = [(1, 2, 1), (2, 3, 1), (1, 3, 1), (2, 2.5, 0.5), (1.5, 3.5, 1.5), (3, 2, 0.75)]


@pytest.mark.parametrize("pp,m", [(2, 2), (3, 5), (4, 4), (4, 8), (6, 13), (8, 16), (8, 24)])
@pytest.mark.parametrize("f,b,w", ZB_TIMES)
def test_zb1p_meets_table2_when_w_fits_its_gaps(pp, m, f, b, w):
  assert w <= min(f, b - w)                     # the module doc's regime
  r = simulate("zb1p", pp, m, F=f, B=b, W=w)
  assert r["bubble"] == pytest.approx((pp - 1) * (f + b - 2 * w))
  assert r["bubble"] == pytest.approx(table2("zb1p", pp, m, F=f, B=b, W=w)["bubble"])
  assert r["activations"] == [pp] * pp         # every rank holds PP micro-batches
  assert r["param_copies"] == 1


@pytest.mark.parametrize("pp,m", [(4, 1), (4, 3), (8, 5)])
def test_zb1p_with_fewer_microbatches_than_stages_lacks_ws_to_fill(pp, m):
  for f, b, w in ZB_TIMES[:3]:
    r = simulate("zb1p", pp, m, F=f, B=b, W=w)
    assert r["bubble"] == pytest.approx((pp - 1) * (f + b - 2 * w) + (pp - m) * w)
    assert r["peak_activations"] == m


def test_zb1p_formula_is_an_idealisation_outside_that_regime():
  # 2W = F + B: the formula says no bubble; W longer than F idles the timeline
  r = simulate("zb1p", 4, 8, F=1, B=3, W=2)
  assert r["table2"]["bubble"] == 0 and r["bubble"] == 3
  # W longer than the input-gradient part B - W: again more idle than the formula
  r = simulate("zb1p", 4, 8, F=2, B=2, W=1.5)
  assert (r["table2"]["bubble"], r["bubble"]) == (3, 6)


def _dualpipe_times():
  """F = B - W, W <= F, FB from full overlap (max(F, B)) to none (F + B)."""
  out = []
  for f, w in [(1, 1), (1, 0.5), (2, 1), (2, 0.5), (3, 3)]:
    b = f + w
    out += [(f, b, w, fb) for fb in (max(f, b), (max(f, b) + f + b) / 2, f + b)]
  return out


@pytest.mark.parametrize("pp,m", [(2, 4), (2, 6), (4, 8), (4, 10), (6, 12), (6, 18),
                                  (8, 16), (8, 20), (10, 20)])
def test_dualpipe_meets_table2_when_f_equals_the_input_gradient_part(pp, m):
  for f, b, w, fb in _dualpipe_times():
    r = simulate("dualpipe", pp, m, F=f, B=b, W=w, FB=fb)
    assert r["bubble"] == pytest.approx((pp / 2 - 1) * (fb + b - 3 * w)), (f, b, w, fb)
    assert r["bubble"] == pytest.approx(r["table2"]["bubble"])
    assert r["activations"] == [pp + 1] * pp
    assert r["param_copies"] == 2


def test_dualpipe_at_the_design_doc_point_and_the_report_figure_shape():
  # DESIGN.md §4: W = F = B/2. Figure 5's shape: PP = 8, M = 20.
  r = simulate("dualpipe", 8, 20, F=1, B=2, W=1, FB=2.5)
  check_timeline(r)
  assert r["bubble"] == pytest.approx(3 * (2.5 + 2 - 3)) and r["peak_activations"] == 9
  # rank 0 opens with PP - 1 forwards of its own direction, then the reverse one
  opening = [(op.kind, op.tasks[0].direction) for op in r["timeline"][0][:8]]
  assert opening == [("F", 0)] * 7 + [("F", 1)]
  # FB pairs per rank: M - 2PP + PP/2 + h + 1, one fewer on the two middle ranks
  # (their first pair runs as F then B); the most pairs -> the most idle
  n_fb = [sum(op.kind == "FB" for op in ops) for ops in r["timeline"]]
  assert n_fb == [20 - 16 + 4 + min(k, 7 - k) + 1 - (k in (3, 4)) for k in range(8)]
  assert n_fb == [9, 10, 11, 11, 11, 11, 10, 9]
  assert r["idle"] == pytest.approx([3.5, 4.0, 4.5, 4.5, 4.5, 4.5, 4.0, 3.5])
  # the middle ranks' idle: a late start of (PP/2 - 1) F, then waits in the cool-down
  assert r["timeline"][3][0].start == 3 * 1


@pytest.mark.parametrize("pp,m", [(4, 8), (6, 16), (8, 16)])
def test_dualpipe_ranks_mirror_each_other(pp, m):
  r = simulate("dualpipe", pp, m, F=1, B=2.5, W=0.75, FB=3)
  half = m // 2
  for k in range(pp):
    a, b = r["timeline"][k], r["timeline"][pp - 1 - k]
    assert [(op.kind, op.start, op.end) for op in a] == [(op.kind, op.start, op.end) for op in b]
    for x, y in zip(a, b):
      assert [(t.kind, t.chunk, 1 - t.direction, (t.mb + half) % m) for t in x.tasks] == \
          [(t.kind, t.chunk, t.direction, t.mb) for t in y.tasks]


def test_dualpipe_formula_is_an_idealisation_outside_that_regime():
  # forward shorter than the input-gradient part (F < B - W): less idle than the formula
  r = simulate("dualpipe", 8, 16, F=1, B=3, W=1, FB=3)
  assert (r["table2"]["bubble"], r["bubble"]) == (9, 8)
  # W longer than F: the formula's -3W goes below what the cool-down leaves idle
  r = simulate("dualpipe", 8, 16, F=1, B=3, W=2, FB=3)
  assert (r["table2"]["bubble"], r["bubble"]) == (0, 3)


@pytest.mark.parametrize("pp,m", [(1, 2), (2, 4), (2, 5), (3, 6), (3, 7), (4, 8), (4, 11),
                                  (6, 12), (8, 16), (8, 20)])
def test_dualpipev_meets_its_published_bubble_when_f_equals_the_input_gradient_part(pp, m):
  """DeepSeek's DualPipeV row, (PP'/2 - 1)(F&B + B - 3W) with PP' = 2 pp chunk
  stages on pp ranks, PP' + 1 chunk activations, 2 chunks of parameters, in
  the regime where DualPipe's row holds (M even or odd)."""
  for f, b, w, fb in _dualpipe_times():
    r = simulate("dualpipev", pp, m, F=f, B=b, W=w, FB=fb)
    assert r["bubble"] == pytest.approx((pp - 1) * (fb + b - 3 * w)), (f, b, w, fb)
    assert r["bubble"] == pytest.approx(r["table2"]["bubble"])
    assert r["activations"] == [2 * pp + 1] * pp
    assert r["param_copies"] == 2


def test_dualpipev_rank_orders_follow_its_eight_steps():
  """PP = 4, M = 10: the op counts per step as DualPipeV's schedule gives them
  (2(PP-r-1) F0, r+1 F0F1, PP-r-1 B1W1F1, M-2PP+r+1 F0B1F1B0 pairs, ...),
  counted here from the timeline, and the turn at rank PP-1."""
  pp, m = 4, 10
  r = simulate("dualpipev", pp, m, F=1, B=2, W=1, FB=2.5)
  check_timeline(r)
  for k, ops in enumerate(r["timeline"]):
    opening = [(op.kind, op.tasks[0].direction) for op in ops[:2 * (pp - k - 1) + 2]]
    assert opening == [("F", 0)] * (2 * (pp - k - 1) + 1) + [("F", 1)]
    n_fb = sum(op.kind == "FB" for op in ops)
    # step 4: 2 per iteration (1 on rank PP-1's first), step 5: 1 per iteration
    assert n_fb == 2 * (m - 2 * pp + k + 1) - (k == pp - 1) + (pp - k - 1), k
    kinds = [op.kind for op in ops]
    assert kinds.count("W") == kinds.count("I") == (pp - k - 1) * 2 + k + 1
    assert all(t.chunk in (k, 2 * pp - 1 - k) for op in ops for t in op.tasks)
  # micro-batch 0 turns at rank PP-1: its chunk PP forward follows chunk PP-1's there
  last = [(t.kind, t.chunk) for op in r["timeline"][pp - 1] for t in op.tasks if t.mb == 0]
  assert last[:2] == [("F", pp - 1), ("F", pp)]
  assert not [x for x in r["transfers"] if x.src == x.dst]


def test_table2_rows():
  kw = dict(F=1, B=2, W=1, FB=2.5)
  assert table2("gpipe", 4, 8, **kw) == {"bubble": 9, "activations": 8, "param_copies": 1}
  assert table2("1f1b", 4, 8, **kw) == {"bubble": 9, "activations": 4, "param_copies": 1}
  assert table2("zb1p", 4, 8, **kw) == {"bubble": 3, "activations": 4, "param_copies": 1}
  assert table2("dualpipe", 4, 8, **kw) == {"bubble": 1.5, "activations": 5,
                                            "param_copies": 2}
  assert table2("dualpipev", 2, 4, **kw) == {"bubble": 1.5, "activations": 5,
                                             "param_copies": 2}
  # FB defaults to F + B (no overlap)
  assert simulate("dualpipe", 4, 8, F=1, B=2, W=1)["times"]["FB"] == 3


# ---------------------------------------------------------------------------
# errors

@pytest.mark.parametrize("args,kwargs,match", [
    (("pipedream", 4, 8), {}, r"schedule='pipedream'.*'gpipe', '1f1b', 'zb1p', 'dualpipe', "
                               r"'dualpipev'"),
    (("1f1b", 0, 8), {}, r"n_stages=0 must be a positive integer"),
    (("1f1b", 4.0, 8), {}, r"n_stages=4.0 must be a positive integer"),
    (("1f1b", 4, True), {}, r"n_microbatches=True must be a positive integer"),
    (("gpipe", 4, 0), {}, r"n_microbatches=0"),
    (("dualpipe", 5, 20), {}, r"n_stages=5.*even number of stages"),
    (("dualpipe", 4, 6), {}, r"n_microbatches=6 with n_stages=4.*>= 2 \* n_stages = 8"),
    (("dualpipe", 4, 9), {}, r"n_microbatches=9.*even"),
    (("1f1b", 4, 8), {"F": 0}, r"F=0: pass a positive, finite time for one chunk's forward"),
    (("1f1b", 4, 8), {"B": -1}, r"B=-1: pass a positive"),
    (("zb1p", 4, 8), {"W": float("nan")}, r"W=nan: pass a positive"),
    (("dualpipe", 4, 8), {"FB": 0.0}, r"FB=0.0: pass a positive.*F&B"),
    (("dualpipev", 4, 7), {}, r"n_microbatches=7 with n_stages=4: DualPipeV.*>= 2 \* n_stages = 8"),
    (("zb1p", 4, 8), {"B": 2, "W": 2}, r"W=2 must be smaller than B=2"),
])
def test_bad_arguments_say_what_to_change(args, kwargs, match):
  with pytest.raises(ValueError, match=match):
    simulate(*args, **kwargs)
  with pytest.raises(ValueError, match=match):
    table2(*args, **kwargs)


def test_schedule_names():
  assert SCHEDULES == ("gpipe", "1f1b", "zb1p", "dualpipe", "dualpipev")


# ---------------------------------------------------------------------------
# plot

def test_plot_timeline_leaves_pyplot_alone_and_draws_every_op():
  import matplotlib
  import matplotlib.pyplot as plt
  from matplotlib.axes import Axes
  backend, figs = matplotlib.get_backend(), plt.get_fignums()
  r = simulate("dualpipe", 4, 8, F=1, B=2, W=1, FB=2.5)
  ax = plot_timeline(r)
  assert isinstance(ax, Axes) and plt.get_fignums() == figs
  assert matplotlib.get_backend() == backend
  n_ops = sum(len(ops) for ops in r["timeline"])
  n_fb = sum(op.kind == "FB" for ops in r["timeline"] for op in ops)
  assert len(ax.patches) == n_ops + 2 * n_fb       # an FB box: two halves + a border
  assert ax.get_xlim() == (0, r["makespan"])
  # onto a caller's axes
  from matplotlib.figure import Figure
  ax2 = Figure().add_subplot()
  assert plot_timeline(simulate("1f1b", 2, 2), ax=ax2) is ax2

