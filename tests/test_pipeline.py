"""Pipeline parallelism (deepseek_jax/parallel/pipeline*.py, wired to the model
and the pretraining loss by train/step.py) on 8 fake CPU devices.

Oracle for the numbers: `jax.value_and_grad` of the unpipelined pretraining
loss on one device (train.step.pretraining_loss). A pipelined step must give
the same loss, metrics, expert loads and gradients within 1e-5 (float32),
with MTP on and a batch whose rows have different numbers of target tokens
(so a mean of micro-batch means would differ). Oracle for the tick table: a
NumPy interpreter written here that passes named messages between ranks and
checks every op reads the activation / gradient it needs, in the order the
simulator's timeline lists.
"""

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import get_preset
from deepseek_jax.model import init_variables
from deepseek_jax.parallel import MeshConfig, activate, setup, simulate
from deepseek_jax.parallel.pipeline_layout import (layout_from_sizes, layout_sizes,
                                                   split_layers, stage_tree, state_layout,
                                                   unstage_tree)
from deepseek_jax.parallel.pipeline_table import build_table
from deepseek_jax.parallel.schedules import chunk_rank
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.step import FAST_COMPILE, pipelined_pretraining_grad, pretraining_loss

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
from train_throughput import random_batch  # noqa: E402

TOL = 1e-5


# --- the tick table against a message-passing interpreter ----------------------
def _interpret(table, pp, m):
  """Runs the table with symbolic values: a slot holds ("x", mb, chunk) or
  ("g", mb, chunk); returns each rank's executed (kind, mb, direction) list."""
  f = table.fields
  trash = table.n_slots
  held = [dict() for _ in range(pp)]            # rank -> (kind, slot) -> value
  peak = {"a": 0, "g": 0}
  executed = [[] for _ in range(pp)]
  done_f, done_i = set(), set()
  n = 2 * pp if table.v else pp                  # chunks per micro-batch
  chunk_of = lambda r, d: (r if d == 0 else (n - 1 - r))          # noqa: E731
  rank_of = lambda c, d: chunk_rank(c, d, pp, table.v)            # noqa: E731

  def channel(src, dst, d):                       # DualPipeV's turn: "h", no message
    return "h" if src == dst else d
  direction = {}
  for t in range(table.n_ticks):
    sends = []
    for r in range(pp):
      ops = []
      if f["f_op"][t, r]:
        ops.append(("F", int(f["f_op"][t, r]) - 1))
      if f["b_op"][t, r]:
        code = int(f["b_op"][t, r])
        ops.append(("BBIIWW"[code - 1], (code - 1) % 2))
      name = ops
      for kind, d in ops:
        c = chunk_of(r, d)
        if kind == "F":
          mb = int(f["f_mb"][t, r])
          direction[mb] = d
          if c > 0:
            assert held[r].get(("a", int(f["f_x"][t, r]))) == ("x", mb, c), (t, r, name)
          done_f.add((mb, c))
          if c < n - 1:
            dst = rank_of(c + 1, int(c + 1 >= pp) if table.v else d)
            sends.append((dst, channel(r, dst, d), "a", ("x", mb, c + 1)))
        else:
          mb = int(f["b_mb"][t, r])
          assert (mb, c) in done_f
          if c > 0:
            assert held[r].get(("a", int(f["b_x"][t, r]))) == ("x", mb, c), (t, r, name)
          if c < n - 1:
            assert held[r].get(("g", int(f["b_g"][t, r]))) == ("g", mb, c), (t, r, name)
          if kind in ("B", "I"):
            done_i.add((mb, c))
            if c > 0:
              dst = rank_of(c - 1, int(c - 1 >= pp) if table.v else d)
              sends.append((dst, channel(r, dst, d), "g", ("g", mb, c - 1)))
          if kind == "W":
            assert (mb, c) in done_i
          if kind in ("B", "W"):     # the last read of this stage input and gradient
            held[r] = {k: v for k, v in held[r].items() if v[1:] != (mb, c)}
        executed[r].append((kind, mb, d))
    # Messages land after every rank's op of this tick, in the named slots.
    for r in range(pp):
      for d in list(range(table.directions)) + ["h"]:
        for what in ("a", "g"):
          slot = int(f[f"r{what}{d}"][t, r])
          got = [v for dst, dd, w, v in sends if dst == r and dd == d and w == what]
          assert len(got) <= 1
          if got:
            assert slot != trash, (t, r, got)
            assert (what, slot) not in held[r], (t, r, "overwrites a value still needed")
            held[r][(what, slot)] = got[0]
          else:
            assert slot == trash, (t, r, what, d)
      for what in ("a", "g"):
        peak[what] = max(peak[what], sum(k[0] == what for k in held[r]))
  assert len(done_f) == len(done_i) == n * m
  assert not any(held), "values left unread"
  return executed, max(peak.values())


