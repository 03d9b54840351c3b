"""Generate text with a trained run or an HF checkpoint.

  # the README demo's run: its latest checkpoint, its tokenizer and prompt template
  python -m launch.generate --workdir=/tmp/demo --prompt="12+34"
  python -m launch.generate --workdir=/tmp/demo --prompt="7*8" --prompt="90-45" \
      --temperature=0.7 --top_p=0.9 --seed=1
  # an HF DeepSeek-V3 directory (tokenizer.json inside, or --tokenizer=PATH)
  python -m launch.generate --from_hf=DIR --prompt="The capital of France is"
  # prompts from a JSONL file: {"prompt": "..."} or {"tokens": [1, 2, 3]} per line
  python -m launch.generate --workdir=/tmp/demo --prompts_file=prompts.jsonl --speculative
  # bfloat16 weights and activations (float32 router, norms, softmax and logits)
  python -m launch.generate --workdir=/tmp/demo --prompt="12+34" --dtype=bfloat16
  # YaRN by config (RoPE scaled, no weights change): meant for runs fine-tuned with it
  # (launch/configs/long_context.py); on a run trained without it, answers change
  python -m launch.generate --workdir=/tmp/demo_long1 --prompt="12+34" --max_seq_len=1024

One prompt streams its text as it is generated; a batch prints each row's
completion as soon as that row stops. The last line gives generated tokens
per second of the decode phase (after compilation) and, with --speculative,
the MTP drafts' acceptance rate. Bad flags, files or prompts exit non-zero
with the reason before anything compiles.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

from launch.checkpoint_flags import define_checkpoint_flags
from launch.config_flag import begin_main

_CHECKPOINT = define_checkpoint_flags()
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt (repeat for a batch).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "JSONL: {\"prompt\": text} or "
                                    "{\"tokens\": [ids]} per line.")
_TEMPLATE = flags.DEFINE_string("template", None, "Wrap text prompts in a task template "
                                "(short, r1) or 'none' (default: the run's template with "
                                "--workdir, none with --from_hf).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
_MIN_P = flags.DEFINE_float("min_p", 0.0, "Drop tokens below min_p x the top probability.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_SPECULATIVE = flags.DEFINE_bool("speculative", False, "Draft with MTP module 1, verify "
                                 "with the main model (needs n_mtp_depth >= 1).")
_NO_STOP = flags.DEFINE_bool("no_stop", False, "Do not stop at the tokenizer's <eos>.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Weights and activations for generation: bfloat16 halves the "
                           "bytes a step reads (router, norms, softmax, logits stay float32).")
_MAX_SEQ_LEN = flags.DEFINE_integer(
    "max_seq_len", None, "Extend the context at inference: with --rope_factor, YaRN-scales "
    "RoPE beyond the model's original_seq_len (V2/V3 sec. on long context).")
_ROPE_FACTOR = flags.DEFINE_float("rope_factor", None, "YaRN scaling factor (see --max_seq_len).")


def _fail(msg: str):
  sys.exit(f"launch.generate: error: {msg}")


def _read_prompts_file(path: str) -> list:
  if not os.path.isfile(path):
    _fail(f"--prompts_file {path!r} does not exist.")
  out = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        _fail(f"{path}:{n}: not valid JSON ({e.msg}).")
      if isinstance(row, dict) and isinstance(row.get("prompt"), str):
        out.append(row["prompt"])
      elif isinstance(row, dict) and isinstance(row.get("tokens"), list):
        out.append([int(t) for t in row["tokens"]])
      else:
        _fail(f"{path}:{n}: each line needs {{\"prompt\": \"text\"}} or "
              "{\"tokens\": [ids]}.")
  return out


def _load():
  """(cfg, variables, tokenizer, template) from --workdir or --from_hf."""
  cfg, variables, tok, _, template = _CHECKPOINT.load()
  changes = {k: f.value for k, f in (("max_seq_len", _MAX_SEQ_LEN), ("rope_factor", _ROPE_FACTOR))
             if f.value is not None}
  if changes:
    cfg = cfg.replace(**changes)
    print(f"context: max_seq_len={cfg.max_seq_len}, original_seq_len={cfg.original_seq_len}, "
          f"rope_factor={cfg.rope_factor} (YaRN {'on' if cfg.use_yarn else 'off'})",
          file=sys.stderr)
  return cfg, variables, tok, _TEMPLATE.value or template


def _encode(prompts, tok, template):
  from deepseek_jax.data import tasks
  ids = []
  for p in prompts:
    if isinstance(p, list):
      ids.append(p)
      continue
    if tok is None:
      _fail("text prompts need a tokenizer: pass --tokenizer=tokenizer.json, or give "
            "token ids in --prompts_file ({\"tokens\": [...]}).")
    if template != "none":
      if template not in tasks.TEMPLATES:
        _fail(f"--template={template!r} must be one of {tuple(tasks.TEMPLATES)} or 'none'.")
      p = tasks.TEMPLATES[template].format(prompt=p)
    ids.append(tok.encode(p, add_bos=True))
  return ids


def main(argv):
  begin_main(argv, "launch.generate")
  prompts = list(_PROMPT.value)
  if _PROMPTS_FILE.value:
    prompts += _read_prompts_file(_PROMPTS_FILE.value)
  if not prompts:
    _fail("no prompts: pass --prompt=... (repeatable) or --prompts_file=F.jsonl.")
  for i, p in enumerate(prompts):
    if not p or (isinstance(p, str) and not p.strip()):
      _fail(f"prompt {i} is empty: every prompt needs text (or at least one token id in "
            "--prompts_file).")
  try:
    cfg, variables, tok, template = _load()
  except (FileNotFoundError, ValueError) as e:
    _fail(str(e))
  ids = _encode(prompts, tok, template)
  import jax
  from deepseek_jax.infer import decode
  stop = () if _NO_STOP.value or tok is None else (tok.eos_id,)
  kw = dict(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
            top_p=_TOP_P.value, min_p=_MIN_P.value, stop_ids=stop,
            rng=jax.random.key(_SEED.value), speculative=_SPECULATIVE.value)
  try:
    decode.check_request(cfg, ids, kw["max_new_tokens"], kw["temperature"], kw["top_k"],
                         kw["top_p"], kw["min_p"], stop, kw["speculative"])
  except (ValueError, NotImplementedError) as e:
    _fail(str(e))

  def text(row):
    row = [t for t in row if t not in stop]
    return tok.decode(row) if tok is not None else " ".join(map(str, row))

  single = len(ids) == 1
  rows = [[] for _ in ids]
  printed = [0] * len(ids)
  finished = [False] * len(ids)
  def show(i):
    shown = prompts[i] if isinstance(prompts[i], str) else ids[i]
    print(f"[{i}] {shown!r} -> {text(rows[i])!r}", flush=True)
    finished[i] = True

  # cast once here (stream's own cast of weights already in dtype is free)
  cfg, variables = decode.inference_model(cfg, variables, _DTYPE.value)
  t0 = time.perf_counter()
  t_decode, n_before, yields = None, 0, 0
  it = decode.stream(cfg, variables, ids, dtype=_DTYPE.value, **kw)
  try:
    while True:
      new = next(it)
      yields += 1
      for i, toks in enumerate(new):
        rows[i] += toks
      if yields == 2:        # prefill and the first step (both compiled) are behind us
        t_decode, n_before = time.perf_counter(), sum(len(r) for r in rows)
      if single:
        s = text(rows[0])
        sys.stdout.write(s[printed[0]:])
        sys.stdout.flush()
        printed[0] = len(s)
      else:
        for i, row in enumerate(rows):
          if not finished[i] and row and (row[-1] in stop or len(row) >= _MAX_NEW.value):
            show(i)
  except StopIteration as stop_it:
    gen = stop_it.value
  t_end = time.perf_counter()
  if single:
    print()
  for i in range(len(rows)):
    if not single and not finished[i]:
      show(i)
  n_tokens = int(gen.lengths.sum())
  line = f"{n_tokens} tokens ({len(ids)} prompts) in {t_end - t0:.2f} s"
  if t_decode is not None and t_end > t_decode:
    rate = (n_tokens - n_before) / (t_end - t_decode)
    line += f"; decode {rate:,.1f} tokens/s (after compilation)"
  if _SPECULATIVE.value:
    line += f"; MTP drafts accepted {gen.accepted}/{gen.drafted} ({gen.acceptance_rate:.0%})"
  print(line, file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
