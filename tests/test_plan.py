"""The memory planner with a pipeline (deepseek_jax/parallel/plan.py, launch/plan.py).

Shapes only (jax.eval_shape): nothing compiles. Oracles written here, apart
from the planner: per-stage parameter bytes counted leaf by leaf from the
model's abstract variables and a contiguous layer split (np.array_split);
conservation against the pipe-free plan (whose bytes tests/test_parallel.py
checks against real sharded arrays); activations from the textbook in-flight
counts (1F1B: PP - s on rank s, GPipe: M) times one micro-batch's layer
inputs of one chunk.
"""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from deepseek_jax import get_preset
from deepseek_jax.model import abstract_variables
from deepseek_jax.parallel import plan as plan_lib
from deepseek_jax.parallel.pipeline_layout import split_layers
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.step import abstract_train_state

CFG = get_preset("tiny")                       # 1 dense + 2 MoE layers, 1 MTP module
MOE8 = CFG.replace(n_layers=8, n_dense_layers=0)
SEQ = 16
_STATES = {}


def memory_plan(cfg, sizes, rules, **kwargs):
  """The planner on the abstract train state of `cfg` (AdamW, float32 moments)."""
  if cfg not in _STATES:
    _STATES[cfg] = abstract_train_state(cfg, TrainConfig())
  return plan_lib.memory_plan(cfg, sizes, rules, state=_STATES[cfg], **kwargs)


def _sizes(pipe=1, data=2, fsdp=1, expert=1):
  return {"data": data, "fsdp": fsdp, "tensor": 1, "expert": expert, "pipe": pipe}


def _hand_stage_params(cfg, pipe):
  """Unsharded parameter bytes of each 1F1B stage: the stage's layers of the
  dense and MoE stacks, the embedding on stage 0, everything else outside the
  stacks (final norm, head, MTP) on the last."""
  params = abstract_variables(cfg)["params"]
  stage_of = {}                                # global layer index -> stage
  for s, layers in enumerate(np.array_split(np.arange(cfg.n_layers), pipe)):
    stage_of.update({int(g): s for g in layers})
  out = [0] * pipe
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    top = path[0].key
    nbytes = int(np.prod(leaf.shape)) * leaf.dtype.itemsize
    if top in ("dense_layers", "moe_layers"):
      first = 0 if top == "dense_layers" else cfg.n_dense_layers
      for i in range(leaf.shape[0]):
        out[stage_of[first + i]] += nbytes // leaf.shape[0]
    elif top == "embed":
      out[0] += nbytes
    else:
      assert top in ("norm", "head") or top.startswith("mtp_"), top
      out[-1] += nbytes
  return out


@pytest.mark.parametrize("pipe", [2, 3])
def test_pipeline_stage_params_equal_a_hand_count_of_the_stage_leaves(pipe):
  # rules "dp", expert = 1: nothing sharded, so a device holds its stage's leaves whole.
  plan = memory_plan(CFG, _sizes(pipe), "dp", batch_size=2 * pipe, seq_len=SEQ,
                     pipeline_schedule="1f1b", num_microbatches=pipe)
  hand = _hand_stage_params(CFG, pipe)
  assert plan["params_bytes_per_rank"] == hand
  assert plan["params_bytes_per_device"] == plan["grads_bytes_per_device"] == max(hand)
  assert plan["layers_per_stage"] == [len(a) for a in np.array_split(range(3), pipe)]
  # AdamW: two float32 moments per parameter; the step counters on every rank.
  counters = memory_plan(CFG, _sizes(), "dp", batch_size=2, seq_len=SEQ)[
      "opt_state_bytes_per_device"] - 2 * sum(hand)
  assert 0 < counters < 64
  assert plan["opt_state_bytes_per_rank"] == [2 * h + counters for h in hand]