@pytest.mark.parametrize("schedule,pp,m", [
    ("gpipe", 4, 3), ("1f1b", 4, 6), ("1f1b", 3, 2), ("zb1p", 4, 8), ("zb1p", 2, 1),
    ("dualpipe", 4, 8), ("dualpipe", 2, 6), ("dualpipe", 6, 12), ("dualpipev", 2, 4),
    ("dualpipev", 2, 5), ("dualpipev", 4, 8), ("dualpipev", 3, 9)])
def test_tick_table_runs_the_simulated_order_and_every_op_reads_its_inputs(schedule, pp, m):
  table = build_table(schedule, pp, m)
  executed, peak = _interpret(table, pp, m)
  sim = simulate(schedule, pp, m, F=1.0, B=2.0, W=1.0)
  for r in range(pp):
    expected = [(t.kind, t.mb, t.direction) for op in sim["timeline"][r] for t in op.tasks]
    assert executed[r] == expected, r
  # Buffers: exactly as many slots as values are ever held at once (from
  # arrival to the last read) on the busiest rank.
  assert table.n_slots == max(peak, 1)


def test_gpipe_holds_every_micro_batch_and_1f1b_only_pp():
  assert build_table("gpipe", 4, 12).n_slots >= 11
  assert build_table("1f1b", 4, 12).n_slots <= 5
  assert build_table("dualpipe", 4, 12).n_slots <= 6


# --- stage layout ---------------------------------------------------------------
def test_layers_split_evenly_then_earlier_stages_take_the_remainder():
  cfg = get_preset("tiny").replace(n_layers=7, n_dense_layers=2)
  layout = split_layers(cfg, 3)
  assert layout.layers == ((0, 1, 2), (3, 4), (5, 6))
  assert layout.ids(0, False) == [0, 1] and layout.ids(0, True) == [0]
  assert layout.ids(2, True) == [3, 4]
  assert layout.slots(False) == 2 and layout.slots(True) == 2
  text = layout.describe()
  assert "stage 0: blocks 0-2 (2 dense, 1 MoE) + embedding" in text
  assert "stage 2: blocks 5-6 (0 dense, 2 MoE) + norm, head, MTP, loss" in text
  assert "uneven split" in text
  assert split_layers(cfg, 3, (1, 3, 3)).layers == ((0,), (1, 2, 3), (4, 5, 6))
  with pytest.raises(ValueError, match="cannot be split into pipe=8 stages"):
    split_layers(cfg, 8)
  with pytest.raises(ValueError, match=r"stage_layers=\[3, 3\] must give each of the pipe=3"):
    split_layers(cfg, 3, (3, 3))


def test_dualpipe_accumulates_each_block_of_a_rank_once():
  """Rank r's chunks run stages r and PP-1-r: its weight-gradient
  accumulators get one row per real block of those stages (not [2, slots],
  every padded slot of both chunks), padded slots an out-of-range row whose
  gradients are dropped. Oracle: the blocks each rank holds, listed here."""
  from deepseek_jax.parallel.pipeline import _accumulator_rows
  cfg = get_preset("tiny").replace(n_layers=4, n_dense_layers=1)
  layout = split_layers(cfg, 2)            # stage 0: dense 0 + MoE 0; stage 1: MoE 1, 2
  rows, n = _accumulator_rows(layout, 2, 2)
  assert n == {"dense_layers": 1, "moe_layers": 3}   # V3 widths: 4 MoE slots -> 3 rows
  holds = {0: [(0, 0), (1, 0), (1, 1)], 1: [(1, 0), (1, 1), (0, 0)]}   # (stage, moe slot)
  for r in range(2):
    table = rows["moe_layers"][r]           # [dirs, slots]
    got = {}
    for d in range(2):
      stage = r if d == 0 else 1 - r
      for i in range(2):
        if layout.index(True)[1][stage, i]:
          got[(stage, i)] = int(table[d, i])
        else:
          assert table[d, i] == n["moe_layers"]       # dropped
    assert sorted(got) == sorted(holds[r]) and sorted(got.values()) == [0, 1, 2]
    assert rows["dense_layers"][r, 0 if r == 0 else 1, 0] == 0     # stage 0's dense block
  # One direction: the identity on real slots.
  rows1, n1 = _accumulator_rows(layout, 2, 1)
  np.testing.assert_array_equal(rows1["moe_layers"][:, 0], [[0, 2], [0, 1]])
  assert n1 == {"dense_layers": 1, "moe_layers": 2}


