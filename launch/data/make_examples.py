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
  arith_prefs.jsonl    1000 preference records {"prompt", "chosen", "rejected",
                       "kind", "answer"} (data/preferences.py) of train problems
                       no other file uses: chosen = the worked solution,
                       rejected = a subtly wrong one (`wrong_completion`)
  arith_prefs_eval.jsonl  100 preference records of arith_eval.jsonl's
                       held-out problems, for pairwise accuracy. The "answer"
                       field is not part of a preference record (it is
                       ignored there); it makes the files prompt files too.
  general_prompts.jsonl  200 prompt records of kind "general" with no
                       reference answer (""), train problems no other file
                       uses: the prompts R1's fourth stage scores with reward
                       models and judges, not a verifier
                       (launch/configs/grpo_stage4.py)
"""

import dataclasses
import json
import os

import numpy as np

from deepseek_jax.data import tasks

HERE = os.path.dirname(os.path.abspath(__file__))
KINDS = ("add", "sub", "mul")


def _write(name, records):
  with open(os.path.join(HERE, name), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)


def wrong_completion(problem: tasks.Problem, rng: np.random.Generator) -> str:
  """The worked solution with one digit of the answer changed, and the same
  digit of the last reasoning line's partial result (so the two agree and
  only the arithmetic of that line, or its agreement with the line before,
  gives it away). The digit and its new value are drawn from `rng`; a
  leading digit never becomes 0 (the answer keeps its length)."""
  answer = problem.answer
  k = int(rng.integers(len(answer)))                     # digit index from the left
  choices = [d for d in "0123456789" if d != answer[k] and not (d == "0" and k == 0
                                                                  and len(answer) > 1)]
  digit = choices[int(rng.integers(len(choices)))]
  wrong = answer[:k] + digit + answer[k + 1:]
  lines = problem.reasoning.split("\n")
  head, partial = lines[-1].rsplit(" -> ", 1)
  at = len(partial) - len(answer) + k                    # the same digit in the partial
  assert partial.endswith(answer), (problem, partial)  # the answer is the last partial
  lines[-1] = f"{head} -> {partial[:at]}{digit}{partial[at + 1:]}"
  return tasks.format_completion(dataclasses.replace(problem, reasoning="\n".join(lines),
                                                     answer=wrong))


def preference_records(problems, seed: int) -> list[dict]:
  """{"prompt", "chosen", "rejected", "kind", "answer"} per problem; the
  rejected solutions are deterministic in `seed`."""
  rng = np.random.default_rng(seed)
  return [{"prompt": p.prompt, "chosen": tasks.format_completion(p),
           "rejected": wrong_completion(p, rng), "kind": tasks.kind_of(p), "answer": p.answer}
          for p in problems]


def examples() -> dict[str, list[dict]]:
  """File name -> its records, for every file this script writes."""
  train = tasks.mixed_problems(2600, seed=0, split="train", max_digits=2, kinds=KINDS,
                               kind_mix="distinct")
  test = tasks.generate_problems(100, seed=0, split="test", max_digits=2, kinds=KINDS)
  prompt = lambda p: {"prompt": p.prompt, "answer": p.answer, "kind": tasks.kind_of(p)}  # noqa
  # The preference pairs' train problems continue the same draw past the 2600 above.
  more = tasks.mixed_problems(3800, seed=0, split="train", max_digits=2, kinds=KINDS,
                              kind_mix="distinct")
  assert more[:2600] == train, "the train problems are a prefix of a longer draw"
  return {
      "arith_sft.jsonl": [{"prompt": tasks.format_prompt(p, "short"),
                           "completion": tasks.format_completion(p)} for p in train[:2000]],
      "arith_prompts.jsonl": [prompt(p) for p in train[2000:]],
      "arith_eval.jsonl": [prompt(p) for p in test],
      "arith_prefs.jsonl": preference_records(more[2600:3600], seed=1),
      "arith_prefs_eval.jsonl": preference_records(test, seed=2),
      "general_prompts.jsonl": [{"prompt": p.prompt, "answer": "", "kind": "general"}
                                for p in more[3600:]],
  }


def main():
  for name, records in examples().items():
    _write(name, records)


if __name__ == "__main__":
  main()
