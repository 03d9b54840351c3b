"""Rule-based rewards (DeepSeek-R1 sec. 2.2.2) and their weighted combination.

A reward function takes (completion text, example) and returns a float, or
None when it cannot judge; `example` is a dict holding at least "answer"
(the verifiable answer) plus whatever extra fields the dataset carries.

  accuracy        1 when the <answer> block holds the same number as the
                  example's answer (number equivalence: "0405", "405.0",
                  "+405", "4.05e2" all equal 405), else 0; for a Countdown
                  example (its "prompt" "make T with a b c") 1 when the block
                  holds any expression of those numbers that equals T
                  (tasks.countdown_correct)
  format          1 for exactly one <think>...</think> followed by exactly one
                  <answer>...</answer> (non-empty), nothing else around them
  language        R1's language-consistency reward: the share of letters in
                  the reasoning written in the target script (default Latin;
                  reasoning without letters counts as consistent)
  overlong        DAPO's soft penalty for over-long completions, by token
                  count n: 0 up to max_len - buffer, then falling linearly to
                  -1 at max_len, -1 beyond

`combine(completions, examples, functions)` applies several weighted
functions; one that raises or returns None (or a non-finite value) for a
completion is logged and that completion marked invalid, excluded from the
update: a broken reward function never stops a run. A function may carry
`kinds` (it scores only examples of those prompt kinds: R1's fourth stage
routes reasoning prompts to rules and general ones to reward models) and
`score_batch(completions, examples)` (one call for the whole rollout: a
reward model or a judge scores in batches; rl/model_rewards.py).
"""

from __future__ import annotations

import logging
import math
import re
import unicodedata
from fractions import Fraction
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from deepseek_jax.data import tasks

RewardFn = Callable[[str, Mapping[str, Any]], "float | None"]
log = logging.getLogger(__name__)

_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?", re.ASCII)  # ASCII digits only
MAX_NUMBER_CHARS = 64        # longer "numbers" are not parsed (no huge-exponent traps)


def parse_number(text: str | None) -> Fraction | None:
  """The exact value of a decimal number written in `text` (thousands commas
  allowed), or None when it is not one number."""
  if text is None:
    return None
  s = text.strip().replace(",", "")
  if not s or len(s) > MAX_NUMBER_CHARS or not _NUMBER.fullmatch(s):
    return None
  mantissa, _, exponent = s.lower().partition("e")
  if exponent and abs(int(exponent)) > MAX_NUMBER_CHARS:
    return None
  return Fraction(mantissa) * Fraction(10) ** int(exponent or 0)


def accuracy(completion: str, example: Mapping[str, Any]) -> float:
  prompt = example.get("prompt")
  if prompt is not None and tasks.is_countdown(prompt):    # many right answers: verified
    return float(tasks.countdown_correct(prompt, tasks.extract_answer(completion)))
  want = parse_number(str(example["answer"]))
  if want is None:
    raise ValueError(f"example answer {example['answer']!r} is not a number")
  got = parse_number(tasks.extract_answer(completion))
  return float(got is not None and got == want)


def format_reward(completion: str, example: Mapping[str, Any]) -> float:
  return float(tasks.format_ok(completion))


_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def _script_of(ch: str) -> str:
  name = unicodedata.name(ch, "")
  return name.split(" ")[0] if name else ""


def language(completion: str, example: Mapping[str, Any], script: str = "LATIN") -> float:
  """Share of the reasoning's letters in `script` (Unicode name prefix:
  LATIN, CJK, CYRILLIC, ...); the whole completion when it has no <think>."""
  match = _THINK.search(completion)
  text = match.group(1) if match else completion
  letters = [c for c in text if c.isalpha()]
  if not letters:
    return 1.0
  target = str(example.get("script", script)).upper()
  return sum(_script_of(c) == target for c in letters) / len(letters)


def overlong(n_tokens: int, max_len: int, buffer: int) -> float:
  """DAPO's soft overlong punishment for a completion of n_tokens."""
  if not 0 < buffer <= max_len:
    raise ValueError(f"overlong buffer={buffer} must lie in (0, max_len={max_len}].")
  if n_tokens <= max_len - buffer:
    return 0.0
  if n_tokens <= max_len:
    return (max_len - buffer - n_tokens) / buffer
  return -1.0


BUILTIN: dict[str, RewardFn] = {"accuracy": accuracy, "format": format_reward,
                                "language": language}


def applies(fn: Any, example: Mapping[str, Any]) -> bool:
  """Whether reward `fn` scores this example: a function with a `kinds`
  attribute (a set of prompt kinds; R1's fourth stage routes each kind of
  prompt to its own rewards) scores only examples of those kinds."""
  kinds = getattr(fn, "kinds", None)
  return kinds is None or example.get("kind") in kinds


def _scores(fn: Any, completions: list[str], examples: list[Mapping[str, Any]]
            ) -> tuple[list[Any], str | None]:
  """fn's raw scores of the completions and its first error message: one
  `score_batch(completions, examples)` call for a batched function (a model
  scoring many at once), else fn(c, ex) per completion."""
  if hasattr(fn, "score_batch"):
    try:
      out = list(fn.score_batch(completions, examples))
      if len(out) != len(completions):
        raise ValueError(f"score_batch returned {len(out)} scores for {len(completions)}")
      return out, None
    except Exception as e:  # noqa: BLE001 (a reward model may fail; the run goes on)
      return [None] * len(completions), f"{type(e).__name__}: {e}"
  out, first_error = [], None
  for c, ex in zip(completions, examples):
    try:
      out.append(fn(c, ex))
    except Exception as e:  # noqa: BLE001 (any user function may fail; the run goes on)
      out.append(None)
      first_error = first_error or f"{type(e).__name__}: {e}"
  return out, first_error


def combine(completions: Sequence[str], examples: Sequence[Mapping[str, Any]],
            functions: Mapping[str, tuple[RewardFn, float]]
            ) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
  """(total [N], per-function values [N] each (nan where it failed or does
  not apply), valid [N]).

  total = sum of weight x value over the functions that apply to the
  example (`applies`: kind routing); a completion for which any applying
  function raised, returned None or a non-finite value is invalid (its total
  0), and each failure is logged once per function and call. A function
  with `score_batch` is called once with every completion it applies to.
  """
  if len(completions) != len(examples):
    raise ValueError(f"{len(completions)} completions but {len(examples)} examples.")
  if not functions:
    raise ValueError("combine needs at least one reward function.")
  n = len(completions)
  per = {name: np.full(n, np.nan) for name in functions}
  valid = np.ones(n, bool)
  for name, (fn, _) in functions.items():
    rows = [i for i in range(n) if applies(fn, examples[i])]
    values, first_error = _scores(fn, [completions[i] for i in rows],
                                  [examples[i] for i in rows])
    failed = 0
    for i, v in zip(rows, values):
      try:
        v = None if v is None else float(v)
      except (TypeError, ValueError) as e:
        v, first_error = None, first_error or f"{type(e).__name__}: {e}"
      if v is None or not math.isfinite(v):
        valid[i], failed = False, failed + 1
      else:
        per[name][i] = v
    if first_error or failed:
      log.warning("reward %r could not score %d of %d completions%s; they are excluded",
                  name, failed, len(rows),
                  f" (first error: {first_error})" if first_error else "")
  total = np.zeros(n)
  for name, (_, weight) in functions.items():
    total += weight * np.nan_to_num(per[name])
  return np.where(valid, total, 0.0), per, valid
