"""Meshes, logical-axis sharding rules and expert parallelism (DESIGN.md §4)."""

from deepseek_jax.parallel.mesh import AXES, MeshConfig, make_mesh
from deepseek_jax.parallel.rules import (RULE_SETS, activate, batch_sharding, logical_axes,
                                         setup, spec_for, tree_shardings)

__all__ = ["AXES", "MeshConfig", "make_mesh", "RULE_SETS", "activate", "batch_sharding",
           "logical_axes", "setup", "spec_for", "tree_shardings"]
