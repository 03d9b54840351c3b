"""R1-style evaluation metrics: unbiased pass@k and majority-vote consistency (cons@k).

DeepSeek-R1 (sec. 3) samples k completions per prompt (temperature 0.6,
top-p 0.95) and reports pass@1 averaged over the samples and cons@k, the
accuracy of the majority answer. Given n samples of a prompt of which c are
correct:

  pass_at_k(n, c, k)   the unbiased estimator of Chen et al. 2021 (Codex,
                       eq. 1): the probability that a random k-subset of the
                       n samples holds a correct one, 1 - C(n-c, k) / C(n, k),
                       computed as 1 - prod_{i=n-c+1..n} (1 - k/i) (their
                       numerically stable form: no huge binomials). pass@1
                       is c / n. Needs 1 <= k <= n and 0 <= c <= n.
  mean_pass_at_k       its mean over prompts, from a correctness table.
  majority_vote        the most frequent answer; None entries (no answer)
                       are ignored, ties go to the answer that occurred first,
                       and with no answer at all the vote is None. `key=`
                       groups answers by a canonical form (e.g.
                       `functools.partial(verifiers.answer_key, "math")`,
                       so "0.5" and "\\frac12" vote together); the first
                       answer of the winning group is returned.
  cons_at_k            1.0 when the majority answer is correct, 0.0 when it
                       is not or no sample answered; the caller passes the k
                       samples it means (cons@64: 64 samples).

Pure Python + NumPy: the evaluator and the GRPO trainer's periodic
evaluation call these on host-side results.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Hashable, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k of one prompt with n samples, c of them correct."""
  n, c, k = operator.index(n), operator.index(c), operator.index(k)
  if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
    raise ValueError(f"pass@k needs n >= 1, 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, "
                     f"k={k}.")
  if n - c < k:                  # every k-subset holds a correct sample
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def mean_pass_at_k(correct: Sequence[Sequence[Any]], k: int) -> float:
  """Mean pass@k over prompts; row p of `correct` holds prompt p's samples (truthy =
  correct; rows may differ in length, each needs at least k samples)."""
  if len(correct) == 0:
    raise ValueError("mean_pass_at_k needs at least one prompt.")
  return float(np.mean([pass_at_k(len(row), int(sum(bool(x) for x in row)), k)
                        for row in correct]))


def _winner(answers: Sequence[Any], key: Callable[[Any], Hashable] | None) -> int | None:
  """Index of the first answer of the most frequent group, None without answers."""
  counts: dict[Hashable, int] = {}
  first: dict[Hashable, int] = {}
  for i, answer in enumerate(answers):
    group = answer if key is None or answer is None else key(answer)
    if group is None:
      continue
    if group not in counts:
      counts[group], first[group] = 0, i
    counts[group] += 1
  if not counts:
    return None
  return first[max(counts, key=counts.__getitem__)]  # max keeps the first of equal counts


def majority_vote(answers: Sequence[Any], key: Callable[[Any], Hashable] | None = None
                  ) -> Any:
  """The most frequent non-None answer (ties: the first to occur), or None.

  With `key`, answers vote by key(answer) (a None key is no answer) and the
  first answer of the winning key is returned. Answers (or keys) must be hashable.
  """
  index = _winner(answers, key)
  return None if index is None else answers[index]


def cons_at_k(answers: Sequence[Any],
              correct: Sequence[Any] | Callable[[Any], Any],
              key: Callable[[Any], Hashable] | None = None) -> float:
  """1.0 when the majority answer (majority_vote(answers, key)) is correct, else 0.0.

  `correct` is either a sequence parallel to `answers` (truthy = that sample is
  correct; the winning group's first sample decides) or a function called on
  the winning answer. No answer at all scores 0.0.
  """
  if not callable(correct) and len(correct) != len(answers):
    raise ValueError(f"{len(answers)} answers but {len(correct)} correctness flags.")
  index = _winner(answers, key)
  if index is None:
    return 0.0
  return float(bool(correct(answers[index]) if callable(correct) else correct[index]))
