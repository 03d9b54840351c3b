"""Token-level distillation of the README demo's MoE into a dense student (issue 31).

  python -m launch.train --config=launch/configs/default.py --workdir=runs/demo
  python -m launch.train --config=launch/configs/distill_dense.py --workdir=runs/distill_dense
  # the same student from scratch for comparison: plain SFT on the same rows
  python -m launch.train --config=launch/configs/distill_dense.py --workdir=runs/dense_scratch \
      --config.objective=lm --config.distill_teacher=
  # sequence-level (R1's recipe: SFT on the teacher's verified samples), the same student
  python -m launch.train --config=launch/configs/distill_dense_seq.py --workdir=runs/distill_seq

Teacher: the demo run (preset "small": MLA, 1 dense + 3 MoE layers of 8
experts, 2 routed + 1 shared active; ~0.6M active of 1.36M parameters),
--config.distill_teacher=DIR for another run or an HF export of one. Student:
a dense Llama-style decoder of about the teacher's active size, built here
from the "small" preset with model overrides (no preset edit): grouped-query
attention (4 query heads of 32 on 2 kv heads), SwiGLU 128 -> 256 in all 4
blocks, no MoE, no MTP; 0.62M parameters, the teacher's 128-id vocabulary (the
shipped character tokenizer, so the teacher's ids are the student's).

Data: the demo's task rows (max_digits 2, loss on the completions only); at
every response position the student's full next-token distribution is pulled
to the teacher's top-64 (renormalised; forward KL, T = 1), computed on the fly
by a jitted teacher forward per batch (--config.distill_cache=DIR to compute
them once before training and reuse them). Held-out exact match on the task's
100 test problems at the end, as the demo's. The three arms side by side:
experiments/distillation.ipynb; figures: bench/RESULTS.md, "Issue 31".
"""

from launch.configs import default

# The dense student: ModelConfig fields replacing preset "small"'s.
STUDENT = dict(attention="gqa", n_dense_layers=4, n_kv_heads=2, head_dim=32, inter_dim=256,
               rope_type="default", n_routed_experts=0, n_shared_experts=0,
               n_activated_experts=0, moe_inter_dim=0, n_expert_groups=1, n_limited_groups=1,
               n_mtp_depth=0)


def get_config():
  """python -m launch.train --config=launch/configs/distill_dense.py --workdir=W"""
  config = default.get_config()             # the demo's data, schedule and evaluation
  for name, value in STUDENT.items():
    config.model[name] = value
  config.objective = "distill"
  config.distill_teacher = "runs/demo"
  config.distill_k = 64
  config.distill_temperature = 1.0
  config.distill_ce_weight = 0.0
  config.distill_cache = ""                 # "" = the teacher on the fly
  config.distill_chunk = 128
  config.mtp_weight = 0.0                   # the student has no MTP block
  config.bias_update_speed = 0.0            # nor router biases
  return config
