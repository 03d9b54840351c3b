"""Rewards that a model computes: a reward model's score and an LLM judge's.

DeepSeek-V3 rewards open-ended answers with a reward model trained on
preference data and uses V3 itself as a judge; DeepSeek-R1's fourth stage
runs RL over all scenarios, rule rewards for reasoning prompts and reward
models for general ones: helpfulness judged on the final summary only,
harmlessness on the whole response (reasoning and summary). Both rewards
here are reward functions for `rewards.combine` with `score_batch` (one
batched call per rollout, not one forward per completion) and optional
`kinds` (the prompt kinds they score; others are left to other rewards):

  RewardModelReward(scorer, on=)   scorer(prompts, responses) -> scores, e.g.
                                   a trained reward model's
                                   (rl.reward_model); on="summary" scores the
                                   text after </think>, "response" the whole
                                   completion
  JudgeReward(complete, rubric=)   the rubric filled with the prompt and the
                                   response goes to `complete(texts) ->
                                   texts` (a judge model's greedy generation:
                                   `judge_completer`), and the first number
                                   of its output, on the rubric's 0..max
                                   scale, divided by max, is the score;
                                   output without one, or out of range,
                                   scores None (the completion is not
                                   scored) and is counted (`take_counts`)

`summary_of(completion)`: the text after the last </think> (the whole
completion when there is none), with an <answer> wrapper removed.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

ON = ("response", "summary")

DEFAULT_RUBRIC = (
    "You are grading an answer. Question: {prompt}\nAnswer: {response}\n"
    "Rate the answer's correctness and helpfulness from 0 to {max_score}. "
    "Reply with the number only.\nScore: ")

_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
_ANSWER = re.compile(r"^\s*<answer>(.*?)</answer>\s*$", re.S)


def summary_of(completion: str) -> str:
  """What a reader sees as the answer: the text after the last </think>
  (all of it when there is none), without an <answer>...</answer> wrapper."""
  tail = completion.rsplit("</think>", 1)[-1]
  m = _ANSWER.match(tail)
  return (m.group(1) if m else tail).strip()


def _check_on(on: str) -> None:
  if on not in ON:
    raise ValueError(f"on={on!r} must be one of {ON}: 'summary' scores the text after "
                     "</think>, 'response' the whole completion.")


def _kinds(kinds) -> frozenset | None:
  return None if kinds is None else frozenset(kinds)


class RewardModelReward:
  """A reward model's score of each completion (module doc).
  scorer(prompts: list[str], responses: list[str]) -> [n] floats."""

  def __init__(self, scorer: Callable[[list[str], list[str]], Sequence[float]], *,
               on: str = "response", kinds: Sequence[str] | None = None,
               name: str = "reward_model"):
    _check_on(on)
    self.scorer, self.on, self.kinds, self.__name__ = scorer, on, _kinds(kinds), name

  def score_batch(self, completions: Sequence[str], examples: Sequence[Mapping[str, Any]]
                  ) -> list[float]:
    texts = [summary_of(c) if self.on == "summary" else c for c in completions]
    scores = np.asarray(self.scorer([ex["prompt"] for ex in examples], texts), np.float64)
    return scores.reshape(-1).tolist()

  def __call__(self, completion: str, example: Mapping[str, Any]) -> float:
    return self.score_batch([completion], [example])[0]


def parse_score(text: str, max_score: float) -> float | None:
  """The judge's score in [0, 1]: the first number of `text` over
  max_score; None when there is none or it lies outside [0, max_score]."""
  m = _NUMBER.search(text)
  if m is None:
    return None
  value = float(m.group(0))
  return value / max_score if 0 <= value <= max_score else None


class JudgeReward:
  """An LLM judge's score of each completion (module doc).
  complete(texts: list[str]) -> list[str]: the judge's outputs."""

  def __init__(self, complete: Callable[[list[str]], Sequence[str]], *,
               rubric: str = DEFAULT_RUBRIC, max_score: float = 10.0, on: str = "summary",
               kinds: Sequence[str] | None = None, name: str = "judge"):
    _check_on(on)
    if not max_score > 0:
      raise ValueError(f"max_score={max_score} must be > 0.")
    for field in ("{prompt}", "{response}"):
      if field not in rubric:
        raise ValueError(f"the judge rubric has no {field} field: write it where the "
                         "question / the answer to grade go.")
    self.complete, self.rubric, self.max_score = complete, rubric, max_score
    self.on, self.kinds, self.__name__ = on, _kinds(kinds), name
    self.unparsable, self.first_unparsable = 0, None

  def prompt_for(self, completion: str, example: Mapping[str, Any]) -> str:
    response = summary_of(completion) if self.on == "summary" else completion
    # format_map with only these fields: braces in the user's text stay as written
    return self.rubric.replace("{max_score}", f"{self.max_score:g}").replace(
        "{prompt}", str(example["prompt"])).replace("{response}", response)

  def score_batch(self, completions: Sequence[str], examples: Sequence[Mapping[str, Any]]
                  ) -> list[float | None]:
    outputs = list(self.complete([self.prompt_for(c, ex)
                                  for c, ex in zip(completions, examples)]))
    scores = [parse_score(o, self.max_score) for o in outputs]
    for o, s in zip(outputs, scores):
      if s is None:
        self.unparsable += 1
        self.first_unparsable = self.first_unparsable or o[:80]
    return scores

  def __call__(self, completion: str, example: Mapping[str, Any]) -> float | None:
    return self.score_batch([completion], [example])[0]

  def take_counts(self) -> tuple[dict[str, float], str | None]:
    """({"unparsable": n} since the last call, the first unparsable output)."""
    counts, first = {"unparsable": float(self.unparsable)}, self.first_unparsable
    self.unparsable, self.first_unparsable = 0, None
    return counts, (f"unparsable judge output {first!r}" if first is not None else None)


