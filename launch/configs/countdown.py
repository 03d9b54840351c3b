"""Cold-start SFT on Countdown, the harder task family: "make 7 with 2 3 5".

  python -m launch.train --config=launch/configs/countdown.py --workdir=/tmp/countdown

The README demo's model and schedule (preset "small", from scratch) on the
Countdown kind of data/tasks.py: three one-digit numbers (1-9), reach the
target using each once with + - * and parentheses. The worked solution is
the steps of one answer ("2*5=10", "10-3=7") and that expression ("2*5-3").
Held-out accuracy is verified, not string-matched: any expression of those
numbers that equals the target counts (tasks.countdown_correct). This is
the SFT stage of launch/configs/grpo_countdown.py. Measured (bench/RESULTS.md,
GRPO on Countdown): held-out exact match 0.03 after SFT; two-digit numbers
(max_digits=2) left it at 0.00.
"""

from launch.configs import default


def get_config():
  """python -m launch.train --config=launch/configs/countdown.py --workdir=/tmp/countdown"""
  config = default.get_config()
  config.task_kinds = ("countdown",)
  config.max_digits = 1            # numbers 1-9, targets < 100: ~1,960 distinct prompts
  config.n_train_problems = 1500   # (of which the train split holds ~1,760)
  return config
