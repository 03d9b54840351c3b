"""Fine-tune a published HF checkpoint (DeepSeek-V2-Lite, V2, V3 / R1, or one of ours).

  python -m launch.train --config=launch/configs/finetune.py --workdir=runs/ft \
      --config.init_from_hf=/ckpt/DeepSeek-V2-Lite \
      --config.data_files='("train.jsonl",)' --config.seq_len=4096

The model is the checkpoint's config.json (`config.preset` is not used);
`--config.model.*` may change only what keeps every parameter shape
(max_seq_len / YaRN, dtype, remat_policy, moe_impl, fp8, n_mtp_depth=0).
The tokenizer is the checkpoint's tokenizer.json unless tokenizer_path is
given. Without data_files it trains on the embedded arithmetic task (the
README's small example). Defaults are a cautious SFT-style recipe: small
peak lr with warmup (the first update has lr 0, so step 1's loss is the
published model's), cosine decay, no router-bias updates (V2 checkpoints
have no bias; V3's stays as published), V2-Lite's expert balance loss
(aux_loss_alpha 0.001) on softmax-routed models is left to the user:
`--config.expert_balance_weight=0.001`.
"""

from launch.configs import base_config


def get_config():
  config = base_config("")         # no preset: the model comes from init_from_hf
  config.init_from_hf = ""         # required: the HF checkpoint directory
  config.steps = 1000
  config.batch_size = 16
  config.seq_len = 2048
  config.lr = 2e-5
  config.warmup_steps = 50
  config.end_lr = 2e-6
  config.weight_decay = 0.1
  config.mtp_weight = 0.1
  config.balance_weight = 0.0
  config.bias_update_speed = 0.0
  config.completion_only = True
  # Without data_files: the embedded arithmetic task. 5000 problems exist
  # even with max_digits=2 (the README's small example; 20000 would not).
  config.n_train_problems = 5000
  config.log_every = 10
  config.eval_every = 0
  config.ckpt_every = 100
  config.keep_ckpts = 2
  return config