def test_sharded_stages_add_up_to_the_pipe_free_plan():
  sizes = _sizes(data=1, fsdp=2, expert=2)
  whole = memory_plan(CFG, sizes, "ep_fsdp", batch_size=4, seq_len=SEQ)
  f1b = memory_plan(CFG, {**sizes, "pipe": 3}, "ep_fsdp", batch_size=8, seq_len=SEQ,
                    pipeline_schedule="1f1b", num_microbatches=2)
  assert sum(f1b["params_bytes_per_rank"]) == whole["params_bytes_per_device"]
  # DualPipe on 2 ranks: each holds chunks 0 and 1, i.e. the whole model.
  dual = memory_plan(CFG, {**sizes, "pipe": 2}, "ep_fsdp", batch_size=16, seq_len=SEQ,
                     pipeline_schedule="dualpipe", num_microbatches=4)
  assert dual["params_bytes_per_rank"] == [whole["params_bytes_per_device"]] * 2
  assert dual["opt_state_bytes_per_rank"] == [whole["opt_state_bytes_per_device"]] * 2


def test_dualpipe_doubles_the_layers_and_parameters_of_a_rank():
  kw = dict(batch_size=16, seq_len=SEQ, num_microbatches=8)
  f1b = memory_plan(MOE8, _sizes(4), "dp", pipeline_schedule="1f1b", **kw)
  dual = memory_plan(MOE8, _sizes(4), "dp", pipeline_schedule="dualpipe", **kw)
  assert f1b["param_copies"] == 1 and dual["param_copies"] == 2
  assert f1b["layers_per_rank"] == [2] * 4 and dual["layers_per_rank"] == [4] * 4
  p, d = f1b["params_bytes_per_rank"], dual["params_bytes_per_rank"]
  assert d == [p[r] + p[3 - r] for r in range(4)]       # chunks r and PP-1-r
  assert d[1] == d[2] == 2 * p[1] == 2 * p[2]           # middle ranks: layers only
  assert dual["grads_bytes_per_device"] == max(d)


def test_activations_are_chunks_in_flight_times_one_microbatch_chunk():
  rows, pp, m = 2, 4, 8
  b = np.dtype(MOE8.dtype).itemsize
  t = SEQ                                    # one sequence per device per micro-batch
  chunk = 2 * t * MOE8.dim * b               # layer inputs of 8 / 4 layers
  # The pipe-free plan of one micro-batch: 8 layers' inputs + one layer's
  # working set X + the head's (vocabulary-chunked loss) + the optimizer
  # update's; the last two are the planner's own terms (since issue 26 they
  # follow the compiled step: parallel/plan.py module doc), read back here.
  whole = memory_plan(MOE8, _sizes(), "dp", batch_size=rows, seq_len=SEQ)
  terms = whole["activation_terms_bytes"]
  logits, update = terms["head"], terms["update"]
  assert terms["layer_inputs"] == 8 * t * MOE8.dim * b
  x = whole["activation_bytes_per_device"] - 8 * t * MOE8.dim * b - logits - update
  assert x == sum(v for k, v in terms.items() if k not in ("layer_inputs", "head", "update"))
  assert x > 0

  def acts(schedule):
    plan = memory_plan(MOE8, _sizes(pp), "dp", batch_size=rows * m, seq_len=SEQ,
                       pipeline_schedule=schedule, num_microbatches=m)
    return plan, plan["activation_bytes_per_rank"]

  plan, f1b = acts("1f1b")                   # rank s holds PP - s micro-batches
  assert f1b == [(pp - s) * chunk + x + update + (logits if s == pp - 1 else 0)
                 for s in range(pp)]
  assert plan["peak_activations"] == pp
  plan, gpipe = acts("gpipe")                # every rank holds all M
  assert gpipe == [m * chunk + x + update + (logits if s == pp - 1 else 0)
                   for s in range(pp)]
  assert plan["peak_activations"] == m
  plan, dual = acts("dualpipe")              # PP + 1 at the peak; F&B: two working sets
  assert plan["peak_activations"] == pp + 1
  held = [(a - 2 * x - update - (logits if r in (0, pp - 1) else 0)) / chunk
          for r, a in enumerate(dual)]
  assert all(h == int(h) and 1 <= h <= pp + 1 for h in held) and max(held) == pp + 1
  assert plan["activation_bytes_per_device"] == max(dual)


