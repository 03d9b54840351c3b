"""Meshes, logical-axis sharding rules, expert parallelism and the pipeline
schedule simulator (DESIGN.md §4)."""

from deepseek_jax.parallel.mesh import AXES, MeshConfig, make_mesh, setup
from deepseek_jax.parallel.rules import (RULE_SETS, activate, batch_sharding, logical_axes,
                                         spec_for, tree_shardings)
from deepseek_jax.parallel.schedules import (SCHEDULES, Op, Task, Transfer, plot_timeline,
                                             simulate, table2)

__all__ = ["AXES", "MeshConfig", "make_mesh", "RULE_SETS", "activate", "batch_sharding",
           "logical_axes", "setup", "spec_for", "tree_shardings",
           "SCHEDULES", "Op", "Task", "Transfer", "plot_timeline", "simulate", "table2"]
