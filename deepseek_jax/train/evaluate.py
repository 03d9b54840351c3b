"""Held-out exact-match accuracy by greedy decoding.

For each test problem the model reads `<bos> prompt` and greedily writes the
completion until <eos>; the completion is scored with the task's rule-based
check (`data.tasks.is_correct`: the text inside <answer>...</answer> equals
the reference answer) and the format check (`format_ok`).

Decoding is deliberately simple: a fixed-length token buffer [batch, length]
(prompts right-padded), and at every step the full forward pass over the
whole buffer, reading the logits at each row's last written position. The
causal mask makes the unwritten tail irrelevant, so every step sees exactly
`prompt + generated so far`. One `jax.lax.while_loop` under `jit` runs all
steps, compiled once per (batch, length). A KV-cached sampler (rl/sampler.py)
replaces the O(length) recompute later.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax.config import ModelConfig
from deepseek_jax.data import pipeline, tasks
from deepseek_jax.data.tokenizer import Tokenizer
from deepseek_jax.model import Transformer
from deepseek_jax.parallel import distributed


def make_greedy_decoder(cfg: ModelConfig, length: int, max_new_tokens: int, eos_id: int,
                        *, compiler_options: dict[str, Any] | None = None,
                        mesh: jax.sharding.Mesh | None = None
                        ) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """jit(decode)(variables, tokens [b, length] int32, prompt_lens [b] int32).

  mesh: the mesh the variables live on (possibly spanning processes): the
  host inputs are replicated over it and the outputs come back replicated,
  so every process can read them. The MoE runs its plain (GSPMD-partitioned)
  dispatch here, not the shard_map one: eval batches need not divide the mesh.

  Returns (tokens with the completions written after each prompt,
  end [b]: index one past each row's last token). A row stops after writing
  <eos>, after `max_new_tokens`, or at the end of the buffer.
  """
  if length > cfg.max_seq_len:
    raise ValueError(f"decode length {length} exceeds max_seq_len={cfg.max_seq_len}; "
                     "lower max_new_tokens or shorten the prompts.")
  model = Transformer(cfg)

  def decode(variables, tokens, prompt_lens):
    b = tokens.shape[0]
    rows = jnp.arange(b)

    def cond(carry):
      t, _, _, done = carry
      return (t < max_new_tokens) & ~jnp.all(done)

    def body(carry):
      t, tokens, end, done = carry
      logits = model.apply(variables, tokens)                  # [b, length, V]
      nxt = jnp.argmax(logits[rows, end - 1], axis=-1).astype(tokens.dtype)  # [b]
      write = ~done
      tokens = tokens.at[rows, jnp.minimum(end, length - 1)].set(
          jnp.where(write, nxt, tokens[rows, jnp.minimum(end, length - 1)]))
      end = jnp.where(write, end + 1, end)
      done = done | (write & (nxt == eos_id)) | (end >= length)
      return t + 1, tokens, end, done

    done0 = prompt_lens >= length
    init = (jnp.zeros((), jnp.int32), tokens, prompt_lens, done0)
    _, tokens, end, _ = jax.lax.while_loop(cond, body, init)
    return tokens, end

  if mesh is None:
    return jax.jit(decode, compiler_options=compiler_options)
  replicated = NamedSharding(mesh, P())
  jitted = jax.jit(decode, compiler_options=compiler_options,
                   out_shardings=(replicated, replicated))

  def on_mesh(variables, tokens, prompt_lens):
    return jitted(variables, *distributed.replicate((tokens, prompt_lens), mesh))
  return on_mesh


def encode_prompts(tok: Tokenizer, problems: Sequence[tasks.Problem], template: str
                   ) -> list[list[int]]:
  return [pipeline.encode_prompt(tok, p, template) for p in problems]


def decode_length(prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  max_seq_len: int) -> int:
  """Buffer length: longest prompt + max_new_tokens, at most max_seq_len."""
  return min(max(len(p) for p in prompts) + max_new_tokens, max_seq_len)


def exact_match(variables: Any, tok: Tokenizer, problems: Sequence[tasks.Problem],
                decoder: Callable, *, length: int, batch_size: int,
                template: str = "short") -> dict[str, Any]:
  """Greedy-decodes every problem; returns accuracy, format rate and samples.

  `decoder` comes from `make_greedy_decoder(cfg, length, ...)`. The last
  batch is padded with copies of the first prompt so that every call has the
  same shape (one compilation).
  """
  prompts = encode_prompts(tok, problems, template)
  completions: list[str] = []
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start:start + batch_size]
    n_real = len(chunk)
    chunk = chunk + [prompts[0]] * (batch_size - n_real)
    buf = np.full((batch_size, length), tok.pad_id, np.int32)
    lens = np.zeros((batch_size,), np.int32)
    for i, p in enumerate(chunk):
      if len(p) >= length:
        raise ValueError(f"prompt of {len(p)} tokens does not fit decode length {length}.")
      buf[i, :len(p)] = p
      lens[i] = len(p)
    out, end = jax.device_get(decoder(variables, buf, lens))
    for i in range(n_real):
      ids = out[i, lens[i]:end[i]].tolist()
      if ids and ids[-1] == tok.eos_id:
        ids = ids[:-1]
      completions.append(tok.decode(ids))
  correct = [tasks.is_correct(c, p) for c, p in zip(completions, problems)]
  well_formed = [tasks.format_ok(c) for c in completions]
  return {
      "accuracy": float(np.mean(correct)) if correct else 0.0,
      "format_ok": float(np.mean(well_formed)) if well_formed else 0.0,
      "n": len(problems),
      "samples": [{"prompt": p.prompt, "answer": p.answer, "completion": c, "correct": ok}
                  for p, c, ok in zip(problems, completions, correct)],
  }
