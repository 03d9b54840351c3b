"""DPO (or IPO) from an SFT run, on preference pairs (DeepSeek LLM's chat model, sec. 5).

  python -m launch.train --config=launch/configs/dpo.py --workdir=runs/dpo \
      --config.init_from=runs/own_sft
  python -m launch.evaluate --workdir=runs/dpo \
      --prompt_files=launch/data/arith_prefs_eval.jsonl --verifier=math

The policy starts from the SFT run (the README's "R1-style RL on your own
prompts" step 1: preset "small") and is trained against the frozen start
weights with the DPO loss -log sigmoid(beta ((c - c_ref) - (r - r_ref))) on
the summed response log-probs of the shipped pairs
(launch/data/arith_prefs.jsonl: a worked solution vs the same with one answer
digit wrong); --config.dpo_loss_type=ipo for IPO. Held-out (arith_prefs_eval
.jsonl): implicit reward accuracy and margin, the chosen / rejected log-probs
and their gap, at the start, every eval_every steps and at the end. The
checkpoints are a plain run's: launch.evaluate scores the greedy answers with
a verifier (the preference files carry `answer`, so they are prompt files
too), launch.generate samples, init_from continues. batch_size counts pairs.

Measured on the 2-core dev machine, shared with other jobs (load ~9), from
the README's SFT run (held-out greedy accuracy by the math verifier 0.31 on
the 100 prompts of arith_prefs_eval.jsonl), at beta 0.1: 150 steps in 346 s raise the
held-out chosen-minus-rejected log-prob margin from 13.87 to 14.96 nats
(implicit reward accuracy 0.82) but not the greedy accuracy (0.26; IPO
0.28); at lr 1e-4 the margin reaches 19.9 while the chosen log-prob falls
from -2.6 to -7.2 and greedy accuracy to 0.08 (broken format). The shipped
rejected responses differ from the chosen only in a final copied digit,
which the SFT model already ranks right, while its own errors are in the
column arithmetic.

On-policy pairs fix that: the SFT model's own right and wrong samples of
the same prompt (launch/make_preferences.py, 600 prompts of
arith_prompts.jsonl, k=8 at temperature 1, --pairs_per_prompt=4: 1074
pairs from 366 prompts):

  python -m launch.make_preferences --from_workdir=runs/own_sft \
      --prompt_files=launch/data/arith_prompts.jsonl --k=8 --pairs_per_prompt=4 \
      --out=runs/own_pairs.jsonl
  python -m launch.train --config=launch/configs/dpo.py --workdir=runs/dpo_onpolicy \
      --config.init_from=runs/own_sft --config.preference_files='("runs/own_pairs.jsonl",)'

With this config (beta 0.5, lr 2e-5, 150 steps) greedy accuracy goes 0.31 ->
0.43 (seed 1: 0.45) on the 100 held-out prompts and 0.445 -> 0.525 (seed 1:
0.52) on 400 more test-split prompts; the shipped pairs at beta 0.5 give
0.28 / 0.41. At beta 0.1 on-policy pairs gain less (0.41 / 0.35 and 0.488 /
0.465 over two seeds); one pair per prompt (366 pairs: 0.405 on the 400) or
lr 5e-5 (0.358) lose accuracy: the chosen log-prob falls. The shipped
held-out log-prob margin still rises a little (13.87 -> 13.95, the chosen
log-prob -2.63 -> -2.43); on held-out on-policy pairs (the SFT model's own,
on the 400 prompts) it rises 1.80 -> 2.9. bench/RESULTS.md (issue 30) has
the table.
"""

from launch.configs import base_config


def get_config():
  """python -m launch.train --config=launch/configs/dpo.py --workdir=W"""
  config = base_config("small")             # the model of init_from's run (default.py)
  config.objective = "dpo"
  config.init_from = "runs/own_sft"
  config.preference_files = ("launch/data/arith_prefs.jsonl",)
  config.eval_preference_files = ("launch/data/arith_prefs_eval.jsonl",)
  config.template = "short"                 # the SFT run's prompt template
  config.beta = 0.5                         # 0.1: on-policy pairs gain half as much (below)
  config.dpo_loss_type = "sigmoid"
  config.steps = 150
  config.batch_size = 8                     # pairs: 16 rows per step
  config.seq_len = 128
  config.lr = 2e-5                          # 1e-4 breaks the SFT model's format (below)
  config.warmup_steps = 10
  config.end_lr = 2e-6
  config.weight_decay = 0.0
  config.bias_update_speed = 0.0            # the router biases stay the SFT run's
  config.log_every = 10
  config.eval_every = 25
  config.eval_batch_size = 50
  config.ckpt_every = 50
  config.keep_ckpts = 2
  return config
