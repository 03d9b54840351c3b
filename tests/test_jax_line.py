"""The JAX behaviour the project builds on, checked on whichever JAX line runs.

CI runs this file on both lines (jax 0.10.2 / Python 3.11 and jax 0.12 /
Python 3.12+). The mesh, expert-parallel and pipeline code is written
against exactly these APIs and facts (../shared/DESIGN.md §8): if a JAX
release changes one of them, this file says which, before a sharded
training run fails in a less legible way: the mesh axis-type default,
collectives inside `jax.shard_map` under `jax.set_mesh`, `pcast` before a
custom VJP, and two processes joined by `jax.distributed` on 127.0.0.1.
Oracles are numpy computations of what each collective must return.
"""

import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

DATA, EXPERT = 2, 4
AXES = ("data", "expert")


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((DATA, EXPERT), AXES, axis_types=(AxisType.Auto,) * 2)


def test_make_mesh_defaults_to_explicit_axes():
  # Linen's logical partitioning needs Auto axes, so every mesh the project
  # builds must say so; this records why (the default is Explicit).
  default = jax.make_mesh((DATA, EXPERT), AXES)
  assert tuple(default.axis_types) == (AxisType.Explicit,) * 2


def test_psum_and_ppermute_in_shard_map_match_numpy(mesh):
  rows, width = 3, 2                                # rows per device
  x = np.arange(DATA * EXPERT * rows * width, dtype=np.float32).reshape(-1, width)
  shifts = [(i, (i + 1) % EXPERT) for i in range(EXPERT)]

  def collectives(block):                           # block: [rows, width]
    return (jax.lax.psum(block, "expert"),
            jax.lax.ppermute(block, "expert", shifts))

  spec = jax.P(AXES)
  with jax.set_mesh(mesh):
    fn = jax.jit(jax.shard_map(collectives, in_specs=spec, out_specs=(spec,) * 2))
    summed, shifted = map(np.asarray, fn(x))

  # Oracle: blocks[d, e] is device (data d, expert e)'s [rows, width] block.
  blocks = x.reshape(DATA, EXPERT, rows, width)
  want_sum = np.broadcast_to(blocks.sum(1, keepdims=True), blocks.shape)
  assert np.array_equal(summed, want_sum.reshape(x.shape))
  want_shift = np.roll(blocks, 1, axis=1)           # device e receives from e-1
  assert np.array_equal(shifted, want_shift.reshape(x.shape))


def test_all_to_all_moves_chunk_j_of_device_e_to_device_j(mesh):
  # Tiled all_to_all splits each device's rows into EXPERT chunks; chunk j
  # goes to device j, which stacks what it receives in sender order.
  width = 2
  x = np.arange(DATA * EXPERT * EXPERT * width, dtype=np.float32).reshape(-1, width)
  spec = jax.P(AXES)
  with jax.set_mesh(mesh):
    fn = jax.jit(jax.shard_map(
        lambda b: jax.lax.all_to_all(b, "expert", 0, 0, tiled=True),
        in_specs=spec, out_specs=spec))
    got = np.asarray(fn(x)).reshape(DATA, EXPERT, EXPERT, width)
  sent = x.reshape(DATA, EXPERT, EXPERT, width)     # [d, sender e, chunk j, w]
  assert np.array_equal(got, sent.transpose(0, 2, 1, 3))  # [d, receiver j, sender e, w]


def test_custom_vjp_on_a_pcast_weight_inside_shard_map(mesh):
  # The FP8 dot and the expert FFN take a replicated weight into a custom_vjp
  # inside shard_map: the weight must be pcast to varying first. Oracle: the
  # gradient of sum(x * w) w.r.t. w is the column sum of x.
  @jax.custom_vjp
  def scale(x, w):
    return x * w

  scale.defvjp(lambda x, w: (x * w, (x, w)),
               lambda res, g: (g * res[1], jnp.sum(g * res[0], axis=0, keepdims=True)))

  def loss(x, w):
    def local(xb, wb):
      wb = jax.lax.pcast(wb, AXES, to="varying")
      return jax.lax.psum(jnp.sum(scale(xb, wb)), AXES)
    return jax.shard_map(local, mesh=mesh, in_specs=(jax.P(AXES), jax.P()),
                         out_specs=jax.P())(x, w)

  x = np.arange(DATA * EXPERT * 2 * 3, dtype=np.float32).reshape(-1, 3)
  w = np.ones((1, 3), np.float32)
  grad = jax.jit(jax.grad(loss, argnums=1))(x, w)
  np.testing.assert_array_equal(np.asarray(grad), x.sum(0, keepdims=True))


_TWO_PROCESS_SCRIPT = r"""
import sys
import jax
import numpy as np
from jax.sharding import AxisType
pid, port = int(sys.argv[1]), sys.argv[2]
jax.config.update("jax_num_cpu_devices", 4)
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=pid, heartbeat_timeout_seconds=30,
                           shutdown_timeout_seconds=30)
mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
local = np.arange(4, dtype=np.float32) + 4 * pid          # global row i holds i
rows = jax.make_array_from_process_local_data(jax.NamedSharding(mesh, jax.P("x")), local)
shift = [(i, (i + 1) % 8) for i in range(8)]
fn = jax.jit(jax.shard_map(lambda b: (jax.lax.psum(b, "x"), jax.lax.ppermute(b, "x", shift)),
                           mesh=mesh, in_specs=jax.P("x"), out_specs=(jax.P(), jax.P("x"))))
total, shifted = fn(rows)
print("RESULT", pid, jax.process_count(), jax.device_count(),
      float(total.addressable_data(0)[0]),
      [float(s.data[0]) for s in sorted(shifted.addressable_shards, key=lambda s: s.index)],
      flush=True)
"""


def test_two_processes_on_loopback_run_cross_process_collectives(tmp_path):
  # Two "nodes" x 4 CPU devices over 127.0.0.1 (CPU collectives: gloo).
  # Oracle: global row i holds i; the psum is sum(range(8)) and ppermute by
  # +1 leaves row i holding i - 1 (mod 8).
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = str(s.getsockname()[1])
  script = tmp_path / "two_process.py"
  script.write_text(_TWO_PROCESS_SCRIPT)
  procs = [subprocess.Popen([sys.executable, str(script), str(pid), port],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for pid in (0, 1)]
  outs = [p.communicate(timeout=120) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  for pid, (out, _) in enumerate(outs):
    line = [l for l in out.splitlines() if l.startswith("RESULT")][0].split(" ", 5)
    assert line[1:5] == [str(pid), "2", "8", "28.0"], line
    want = [float((i - 1) % 8) for i in range(4 * pid, 4 * pid + 4)]
    assert line[5] == str(want), line
