"""Pipeline schedules on a CPU mesh: step time, buffers and the simulator's view.

    python bench/pipeline_schedules.py --pipe 4 --data 2 --microbatches 8

For each schedule (gpipe, 1f1b, zb1p, dualpipe) builds the pipelined
pretraining gradient (`train.step.pipelined_pretraining_grad`, the executor
of parallel/pipeline.py on the model's stages) for a small model on
pipe x data fake CPU devices (parameters stored by stage, as the train
state holds them on a pipe mesh), compiles it, times `--repeats` calls
(median) and prints one JSON line:

  schedule, pipe, data, microbatches, ticks (executor ticks of the table),
  slots (stage inputs held per rank: the activation memory in units of one
  micro-batch's stage input), sim_bubble / sim_makespan (the simulator's, with
  F=1, B=2, W=1, FB=2.5), compile_s, step_s (median), loss, and
  max_grad_diff against the unpipelined value_and_grad (the oracle).

On CPU the collectives are synchronous and the fake devices share the
cores, so step_s compares schedules' total work (ticks x the op per tick,
recomputation included), not what their overlap would save on GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--pipe", type=int, default=4)
  ap.add_argument("--data", type=int, default=2)
  ap.add_argument("--microbatches", type=int, default=8)
  ap.add_argument("--rows", type=int, default=16, help="batch rows (a multiple of M x data)")
  ap.add_argument("--seq", type=int, default=32)
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--schedules", default="gpipe,1f1b,zb1p,dualpipe")
  args = ap.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  jax.config.update("jax_num_cpu_devices", args.pipe * args.data)
  import jax.numpy as jnp
  import numpy as np

  from deepseek_jax import get_preset
  from deepseek_jax.model import init_variables
  from deepseek_jax.parallel import MeshConfig, activate, setup, simulate
  from deepseek_jax.parallel.pipeline_layout import split_layers, stage_tree, unstage_tree
  from deepseek_jax.parallel.rules import tree_shardings
  from deepseek_jax.train.config import TrainConfig
  from deepseek_jax.train.step import pipelined_pretraining_grad, pretraining_loss
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from train_throughput import random_batch

  cfg = get_preset("tiny").replace(n_layers=args.layers)
  train_cfg = TrainConfig()
  v = init_variables(cfg, jax.random.key(0))
  batch = {k: jnp.asarray(a) for k, a in random_batch(cfg.vocab_size, args.rows, args.seq,
                                                        0).items()}
  oracle = jax.jit(jax.value_and_grad(pretraining_loss(cfg, train_cfg), has_aux=True))
  (_, _), want = oracle(v["params"], v["router_bias"], batch)
  mesh, rules = setup(MeshConfig(pipe=args.pipe, data=args.data))
  # As the train step has them: the layer stacks stored by stage, split over pipe.
  layout = split_layers(cfg, args.pipe)
  staged = stage_tree(layout, v)
  staged = jax.device_put(staged, tree_shardings(staged, mesh, rules))
  for schedule in args.schedules.split(","):
    fn = pipelined_pretraining_grad(cfg, train_cfg, mesh, rules, schedule=schedule,
                                    n_microbatches=args.microbatches, staged=True)
    sim = simulate(schedule, args.pipe, args.microbatches, F=1.0, B=2.0, W=1.0, FB=2.5)
    with activate(mesh, rules):
      t0 = time.perf_counter()
      step = jax.jit(fn).lower(staged["params"], staged["router_bias"], batch).compile()
      compile_s = time.perf_counter() - t0
      times = []
      for _ in range(args.repeats + 1):
        t0 = time.perf_counter()
        (loss, _), grads = jax.block_until_ready(step(staged["params"], staged["router_bias"],
                                                      batch))
        times.append(time.perf_counter() - t0)
    grads = unstage_tree(layout, grads)
    diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
               for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(grads)))
    print(json.dumps({
        "schedule": schedule, "pipe": args.pipe, "data": args.data,
        "microbatches": args.microbatches, "ticks": fn.table.n_ticks,
        "slots": fn.table.n_slots, "sim_bubble": sim["bubble"],
        "sim_makespan": sim["makespan"], "compile_s": round(compile_s, 2),
        "step_s": round(statistics.median(times[1:]), 4), "loss": float(loss),
        "max_grad_diff": diff}), flush=True)


if __name__ == "__main__":
  main()
