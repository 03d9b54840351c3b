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
The figures of this recipe have not been measured yet.
"""

from launch.configs import base_config


def get_config():
  """python -m launch.train --config=launch/configs/distill.py --workdir=W"""
  config = base_config("tiny")              # the student: smaller than the teacher
  config.data_files = ("/tmp/demo_distill.jsonl",)
  config.eval_task = True                   # held-out exact match (test split)
  config.max_digits = 2                     # of the eval problems: the teacher's
  config.n_eval_problems = 100
  config.template = "short"                 # the teacher's, as in the records' prompts
  config.steps = 560
  config.batch_size = 8
  config.seq_len = 128
  config.completion_only = True
  config.lr = 3e-3                          # the demo's from-scratch schedule
  config.warmup_steps = 40
  config.end_lr = 3e-4
  config.weight_decay = 0.1
  config.log_every = 40
  config.eval_every = 0
  config.eval_batch_size = 50
  config.max_new_tokens = 64
  config.ckpt_every = 100
  config.keep_ckpts = 2
  return config
