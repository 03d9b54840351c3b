"""Long-context extension of the README demo: V3's 4K -> 32K -> 128K, scaled down.

  python -m launch.train --config=launch/configs/default.py --workdir=/tmp/demo
  python -m launch.train --config=launch/configs/long_context.py:1 --workdir=/tmp/demo_long1
  python -m launch.train --config=launch/configs/long_context.py:2 --workdir=/tmp/demo_long2

DeepSeek-V3 (report sec. 4.3) pre-trains at 4K tokens, then runs two
1000-step stages, at 32K and at 128K, with YaRN on the decoupled rotary key
only and the same YaRN settings in both stages (scale s = 40, alpha = 1,
beta = 32, attention factor sqrt(t) = 0.1 ln s + 1), the batch shrinking as
sequences grow (1920 then 480 sequences) at a learning rate of 7.3e-6, the end
of its pre-training schedule. Here the "small" preset was trained on
128-token rows with RoPE for 256 positions (original_seq_len); both stages
set YaRN for 4x that (rope_factor 4, max_seq_len 1024) and train
  stage 1  512-token rows, batch 8, from the demo's weights (init_from)
  stage 2  1024-token rows, batch 4, from stage 1's weights
on the demo's arithmetic mixed with passkey retrieval (data/tasks.py: a
5-digit key hidden at a random depth in filler text, prompts as long as a
row holds), so the held-out exact match measures retrieval across the whole
extended window. The learning rate is the demo's final one: the passkey
skill is new to this model, where V3's long-context data were not.

Each stage's init_from names the previous workdir (override with
--config.init_from=DIR); the model fields allowed to differ from that run
are TrainConfig's INIT_FROM_MAY_CHANGE. Measured figures: WORKSPACE.md.
"""

from launch.configs import base_config

STAGES = {
    # stage: (seq_len, batch_size, init_from)
    "1": (512, 8, "/tmp/demo"),
    "2": (1024, 4, "/tmp/demo_long1"),
}


def get_config(stage: str = "1"):
  """python -m launch.train --config=launch/configs/long_context.py:1 --workdir=W"""
  if stage not in STAGES:
    raise ValueError(f"long_context.py:{stage}: the stages are {sorted(STAGES)} "
                     "(--config=launch/configs/long_context.py:1, then :2)")
  seq_len, batch, init_from = STAGES[stage]
  config = base_config("small", max_seq_len=1024, rope_factor=4.0)
  config.init_from = init_from
  config.steps = 200
  config.batch_size = batch
  config.seq_len = seq_len
  config.task_kinds = ("add", "sub", "mul", "passkey")
  config.passkey_chars = 0            # as long as a row holds
  config.n_train_problems = 4000
  config.n_eval_problems = 40
  config.max_digits = 2
  config.completion_only = True
  config.lr = 3e-4
  config.warmup_steps = 10
  config.end_lr = 3e-4
  config.weight_decay = 0.1
  config.log_every = 20
  config.eval_every = 0
  config.eval_batch_size = 20
  config.max_new_tokens = 64
  config.ckpt_every = 50
  config.keep_ckpts = 2
  return config
