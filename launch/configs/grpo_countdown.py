"""GRPO on Countdown (the second, harder task family): SFT, then GRPO.

  python -m launch.grpo --config=launch/configs/grpo_countdown.py --workdir=runs/countdown

Stage 1 trains launch/configs/countdown.py (the demo's model on Countdown
problems, from scratch; skipped with --config.init_from=RUN); stage 2 is
the demo's GRPO (launch/configs/grpo_demo.py) on Countdown prompts. The
accuracy reward verifies the expression in <answer> (each given number
exactly once, + - * and parentheses, equal to the target: a search problem
with many right answers, where the SFT model has seen one per prompt).
Held-out accuracy before and after: summary.json. Measured (100 steps,
bench/RESULTS.md): greedy 0.03 -> 0.08, sampled 0.03 -> 0.04 in 5.5 min.
"""

from launch.configs import grpo_demo


def get_config():
  """python -m launch.grpo --config=launch/configs/grpo_countdown.py --workdir=runs/countdown"""
  config = grpo_demo.get_config()
  config.sft_config = "launch/configs/countdown.py"
  config.task_kinds = ("countdown",)
  config.max_digits = 1            # as the SFT stage (launch/configs/countdown.py)
  config.n_train_problems = 1500
  return config
