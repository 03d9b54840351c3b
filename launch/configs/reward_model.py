"""A reward model from an SFT run, on preference pairs (DeepSeek-V3 sec. 5.2's RM).

  python -m launch.train --config=launch/configs/reward_model.py --workdir=runs/rm \
      --config.init_from=runs/own_sft

The model is the SFT run's (the README's "R1-style RL on your own prompts" step
1: preset "small") with a scalar value head on the last response token
(rl/reward_model.py), trained with the Bradley-Terry loss
-log sigmoid(r_chosen - r_rejected - rm_margin) on the shipped pairs
(launch/data/arith_prefs.jsonl: a worked solution vs the same with one
answer digit wrong), held-out pairwise accuracy and reward margin on
arith_prefs_eval.jsonl at the start, every eval_every steps and at the end.
batch_size counts pairs (2 rows each). Your data or a published checkpoint:
  --config.preference_files='("pairs.jsonl",)' \
  --config.eval_preference_files='("held_out.jsonl",)'
  --config=launch/configs/reward_model.py --config.init_from_hf=DIR (and the
  checkpoint's model: see launch/configs/finetune.py)
Measured on the 2-core dev machine, shared with other jobs (load ~9), from
the README's SFT run (560 steps on arith_sft.jsonl, held-out exact match
0.31): held-out pairwise accuracy 0.50 at step 0, 0.63 / 0.78 / 0.81 / 0.85
/ 0.88 / 0.93 at steps 50 / 100 / ... / 300, margin +7.8; 398 s for the run.
Lower learning rates plateau (3e-4: 0.68 at 200 steps; 1e-4: 0.74 at 300).
The checkpoint reads back as a scorer:
  deepseek_jax.rl.preference_trainer.load_reward_model("runs/rm")(prompts, responses)
"""

from launch.configs import base_config


def get_config():
  """python -m launch.train --config=launch/configs/reward_model.py --workdir=W"""
  config = base_config("small")             # the model of init_from's run (default.py)
  config.objective = "reward_model"
  config.init_from = "runs/own_sft"
  config.preference_files = ("launch/data/arith_prefs.jsonl",)
  config.eval_preference_files = ("launch/data/arith_prefs_eval.jsonl",)
  config.template = "short"                 # the SFT run's prompt template
  config.rm_margin = 0.0
  config.steps = 300
  config.batch_size = 8                     # pairs: 16 rows per step
  config.seq_len = 128
  config.lr = 1e-3                          # 3e-4 / 1e-4 plateau at 0.68 / 0.74
  config.warmup_steps = 30
  config.end_lr = 1e-4
  config.weight_decay = 0.0
  config.log_every = 10
  config.eval_every = 50
  config.eval_batch_size = 50               # pairs per held-out forward
  config.ckpt_every = 50
  config.keep_ckpts = 2
  return config
