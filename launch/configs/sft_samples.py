"""SFT on a run's own rejection-sampled completions (DeepSeek-R1 sec. 2.3.3), from that run.

  python -m launch.train --config=launch/configs/default.py --workdir=/tmp/demo
  python -m launch.rejection_sample --from_workdir=/tmp/demo \
      --out=/tmp/demo_samples.jsonl --n_prompts=2000 --k=4
  python -m launch.train --config=launch/configs/sft_samples.py --workdir=/tmp/demo_rs

R1's third stage samples responses from the RL checkpoint, keeps the correct
ones and fine-tunes on them. Here the teacher is the README demo (or a GRPO
run: --from_workdir=runs/grpo then --config.init_from=runs/grpo); the
samples are its completions of train-split problems that earn GRPO's format
and accuracy rewards with the answer written exactly as the reference
(launch.rejection_sample), one {"prompt", "completion", ...} SFT record per
line, so loss falls on the completion and <eos> only. Training starts from
the teacher's weights (init_from: the model below must be that run's, the
"small" preset), at the demo's final learning rate, and evaluates exact match
on the task's held-out test split (eval_task, with the demo's max_digits and
prompt template) every eval_every steps and at the end, so the first eval
shows what the samples added. Other files or runs:
  --config.data_files='("samples.jsonl",)' --config.init_from=RUN
The figures of this recipe have not been measured yet.
"""

from launch.configs import base_config


def get_config():
  """python -m launch.train --config=launch/configs/sft_samples.py --workdir=W"""
  config = base_config("small")             # the model of init_from's run (default.py)
  config.init_from = "/tmp/demo"
  config.data_files = ("/tmp/demo_samples.jsonl",)
  config.eval_task = True                   # held-out exact match (test split)
  config.max_digits = 2                     # of the eval problems: the demo's
  config.n_eval_problems = 100
  config.template = "short"                 # the demo's, as in the records' prompts
  config.steps = 200
  config.batch_size = 8
  config.seq_len = 128
  config.completion_only = True
  config.lr = 3e-4                          # the demo's end_lr: a gentle continuation
  config.warmup_steps = 10
  config.end_lr = 3e-5
  config.weight_decay = 0.1
  config.log_every = 20
  config.eval_every = 100
  config.eval_batch_size = 50
  config.max_new_tokens = 64
  config.ckpt_every = 100
  config.keep_ckpts = 2
  return config
