"""pass@k and cons@k against direct transcriptions: every k-subset enumerated, exact binomials."""

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from deepseek_jax.rl import evaluation


def _enumerated_pass_at_k(row, k):
  """The definition: the share of k-subsets of the samples that hold a correct one."""
  hits = [any(row[j] for j in subset) for subset in itertools.combinations(range(len(row)), k)]
  return float(np.mean(hits))


def _random_table(rng, prompts, n):
  """Random correctness rows, plus an all-wrong and an all-right row."""
  table = rng.random((prompts, n)) < rng.random((prompts, 1))
  return np.concatenate([table, np.zeros((1, n), bool), np.ones((1, n), bool)])


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_pass_at_k_equals_the_mean_over_all_k_subsets(n):
  rng = np.random.default_rng(n)
  table = _random_table(rng, 6, n)
  for k in range(1, n + 1):                          # k = n included
    want = [_enumerated_pass_at_k(row, k) for row in table]
    got = [evaluation.pass_at_k(n, int(row.sum()), k) for row in table]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    assert got[-2] == 0.0 and got[-1] == 1.0          # all wrong, all right
    assert evaluation.mean_pass_at_k(table, k) == pytest.approx(np.mean(want), rel=1e-12)
  np.testing.assert_allclose([evaluation.pass_at_k(n, int(r.sum()), 1) for r in table],
                             table.mean(axis=1), rtol=1e-12)   # pass@1 = c / n


@pytest.mark.parametrize("n,c,k", [(200, 37, 50), (1000, 3, 64), (64, 1, 1), (500, 0, 499),
                                   (300, 299, 2)])
def test_pass_at_k_is_stable_for_large_n(n, c, k):
  exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
  assert evaluation.pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15)


def test_mean_pass_at_k_takes_ragged_rows():
  rows = [[1, 0, 0], [0, 0, 1, 1, 0], [True]]
  want = np.mean([_enumerated_pass_at_k(r, 1) for r in rows])
  assert evaluation.mean_pass_at_k(rows, 1) == pytest.approx(want, rel=1e-12)
  with pytest.raises(ValueError):
    evaluation.mean_pass_at_k(rows, 2)               # the last row has one sample
  with pytest.raises(ValueError):
    evaluation.mean_pass_at_k([], 1)


@pytest.mark.parametrize("n,c,k", [(3, 1, 4), (3, 4, 1), (3, -1, 1), (-1, 0, 1), (3, 1, 0),
                                   (0, 0, 1)])
def test_pass_at_k_refuses_impossible_arguments(n, c, k):
  with pytest.raises(ValueError, match="pass@k needs"):
    evaluation.pass_at_k(n, c, k)


def test_pass_at_k_refuses_non_integers():
  with pytest.raises(TypeError):
    evaluation.pass_at_k(4.0, 1, 1)


def _numpy_vote(answers):
  """Transcription: counts and first positions by np.unique; most votes, then earliest."""
  present = [a for a in answers if a is not None]
  if not present:
    return None
  values, first, counts = np.unique(np.array(present, dtype=object).astype(str),
                                    return_index=True, return_counts=True)
  best = np.lexsort((first, -counts))[0]             # last key sorts first
  return present[first[best]]


def test_majority_vote_and_cons_at_k_on_random_tables():
  rng = np.random.default_rng(0)
  alphabet = np.array(["a", "b", "c", None], dtype=object)
  for _ in range(300):
    k = int(rng.integers(1, 9))
    answers = list(rng.choice(alphabet, size=k, p=[0.3, 0.25, 0.2, 0.25]))
    want = _numpy_vote(answers)
    assert evaluation.majority_vote(answers) == want
    flags = [a == "a" for a in answers]
    assert evaluation.cons_at_k(answers, flags) == float(want == "a")
    assert evaluation.cons_at_k(answers, lambda w: w == "a") == float(want == "a")


def test_majority_vote_rules():
  assert evaluation.majority_vote(["b", "a", "a", "b"]) == "b"          # tie: first to occur
  assert evaluation.majority_vote([None, "a", None, None, "b", "b"]) == "b"
  assert evaluation.majority_vote([None, None]) is None
  assert evaluation.majority_vote([]) is None
  assert evaluation.majority_vote([3, 3.0, 2]) == 3                     # equal keys vote together
  assert evaluation.majority_vote(["X", "y", "Y"], key=str.lower) == "y"
  assert evaluation.cons_at_k([None, None], [False, False]) == 0.0
  with pytest.raises(ValueError, match="correctness flags"):
    evaluation.cons_at_k(["a"], [True, False])
