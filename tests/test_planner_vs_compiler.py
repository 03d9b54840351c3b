"""The memory planner (parallel/plan.py) against the compiled train step.

Oracle: XLA's own per-device figure for the real train step
(`compile_report`: arguments + temporaries + outputs - aliased, from the
buffer assignment of the program training runs), on 8 fake CPU devices at
widths small enough to compile in seconds but shaped like DeepSeek-V3 (MLA,
a dense block then MoE blocks, 8 routed experts per token, the MTP block,
blockwise attention, the vocabulary-chunked loss). `memory_plan` must land
within 25% of it on the expert-parallel and the tensor-parallel meshes.
One compile per mesh (module fixture).
"""

import pytest

from deepseek_jax import get_preset
from deepseek_jax.parallel import MeshConfig, setup
from deepseek_jax.parallel.plan import memory_plan
from deepseek_jax.train.compile_report import compile_report
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.step import abstract_train_state

# V3's shape at 1/7 of its width: 1 dense + 2 MoE blocks (+ MTP), 32 routed
# experts.
CFG = get_preset("v3_671b", n_layers=3, n_dense_layers=1, dim=1024, inter_dim=2816,
                 moe_inter_dim=512, n_heads=16, n_routed_experts=32, vocab_size=32768,
                 q_lora_rank=384, kv_lora_rank=128)
TRAIN = TrainConfig(batch_size=8, seq_len=1024, moments_dtype="bfloat16")
MESHES = {"ep_fsdp expert=8": (dict(expert=8), "ep_fsdp"),
          "fsdp_tp tensor=2 fsdp=4": (dict(tensor=2, fsdp=4), "fsdp_tp")}


# ~85 s for both compiles on 2 cores: CI's slow step. At smaller widths the
# items the planner leaves out (a few hundred MiB) are no longer small.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=list(MESHES))
def run(request):
  axes, rules = MESHES[request.param]
  mesh, rule_set = setup(MeshConfig(**{"data": 1, **axes, "rules": rules}))
  plan = memory_plan(CFG, dict(mesh.shape), rules,
                     state=abstract_train_state(CFG, TrainConfig(moments_dtype="bfloat16")),
                     batch_size=TRAIN.batch_size, seq_len=TRAIN.seq_len)
  return compile_report(CFG, TRAIN, mesh, rule_set, plan=plan), plan


def test_planner_total_is_within_a_quarter_of_the_compiled_step(run):
  report, plan = run
  assert CFG.attn_block_size < TRAIN.seq_len          # the blockwise path is planned
  ratio = report["total_bytes"] / plan["total_bytes_per_device"]
  print(f"compiled {report['total_bytes'] / 2**20:.1f} MiB, planner "
        f"{plan['total_bytes_per_device'] / 2**20:.1f} MiB, ratio {ratio:.3f}",
        {k: round(v / 2**20, 1) for k, v in plan["activation_terms_bytes"].items()})
  assert 0.75 <= ratio <= 1.25, (ratio, report, plan["activation_terms_bytes"])


def test_planner_state_equals_the_compiled_arguments_but_the_batch(run):
  # The step's arguments are the state (params + optimizer) and the batch:
  # the planner's state bytes are exact, the batch is a few int32 per token.
  report, plan = run
  state = plan["params_bytes_per_device"] + plan["opt_state_bytes_per_device"]
  batch = report["argument_bytes"] - state
  rows = plan["mesh"]["data"] * plan["mesh"]["fsdp"] * plan["mesh"]["expert"]
  tokens = TRAIN.batch_size * TRAIN.seq_len // rows
  assert 0 <= batch <= 6 * 4 * tokens + 1024
