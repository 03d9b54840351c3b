"""DeepSeek-R1's fourth stage in small: RL over all scenarios, each prompt kind with its rewards.

  python -m launch.grpo --config=launch/configs/grpo_stage4.py --workdir=runs/stage4

R1's last stage trains on a mix of prompts: reasoning prompts rewarded by
rules (here the math verifier, kinds add / sub / mul of
launch/data/arith_prompts.jsonl) and general prompts rewarded by models
(kind "general", launch/data/general_prompts.jsonl, no reference answer):
helpfulness by a reward model on the final summary only (the text after
</think>), harmlessness by a reward model on the whole response, and here
also an LLM judge on the summary. It starts from the SFT run of the
README's "R1-style RL on your own prompts" (runs/own_sft) and needs the
reward model of its "Preference learning" section (runs/rm); the judge is
the SFT model itself (an HF directory or any run works). The arithmetic
reward model stands in for both of R1's (this project ships no helpfulness
or safety data): the point is the routing and the per-kind curves
(`reward_kind/<kind>`, `reward/<name>`, `reward_unparsable/judge` in
metrics.jsonl). Held-out: the math verifier on arith_eval.jsonl.
"""

from launch.configs import grpo_demo


def get_config():
  """python -m launch.grpo --config=launch/configs/grpo_stage4.py --workdir=W"""
  config = grpo_demo.get_config()
  config.init_from = "runs/own_sft"
  config.prompt_files = ("launch/data/arith_prompts.jsonl", "launch/data/general_prompts.jsonl")
  config.eval_prompt_files = ("launch/data/arith_eval.jsonl",)
  config.verifier = "math"
  config.reward_models = ("helpful=runs/rm@summary", "harmless=runs/rm@response")
  config.judges = ("judge=runs/own_sft@summary",)
  config.reward_weights = ("judge=0.5",)
  # rules for reasoning kinds, models for general prompts; format scores every kind
  config.kind_rewards = ("add=accuracy", "sub=accuracy", "mul=accuracy",
                         "general=helpful+harmless+judge")
  config.steps = 100
  return config
