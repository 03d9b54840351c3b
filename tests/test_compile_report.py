"""The compile report (deepseek_jax/train/compile_report.py, launch/plan.py --compile).

Oracles: FLOPs counted by hand for programs of known shapes (2 m n k per
matmul, times the scan lengths around it; a conditional's dearer branch;
a convolution's window); the argument bytes as the sharded bytes of the
abstract state and batch, computed here from their PartitionSpecs and the
mesh's axis sizes; the donated state as the aliased bytes; the CLI's JSON
equal to the in-process report of the same run. The CLI and the in-process
report compile the same program, so one of them reads it from the test
compilation cache.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from deepseek_jax import get_preset
from deepseek_jax.parallel import MeshConfig, setup
from deepseek_jax.parallel.plan import memory_plan
from deepseek_jax.train.compile_report import abstract_batch, compile_report, hlo_flops
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.flops import forward_flops_per_token
from deepseek_jax.train.step import abstract_train_state

REPO = pathlib.Path(__file__).resolve().parents[1]
M, K = 16, 32                                      # matmul [M, K] @ [K, K]
MATMUL = 2 * M * K * K


def _compiled(f, *shapes):
  return jax.jit(f).lower(*[jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]).compile()


def _compiled_text(f, *shapes):
  return _compiled(f, *shapes).as_text()


def test_hlo_flops_counts_scan_bodies_once_per_trip_and_the_dearer_branch():
  def f(x, ws, vs, p):
    body = lambda c, w: (jnp.tanh(c @ w), None)            # noqa: E731
    y = lax.scan(body, x, ws)[0]                           # 5 matmuls
    z = lax.scan(lambda c, v: (lax.scan(body, c, v)[0], None), y, vs)[0]   # 3 x 4
    two = lambda c: jnp.tanh(c @ ws[0]) @ ws[1]            # noqa: E731
    one = lambda c: c @ ws[2]                              # noqa: E731
    return lax.cond(p.sum() > 0, two, one, z)              # 2 (the dearer branch)
  compiled = _compiled(f, (M, K), (5, K, K), (3, 4, K, K), (2,))
  counted = hlo_flops(compiled.as_text())
  assert counted["flops"] == (5 + 3 * 4 + 2) * MATMUL
  assert counted["flops_cheapest_branch"] == (5 + 3 * 4 + 1) * MATMUL
  # no loop of unknown trip count: the all-trips figures are the same two
  assert counted["flops_all_trips"] == counted["flops"]
  assert counted["flops_all_trips_cheapest_branch"] == counted["flops_cheapest_branch"]
  assert counted["unknown_trip_loops"] == 0
  assert counted["while_loops"] == 1 + 1 + 3             # the inner loop runs 3 times
  # XLA's own count takes each loop body once: what this counter is for.
  assert compiled.cost_analysis()["flops"] < (5 + 12) * MATMUL


def test_hlo_flops_of_batched_dots_and_convolutions():
  # einsum with a batch dimension: 2 * (b m n) * k.
  text = _compiled_text(lambda a, b: jnp.einsum("bmk,bkn->bmn", a, b), (3, M, K), (3, K, 8))
  assert hlo_flops(text)["flops"] == 2 * 3 * M * 8 * K
  # A 3x3 convolution, 4 -> 4 channels, SAME padding, in a 3-step scan; and a
  # grouped one (2 groups of 2 input channels): 2 * outputs * window * inputs per group.
  conv = lambda c, k: (jnp.tanh(lax.conv_general_dilated(c, k, (1, 1), "SAME")), None)  # noqa
  text = _compiled_text(lambda x, ks: lax.scan(conv, x, ks)[0], (2, 4, 8, 8), (3, 4, 4, 3, 3))
  assert hlo_flops(text)["flops"] == 3 * 2 * (2 * 4 * 8 * 8) * (4 * 3 * 3)
  grouped = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), "VALID",  # noqa: E731
                                                  feature_group_count=2)
  text = _compiled_text(grouped, (2, 4, 8, 8), (6, 2, 3, 3))
  assert hlo_flops(text)["flops"] == 2 * (2 * 6 * 6 * 6) * (2 * 3 * 3)


# A cuBLAS GEMM as XLA:GPU writes it (a custom-call, dimensions in its
# backend_config; the output a (result, workspace) tuple), in a 3-trip loop.
GEMM_HLO = """HloModule m

