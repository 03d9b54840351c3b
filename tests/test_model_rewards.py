"""Model rewards (rl/model_rewards.py) and combine's kind routing / batched
functions (rl/rewards.py), against per-row hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from deepseek_jax.rl import model_rewards as mr
from deepseek_jax.rl import rewards


@pytest.mark.parametrize("completion, summary", [
    ("<think>a</think> <answer>42</answer>", "42"),
    ("<think>a</think>\nThe sum is 42.", "The sum is 42."),
    ("no reasoning at all", "no reasoning at all"),
    ("<think>1</think><think>2</think> tail ", "tail"),
    ("<think>open only", "<think>open only"),
])
def test_summary_is_the_text_after_the_last_think(completion, summary):
  assert mr.summary_of(completion) == summary


@pytest.mark.parametrize("text, score", [
    ("7", 0.7), (" 10 out of 10", 1.0), ("Score: 0", 0.0), ("3.5", 0.35),
    ("eleven", None), ("11", None), ("-1", None), ("", None), ("x 2 y 9", 0.2)])
def test_parse_score(text, score):
  got = mr.parse_score(text, 10)
  assert got == score if score is None else math.isclose(got, score)


def test_combine_routes_kinds_and_calls_a_batched_function_once():
  calls = []

  class Lengths:                   # a batched "model": the summary's length
    kinds = frozenset({"general"})

    def score_batch(self, completions, examples):
      calls.append(list(completions))
      return [len(mr.summary_of(c)) for c in completions]

  def exact(c, ex):
    return float(mr.summary_of(c) == ex["answer"])
  exact.kinds = frozenset({"math"})

  texts = ["<think>x</think>4", "<think>x</think>hello", "<think>y</think>5", "hi"]
  examples = [{"answer": "4", "kind": "math", "prompt": "2+2"},
              {"answer": "", "kind": "general", "prompt": "greet"},
              {"answer": "4", "kind": "math", "prompt": "2+2"},
              {"answer": "", "kind": "general", "prompt": "greet"}]
  total, per, valid = rewards.combine(texts, examples, {
      "exact": (exact, 2.0), "len": (Lengths(), 0.5), "format": (rewards.format_reward, 1.0)})
  assert calls == [[texts[1], texts[3]]]                  # one call, its kinds only
  fmt = [rewards.format_reward(t, e) for t, e in zip(texts, examples)]
  want = [2.0 * 1 + fmt[0], 0.5 * 5 + fmt[1], 2.0 * 0 + fmt[2], 0.5 * 2 + fmt[3]]
  np.testing.assert_allclose(total, want)
  assert valid.all()
  assert np.isnan(per["exact"][[1, 3]]).all() and np.isnan(per["len"][[0, 2]]).all()


def test_a_failing_batched_function_leaves_its_rows_unscored_and_the_rest_alone():
  class Broken:
    def score_batch(self, completions, examples):
      raise RuntimeError("model server down")

  examples = [{"answer": "1", "prompt": "p"}] * 3
  total, per, valid = rewards.combine(["a", "b", "c"], examples,
                                      {"rm": (Broken(), 1.0)})
  assert not valid.any() and (total == 0).all() and np.isnan(per["rm"]).all()


def test_reward_model_reward_scores_summary_or_response():
  seen = []

  def scorer(prompts, responses):
    seen.append((list(prompts), list(responses)))
    return [float(len(r)) for r in responses]

  c, ex = "<think>long reasoning</think> <answer>12</answer>", {"prompt": "q"}
  assert mr.RewardModelReward(scorer, on="summary")(c, ex) == 2.0
  assert mr.RewardModelReward(scorer, on="response")(c, ex) == float(len(c))
  assert seen[0] == (["q"], ["12"])
  with pytest.raises(ValueError, match="on='final'"):
    mr.RewardModelReward(scorer, on="final")


def test_judge_fills_the_rubric_parses_and_counts_unparsable_outputs():
  replies = iter(["8", "no idea", "12", "3"])
  asked = []

  def complete(texts):
    asked.extend(texts)
    return [next(replies) for _ in texts]

  judge = mr.JudgeReward(complete, rubric="Q: {prompt} A: {response} (0-{max_score}):",
                         max_score=10)
  texts = ["<think>t</think> 4 {braces}", "x", "y", "z"]
  examples = [{"prompt": f"p{i}", "answer": ""} for i in range(4)]
  total, per, valid = rewards.combine(texts, examples, {"judge": (judge, 1.0)})
  assert asked[0] == "Q: p0 A: 4 {braces} (0-10):"
  np.testing.assert_allclose(total, [0.8, 0.0, 0.0, 0.3])
  assert valid.tolist() == [True, False, False, True]
  counts, first = judge.take_counts()
  assert counts == {"unparsable": 2.0} and "no idea" in first
  assert judge.take_counts()[0] == {"unparsable": 0.0}
  with pytest.raises(ValueError, match="no \\{response\\} field"):
    mr.JudgeReward(complete, rubric="Q: {prompt}")


def test_a_real_judge_model_that_cannot_answer_scores_none_and_never_crashes():
  """A tiny random model as the judge, through our own generate: its output
  is noise, so most scores are None; the rollout goes on."""
  import jax

  from deepseek_jax.config import get_preset
  from deepseek_jax.data.tokenizer import default_tokenizer
  from deepseek_jax.model import init_variables
  cfg = get_preset("tiny")
  tok = default_tokenizer()
  cfg = cfg.replace(vocab_size=tok.vocab_size) if cfg.vocab_size != tok.vocab_size else cfg
  variables = init_variables(cfg, jax.random.key(0))
  complete = mr.judge_completer(cfg, variables, tok, max_new_tokens=3, batch_size=4)
  judge = mr.JudgeReward(complete)
  examples = [{"prompt": "2+2", "answer": "4"}] * 3
  total, per, valid = rewards.combine(["<think>a</think> 4", "5", "x"], examples,
                                      {"judge": (judge, 1.0)})
  outputs = complete([judge.prompt_for(c, e) for c, e in zip(["<think>a</think> 4", "5", "x"],
                                                               examples)])
  want = [mr.parse_score(o, 10) for o in outputs]      # greedy: the same outputs again
  assert valid.tolist() == [w is not None for w in want]
  assert judge.take_counts()[0]["unparsable"] == sum(w is None for w in want)
  np.testing.assert_allclose(total, [w or 0.0 for w in want])
