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

These are pure Python + NumPy, on host-side results. `evaluate_prompts`
runs a model over prompt records (the greedy completion and `samples`
sampled ones per prompt) and reports all of them, overall and per `kind`:
launch.evaluate and the GRPO trainer's periodic evaluation both call it.
"""

from __future__ import annotations

import dataclasses
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


# ----------------------------------------------------------------------------
# Running a model over prompt records


def pass_ks(samples: int) -> tuple[int, ...]:
  """The k of pass@k reported for `samples` samples: 1, 2, 4, ... and samples."""
  return tuple(sorted({1 << i for i in range(samples.bit_length()) if 1 << i <= samples}
                      | {samples}))


@dataclasses.dataclass
class PromptScores:
  """Per prompt: its greedy completion's score (None without greedy
  decoding), its sampled completions' scores (1.0 / 0.0, None = unscored) and
  answer keys, and its kind."""

  kind: str
  greedy: float | None
  scores: list[float | None]
  keys: list[Hashable | None]


def summarize(rows: Sequence[PromptScores], samples: int) -> dict[str, float]:
  """greedy_accuracy, pass@k (k in pass_ks), cons@samples, unscored over rows.

  An unscored sample (None) counts as wrong in pass@k (it did not give a
  right answer) and is reported in `unscored` (the share of samples)."""
  out: dict[str, float] = {"n": float(len(rows))}
  if not rows:
    return out
  if rows[0].greedy is not None:
    out["greedy_accuracy"] = float(np.mean([r.greedy or 0.0 for r in rows]))
  if samples:
    table = [[s == 1.0 for s in r.scores] for r in rows]
    for k in pass_ks(samples):
      out[f"pass@{k}"] = mean_pass_at_k(table, k)
    out[f"cons@{samples}"] = float(np.mean([cons_at_k(r.keys, row)
                                            for r, row in zip(rows, table)]))
    out["unscored"] = float(np.mean([s is None for r in rows for s in r.scores]))
  return out


def _texts(cfg, variables, tok, prompt_ids, *, max_new_tokens, batch_size, temperature,
           top_p, rng, mesh) -> list[str]:
  from deepseek_jax.train import evaluate
  new = evaluate.eval_max_new_tokens(prompt_ids, max_new_tokens, cfg.max_seq_len)
  return [tok.decode(ids) for ids in evaluate.completions(
      cfg, variables, prompt_ids, max_new_tokens=new, eos_id=tok.eos_id,
      batch_size=batch_size, temperature=temperature, top_p=top_p, rng=rng, mesh=mesh)]


def evaluate_prompts(cfg, variables, tok, records: Sequence[Any],
                     prompt_ids: Sequence[Sequence[int]], *,
                     score: Callable[[str, Any], float | None],
                     answer_key: Callable[[str], Hashable | None], samples: int,
                     greedy: bool = True, temperature: float = 0.6, top_p: float = 0.95,
                     max_new_tokens: int, batch_size: int, rng=None, mesh=None
                     ) -> dict[str, Any]:
  """R1-style evaluation of a model over prompt records (`data.prompts.PromptRecord`
  or anything with .prompt / .answer / .kind).

  Decodes each prompt greedily (if `greedy`) and `samples` times at
  temperature / top_p (rng: a key; the sampled prompts run as the whole list
  repeated `samples` times, in batches of batch_size), scores every
  completion with score(text, record) (1.0 right; None = could not score)
  and groups answers by answer_key(text) for the majority vote.
  Returns {"overall": summarize(...), "by_kind": {kind: summarize(...)},
  "completions": per prompt {prompt, answer, kind, greedy, sampled, scores}}.
  """
  if samples < 0 or (samples == 0 and not greedy):
    raise ValueError(f"samples={samples}: evaluate at least one completion per prompt "
                     "(samples >= 1, or greedy=True).")
  if samples and rng is None:
    raise ValueError("sampled evaluation (samples >= 1) needs rng=jax.random.key(...).")
  kw = dict(max_new_tokens=max_new_tokens, batch_size=min(batch_size, len(prompt_ids)),
            mesh=mesh)
  n = len(records)
  greedy_texts = (_texts(cfg, variables, tok, prompt_ids, temperature=0.0, top_p=1.0, rng=None,
                         **kw) if greedy else [None] * n)
  sampled = (_texts(cfg, variables, tok, list(prompt_ids) * samples, temperature=temperature,
                    top_p=top_p, rng=rng, **kw) if samples else [])
  rows, completions = [], []
  for i, r in enumerate(records):
    texts = sampled[i::n] if samples else []
    scores = [score(t, r) for t in texts]
    rows.append(PromptScores(r.kind or "all", None if not greedy else score(greedy_texts[i], r),
                             scores, [answer_key(t) for t in texts]))
    completions.append({"prompt": r.prompt, "answer": r.answer, "kind": r.kind,
                        "greedy": greedy_texts[i], "greedy_score": rows[-1].greedy,
                        "sampled": texts, "scores": scores})
  kinds = sorted({row.kind for row in rows})
  return {"overall": summarize(rows, samples),
          "by_kind": {k: summarize([row for row in rows if row.kind == k], samples)
                      for k in kinds},
          "completions": completions}