def judge_completer(cfg, variables, tok, *, max_new_tokens: int = 8, batch_size: int = 32,
                    mesh=None, rules=None) -> Callable[[list[str]], list[str]]:
  """complete(texts) -> texts by greedy generation of our model (the judge:
  a trained run's or a published checkpoint's variables), batch_size
  prompts at a time, stopping at the tokenizer's <eos>. Prompts longer than
  the judge's context lose their beginning (the rubric's tail, where the
  judge answers, is kept)."""
  from deepseek_jax.infer import generate      # the judge decodes as rollouts do
  room = cfg.max_seq_len - max_new_tokens
  if room < 1:
    raise ValueError(f"judge max_new_tokens={max_new_tokens} leaves no room for the prompt "
                     f"in the judge's max_seq_len={cfg.max_seq_len}.")

  def complete(texts: list[str]) -> list[str]:
    out = []
    for i in range(0, len(texts), batch_size):
      ids = [tok.encode(t, add_bos=True)[-room:] for t in texts[i:i + batch_size]]
      n = len(ids)
      # rows padded to a power of two: few batch shapes, few compilations
      ids += [ids[-1]] * (min(1 << (n - 1).bit_length(), batch_size) - n)
      gen = generate(cfg, variables, ids, max_new_tokens=max_new_tokens,
                     stop_ids=(tok.eos_id,), rng=jax.random.key(0), mesh=mesh, rules=rules)
      for s in gen.sequences()[:n]:
        out.append(tok.decode(s[:-1] if s and s[-1] == tok.eos_id else s))
    return out
  return complete




# ---------------------------------------------------------------------------
# From a run's config: 'NAME=PATH[@on]' specs and kind routing
# ---------------------------------------------------------------------------
def parse_spec(spec: str, field: str) -> tuple[str, str, str]:
  """(name, path, on) of 'NAME=PATH' or 'NAME=PATH@summary|response'
  (on defaults to "response"); ValueError naming `field` otherwise."""
  name, eq, rest = spec.partition("=")
  path, at, on = rest.rpartition("@") if "@" in rest else (rest, "", "response")
  if not eq or not name.strip() or not path.strip() or on not in ON:
    raise ValueError(f"{field} entry {spec!r} must read NAME=PATH or NAME=PATH@on with on "
                     f"one of {ON} (e.g. 'helpful=runs/rm@summary').")
  return name.strip(), path.strip(), on


def parse_kind_rewards(entries: Sequence[str], known: Sequence[str]) -> dict[str, frozenset]:
  """{reward name: the prompt kinds it scores} of 'KIND=NAME+NAME' entries
  (kind_rewards); a reward no entry names scores every kind."""
  kinds: dict[str, set] = {}
  for entry in entries:
    kind, eq, names = entry.partition("=")
    if not eq or not kind.strip() or not names.strip():
      raise ValueError(f"kind_rewards entry {entry!r} must read KIND=NAME+NAME (e.g. "
                       "'math=accuracy+format', 'general=helpful').")
    for name in names.split("+"):
      if name.strip() not in known:
        raise ValueError(f"kind_rewards entry {entry!r} names reward {name.strip()!r}; the "
                         f"run's rewards are {sorted(known)}.")
      kinds.setdefault(name.strip(), set()).add(kind.strip())
  return {name: frozenset(k) for name, k in kinds.items()}


def load_model(path: str, field: str):
  """(cfg, variables, tokenizer) of a training run's directory (its latest
  checkpoint and tokenizer) or an HF checkpoint directory (config.json +
  safetensors + tokenizer.json): train.export.load_model_dir plus the
  tokenizer; ValueError naming `field` otherwise."""
  import os

  from deepseek_jax.data.tokenizer import default_tokenizer, load_tokenizer
  from deepseek_jax.train.export import load_model_dir
  if os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(
      os.path.join(path, "tokenizer.json")) and not os.path.isdir(
          os.path.join(path, "checkpoints")):
    raise ValueError(f"{field}: {path} has no tokenizer.json beside its weights.")
  cfg, variables, train_cfg = load_model_dir(path, field)
  if train_cfg is None:
    return cfg, variables, load_tokenizer(os.path.join(path, "tokenizer.json"))
  tok_path = train_cfg.tokenizer_path
  return cfg, variables, load_tokenizer(tok_path) if tok_path else default_tokenizer()


def load_judges(specs: Sequence[str], *, rubric_file: str = "", max_new_tokens: int = 8,
                mesh=None, rules=None) -> dict[str, JudgeReward]:
  """{name: JudgeReward} of `judges` specs ('NAME=PATH[@on]', default on
  "summary" when no @on is written), each judge model loaded by `load_model`;
  rubric_file: a text file with {prompt} and {response} (and optionally
  {max_score}) fields, default DEFAULT_RUBRIC."""
  rubric = DEFAULT_RUBRIC
  if rubric_file:
    with open(rubric_file) as f:
      rubric = f.read()
  out = {}
  for spec in specs:
    name, path, on = parse_spec(spec, "judges")
    on = on if "@" in spec else "summary"
    cfg, variables, tok = load_model(path, f"judges ({name})")
    out[name] = JudgeReward(judge_completer(cfg, variables, tok, max_new_tokens=max_new_tokens,
                                            mesh=mesh, rules=rules),
                            rubric=rubric, on=on, name=name)
  return out


__all__ = ["ON", "DEFAULT_RUBRIC", "summary_of", "parse_score", "RewardModelReward",
           "JudgeReward", "judge_completer", "parse_spec", "parse_kind_rewards", "load_model",
           "load_judges"]
