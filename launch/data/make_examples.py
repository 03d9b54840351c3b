"""Writes the shipped example files of the README's "R1-style RL on your own prompts".

  python -m launch.data.make_examples          # rewrites launch/data/arith_*.jsonl

From the embedded arithmetic task (data/tasks.py, max_digits=2, kinds add /
sub / mul), deterministically (seed 0), in the formats a user's own files use:
  arith_sft.jsonl      2000 SFT records {"prompt", "completion"}: the prompt in
                       the demo's "short" template, the worked solution
                       (launch.train --config.data_files=...)
  arith_prompts.jsonl  600 prompt records {"prompt", "answer", "kind"} of the
                       train split (launch.grpo --config.prompt_files=...)
  arith_eval.jsonl     100 prompt records of the held-out test split
                       (launch.evaluate --prompt_files=..., eval_prompt_files)
"""

import json
import os

from deepseek_jax.data import tasks

HERE = os.path.dirname(os.path.abspath(__file__))
KINDS = ("add", "sub", "mul")


def _write(name, records):
  with open(os.path.join(HERE, name), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)


def main():
  train = tasks.mixed_problems(2600, seed=0, split="train", max_digits=2, kinds=KINDS,
                               kind_mix="distinct")
  test = tasks.generate_problems(100, seed=0, split="test", max_digits=2, kinds=KINDS)
  _write("arith_sft.jsonl", [{"prompt": tasks.format_prompt(p, "short"),
                              "completion": tasks.format_completion(p)} for p in train[:2000]])
  prompt = lambda p: {"prompt": p.prompt, "answer": p.answer, "kind": tasks.kind_of(p)}  # noqa
  _write("arith_prompts.jsonl", [prompt(p) for p in train[2000:]])
  _write("arith_eval.jsonl", [prompt(p) for p in test])


if __name__ == "__main__":
  main()