def test_stage_tree_and_unstage_tree_round_trip_any_state_pytree():
  """Params, router biases and optimizer moments alike (by their paths);
  padded slots are dropped on the way back: an exact inverse."""
  cfg = get_preset("tiny").replace(n_layers=6, n_dense_layers=1)
  layout = split_layers(cfg, 4)                # 2, 2, 1, 1 blocks: padded MoE slots
  tree = {"step": jnp.zeros((), jnp.int32),
          "mu": ({"moe_layers": {"w": jnp.arange(1.0, 6.0)[:, None] * jnp.ones((5, 3))},
                  "dense_layers": {"w": jnp.ones((1, 2))}, "head": {"w": jnp.ones((2, 3))}},)}
  staged = stage_tree(layout, tree)
  assert staged["mu"][0]["moe_layers"]["w"].shape == (4, 2, 3)
  assert staged["mu"][0]["dense_layers"]["w"].shape == (4, 1, 2)
  assert staged["mu"][0]["head"]["w"].shape == (2, 3)
  # Stage s's active slots hold its blocks in order: 1, 2-3, 4, 5 (MoE ids 0-4).
  np.testing.assert_array_equal(staged["mu"][0]["moe_layers"]["w"][:, :, 0],
                                [[1, 1], [2, 3], [4, 1], [5, 1]])
  back = unstage_tree(layout, staged)
  assert jax.tree.structure(back) == jax.tree.structure(tree)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
    np.testing.assert_array_equal(a, b)


def test_dualpipev_stores_chunks_r_and_2pp_minus_1_minus_r_and_round_trips():
  """DualPipeV's layout on pipe=3 of 7 blocks (1 dense + 6 MoE): 6 chunks of
  2, 1, 1, 1, 1, 1 blocks; stage r stores chunk r, then chunk 5-r, slots
  chunk-major (each chunk position its own slot count). Oracle: the blocks
  listed by hand; stage_tree / unstage_tree exact; the checkpoint meta
  ([[chunk r, chunk 5-r] per stage]) rebuilds the layout; the executor's
  accumulator rows are the rank's own slots."""
  from deepseek_jax.parallel.pipeline import _accumulator_rows_v, _parts_v
  from deepseek_jax.parallel.pipeline_layout import split_layers_v
  cfg = get_preset("tiny").replace(n_layers=7, n_dense_layers=1)
  layout = split_layers_v(cfg, 3)
  assert layout.chunks == (((0, 1), (6,)), ((2,), (5,)), ((3,), (4,)))
  assert layout.layers == ((0, 1, 6), (2, 5), (3, 4))
  assert layout.part_slots(False) == [1, 0] and layout.part_slots(True) == [1, 1]
  idx, on = layout.index(True)                     # MoE ids = block - 1
  np.testing.assert_array_equal(idx, [[0, 5], [1, 4], [2, 3]])
  assert on.all()
  assert layout_sizes(layout) == [[2, 1], [1, 1], [1, 1]]
  assert layout_from_sizes(cfg, [[2, 1], [1, 1], [1, 1]]) == layout
  assert "stage 0: blocks 0-1 + block 6 (1 dense, 2 MoE) + embedding, norm, head" in (
      layout.describe())
  tree = {"moe_layers": {"w": jnp.arange(6.0)[:, None] * jnp.ones((6, 2))},
          "dense_layers": {"w": jnp.ones((1, 2))}}
  staged = stage_tree(layout, tree)
  np.testing.assert_array_equal(staged["moe_layers"]["w"][:, :, 0], [[0, 5], [1, 4], [2, 3]])
  assert staged["dense_layers"]["w"].shape == (3, 1, 2)
  for x, y in zip(jax.tree.leaves(unstage_tree(layout, staged)), jax.tree.leaves(tree)):
    np.testing.assert_array_equal(x, y)
  assert _parts_v(layout) == [{"dense_layers": (0, 1), "moe_layers": (0, 1)},
                              {"moe_layers": (1, 1)}]
  rows, n = _accumulator_rows_v(layout, 3)
  assert n == {"dense_layers": 1, "moe_layers": 2}
  np.testing.assert_array_equal(rows["moe_layers"][:, :, 0], [[0, 1]] * 3)
  np.testing.assert_array_equal(rows["dense_layers"][:, 0, 0], [0, 1, 1])   # 1: dropped
  assert state_layout(cfg, None, "dualpipev") is None
  with pytest.raises(ValueError, match=r"7 blocks cannot be cut into the 2 \* pipe = 8"):
    split_layers_v(cfg, 4)