def test_dualpipev_holds_one_copy_in_two_half_chunks_and_2pp_plus_1_of_them_in_flight():
  """DualPipeV on 4 ranks: the 8 layers in 8 chunks of one, rank r holds
  chunks r and 7-r (one parameter copy: the ranks add up to the pipe-free
  plan; rank 0 holds the embedding and the head); activations: 2 PP + 1
  chunks of one layer, one working set (the executor runs an F&B tick's two
  halves one after the other), the head's on rank 0."""
  pp, m, rows = 4, 8, 2
  kw = dict(batch_size=rows * m, seq_len=SEQ, num_microbatches=m)
  v = memory_plan(MOE8, _sizes(pp), "dp", pipeline_schedule="dualpipev", **kw)
  per_layer = _hand_stage_params(MOE8, 8)          # 8 stages of one layer: the 8 chunks
  assert v["params_bytes_per_rank"] == [per_layer[r] + per_layer[7 - r] for r in range(pp)]
  whole = memory_plan(MOE8, _sizes(), "dp", batch_size=rows, seq_len=SEQ)
  assert sum(v["params_bytes_per_rank"]) == whole["params_bytes_per_device"]
  assert v["layers_per_stage"] == [1] * 8 and v["layers_per_rank"] == [2] * pp
  assert v["peak_activations"] == 2 * pp + 1 and v["param_copies"] == 2
  terms = whole["activation_terms_bytes"]
  logits, update = terms["head"], terms["update"]
  x = whole["activation_bytes_per_device"] - terms["layer_inputs"] - logits - update
  one = SEQ * MOE8.dim * np.dtype(MOE8.dtype).itemsize      # one layer, one micro-batch
  assert v["activation_bytes_per_rank"] == [
      (2 * pp + 1) * one + x + update + (logits if r == 0 else 0) for r in range(pp)]
  with pytest.raises(ValueError, match=r"cannot be cut into the 2 \* pipe = 8 chunks"):
    memory_plan(CFG, _sizes(4), "dp", pipeline_schedule="dualpipev", **kw)


@pytest.mark.parametrize("sizes,kwargs,match", [
    (_sizes(2), {}, r"pipe=2 needs a pipeline_schedule"),
    (_sizes(), dict(pipeline_schedule="1f1b"), r"pipeline_schedule='1f1b' needs a pipeline"),
    (_sizes(), dict(num_microbatches=4), r"num_microbatches=4 applies only to a pipeline"),
    (_sizes(2), dict(pipeline_schedule="1f1b"), r"needs num_microbatches"),
    (_sizes(4), dict(pipeline_schedule="1f1b", num_microbatches=4),
     r"3 blocks .* cannot be split into pipe=4 stages"),
    (_sizes(2), dict(pipeline_schedule="interleaved", num_microbatches=4),
     r"'interleaved' is not a known pipeline schedule"),
    (_sizes(2), dict(pipeline_schedule="dualpipe", num_microbatches=2), r"n_microbatches >= 2"),
    (_sizes(3), dict(pipeline_schedule="dualpipe", num_microbatches=6), r"even number of stages"),
    (_sizes(2), dict(pipeline_schedule="dualpipev", num_microbatches=3),
     r"3 blocks cannot be cut into the 2 \* pipe = 4 chunks .* DualPipeV"),
    (_sizes(2), dict(pipeline_schedule="1f1b", num_microbatches=3),
     r"batch_size=4 does not split into num_microbatches=3 .* multiple of 3 \* 2 = 6"),
])
def test_pipeline_misconfigurations_name_the_field_and_the_fix(sizes, kwargs, match):
  with pytest.raises(ValueError, match=match):
    memory_plan(CFG, sizes, "dp", batch_size=4, seq_len=SEQ, **kwargs)


def test_the_planner_measures_the_models_layout_only():
  # A train state already in a pipeline's stage layout ([stages, layers, ...])
  # would be split twice: refused, naming the way to build the right one.
  staged = abstract_train_state(CFG, TrainConfig(), layout=split_layers(CFG, 2))
  with pytest.raises(ValueError, match=r"stage layout .*abstract_train_state\(cfg, train_cfg\)"):
    plan_lib.memory_plan(CFG, _sizes(2), "dp", state=staged, batch_size=4, seq_len=SEQ,
                         pipeline_schedule="1f1b", num_microbatches=2)