%body (t: (s32[], f32[16,32], f32[32,8])) -> (s32[], f32[16,32], f32[32,8]) {
  %t = (s32[], f32[16,32]{1,0}, f32[32,8]{1,0}) parameter(0)
  %a = f32[16,32]{1,0} get-tuple-element(%t), index=1
  %b = f32[32,8]{1,0} get-tuple-element(%t), index=2
  %gemm = (f32[16,8]{1,0}, s8[1028]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm", \
backend_config={"gemm_backend_config":{"alpha_real":1,"beta":0,"dot_dimension_numbers":\
{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],\
"rhs_batch_dimensions":[]}}}
  %i = s32[] get-tuple-element(%t), index=0
  ROOT %out = (s32[], f32[16,32]{1,0}, f32[32,8]{1,0}) tuple(%i, %a, %b)
}

%cond (t.1: (s32[], f32[16,32], f32[32,8])) -> pred[] {
  %t.1 = (s32[], f32[16,32]{1,0}, f32[32,8]{1,0}) parameter(0)
  ROOT %p = pred[] constant(true)
}

ENTRY %main (x: (s32[], f32[16,32], f32[32,8])) -> (s32[], f32[16,32], f32[32,8]) {
  %x = (s32[], f32[16,32]{1,0}, f32[32,8]{1,0}) parameter(0)
  ROOT %w = (s32[], f32[16,32]{1,0}, f32[32,8]{1,0}) while(%x), condition=%cond, body=%body, \
backend_config={"known_trip_count":{"n":"3"}}
}
"""


def test_hlo_flops_of_a_gpu_gemm_custom_call():
  assert hlo_flops(GEMM_HLO) == {
      "flops": 3 * 2 * 16 * 8 * 32, "flops_cheapest_branch": 3 * 2 * 16 * 8 * 32,
      "flops_all_trips": 3 * 2 * 16 * 8 * 32, "flops_all_trips_cheapest_branch":
      3 * 2 * 16 * 8 * 32, "while_loops": 1, "unknown_trip_loops": 0, "hinted_trip_loops": 0}


def test_hlo_flops_all_trips_counts_the_expert_kernels_loops_by_their_hints(monkeypatch):
  """gmm's chunk loops have data-dependent trip counts (the blocks the routing
  used): hlo_flops counts each once, flops_all_trips by its `loop_trips` hint
  (the static buffer's blocks). Oracle: with every block of the buffer used,
  forward + dx + dw are 3 x 2 * rows * K * N."""
  from deepseek_jax.model import grouped_matmul as gm
  n_blocks, bs, k, n, groups = 8, 4, 16, 8, 4
  monkeypatch.setattr(gm, "GATHER_BUDGET_BYTES", 2 * k * n * 4)     # chunks of 2 blocks
  block_group = jnp.repeat(jnp.arange(groups), n_blocks // groups)

  def f(x, w, used):                     # the blocks used: data, as routing makes it
    return gm.gmm(x, w, block_group, used.astype(jnp.int32)).sum()

  one_pass = 2 * n_blocks * bs * k * n
  counted = hlo_flops(_compiled_text(f, (n_blocks * bs, k), (groups, k, n), ()))
  assert counted["flops_all_trips"] == one_pass
  assert counted["flops"] == one_pass // 4 and counted["hinted_trip_loops"] == 1
  counted = hlo_flops(_compiled_text(jax.value_and_grad(f, argnums=(0, 1)),
                                     (n_blocks * bs, k), (groups, k, n), ()))
  # forward 4 trips, dx 4 trips, dw 4 groups x 1 trip (2 blocks each) of 2 blocks
  assert counted["flops_all_trips"] == 3 * one_pass
  assert counted["flops_all_trips_cheapest_branch"] == 3 * one_pass    # no conditionals
  assert counted["hinted_trip_loops"] == 1 + 1 + groups
  assert counted["flops"] < counted["flops_all_trips"]


def _shard_bytes(tree, mesh) -> int:
  """Bytes of one device's shard of every leaf, from its spec and the mesh."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    split = 1
    for entry in leaf.sharding.spec:
      for axis in (entry,) if isinstance(entry, str) else (entry or ()):
        split *= mesh.shape[axis]
    nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    assert nbytes % split == 0
    total += nbytes // split
  return total


# The CLI's run (launch.plan --preset=tiny --layers=1: one MoE layer, none dense (the
# --layers cut), the MTP block kept).
CLI_CFG = get_preset("tiny", n_layers=1, n_dense_layers=0)
CLI_TRAIN = TrainConfig(batch_size=8, seq_len=16, fast_compile=True)
CLI_MESH = dict(data=2, expert=4)
PIPE_CFG = get_preset("tiny", n_layers=2, n_mtp_depth=0)
PIPE_TRAIN = TrainConfig(batch_size=8, seq_len=16, pipeline_schedule="1f1b",
                         num_microbatches=2, fast_compile=True)
PIPE_MESH = dict(data=2, expert=2, pipe=2)


def _report(cfg, train_cfg, sizes, **kw):
  mesh, rules = setup(MeshConfig(**sizes, rules="ep_fsdp"))
  report = compile_report(cfg, train_cfg, mesh, rules, **kw)
  state = abstract_train_state(cfg, train_cfg, mesh, rules)
  return report, mesh, (_shard_bytes(state, mesh),
                        _shard_bytes(abstract_batch(train_cfg, mesh, rules), mesh))


@pytest.fixture(scope="module")
def expert_run():
  return _report(CLI_CFG, CLI_TRAIN, CLI_MESH)


# jax 0.12's XLA aborts the process (spmd_partitioner_util.cc:498 "Check failed:
# partition_group_list...") compiling this pipe2 x expert2 x data2 step from abstract
# inputs; jax 0.10.2 compiles it. The pipeline tests (test_pipeline.py) pass on both.
PIPE_COMPILES = tuple(int(v) for v in jax.__version__.split(".")[:2]) < (0, 12)


@pytest.fixture(scope="module")
def pipeline_run():
  if not PIPE_COMPILES:
    pytest.skip(f"jax {jax.__version__}: XLA's SPMD partitioner aborts compiling the "
                "pipelined step from abstract inputs (see PIPE_COMPILES)")
  return _report(PIPE_CFG, PIPE_TRAIN, PIPE_MESH)


@pytest.mark.parametrize("run", ["expert_run", "pipeline_run"])
def test_compiled_memory_is_the_sharded_state_and_batch_plus_temporaries(run, request):
  report, mesh, (state_bytes, batch_bytes) = request.getfixturevalue(run)
  assert report["devices"] == mesh.size == 8
  assert report["argument_bytes"] == state_bytes + batch_bytes
  assert report["alias_bytes"] == state_bytes              # the donated state, in place
  assert report["output_bytes"] > state_bytes              # + the metrics
  assert report["temp_bytes"] > 0
  assert report["total_bytes"] == (report["argument_bytes"] + report["temp_bytes"]
                                   + report["output_bytes"] - report["alias_bytes"])
  assert report["compile_seconds"] > 0


def test_compiled_flops_against_the_model_count(expert_run, pipeline_run):
  report = expert_run[0]
  tokens = CLI_TRAIN.batch_size * CLI_TRAIN.seq_len
  assert report["unknown_trip_loops"] == 0 and report["while_loops"] >= 1
  assert report["model_flops"] * 8 / tokens == pytest.approx(
      3 * forward_flops_per_token(CLI_CFG, CLI_TRAIN.seq_len))
  # The exchange's common path (the cheapest branches): full remat recomputes
  # the forward (4/3), attention is computed over the whole S x S square,
  # expert buffers are padded: above 1, well under 2. Its every-row fallback
  # (ep = 4 x the expert rows) counts in the dearest branches.
  common = report["hlo_flops_cheapest_branch"]
  assert 1.0 < common / report["model_flops"] < 2.0
  assert report["hlo_flops"] >= common
  # The pipeline's tick loop counts its dearest op on every tick (an upper
  # bound); a rank's idle ticks are the cheapest branches (every matmul is in a
  # tick's op: the lower bound may be 0).
  pipe = pipeline_run[0]
  assert pipe["unknown_trip_loops"] == 0 and pipe["while_loops"] > report["while_loops"]
  assert pipe["hlo_flops"] > pipe["model_flops"]
  assert 0 <= pipe["hlo_flops_cheapest_branch"] < pipe["hlo_flops"]


def _cli(*args, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
             JAX_DEFAULT_MATMUL_PRECISION="highest",
             JAX_COMPILATION_CACHE_DIR=os.environ["DSJ_TEST_JAX_CACHE"],
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env.pop("JAX_NUM_CPU_DEVICES", None)
  proc = subprocess.run([sys.executable, "-m", "launch.plan", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  assert len(lines) == 1, proc.stdout
  return json.loads(lines[0]), proc.stdout


def test_cli_compile_prints_one_json_line_equal_to_the_report(expert_run):
  out, text = _cli("--preset=tiny", "--layers=1", "--mesh=data=2,expert=4", "--rules=ep_fsdp",
                   "--batch_size=8", "--seq_len=16", "--compile", "--fast_compile",
                   "--device_memory_gib=1")
  report = expert_run[0]
  for key in ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "total_bytes",
              "hlo_flops", "model_flops", "devices", "mesh"):
    assert out[key] == report[key], key
  # The plan of the cut model (--layers=1: one MoE layer) is the CLI's planner's.
  plan = memory_plan(CLI_CFG, expert_run[1].shape, "ep_fsdp",
                     state=abstract_train_state(CLI_CFG, CLI_TRAIN), batch_size=8, seq_len=16)
  assert out["planner_total_bytes"] == plan["total_bytes_per_device"]
  assert out["planner_params_bytes"] == plan["params_bytes_per_device"]
  assert out["compiled_over_planner"] == pytest.approx(out["total_bytes"]
                                                       / plan["total_bytes_per_device"])
  assert out["fits"] is True                               # a few MiB in 1 GiB
  assert "temporaries" in text and "HLO FLOPs, dearest" in text


def test_hlo_flops_all_trips_counts_causal_attention_blocks_exactly():
  """The blockwise attention's key loop runs i + 1 trips for query block i
  (causal): hinted with the mean, flops_all_trips counts the lower triangle of
  tiles, n (n + 1) / 2, where the once-per-loop count sees n; the backward's
  query loops likewise (dq, dk, dv, and the recomputed scores)."""
  from deepseek_jax.model.attention import blockwise_attention
  b, h, n, blk, dk, dv = 1, 2, 7, 4, 8, 6            # 7 blocks: mean trips 4, exact
  s = n * blk

  def f(q, k, v):
    seg = jnp.ones((b, s), jnp.int32)
    return blockwise_attention(q, k, v, seg, seg, block_q=blk, block_k=blk).sum()

  shapes = ((b, h, s, dk), (b, h, s, dk), (b, h, s, dv))
  tile = 2 * b * h * blk * blk                        # one [blk, blk] product per unit depth
  tiles = n * (n + 1) // 2
  counted = hlo_flops(_compiled_text(f, *shapes))
  assert counted["flops_all_trips"] == tiles * tile * (dk + dv)       # q k^T, p v
  assert counted["flops"] == n * tile * (dk + dv)
  counted = hlo_flops(_compiled_text(jax.value_and_grad(f, argnums=(0, 1, 2)), *shapes))
  # backward per tile: q k^T again, dv += p^T do, dp = do v^T, dk += ds^T q, dq += ds k
  exact = tiles * tile * ((dk + dv) + (dk + dv + dv + dk + dk))
  if jax.__version_info__ < (0, 11):
    assert counted["flops_all_trips"] == exact
  else:   # jaxlib 0.12's XLA lifts one [blk, blk] x dv product out of the hinted loop
    assert exact - (tiles - n) * tile * dv <= counted["flops_all_trips"] <= exact
