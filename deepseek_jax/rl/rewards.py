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
update: a broken reward function never stops a run.
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


def combine(completions: Sequence[str], examples: Sequence[Mapping[str, Any]],
            functions: Mapping[str, tuple[RewardFn, float]]
            ) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
  """(total [N], per-function values [N] each (nan where it failed), valid [N]).

  total = sum of weight x value over the functions; a completion for which
  any function raised, returned None or a non-finite value is invalid (its
  total 0), and each failure is logged once per function and call.
  """
  if len(completions) != len(examples):
    raise ValueError(f"{len(completions)} completions but {len(examples)} examples.")
  if not functions:
    raise ValueError("combine needs at least one reward function.")
  n = len(completions)
  per = {name: np.full(n, np.nan) for name in functions}
  valid = np.ones(n, bool)
  for name, (fn, _) in functions.items():
    first_error = None
    for i, (c, ex) in enumerate(zip(completions, examples)):
      try:
        v = fn(c, ex)
        v = None if v is None else float(v)
      except Exception as e:  # noqa: BLE001 (any user function may fail; the run goes on)
        v, first_error = None, first_error or f"{type(e).__name__}: {e}"
      if v is None or not math.isfinite(v):
        valid[i] = False
      else:
        per[name][i] = v
    if first_error or np.isnan(per[name]).any():
      log.warning("reward %r could not score %d of %d completions%s; they are excluded",
                  name, int(np.isnan(per[name]).sum()), n,
                  f" (first error: {first_error})" if first_error else "")
  total = np.zeros(n)
  for name, (_, weight) in functions.items():
    total += weight * np.nan_to_num(per[name])
  return np.where(valid, total, 0.0), per, valid