def test_dualpipev_train_state_checkpoints_and_resumes_in_its_layout(tmp_path):
  """A dualpipev run's state on pipe=2 x data=4 is stored in DualPipeV's
  layout (rank r: chunks r and 3-r); its checkpoint records it, resumes
  without conversion under dualpipev, converted under dualpipe (contiguous
  stages) and on one device, the parameters equal throughout. (No train
  step: the numbers are the equivalence test's; this checks the state.)"""
  from deepseek_jax.train import checkpoint
  from deepseek_jax.train.start import resume_or_start
  from deepseek_jax.train.step import init_train_state, model_variables
  cfg = get_preset("tiny").replace(n_layers=4)     # 1 dense + 3 MoE: chunks of 1
  train_cfg = TrainConfig(pipeline_schedule="dualpipev", num_microbatches=4, fast_compile=True)
  mesh, rules = setup(MeshConfig(pipe=2, data=4))
  state = init_train_state(cfg, train_cfg, jax.random.key(0), mesh, rules)
  ref = init_train_state(cfg, train_cfg, jax.random.key(0))
  w = state.params["moe_layers"]["ffn"]["w1"]
  assert w.shape[:2] == (2, 2) and w.sharding.spec[0] == "pipe"
  # rank 0: [padded, MoE 2 (block 3)], rank 1: [MoE 0 (block 1), MoE 1 (block 2)]
  want = ref.params["moe_layers"]["ffn"]["w1"]
  np.testing.assert_array_equal(w[0, 1], want[2])
  np.testing.assert_array_equal(w[1], want[:2])
  assert _max_diff(model_variables(cfg, state, mesh, "dualpipev"),
                   {"params": ref.params, "router_bias": ref.router_bias}) == 0
  ckpts = checkpoint.Checkpoints(str(tmp_path), cfg, train_cfg.to_dict(), async_save=False)
  ckpts.pipeline_stages = layout_sizes(state_layout(cfg, mesh, "dualpipev"))
  ckpts.save(1, state, {"step": 1}, force=True)
  assert ckpts.saved_meta()["pipeline_stages"] == [[1, 1], [1, 1]]
  logs = []
  for sched, m, run_mesh, converted in (("dualpipev", 4, mesh, False),
                                        ("dualpipe", 4, mesh, True), ("1f1b", 0, None, True)):
    cfg_t = dataclasses.replace(train_cfg, pipeline_schedule=sched, num_microbatches=m)
    logs.clear()
    back, _, step = resume_or_start(ckpts, cfg, cfg_t, run_mesh, rules if run_mesh else None,
                                    fresh=None, log=logs.append)
    assert step == 1 and any("converted" in line for line in logs) == converted, logs
    got = model_variables(cfg, back, run_mesh, sched if run_mesh else None)
    assert _max_diff(got["params"], ref.params) == 0, sched
  ckpts.close()


