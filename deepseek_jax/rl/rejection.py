"""Rejection sampling (DeepSeek-R1 sec. 2.3.3): a model's own correct completions as SFT data.

R1 samples several responses per prompt from an RL checkpoint, keeps only the
correct ones and fine-tunes on them (the same samples, from a larger model,
distil into smaller ones: sec. 2.4). Here the prompts are task problems
(data/tasks.py) and a completion is kept when it earns both of GRPO's
rule-based rewards (rl/rewards.py: `format_reward` and `accuracy`), and, with
canonical_only (default), when its answer is written exactly as the
reference (tasks.is_correct): accuracy accepts "007" or "7.0" for 7, but an
SFT record teaches its literal text and the held-out evaluation is exact
match, so such answers would teach the model to be marked wrong. A
completion holding a special token (<bos>, <pad>, <unk>, ...) is rejected
too: its text would re-encode as a control token inside the SFT document.

    records, stats = rejection_sample(cfg, variables, tok, problems, k=4,
                                      max_new_tokens=64, template="short")
    write_jsonl(records, "samples.jsonl")   # launch.train --config.data_files=...

Each record is {"prompt", "completion", "answer", "kind"}: `prompt` is
exactly `tasks.format_prompt(problem, template)` and `completion` the decoded
sample (without <eos>), so data.pipeline.load_documents reads the file as
SFT records and encodes a kept sample as `<bos> prompt completion <eos>`,
the same ids as the task's own documents (pipeline.encode_problem) when the
sample equals the worked solution.

With a judge (an LLM judge, rl.model_rewards.JudgeReward: DeepSeek-V3 uses
the model itself as a judge), only the samples it scores >= a threshold are
kept (`judge_records`).

Sampling is evaluate.completions (infer.generate in batches): deterministic
in `seed`. `launch/rejection_sample.py` is the command line.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import jax

from deepseek_jax.config import ModelConfig
from deepseek_jax.data import tasks
from deepseek_jax.data.tokenizer import Tokenizer
from deepseek_jax.files import atomic_write
from deepseek_jax.rl import rewards
from deepseek_jax.train import evaluate

# Why a sample was not kept, in the order they are checked (the first failing one counts).
REJECT_REASONS = ("special_tokens", "format", "answer", "noncanonical")


def verdict(completion: str, problem: tasks.Problem, *, canonical_only: bool = True
            ) -> str | None:
  """None when `completion` passes the checks, else the first reason
  (REJECT_REASONS, less special_tokens) it fails: GRPO's format and accuracy
  rewards must both be 1, and with canonical_only the answer must be the
  reference's exact text."""
  example = {"answer": problem.answer}
  if rewards.format_reward(completion, example) != 1.0:
    return "format"
  if rewards.accuracy(completion, example) != 1.0:
    return "answer"
  if canonical_only and not tasks.is_correct(completion, problem):
    return "noncanonical"
  return None


def special_ids(tok: Tokenizer) -> frozenset[int]:
  """Ids of the tokenizer's special tokens (<pad>, <bos>, <eos>, <unk>, FIM, ...)."""
  added = tok.hf.get_added_tokens_decoder()
  return frozenset({tok.pad_id, tok.bos_id, tok.eos_id}
                   | {i for i, t in added.items() if t.special})


def select(problems: Sequence[tasks.Problem], completions: Sequence[str], *, k: int,
           template: str = "short", keep_per_prompt: int | None = None, dedupe: bool = True,
           canonical_only: bool = True, has_special: Sequence[bool] | None = None
           ) -> tuple[list[dict[str, str]], dict[str, Any]]:
  """Records and stats from k sampled completions per problem.

  completions: len(problems) * k texts, problem i's at [i*k, (i+1)*k).
  has_special: per completion, whether its ids hold a special token
  (rejected as "special_tokens"). Kept completions keep their order; with
  dedupe a text already kept for the same prompt is dropped, and at most
  keep_per_prompt (None = all) are kept per prompt.
  """
  items = [(tasks.format_prompt(p, template), p.answer, tasks.kind_of(p)) for p in problems]
  return _select(items, completions, lambda i, text: verdict(
      text, problems[i], canonical_only=canonical_only), k=k, keep_per_prompt=keep_per_prompt,
      dedupe=dedupe, has_special=has_special)


def record_verdict(completion: str, answer: str, check, *, require_format: bool = True
                   ) -> str | None:
  """None when a completion of a prompt-file record passes, else the reason:
  "format" (with require_format: GRPO's format reward is not 1), "answer"
  (the verifier `check(completion, answer)` did not score 1.0)."""
  if require_format and rewards.format_reward(completion, {"answer": answer}) != 1.0:
    return "format"
  return None if check(completion, answer) == 1.0 else "answer"


