"""Multi-process runs: joining processes, per-process batches, losing a peer.

One process per host (or per simulated host on CPU), each driving its local
devices; the mesh spans every process's devices (multi-controller JAX):

    initialize(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=i)
    # or initialize(auto=True) under SLURM / Open MPI / a TPU or cloud cluster

Every process runs the same program. What differs per process is only
(a) which rows of each global batch it feeds (`process_rows`,
`put_batch`: its devices' rows, nothing else is read) and (b) that only
process 0 writes logs, metrics and plots (`is_primary`); orbax writes
checkpoints cooperatively.

Losing a peer (measured on CPU with gloo collectives, DESIGN.md §8 and
tests/test_multihost.py): a collective in flight usually fails at once with a
`JaxRuntimeError` (connection closed by peer), which the trainer turns into
`PeerLostError`; a survivor that is not in a collective (compiling, saving),
or whose collective just waits (seen on jax 0.12), is aborted by JAX's
heartbeat after `heartbeat_timeout_s`, printing "Terminating process because
the JAX distributed service detected fatal errors ... another task died";
losing the coordinator (process 0) aborts every process in well under a
second. So a run whose peer dies exits non-zero within
`heartbeat_timeout_s` plus one step, never hangs. After a `PeerLostError` the
process must leave with `os._exit` (a normal exit waits in JAX's shutdown
barrier for the dead peer until `shutdown_timeout_s`).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

# Seconds without a heartbeat after which a peer counts as dead (JAX's own
# default is 100 s) and the time a clean exit waits for its peers (300 s).
DEFAULT_HEARTBEAT_TIMEOUT_S = 60
DEFAULT_SHUTDOWN_TIMEOUT_S = 60
DEFAULT_INITIALIZATION_TIMEOUT_S = 300


class PeerLostError(RuntimeError):
  """Another process of a multi-process run died or became unreachable."""


def check_args(coordinator_address: str | None, num_processes: int | None,
               process_id: int | None, auto: bool) -> bool:
  """Validates the launch arguments; returns whether this is a multi-process run."""
  given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
           "process_id": process_id}
  set_ = [k for k, v in given.items() if v is not None]
  if auto:
    return True
  if not set_:
    return False
  if len(set_) != 3:
    missing = [k for k in given if k not in set_]
    raise ValueError(f"multi-process launch: {', '.join(set_)} given but not "
                     f"{', '.join(missing)}; pass all three (or --multihost alone on a "
                     "cluster JAX can detect, e.g. SLURM).")
  if not re.fullmatch(r"\[?[A-Za-z0-9_.:\-]+\]?:\d{1,5}", coordinator_address):
    raise ValueError(f"coordinator_address={coordinator_address!r} must be HOST:PORT "
                     "(e.g. 10.0.0.1:1234), the address of process 0.")
  if not (isinstance(num_processes, int) and num_processes >= 1):
    raise ValueError(f"num_processes={num_processes!r} must be a positive integer.")
  if not (isinstance(process_id, int) and 0 <= process_id < num_processes):
    raise ValueError(f"process_id={process_id!r} must be in [0, num_processes="
                     f"{num_processes}).")
  return True


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False,
               heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S,
               shutdown_timeout_s: int = DEFAULT_SHUTDOWN_TIMEOUT_S,
               initialization_timeout_s: int = DEFAULT_INITIALIZATION_TIMEOUT_S) -> bool:
  """Joins a multi-process run (`jax.distributed.initialize`) before any
  other JAX call; returns False (and does nothing) for a single-process launch.

  Either all of coordinator_address (process 0's HOST:PORT), num_processes
  and process_id, or auto=True for the environments JAX detects (SLURM,
  Open MPI, TPU pods, ...). Nothing else in the library needs to know.
  """
  if not check_args(coordinator_address, num_processes, process_id, auto):
    return False
  for name, v in (("heartbeat_timeout_s", heartbeat_timeout_s),
                  ("shutdown_timeout_s", shutdown_timeout_s),
                  ("initialization_timeout_s", initialization_timeout_s)):
    if not (isinstance(v, int) and v >= 1):
      raise ValueError(f"{name}={v!r} must be a positive number of seconds.")
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes,
      process_id=process_id, initialization_timeout=initialization_timeout_s,
      heartbeat_timeout_seconds=heartbeat_timeout_s,
      shutdown_timeout_seconds=shutdown_timeout_s)
  return True


def is_primary() -> bool:
  """Whether this process writes logs, metrics and plots (process 0)."""
  return jax.process_index() == 0


def process_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> tuple[int, int]:
  """[lo, hi): the rows (dim 0) of a global array this process's devices hold.

  The mesh orders devices process by process, so a process's rows are one
  contiguous block (all rows when the batch is replicated across processes).
  """
  spans = set()
  for index in sharding.addressable_devices_indices_map(global_shape).values():
    rows = index[0] if index else slice(None)
    spans.add(tuple(rows.indices(global_shape[0])[:2]))
  lo, hi = min(s[0] for s in spans), max(s[1] for s in spans)
  covered = np.zeros(hi - lo, bool)
  for a, b in spans:
    covered[a - lo:b - lo] = True
  if not covered.all():
    raise NotImplementedError(
        f"process {jax.process_index()} holds the non-contiguous rows {sorted(spans)} of "
        "the batch; build the mesh from jax.devices() in process order "
        "(parallel.make_mesh does).")
  return lo, hi


def put_batch(local: dict[str, np.ndarray], sharding: NamedSharding,
              global_rows: int) -> dict[str, jax.Array]:
  """Global [global_rows, ...] arrays from this process's rows
  (`jax.make_array_from_process_local_data`); `local` holds exactly the rows
  `process_rows` named."""
  return {k: jax.make_array_from_process_local_data(
              sharding, v, (global_rows,) + tuple(np.shape(v)[1:]))
          for k, v in local.items()}


def replicate(tree: Any, mesh) -> Any:
  """Host arrays -> global arrays replicated over `mesh` (every process
  passes the same values): inputs for a jit whose other arguments span
  processes."""
  sharding = NamedSharding(mesh, jax.P())
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)