def test_train_state_on_a_pipe_mesh_is_split_by_stage_and_steps_like_one_device(tmp_path):
  """init_train_state on pipe4 x data2 stores the layer stacks (and their Adam
  moments) as [stage, slot, ...] split over `pipe`: each rank holds its own
  stage's blocks. One 1F1B train step equals the one-device step (moments
  hold the gradients: Adam's first update alone is ~sign(g)), and a
  checkpoint of the staged state restores on one device, converted. A
  second step takes V3's second MTP weight (mtp_weight_switch_step=1) in
  the same compiled step, pipelined or not."""
  from deepseek_jax.train import checkpoint
  from deepseek_jax.train.start import restore_relayout, with_variables
  from deepseek_jax.train.step import init_train_state, make_train_step, model_variables
  cfg = get_preset("tiny").replace(n_layers=5)     # 1 dense + 4 MoE: stages 2, 1, 1, 1
  train_cfg = TrainConfig(pipeline_schedule="1f1b", num_microbatches=4, fast_compile=True,
                          mtp_weight_switch_step=1)
  mesh, rules = setup(MeshConfig(pipe=4, data=2))
  state = init_train_state(cfg, train_cfg, jax.random.key(0), mesh, rules)
  ref = init_train_state(cfg, train_cfg, jax.random.key(0))
  w = state.params["moe_layers"]["ffn"]["w1"]
  assert w.shape[:2] == (4, 1) and w.sharding.spec[0] == "pipe"
  assert {s.data.shape[0] for s in w.addressable_shards} == {1}
  mu = state.opt_state[1][0].mu["moe_layers"]["ffn"]["w1"]
  assert mu.shape == w.shape and mu.sharding.spec[0] == "pipe"
  np.testing.assert_array_equal(model_variables(cfg, state, mesh)["params"]["moe_layers"]
                                ["ffn"]["w1"], ref.params["moe_layers"]["ffn"]["w1"])
  batch = _batch(cfg, 8)
  steps = make_train_step(cfg, train_cfg, mesh, rules), make_train_step(cfg, train_cfg)
  state, m = steps[0](state, batch)
  ref, m_ref = steps[1](ref, batch)
  for key in ("loss", "ce", "mtp", "grad_norm"):
    assert abs(float(m[key]) - float(m_ref[key])) <= TOL, key
  np.testing.assert_array_equal(m["expert_load"], m_ref["expert_load"])
  got = unstage_tree(state_layout(cfg, mesh), jax.device_get(
      {"mu": state.opt_state[1][0].mu, "bias": state.router_bias}))
  assert _max_diff(got["mu"], ref.opt_state[1][0].mu) <= TOL
  assert _max_diff(got["bias"], ref.router_bias) == 0.0
  # Checkpointed in the stage layout; resumed on one device in the model's.
  ckpts = checkpoint.Checkpoints(str(tmp_path), cfg, train_cfg.to_dict(), async_save=False)
  ckpts.pipeline_stages = layout_sizes(state_layout(cfg, mesh))
  ckpts.save(1, state, {"step": 1}, force=True)
  assert ckpts.saved_meta()["pipeline_stages"] == [2, 1, 1, 1]
  back, _ = restore_relayout(ckpts, cfg, train_cfg, None, None,
                             layout_from_sizes(cfg, [2, 1, 1, 1]), None)
  ckpts.close()
  assert jax.tree.structure(back) == jax.tree.structure(ref)
  assert _max_diff(back.params, jax.device_get(model_variables(cfg, state, mesh)["params"])) == 0
  # init_from onto the pipe mesh: the model's layout is re-split by stage.
  moved = with_variables(state, {"params": back.params, "router_bias": back.router_bias},
                         state_layout(cfg, mesh))
  assert moved.params["moe_layers"]["ffn"]["w1"].sharding == w.sharding
  assert _max_diff(model_variables(cfg, moved, mesh), {"params": back.params,
                                                       "router_bias": back.router_bias}) == 0
  # Step number 2 > mtp_weight_switch_step: lambda = mtp_weight_final.
  (_, m2), (_, m2_ref) = steps[0](state, batch), steps[1](ref, batch)
  assert abs(float(m2["loss"]) - float(m2_ref["loss"])) <= TOL
  for got, weight in ((m, 0.3), (m_ref, 0.3), (m2, 0.1), (m2_ref, 0.1)):
    assert float(got["mtp_weight"]) == pytest.approx(weight)
    assert float(got["loss"]) == pytest.approx(
        float(got["ce"]) + weight * float(got["mtp"])
        + train_cfg.balance_weight * float(got["balance"]), rel=1e-6)