def select_records(records: Sequence[Any], prompt_texts: Sequence[str],
                   completions: Sequence[str], *, k: int, check,
                   require_format: bool = True, keep_per_prompt: int | None = None,
                   dedupe: bool = True, has_special: Sequence[bool] | None = None
                   ) -> tuple[list[dict[str, str]], dict[str, Any]]:
  """`select` for prompt-file records (data.prompts.PromptRecord): a completion
  is kept when `record_verdict` passes it; each kept record's prompt is the
  rendered prompt text (prompt_texts[i], what the model read)."""
  items = [(t, r.answer, r.kind or "all") for r, t in zip(records, prompt_texts)]
  return _select(items, completions, lambda i, text: record_verdict(
      text, records[i].answer, check, require_format=require_format), k=k,
      keep_per_prompt=keep_per_prompt, dedupe=dedupe, has_special=has_special)


def _select(items: Sequence[tuple[str, str, str]], completions: Sequence[str], judge, *,
            k: int, keep_per_prompt: int | None, dedupe: bool,
            has_special: Sequence[bool] | None) -> tuple[list[dict[str, str]], dict[str, Any]]:
  """items: (prompt text, answer, kind) per prompt; judge(i, text) -> None
  (keep) or a rejection reason."""
  if k < 1:
    raise ValueError(f"k={k} must be >= 1.")
  if len(completions) != len(items) * k:
    raise ValueError(f"{len(completions)} completions for {len(items)} problems x k={k}.")
  if has_special is not None and len(has_special) != len(completions):
    raise ValueError(f"has_special has {len(has_special)} entries for {len(completions)} "
                     "completions.")
  if keep_per_prompt is not None and keep_per_prompt < 1:
    raise ValueError(f"keep_per_prompt={keep_per_prompt} must be >= 1 (or None: all).")
  records: list[dict[str, str]] = []
  rejected = dict.fromkeys(REJECT_REASONS, 0)
  kinds: dict[str, dict[str, int]] = {}
  n_accepted = n_duplicates = n_over_cap = prompts_with_kept = 0
  for i, (prompt, answer, kind) in enumerate(items):
    per_kind = kinds.setdefault(kind, {"n_prompts": 0, "n_sampled": 0, "n_accepted": 0,
                                       "n_kept": 0, "prompts_with_kept": 0})
    per_kind["n_prompts"] += 1
    kept: list[str] = []
    for j in range(i * k, (i + 1) * k):
      text = completions[j]
      per_kind["n_sampled"] += 1
      reason = ("special_tokens" if has_special is not None and has_special[j]
                else judge(i, text))
      if reason is not None:
        rejected[reason] += 1
        continue
      n_accepted += 1
      per_kind["n_accepted"] += 1
      if dedupe and text in kept:
        n_duplicates += 1
      elif keep_per_prompt is not None and len(kept) >= keep_per_prompt:
        n_over_cap += 1
      else:
        kept.append(text)
    records.extend({"prompt": prompt, "completion": c, "answer": answer, "kind": kind}
                   for c in kept)
    per_kind["n_kept"] += len(kept)
    per_kind["prompts_with_kept"] += bool(kept)
    prompts_with_kept += bool(kept)
  n_sampled = len(completions)
  for per_kind in kinds.values():
    per_kind["acceptance"] = per_kind["n_accepted"] / per_kind["n_sampled"]
  stats = {
      "n_prompts": len(items), "k": k, "n_sampled": n_sampled,
      "n_accepted": n_accepted, "acceptance": n_accepted / n_sampled if n_sampled else 0.0,
      "n_kept": len(records), "n_duplicates": n_duplicates, "n_over_cap": n_over_cap,
      "prompts_with_kept": prompts_with_kept,
      "prompts_with_kept_share": prompts_with_kept / len(items) if items else 0.0,
      "rejected": rejected,
      "by_kind": dict(sorted(kinds.items())),
  }
  return records, stats


