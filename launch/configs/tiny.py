"""Tiny run for tests and smoke checks: seconds of training after compilation.

  python -m launch.train --config=launch/configs/tiny.py --workdir=/tmp/tiny
"""

from launch.configs import base_config


def get_config():
  """python -m launch.train --config=launch/configs/tiny.py --workdir=/tmp/tiny"""
  config = base_config("tiny")
  config.steps = 6
  config.batch_size = 8   # splits over up to 8 devices (tests use 8 fake ones)
  config.seq_len = 64
  config.n_train_problems = 100
  config.n_eval_problems = 8
  config.max_digits = 1
  config.lr = 3e-3
  config.warmup_steps = 2
  config.end_lr = 3e-4
  config.log_every = 1
  config.eval_every = 0
  config.eval_batch_size = 8
  config.max_new_tokens = 40
  config.ckpt_every = 3
  config.keep_ckpts = 2
  config.fast_compile = True
  return config
