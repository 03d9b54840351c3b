"""Held-out exact-match accuracy by greedy (or sampled) decoding.

For each test problem the model reads `<bos> prompt` and writes the
completion until <eos> (greedily; `temperature` > 0 samples, what GRPO's
"sampled accuracy" reports); the completion is scored with the task's rule-based
check (`data.tasks.is_correct`: the text inside <answer>...</answer> equals
the reference answer) and the format check (`format_ok`).

Decoding is `deepseek_jax.infer.generate` (prefill, then the absorbed-MLA
latent cache, one token per step), the same sampler users and the GRPO
rollouts call, in batches of `batch_size` prompts (the last one padded with
copies of the first, so shapes repeat and compilations are shared).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.data import pipeline, tasks
from deepseek_jax.data.tokenizer import Tokenizer
from deepseek_jax.infer import generate


def eval_max_new_tokens(prompts: Sequence[Sequence[int]], max_new_tokens: int,
                        max_seq_len: int) -> int:
  """max_new_tokens, lowered so the longest prompt plus it fits max_seq_len."""
  room = max_seq_len - max(len(p) for p in prompts)
  if room < 1:
    raise ValueError(f"an eval prompt of {max_seq_len - room} tokens leaves no room to "
                     f"generate within max_seq_len={max_seq_len}.")
  return min(max_new_tokens, room)


def completions(cfg: ModelConfig, variables: Any, prompts: Sequence[Sequence[int]], *,
                max_new_tokens: int, eos_id: int, batch_size: int, temperature: float = 0.0,
                top_p: float = 1.0, rng=None, mesh=None) -> list[list[int]]:
  """Completion of every prompt (without its <eos>), batch by batch: greedy
  at temperature 0, else sampled (rng: a key, split per batch; top_p the
  nucleus filter).
  mesh: the mesh `variables` live on (multi-host runs: every process gets
  the same completions)."""
  if temperature > 0 and rng is None:
    raise ValueError("sampled completions (temperature > 0) need rng=jax.random.key(...).")
  out: list[list[int]] = []
  for start in range(0, len(prompts), batch_size):
    chunk = list(prompts[start:start + batch_size])
    n_real = len(chunk)
    chunk += [prompts[0]] * (batch_size - n_real)
    key = None if rng is None else jax.random.fold_in(rng, start)
    gen = generate(cfg, variables, chunk, max_new_tokens=max_new_tokens, stop_ids=(eos_id,),
                   temperature=temperature, top_p=top_p, rng=key, mesh=mesh)
    for ids in gen.sequences()[:n_real]:
      out.append(ids[:-1] if ids and ids[-1] == eos_id else ids)
  return out


def greedy_completions(cfg: ModelConfig, variables: Any, prompts: Sequence[Sequence[int]], *,
                       max_new_tokens: int, eos_id: int, batch_size: int,
                       mesh=None) -> list[list[int]]:
  """`completions` at temperature 0."""
  return completions(cfg, variables, prompts, max_new_tokens=max_new_tokens, eos_id=eos_id,
                     batch_size=batch_size, mesh=mesh)


def encode_prompts(tok: Tokenizer, problems: Sequence[tasks.Problem], template: str
                   ) -> list[list[int]]:
  return [pipeline.encode_prompt(tok, p, template) for p in problems]


def exact_match(variables: Any, tok: Tokenizer, problems: Sequence[tasks.Problem],
                cfg: ModelConfig, *, max_new_tokens: int, batch_size: int,
                template: str = "short", mesh=None, temperature: float = 0.0,
                rng=None) -> dict[str, Any]:
  """Decodes every problem (greedy, or sampled at `temperature` with `rng`);
  returns accuracy, format rate, accuracy per problem kind (`by_kind`,
  tasks.kind_of) and samples."""
  prompts = encode_prompts(tok, problems, template)
  new = eval_max_new_tokens(prompts, max_new_tokens, cfg.max_seq_len)
  texts = [tok.decode(ids) for ids in completions(
      cfg, variables, prompts, max_new_tokens=new, eos_id=tok.eos_id,
      batch_size=batch_size, temperature=temperature, rng=rng, mesh=mesh)]
  correct = [tasks.is_correct(c, p) for c, p in zip(texts, problems)]
  well_formed = [tasks.format_ok(c) for c in texts]
  return {
      "accuracy": float(np.mean(correct)) if correct else 0.0,
      "format_ok": float(np.mean(well_formed)) if well_formed else 0.0,
      "n": len(problems),
      "by_kind": {k: float(np.mean([ok for ok, p in zip(correct, problems)
                                    if tasks.kind_of(p) == k]))
                  for k in sorted({tasks.kind_of(p) for p in problems})},
      "samples": [{"prompt": p.prompt, "answer": p.answer, "completion": c, "correct": ok}
                  for p, c, ok in zip(problems, texts, correct)],
  }
