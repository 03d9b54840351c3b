"""Preference pairs for reward models and DPO: files, records and batches.

A preference file holds one record per JSON line (`.jsonl` / `.json`) or
parquet row (`.parquet`):

  prompt    the user turn (string, required, not blank)
  chosen    the preferred response (string, required, not blank)
  rejected  the dispreferred response (string, required, not blank, and not
            the same text as `chosen`: such a pair teaches nothing, and is
            almost always a data bug)
  kind      optional label; metrics are reported per kind
  system    optional system turn
Other fields are ignored (the shipped example also writes `answer`, so its
files load as prompt files too). Responses are plain text, the assistant
turn only; conversational records (lists of messages) are refused with a
hint to write the assistant turn's text.

`load_preference_files(paths)` reads them; every error names the file and
line (or parquet row) before anything compiles, in the style of
data/prompts.py. The prompt is rendered by a `prompts.PromptFormat` (a
chat template, "short" / "r1", or "none"; `prompts.resolve_format` picks
one), exactly as prompt files are.

`encode_pairs(tok, records, fmt, seq_len=...)` turns n records into 2n rows,
interleaved: row 2i is pair i's chosen response, row 2i+1 its rejected one
(`split_pairs` undoes it), so both halves of a pair stay on one data shard
(a shard of the rows holds whole pairs when the pairs per batch are a
multiple of the shards). `encode_responses(tok, prompts, responses, fmt,
seq_len=...)` makes the same rows for single (prompt, response) documents:
what a trained reward model scores (rl/preference_trainer.py).
Each row is the document `<bos> prompt response <eos>` (no <bos> when the
chat template writes it) in a row of seq_len + 1 ids, right-padded, split
like data/pipeline.py's packed rows into inputs and next-token targets.
Every array is [2n, seq_len]:

    tokens         int32    model input ids (row[:-1])
    targets        int32    the next id after each input position (row[1:])
    segment_ids    int32    1 on the document, 0 on padding
    positions      int32    0, 1, 2, ... on the document, 0 on padding
    response_mask  float32  1 where targets[j] is a response token or the
                            final <eos>; 0 on the prompt and on padding

Example, seq_len=7, prompt [b p q], response [x y] (b=<bos>, e=<eos>, .=pad):

    row            b  p  q  x  y  e  .  .
    tokens         b  p  q  x  y  e  .        targets  p  q  x  y  e  .  .
    segment_ids    1  1  1  1  1  1  0        positions 0 1 2 3 4 5 0
    response_mask  0  0  1  1  1  0  0

The last 1 of response_mask sits at the last response token (its target is
<eos>): where the reward model reads its score (rl/reward_model.py). Prompt
and response are tokenized separately (as pipeline.encode_sft), so no id
straddles the boundary and both rows of a pair share the prompt's ids.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, Sequence

import numpy as np

from deepseek_jax.data.pipeline import _open_parquet, _parquet_strings
from deepseek_jax.data.prompts import PromptFormat, PromptRecord, read_record_files

PREFERENCE_FIELDS = ("prompt", "chosen", "rejected", "kind", "system")
REQUIRED_FIELDS = ("prompt", "chosen", "rejected")
PAIR_DTYPES = {
    "tokens": np.int32,
    "targets": np.int32,
    "segment_ids": np.int32,
    "positions": np.int32,
    "response_mask": np.float32,
}
_FIELDS_HINT = ("a preference record needs 'prompt', 'chosen' and 'rejected' (optional "
                "'kind', 'system')")


@dataclasses.dataclass(frozen=True)
class PreferenceRecord:
  """One preference pair: a prompt, the chosen and the rejected response, an
  optional kind and system turn. `where` is "file:line" (or "file: row N")."""

  prompt: str
  chosen: str
  rejected: str
  kind: str = ""
  system: str = ""
  where: str = ""

  def prompt_record(self) -> PromptRecord:
    """The prompt half, as `PromptFormat.text` reads it."""
    return PromptRecord(prompt=self.prompt, answer="", kind=self.kind, system=self.system,
                        where=self.where)


def _preference_record(where: str, record: Any) -> PreferenceRecord:
  if not isinstance(record, dict):
    raise ValueError(f"{where}: expected a JSON object with fields 'prompt', 'chosen' and "
                     f"'rejected', got {type(record).__name__}")
  missing = [f for f in REQUIRED_FIELDS if record.get(f) is None]
  if missing:
    raise ValueError(f"{where}: missing field(s) {missing} (fields present: "
                     f"{sorted(k for k, v in record.items() if v is not None)}); "
                     + _FIELDS_HINT)
  for f in PREFERENCE_FIELDS:
    value = record.get(f)
    if value is not None and not isinstance(value, str):
      hint = ("; conversational records are not read: write the assistant turn's text"
              if f in ("chosen", "rejected") and isinstance(value, (list, dict)) else "")
      raise ValueError(f"{where}: field {f!r} is a {type(value).__name__}, expected a "
                       f"string{hint}")
  for f in REQUIRED_FIELDS:
    if not record[f].strip():
      raise ValueError(f"{where}: field {f!r} is empty")
  if record["chosen"] == record["rejected"]:
    raise ValueError(f"{where}: 'chosen' and 'rejected' are the same text, so the pair "
                     "prefers nothing; drop the record")
  return PreferenceRecord(prompt=record["prompt"], chosen=record["chosen"],
                          rejected=record["rejected"], kind=record.get("kind") or "",
                          system=record.get("system") or "", where=where)


def _parquet_records(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
  with _open_parquet(path) as pf:
    names = pf.schema_arrow.names
    missing = [f for f in REQUIRED_FIELDS if f not in names]
    if missing:
      raise ValueError(f"{path}: no column(s) {missing}; its columns are {names}; a "
                       "preference file needs columns 'prompt', 'chosen' and 'rejected' "
                       "(optional 'kind', 'system')")
    columns = {f: _parquet_strings(pf, path, f) for f in PREFERENCE_FIELDS if f in names}
  for row in range(len(columns["prompt"])):
    yield f"{path}: row {row} (0-based)", {f: c[row] for f, c in columns.items()}


def load_preference_files(paths: str | os.PathLike | Sequence[str | os.PathLike]
                          ) -> list[PreferenceRecord]:
  """The records of every file, in order; ValueError when there are none."""
  return read_record_files(paths, what="preference",
                           fields="'prompt', 'chosen' and 'rejected'",
                           parquet_rows=_parquet_records, make=_preference_record)


# ----------------------------------------------------------------------------
# Batches


def encode_pairs(tok, records: Sequence[PreferenceRecord], fmt: PromptFormat, *,
                 seq_len: int, pad_id: int | None = None) -> dict[str, np.ndarray]:
  """The module docstring's arrays, [2 * len(records), seq_len]: rows 2i and
  2i+1 are record i's chosen and rejected documents, right-padded with
  `pad_id` (default the tokenizer's). A document longer than seq_len + 1 ids
  is an error naming its record and the seq_len it needs."""
  if not records:
    raise ValueError("encode_pairs needs at least one preference record")
  prompts = [r.prompt_record() for r in records]
  return encode_responses(tok, prompts, [t for r in records for t in (r.chosen, r.rejected)],
                          fmt, seq_len=seq_len, pad_id=pad_id, repeat=2)


def encode_responses(tok, prompts: Sequence[PromptRecord], responses: Sequence[str],
                     fmt: PromptFormat, *, seq_len: int, pad_id: int | None = None,
                     repeat: int = 1) -> dict[str, np.ndarray]:
  """Rows of (prompt, response) documents in the module docstring's layout,
  [len(responses), seq_len]: row j is prompts[j // repeat] followed by
  responses[j] (repeat=2: encode_pairs' chosen / rejected rows). What a
  reward model scores (rl/reward_model.py). A document longer than
  seq_len + 1 ids is an error naming its record and the seq_len it needs."""
  if not responses:
    raise ValueError("encode_responses needs at least one response")
  if len(responses) != repeat * len(prompts):
    raise ValueError(f"{len(responses)} responses for {len(prompts)} prompts; expected "
                     f"{repeat} per prompt")
  if seq_len < 1:
    raise ValueError(f"seq_len={seq_len} must be >= 1")
  pad_id = tok.pad_id if pad_id is None else pad_id
  prompt_ids = tok.encode_batch([fmt.text(p) for p in prompts], add_bos=not fmt.adds_bos)
  completions = tok.encode_batch(list(responses), add_eos=True)
  n, cap = len(responses), seq_len + 1
  ids = np.full((n, cap), pad_id, np.int32)
  seg = np.zeros((n, cap), np.int32)
  pos = np.zeros((n, cap), np.int32)
  response = np.zeros((n, cap), np.float32)          # per id: 1 on response and <eos>
  for row, completion in enumerate(completions):
    record, prompt = prompts[row // repeat], prompt_ids[row // repeat]
    length = len(prompt) + len(completion)
    if length > cap:
      which = ("chosen", "rejected")[row % 2] if repeat == 2 else "response"
      raise ValueError(
          f"{record.where or f'record {row // repeat}'}: <bos> prompt {which} <eos> is "
          f"{length} tokens ({len(prompt)} prompt + {len(completion)} response) but a row "
          f"holds seq_len+1={cap}; raise seq_len to >= {length - 1} or drop the record")
    ids[row, :length] = prompt + completion
    seg[row, :length] = 1
    pos[row, :length] = np.arange(length)
    response[row, len(prompt):length] = 1.0
  return {
      "tokens": ids[:, :-1],
      "targets": ids[:, 1:],
      "segment_ids": seg[:, :-1],
      "positions": pos[:, :-1],
      "response_mask": response[:, 1:],
  }


def split_pairs(x):
  """(chosen, rejected) halves of per-row values [2n, ...] laid out as
  `encode_pairs` makes them (rows 2i, 2i+1): each [n, ...]. Works on NumPy
  and jax arrays alike."""
  if x.shape[0] % 2:
    raise ValueError(f"per-row values have {x.shape[0]} rows; preference batches have an "
                     "even number (chosen, rejected per pair)")
  return x[0::2], x[1::2]