def test_bad_pipeline_settings_are_refused_before_compiling():
  cfg = get_preset("tiny")
  mesh, rules = setup(MeshConfig(pipe=4, data=2))
  with pytest.raises(ValueError, match="n_microbatches >= 2 \\* n_stages = 8"):
    pipelined_pretraining_grad(cfg, TrainConfig(), mesh, rules, schedule="dualpipe",
                               n_microbatches=4)
  with pytest.raises(ValueError, match="not a known pipeline schedule"):
    pipelined_pretraining_grad(cfg, TrainConfig(), mesh, rules, schedule="interleaved",
                               n_microbatches=4)
  fn = pipelined_pretraining_grad(cfg.replace(n_layers=4), TrainConfig(), mesh, rules,
                                  schedule="1f1b", n_microbatches=3)
  batch = {k: jnp.asarray(v) for k, v in random_batch(cfg.vocab_size, 8, 8, 0).items()}
  v = jax.eval_shape(lambda: init_variables(cfg.replace(n_layers=4), jax.random.key(0)))
  with pytest.raises(ValueError, match="8 rows does not split into num_microbatches=3"):
    fn(v["params"], v["router_bias"], batch)


# --- numbers against the unpipelined model ---------------------------------------
def _batch(cfg, rows, seq=16):
  batch = {k: jnp.asarray(v) for k, v in random_batch(cfg.vocab_size, rows, seq, 0).items()}
  # Rows with fewer targets and a padded tail: micro-batches differ in counts.
  batch["loss_mask"] = batch["loss_mask"].at[0, 3:].set(0.0)
  batch["segment_ids"] = batch["segment_ids"].at[1, 10:].set(0)
  batch["loss_mask"] = batch["loss_mask"].at[1, 10:].set(0.0)
  return batch


def _max_diff(a, b):
  return max(float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max())
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# DeepSeek-V2's balance losses on (D = 4 devices as on one device: the mesh's
# expert degree would be the default); the oracle is the same loss on one device.
V2 = dict(expert_balance_weight=0.1, device_balance_weight=0.2, comm_balance_weight=0.3,
          balance_devices=4)
V2_METRICS = ("balance_expert", "balance_device", "balance_comm", "balance_expert_per_layer",
              "balance_device_per_layer", "balance_comm_per_layer", "device_tokens_per_layer")


def _check_against_one_device(schedule, mesh_cfg, m, n_layers, rows, stage_layers=None,
                              remat="none", train_cfg=TrainConfig()):
  cfg = get_preset("tiny").replace(n_layers=n_layers, remat_policy=remat)
  v = init_variables(cfg, jax.random.key(0))
  # A skewed router bias, so the loads (and the bias update) are not uniform.
  v["router_bias"] = jax.tree.map(lambda b: b.at[..., 2].add(0.5), v["router_bias"])
  batch = _batch(cfg, rows)
  grad_fn = jax.value_and_grad(pretraining_loss(cfg, train_cfg), has_aux=True)
  (loss, aux), grads = jax.jit(grad_fn, compiler_options=FAST_COMPILE)(
      v["params"], v["router_bias"], batch)
  mesh, rules = setup(mesh_cfg)
  fn = pipelined_pretraining_grad(cfg, train_cfg, mesh, rules, schedule=schedule,
                                  n_microbatches=m, stage_layers=stage_layers)
  with activate(mesh, rules):
    (p_loss, p_aux), p_grads = jax.jit(fn, compiler_options=FAST_COMPILE)(
        v["params"], v["router_bias"], batch)
  assert abs(float(loss) - float(p_loss)) <= TOL
  assert sorted(aux["metrics"]) == sorted(p_aux["metrics"])
  for key, want in aux["metrics"].items():
    np.testing.assert_allclose(p_aux["metrics"][key], want, atol=TOL, rtol=0, err_msg=key)
  np.testing.assert_array_equal(aux["expert_load"], p_aux["expert_load"])
  np.testing.assert_array_equal(aux["mtp_expert_load"], p_aux["mtp_expert_load"])
  assert jax.tree.structure(grads) == jax.tree.structure(p_grads)
  assert _max_diff(grads, p_grads) <= TOL
  return aux, fn


@pytest.mark.slow   # ~25 s; the default suite's 1F1B pipe4 x data2 check is the train-state test
def test_1f1b_on_pipe4_data2_equals_the_unpipelined_model():
  """Uneven by kind: stage 0 holds the dense block, stages 1-3 one MoE block each."""
  _, fn = _check_against_one_device("1f1b", MeshConfig(pipe=4, data=2), 4, 4, 8)
  assert fn.layout.layers == ((0,), (1,), (2,), (3,))


