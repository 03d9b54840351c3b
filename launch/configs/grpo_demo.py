"""The R1-style demo: cold-start SFT from scratch, then GRPO, on the arithmetic task.

  python -m launch.grpo --config=launch/configs/grpo_demo.py --workdir=runs/grpo

Stage 1 is the README demo (launch/configs/default.py: the "small" preset,
MLA + MoE + MTP, learns column arithmetic with worked solutions); skipped
with --config.init_from=RUN; from a published HF checkpoint with
--config.init_from_hf=DIR --config.sft_config=launch/configs/finetune.py
(the SFT stage fine-tunes it, then GRPO). Stage 2, GRPO: 16 held-in prompts x 8 sampled
completions per step (temperature 1), rewards accuracy (1) + format (0.5),
group-normalised advantages, the DeepSeekMath loss with k3 KL (beta 0.04)
against the SFT model, one pass per rollout, AdamW at constant 1e-4
(3e-4 collapsed the sampled distribution onto worse answers: greedy 0.47
-> 0.37 by step 50).
Held-out accuracy (greedy, and sampled as the mean of 4 draws per
problem) before and after: summary.json (per-kind figures in
metrics.jsonl). Measured figures: bench/RESULTS.md (GRPO): sampled +16 to
+19 points; what caps it is mul (31% of the held-out problems, 10% of the
distinct training problems, never learned by the SFT stage, so never
rewarded), and lr above 1e-4 hurts. A longer SFT stage is the cheaper way to
a strong model (1000 steps: sampled 0.69 before any GRPO), at the cost of
GRPO's headroom (bench/RESULTS.md, "Where the GRPO demo's time goes").
"""

from ml_collections import ConfigDict, config_dict

from deepseek_jax.parallel import MeshConfig
from deepseek_jax.rl.trainer import GRPOConfig


def get_config():
  """python -m launch.grpo --config=launch/configs/grpo_demo.py --workdir=runs/grpo"""
  config = ConfigDict()
  for name, value in GRPOConfig().to_dict().items():
    config[name] = value if value is not None else config_dict.placeholder(float)
  config.sft_config = "launch/configs/default.py"
  config.init_from_hf = ""     # an HF checkpoint the SFT stage starts from (finetune.py)
  config.steps = 250
  config.prompts_per_step = 16
  config.group_size = 8
  config.max_new_tokens = 64
  config.max_digits = 2
  config.n_train_problems = 8000
  config.n_eval_problems = 100
  config.temperature = 1.0
  config.lr = 1e-4
  config.warmup_steps = 5
  config.beta = 0.04
  config.log_every = 10
  config.eval_every = 50
  config.eval_batch_size = 50
  config.eval_samples = 4      # sampled accuracy over 4 draws per problem (1 draw: +-0.05)
  config.ckpt_every = 50
  # The GRPO stage's device mesh (one device: none). --config.mesh.expert=4 ...
  config.mesh = ConfigDict(MeshConfig().to_dict())
  return config
