"""Sequence-level distillation of the README demo's MoE into a dense student (issue 31).

  python -m launch.train --config=launch/configs/default.py --workdir=runs/demo
  python -m launch.rejection_sample --from_workdir=runs/demo --out=runs/samples.jsonl \
      --n_prompts=2000 --k=4
  python -m launch.train --config=launch/configs/distill_dense_seq.py --workdir=runs/distill_seq
  # the other arms, the same student: token-level, and from scratch on the task's rows
  python -m launch.train --config=launch/configs/distill_dense.py --workdir=runs/distill_dense
  python -m launch.train --config=launch/configs/distill_dense.py --workdir=runs/dense_scratch \
      --config.objective=lm --config.distill_teacher=

R1's recipe (DeepSeek-R1 sec. 2.4): the student is fine-tuned, from random
weights here, on the teacher's own completions of train-split prompts that
earn GRPO's format and accuracy rewards with the reference's exact answer
(launch.rejection_sample's {"prompt", "completion", ...} records, loss on the
completion and <eos> only); no teacher forward during training, so a step
costs what a from-scratch step does. Student: distill_dense.py's dense GQA
decoder (4 blocks, 4 query / 2 kv heads of 32, SwiGLU 256, no MoE or MTP:
0.62M parameters, the shipped 128-id character tokenizer), the demo's
schedule (560 steps of 8 x 128 tokens, lr 3e-3 -> 3e-4). Held-out exact match
on the task's 100 test problems at the end (eval_task, the demo's max_digits
and "short" template, the records' prompt format): the same problems as the
other two arms with the same seed. Another samples file:
--config.data_files='("x.jsonl",)'; a missing one is refused with one line
before anything compiles. Measured against the other arms: bench/RESULTS.md,
"Issue 31".
"""

from launch.configs import distill_dense


def get_config():
  """python -m launch.train --config=launch/configs/distill_dense_seq.py --workdir=W"""
  config = distill_dense.get_config()       # the dense student, the demo's schedule
  config.objective = "lm"                   # plain SFT on the teacher's samples
  config.distill_teacher = ""               # the teacher is in the data, not the loss
  config.data_files = ("runs/samples.jsonl",)
  config.eval_task = True                   # held-out exact match on the teacher's task
  return config