def test_zb1p_on_pipe2_expert2_data2_with_v2_balance_equals_the_unpipelined_model():
  """Split backward (I then W), experts split over `expert` inside each
  stage, DeepSeek-V2's balance losses on: their sums and per-layer values
  (main MoE layers across stages, then the MTP block) and gradients."""
  aux, _ = _check_against_one_device("zb1p", MeshConfig(pipe=2, expert=2, data=2), 4, 4, 16,
                                     train_cfg=TrainConfig(**V2))
  assert set(V2_METRICS) <= set(aux["metrics"])
  assert aux["metrics"]["balance_comm_per_layer"].shape == (3 + 1,)


@pytest.mark.slow   # 15-40 s each to compile on 2 cores: CI's slow step
@pytest.mark.parametrize("schedule,mesh,m,n_layers,rows,stage_layers,remat,v2", [
    ("dualpipe", dict(pipe=2, expert=2, data=2), 4, 4, 16, None, "none", False),
    ("dualpipe", dict(pipe=4, data=2), 8, 5, 16, None, "none", True),     # uneven: 2,1,1,1
    # DualPipeV: 2 PP chunks, rank r holds chunks r and 2PP-1-r, the turn at rank PP-1
    ("dualpipev", dict(pipe=2, expert=2, data=2), 4, 4, 16, None, "none", False),
    ("dualpipev", dict(pipe=4, data=2), 8, 9, 16, None, "none", True),    # chunks 2,1,...,1
    ("gpipe", dict(pipe=4, data=2), 4, 5, 8, None, "none", False),
    ("zb1p", dict(pipe=4, data=2), 6, 4, 12, None, "full", False),        # remat inside stages
    ("gpipe", dict(pipe=2, expert=2, data=2), 2, 4, 8, (1, 3), "none", False),   # uneven, given
    ("1f1b", dict(pipe=2, expert=2, data=2), 4, 3, 16, None, "none", True),
    # FSDP and tensor parallelism inside the stages
    ("1f1b", dict(pipe=2, fsdp=2, tensor=2, data=1, rules="fsdp_tp"), 2, 4, 8, None, "none",
     False),
])
def test_every_schedule_on_both_meshes_equals_the_unpipelined_model(
    schedule, mesh, m, n_layers, rows, stage_layers, remat, v2):
  _check_against_one_device(schedule, MeshConfig(**mesh), m, n_layers, rows, stage_layers,
                            remat, TrainConfig(**V2) if v2 else TrainConfig())


# --- launch.train with a pipe axis -------------------------------------------------
@pytest.mark.slow   # three training runs (~2.5 min on 2 cores): CI's slow step
def test_launch_train_with_dualpipe_trains_like_one_device_and_resumes(tmp_path):
  import json
  import subprocess
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8")
  common = ["--config=launch/configs/tiny.py", "--config.batch_size=16",
            "--config.decay_steps=4", "--config.fast_compile=True", "--config.log_every=1",
            "--config.n_eval_problems=0"]   # no held-out decode: the losses are compared
  pipe = ["--config.mesh.pipe=2", "--config.mesh.expert=2", "--config.mesh.data=2",
          "--config.pipeline_schedule=dualpipe", "--config.num_microbatches=4"]

  def run(workdir, *flags):
    out = subprocess.run([sys.executable, "-m", "launch.train", f"--workdir={workdir}",
                          *common, *flags], cwd=repo, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout

  def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}

  pp, ref = str(tmp_path / "pp"), str(tmp_path / "ref")
  run(pp, *pipe, "--config.steps=3")
  second = run(pp, *pipe, "--config.steps=5")
  assert "resuming from" in second and "at step 3" in second
  assert "step      1/" not in second
  # Its checkpoints are in the stage layout; resumed without a pipe axis they
  # are converted (and export reads the model's layout).
  third = run(pp, "--config.steps=6")
  assert "checkpoint converted from pipeline stages [2, 1] to none" in third
  # The same run on one data-parallel mesh, in one call (the schedule is fixed
  # by decay_steps; a checkpoint every step keeps step 5 for the comparison).
  run(ref, "--config.steps=6", "--config.ckpt_every=1", "--config.keep_ckpts=2")
  got, want = losses(pp), losses(ref)
  assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5, 6]
  for step in want:
    assert got[step] == pytest.approx(want[step], rel=1e-4), step
  from deepseek_jax.train.export import load_trained_variables
  _, v_pp, _ = load_trained_variables(pp, step=5)
  _, v_ref, _ = load_trained_variables(ref, step=5)
  assert jax.tree.structure(v_pp) == jax.tree.structure(v_ref)
  assert _max_diff(v_pp, v_ref) <= 1e-4
