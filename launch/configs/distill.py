"""Distillation (DeepSeek-R1 sec. 2.4): SFT a smaller model from scratch on a larger one's samples.

  python -m launch.train --config=launch/configs/default.py --workdir=/tmp/demo
  python -m launch.rejection_sample --from_workdir=/tmp/demo \
      --out=/tmp/demo_distill.jsonl --n_prompts=4000 --k=2
  python -m launch.train --config=launch/configs/distill.py --workdir=/tmp/distill_tiny

R1 distils its reasoning into smaller dense models by plain SFT on ~800K
samples curated with R1 (no RL on the students), which beat RL on the small
models themselves. Here the teacher is the README demo's "small" preset
(4 layers, width 128; a GRPO run, --from_workdir=runs/grpo, is R1's
teacher); the student is the "tiny" preset (3 layers, width 64: 0.30M
parameters to the teacher's 1.36M), trained from random weights on the teacher's
rejection-sampled completions (correct, well-formed, exact answers; SFT
records, loss on the completions only) with the demo's from-scratch
schedule, and evaluated for exact match on the task's held-out test split
(eval_task, the demo's max_digits and template). A student needs no
init_from and any model fields that fit the rows: --preset=NAME or
--config.model.n_layers=2 etc. The samples: --config.data_files='("x.jsonl",)'.
A dense (Llama-style GQA) student instead, the one the token-level arm
trains: launch/configs/distill_dense_seq.py (measured against token-level
distillation and training from scratch in bench/RESULTS.md, "Issue 31"). The
figures of this tiny-MoE student have not been measured yet.
"""

from launch.configs import default


def get_config():
  """python -m launch.train --config=launch/configs/distill.py --workdir=W"""
  config = default.get_config()             # the teacher's data shape and from-scratch
  config.preset = "tiny"                    # schedule; the student: smaller than it
  config.data_files = ("/tmp/demo_distill.jsonl",)
  config.eval_task = True                   # held-out exact match on the teacher's task
  config.template = "short"                 # (max_digits 2), prompts as in the records
  return config