def rejection_sample(model_cfg: ModelConfig, variables: Any, tokenizer: Tokenizer,
                     problems: Sequence[Any], *, k: int, max_new_tokens: int,
                     temperature: float = 1.0, template: str = "short", seed: int = 0,
                     batch_size: int = 64, keep_per_prompt: int | None = None,
                     dedupe: bool = True, canonical_only: bool = True, mesh=None,
                     prompt_format=None, check=None, require_format: bool = True,
                     judge=None, judge_threshold: float = 0.5
                     ) -> tuple[list[dict[str, str]], dict[str, Any]]:
  """Samples k completions per problem and keeps those that pass (`select`).

  Every problem's prompt `<bos> format_prompt(problem, template)` is repeated
  k times (in order) and decoded by evaluate.completions at `temperature`
  with rng jax.random.key(seed), batch_size rows at a time, up to
  max_new_tokens (lowered so the longest prompt plus it fits the model's
  max_seq_len; stats["max_new_tokens"] is the value used). temperature 0 is
  greedy: then only k=1 makes sense. mesh: the mesh `variables` live on.

  Prompt-file records instead of task problems: `problems` are
  data.prompts.PromptRecords, `prompt_format` (a data.prompts.PromptFormat)
  renders them, `check` is the verifier (completion, answer) -> score and a
  completion is kept by `select_records` (require_format: also GRPO's format
  reward).

  judge: also keep only what the judge accepts (`judge_records`, scores >=
  judge_threshold), after the checks above; stats gain its counts and
  n_kept counts the records the judge kept.

  Returns (records, stats); stats as `select`'s plus temperature, seed and
  max_new_tokens. Raises ValueError for bad arguments before compiling.
  """
  if not problems:
    raise ValueError("no problems to sample from.")
  if not isinstance(k, int) or k < 1:
    raise ValueError(f"k={k!r} must be an integer >= 1.")
  if not (math.isfinite(temperature) and temperature >= 0):
    raise ValueError(f"temperature={temperature} must be a finite number >= 0.")
  if temperature == 0 and k > 1:
    raise ValueError(f"temperature=0 (greedy) gives k={k} identical completions; use "
                     "temperature > 0, or k=1.")
  if batch_size < 1 or max_new_tokens < 1:
    raise ValueError(f"batch_size={batch_size} and max_new_tokens={max_new_tokens} must be "
                     ">= 1.")
  if keep_per_prompt is not None and keep_per_prompt < 1:
    raise ValueError(f"keep_per_prompt={keep_per_prompt} must be >= 1 (or None: all).")
  if not 0 <= judge_threshold <= 1:
    raise ValueError(f"judge_threshold={judge_threshold} must lie in [0, 1].")
  if prompt_format is not None:
    if check is None:
      raise ValueError("prompt-file records need check=<a verifier> (rl.verifiers.get(name)).")
    from deepseek_jax.data import prompts as prompts_lib
    texts = [prompt_format.text(r) for r in problems]
    prompts = prompts_lib.encode_records(tokenizer, problems, prompt_format)
  else:
    prompts = evaluate.encode_prompts(tokenizer, problems, template)
  new = evaluate.eval_max_new_tokens(prompts, max_new_tokens, model_cfg.max_seq_len)
  repeated = [p for p in prompts for _ in range(k)]
  ids = evaluate.completions(model_cfg, variables, repeated, max_new_tokens=new,
                             eos_id=tokenizer.eos_id, batch_size=batch_size,
                             temperature=temperature, rng=jax.random.key(seed), mesh=mesh)
  special = special_ids(tokenizer)
  decoded = [tokenizer.decode(s) for s in ids]
  has_special = [any(t in special for t in s) for s in ids]
  if prompt_format is not None:
    records, stats = select_records(problems, texts, decoded, k=k, check=check,
                                    require_format=require_format,
                                    keep_per_prompt=keep_per_prompt, dedupe=dedupe,
                                    has_special=has_special)
  else:
    records, stats = select(problems, decoded, k=k, template=template,
                            keep_per_prompt=keep_per_prompt, dedupe=dedupe,
                            canonical_only=canonical_only, has_special=has_special)
  stats.update(temperature=float(temperature), seed=seed, max_new_tokens=new)
  if judge is not None:
    records, judged = judge_records(records, judge, judge_threshold)
    stats.update(judged, n_kept=len(records))
  return records, stats


def judge_records(records: list[dict[str, str]], judge, threshold: float = 0.5
                  ) -> tuple[list[dict[str, str]], dict[str, Any]]:
  """The records a judge accepts (DeepSeek-V3 uses the model as a judge in
  rejection sampling): `judge` (rl.model_rewards.JudgeReward or any
  score_batch(completions, examples)) scores every kept record at once; a
  record stays when its score is >= threshold. An unparsable verdict
  (None) rejects the record and is counted. Returns (kept, stats:
  judge_rejected, judge_unparsable, judge_mean_score over the parsed ones)."""
  if not 0 <= threshold <= 1:
    raise ValueError(f"judge threshold={threshold} must lie in [0, 1] (scores are 0..1).")
  if not records:
    return [], {"judge_rejected": 0, "judge_unparsable": 0, "judge_mean_score": None}
  scores = judge.score_batch([r["completion"] for r in records],
                             [{"prompt": r["prompt"], "answer": r.get("answer", "")}
                              for r in records])
  kept = [r for r, v in zip(records, scores) if v is not None and v >= threshold]
  parsed = [v for v in scores if v is not None]
  return kept, {"judge_rejected": len(records) - len(kept),
                "judge_unparsable": sum(v is None for v in scores),
                "judge_mean_score": sum(parsed) / len(parsed) if parsed else None}


def write_jsonl(records: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> int:
  """Writes one JSON object per line to `path` atomically (files.atomic_write:
  a reader never sees half a file, an interrupted write leaves the old file);
  creates the directory. Returns the number of records written."""
  path = os.fspath(path)
  if os.path.isdir(path):
    raise ValueError(f"{path!r} is a directory; give the path of the .jsonl file to write.")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  lines = [json.dumps(record, ensure_ascii=False) + "\n" for record in records]

  def write(tmp: str) -> None:
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(lines)
      f.flush()
      os.fsync(f.fileno())
  atomic_write(path, write)
  return len(lines)