def test_plan_cli_plans_deepseek_v3s_own_layout():
  # V3 (report sec. 3.2): 16-way pipeline with DualPipe, 64-way EP over 8
  # nodes, data parallel over the rest of 2048 GPUs; AdamW moments in BF16.
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, "-m", "launch.plan", "--preset=v3_671b",
         "--mesh=pipe=16,expert=64,data=2", "--schedule=dualpipe",
         "--num_microbatches=32", "--moments_dtype=bfloat16"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONWARNINGS="error::DeprecationWarning")
  out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "dualpipe, 16 stages, 32 micro-batches of 128 sequences" in out.stdout
  plan = json.loads(out.stdout.strip().splitlines()[-1])
  assert plan["devices"] == 2048 and plan["batch_size"] == 32 * 128
  assert (plan["pipe"], plan["pipeline_schedule"], plan["num_microbatches"]) == (16, "dualpipe", 32)
  assert plan["layers_per_stage"] == [4] * 13 + [3] * 3          # 61 layers
  assert plan["layers_per_rank"] == [7] * 3 + [8] * 10 + [7] * 3
  assert plan["peak_activations"] == 17 and plan["param_copies"] == 2
  # The largest rank: 8 MoE layers, their routed experts split over 64 devices
  # (256 x 3 x 7168 x 2048 float32 each), the rest of a layer ~2% of that.
  routed = 8 * 256 * 3 * 7168 * 2048 * 4 // 64
  assert routed < plan["params_bytes_per_device"] < 1.05 * routed
  assert plan["opt_state_bytes_per_device"] == pytest.approx(
      plan["params_bytes_per_device"], rel=1e-6)                   # two bf16 moments
  # The table's rows are one rank's (the largest total's): they add up to it.
  gib = {m.group(1).strip(): float(m.group(2)) for m in re.finditer(
      r"^  ([a-z ]+?)\s+([0-9.]+) GiB$", out.stdout, re.M)}
  rows = sum(gib[k] for k in ("parameters", "gradients", "optimizer state", "activations"))
  assert abs(rows - gib["total per device"]) <= 0.02, gib
  assert gib["total per device"] == pytest.approx(plan["total_bytes_per_device"] / 2**30, abs=0.01)
  bad = subprocess.run(cmd[:5], cwd=root, env=env, capture_output=True, text=True,
                       timeout=120)
  assert bad.returncode != 0 and "pipe=16 needs a pipeline_schedule" in bad.stderr


def test_scaling_laws_give_deepseek_llms_own_hyperparameters():
  """DeepSeek LLM's fits (train/scaling.py) at its own models' budgets (7B:
  30 layers x 4096, 67B: 95 x 8192, 2T tokens of 4096) against the batch
  sizes and learning rates they were trained with (2304 / 4608 sequences of
  4096; 4.2e-4 / 3.2e-4): within 10%; the model/data split multiplies back
  to C; launch.plan --compute prints them as one JSON line."""
  from deepseek_jax.train import scaling
  for (layers, dim), batch, lr in (((30, 4096), 2304, 4.2e-4), ((95, 8192), 4608, 3.2e-4)):
    c = scaling.non_embedding_flops_per_token(layers, dim, 4096) * 2e12
    got = scaling.optimal(c)
    assert abs(got["batch_tokens_opt"] / (batch * 4096) - 1) < 0.10, got
    assert abs(got["lr_opt"] / lr - 1) < 0.10, got
    assert abs(got["model_flops_per_token_opt"] * got["tokens_opt"] / c - 1) < 0.01
  with pytest.raises(ValueError, match="compute=0"):
    scaling.optimal(0)
  res = subprocess.run([sys.executable, "-m", "launch.plan", "--compute=1e21",
                        "--preset=deepseek_llm_7b"], capture_output=True, text=True,
                       timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert res.returncode == 0, res.stderr[-2000:]
  line = json.loads(res.stdout.strip().splitlines()[-1])
  assert line["batch_tokens_opt"] == pytest.approx(scaling.optimal(1e21)["batch_tokens_opt"])
  assert line["preset_model_flops_per_token"] == scaling.non_embedding_flops_per_token(30, 4096,
                                                                                       4096)
