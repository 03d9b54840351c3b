"""Documents -> packed fixed-length rows -> deterministic, resumable batches.

Host-side numpy only; nothing here touches jax. A *document* is
`<bos> text <eos>` as token ids. Documents are packed whole into rows of
`seq_len + 1` ids (first fit, in order), and each row splits into model input
`tokens = row[:-1]` and `targets = row[1:]`. The batch contract, every array
shaped [batch, seq_len]:

    tokens       int32    model input ids
    targets      int32    the next id after each input position
    segment_ids  int32    1, 2, 3, ... per document within its row; 0 = padding.
                          Attention may only connect equal, non-zero segment ids.
    positions    int32    index within the document (restarts at 0), for RoPE
    loss_mask    float32  1 where targets[i] is the next token of the same
                          document as tokens[i]; 0 on padding, on each
                          document's last token, and (completion_only=True) on
                          targets outside the completion.

Example, seq_len=6, documents [b x y e] and [b z e] (b=<bos>, e=<eos>, p=pad):

    row          b  x  y  e  b  z  e
    tokens       b  x  y  e  b  z        targets   x  y  e  b  z  e
    segment_ids  1  1  1  1  2  2        positions 0  1  2  3  0  1
    loss_mask    1  1  1  0  1  1

FIM (DeepSeek-V3 report sec. 4.1, PSM form) optionally rewrites a document as
`<bos> <fim_begin> prefix <fim_hole> suffix <fim_end> middle <eos>` before packing.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np

from deepseek_jax.data import tasks
from deepseek_jax.data.tokenizer import Tokenizer

BATCH_DTYPES = {
    "tokens": np.int32,
    "targets": np.int32,
    "segment_ids": np.int32,
    "positions": np.int32,
    "loss_mask": np.float32,
}


class Document(NamedTuple):
    """Token ids of one document and a per-token completion mask.

    completion_mask[j] = 1 when token j is part of what the model should learn
    to write (the assistant's completion and <eos>); with completion_only=True
    only such targets carry loss. Plain-text documents are all completion.
    """

    ids: np.ndarray  # [len] int32
    completion_mask: np.ndarray  # [len] float32


def text_document(ids: Sequence[int]) -> Document:
    ids = np.asarray(ids, np.int32)
    return Document(ids, np.ones(len(ids), np.float32))


def encode_texts(tok: Tokenizer, texts: Sequence[str]) -> list[Document]:
    """`<bos> text <eos>` documents, every token a completion token."""
    return [text_document(ids) for ids in tok.encode_batch(texts, add_bos=True, add_eos=True)]


def encode_prompt(tok: Tokenizer, problem: tasks.Problem, template: str = "short") -> list[int]:
    """`<bos> prompt`: what a sampler is given to generate the completion."""
    return tok.encode(tasks.format_prompt(problem, template), add_bos=True)


def encode_problem(tok: Tokenizer, problem: tasks.Problem,
                   template: str = "short") -> Document:
    """`<bos> prompt completion <eos>`, completion_mask 1 on completion and <eos>."""
    prompt = encode_prompt(tok, problem, template)
    completion = tok.encode(tasks.format_completion(problem), add_eos=True)
    mask = np.concatenate([np.zeros(len(prompt)), np.ones(len(completion))])
    return Document(np.asarray(prompt + completion, np.int32), mask.astype(np.float32))


def fim_transform(doc: Document, rng: np.random.Generator, *, rate: float,
                  fim_ids: tuple[int, int, int]) -> Document:
    """With probability `rate`, PSM fill-in-the-middle rewrite of a <bos> ... <eos> doc.

    Two cut points are drawn uniformly over the text between <bos> and <eos>;
    fim_ids = (id of <fim_begin>, <fim_hole>, <fim_end>). The document grows by 3.
    """
    if rng.random() >= rate:
        return doc
    body = doc.ids[1:-1]
    i, j = np.sort(rng.integers(0, len(body) + 1, size=2))
    begin, hole, end = (np.asarray([t], np.int32) for t in fim_ids)
    ids = np.concatenate([doc.ids[:1], begin, body[:i], hole, body[j:], end, body[i:j],
                          doc.ids[-1:]])
    return text_document(ids)


# ----------------------------------------------------------------------------
# Packing


def pack_documents(docs: Sequence[Document | Sequence[int]], seq_len: int, *,
                   pad_id: int = 0, completion_only: bool = False) -> dict[str, np.ndarray]:
    """Packs whole documents into rows; returns the batch contract, [n_rows, seq_len].

    First fit: each document goes into the first row with room, else a new row.
    Plain id sequences are treated as text documents.
    """
    docs = [d if isinstance(d, Document) else text_document(d) for d in docs]
    cap = seq_len + 1
    for i, d in enumerate(docs):
        if len(d.ids) > cap:
            raise ValueError(
                f"document {i} has {len(d.ids)} tokens but a row holds seq_len+1={cap}; "
                f"raise seq_len to >= {len(d.ids) - 1} or filter out long documents")
        if len(d.ids) < 2:
            raise ValueError(f"document {i} has {len(d.ids)} token(s), so nothing to "
                             "predict; drop documents shorter than 2 tokens")
    free = np.zeros(0, np.int64)  # [n_rows] room left in each row
    rows: list[list[int]] = []  # document indices per row
    for i, d in enumerate(docs):
        fits = np.flatnonzero(free >= len(d.ids))
        if len(fits) == 0:
            free = np.append(free, cap)
            rows.append([])
            r = len(rows) - 1
        else:
            r = int(fits[0])
        rows[r].append(i)
        free[r] -= len(d.ids)

    n = len(rows)
    ids = np.full((n, cap), pad_id, np.int32)
    seg = np.zeros((n, cap), np.int32)
    pos = np.zeros((n, cap), np.int32)
    weight = np.zeros((n, cap), np.float32)  # per target token
    for r, members in enumerate(rows):
        start = 0
        for s, i in enumerate(members, start=1):
            d, stop = docs[i], start + len(docs[i].ids)
            ids[r, start:stop] = d.ids
            seg[r, start:stop] = s
            pos[r, start:stop] = np.arange(len(d.ids))
            weight[r, start:stop] = d.completion_mask if completion_only else 1.0
            start = stop
    same_doc = (seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] != 0)
    return {
        "tokens": ids[:, :-1],
        "targets": ids[:, 1:],
        "segment_ids": seg[:, :-1],
        "positions": pos[:, :-1],
        "loss_mask": same_doc.astype(np.float32) * weight[:, 1:],
    }


# ----------------------------------------------------------------------------
# Batching


class BatchIterator:
    """Global batches of packed rows, reshuffled every epoch, looping forever.

    Batch `step` depends only on (rows, batch_size, seed, step): epoch
    e = step // steps_per_epoch uses the permutation default_rng([seed, e]),
    and the last partial batch of an epoch is dropped. So resuming is
    `restore(state)` (or just calling `batch_at(step)`), with no data replay.
    """

    def __init__(self, rows: dict[str, np.ndarray], batch_size: int, *, seed: int):
        self.rows = rows
        self.batch_size = batch_size
        self.seed = seed
        self.n_rows = len(rows["tokens"])
        if not 0 < batch_size <= self.n_rows:
            raise ValueError(f"batch_size={batch_size} must be in [1, n_rows={self.n_rows}]; "
                             "lower batch_size or add documents")
        self.steps_per_epoch = self.n_rows // batch_size
        self.step = 0
        self._perm = (-1, np.zeros(0, np.int64))  # (epoch, permutation) of the last batch

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_rows))
        return self._perm[1]

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        return self.rows_at(step, 0, self.batch_size)

    def rows_at(self, step: int, lo: int, hi: int) -> dict[str, np.ndarray]:
        """Rows [lo, hi) of global batch `step`: what one process of a
        multi-process run feeds (parallel.distributed.process_rows); only
        those rows are gathered."""
        if not 0 <= lo < hi <= self.batch_size:
            raise ValueError(f"rows [{lo}, {hi}) are not inside a batch of {self.batch_size}")
        epoch, i = divmod(step, self.steps_per_epoch)
        start = i * self.batch_size
        index = self._permutation(epoch)[start + lo:start + hi]
        return {k: v[index] for k, v in self.rows.items()}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return self.next_rows(0, self.batch_size)

    def next_rows(self, lo: int, hi: int) -> dict[str, np.ndarray]:
        """Rows [lo, hi) of the next batch; advances like `next()`."""
        rows = self.rows_at(self.step, lo, hi)
        self.step += 1
        return rows

    def state(self) -> dict[str, int]:
        """What a checkpoint saves: the next step and the seed it belongs to."""
        return {"step": self.step, "seed": self.seed}

    def restore(self, state: dict[str, Any]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"state seed={state['seed']} differs from this iterator's "
                             f"seed={self.seed}; build the iterator with the saved seed")
        self.step = int(state["step"])


def validate_batch(batch: dict[str, Any], vocab_size: int, max_seq_len: int) -> None:
    """Host-side checks of the batch contract, to run before any jit."""
    missing = [k for k in BATCH_DTYPES if k not in batch]
    if missing:
        raise ValueError(f"batch is missing keys {missing}; expected {list(BATCH_DTYPES)}")
    shape = np.shape(batch["tokens"])
    for key, dtype in BATCH_DTYPES.items():
        value = batch[key]
        if np.shape(value) != shape or len(shape) != 2:
            raise ValueError(f"batch[{key!r}] has shape {np.shape(value)}; every entry must "
                             f"be [batch, seq] like tokens {shape}")
        if np.asarray(value).dtype != dtype:
            raise ValueError(f"batch[{key!r}] has dtype {np.asarray(value).dtype}; expected "
                             f"{np.dtype(dtype).name}")
    if shape[1] > max_seq_len:
        raise ValueError(f"batch seq length {shape[1]} exceeds the model's max_seq_len="
                         f"{max_seq_len}; pack with seq_len <= {max_seq_len} or raise "
                         "max_seq_len")
    for key in ("tokens", "targets"):
        ids = np.asarray(batch[key])
        bad = np.argwhere((ids < 0) | (ids >= vocab_size))
        if len(bad):
            b, s = bad[0]
            raise ValueError(
                f"batch[{key!r}][{b}, {s}] = {ids[b, s]} is outside [0, vocab_size="
                f"{vocab_size}); tokenize with the model's tokenizer or set "
                f"vocab_size > {ids.max()}")
    mask = np.asarray(batch["loss_mask"])
    if not np.all((mask >= 0) & (mask <= 1)):
        raise ValueError("batch['loss_mask'] must lie in [0, 1] (NaN included is an error)")


# ----------------------------------------------------------------------------
# Files


def load_jsonl(path: str | os.PathLike, text_field: str = "text") -> list[str]:
    """The `text_field` string of every JSON object line; blank lines are skipped."""
    texts = []
    for lineno, record in _json_lines(path):
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            fields = list(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{path}:{lineno}: expected an object with a string field "
                             f"{text_field!r}, got {fields}; pass text_field=<your field>")
        texts.append(record[text_field])
    return texts


def load_text(path: str | os.PathLike, *, per_line: bool = False) -> list[str]:
    """Documents of a UTF-8 text file: blank-line-separated blocks, or one per line.

    Blocks keep their inner newlines; surrounding whitespace lines are dropped.
    """
    docs, block = [], []
    for _, line in _lines(path):
        if per_line:
            if line.strip():
                docs.append(line.rstrip("\r\n"))
        elif line.strip():
            block.append(line)
        elif block:
            docs.append("".join(block).rstrip("\r\n"))
            block = []
    if block:
        docs.append("".join(block).rstrip("\r\n"))
    return docs


def _require_file(path: str | os.PathLike) -> None:
    """FileNotFoundError for a missing data file, ValueError for a directory."""
    if os.path.isdir(path):
        raise ValueError(f"data file {str(path)!r} is a directory; list the data files in it "
                         "(.jsonl / .json, .parquet or .txt) instead")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")


def _lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(line number, text) pairs; errors name the file and line."""
    _require_file(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte "
                                 f"{e.start}); re-encode the file as UTF-8") from e


def _json_lines(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of every non-blank line of a JSON-lines file."""
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg}); expected one JSON "
                             "object per line") from e


# Parquet (pyarrow is imported inside these functions: importing the package
# never loads it).


def _open_parquet(path: str | os.PathLike) -> Any:
    """A pyarrow.parquet.ParquetFile; errors name the file and the fix."""
    _require_file(path)
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"reading {str(path)!r} needs pyarrow; pip install 'pyarrow>=17'"
                          ) from e
    try:
        return pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable parquet file ({e}); write it with "
                         "pyarrow.parquet.write_table (or pandas.DataFrame.to_parquet), "
                         "or give it the extension of its real format") from e


def _parquet_strings(pf: Any, path: str | os.PathLike, name: str) -> list[str | None]:
    """Column `name` of a parquet file as Python strings (None where null)."""
    import pyarrow
    kind = pf.schema_arrow.field(name).type
    is_string = (pyarrow.types.is_string, pyarrow.types.is_large_string,
                 getattr(pyarrow.types, "is_string_view", lambda t: False))
    value = kind.value_type if pyarrow.types.is_dictionary(kind) else kind
    if not any(f(value) for f in is_string):
        raise ValueError(f"{path}: column {name!r} has type {kind}, not string; store the "
                         f"text as a string column or pass the name of one "
                         f"(columns: {pf.schema_arrow.names})")
    try:
        column = pf.read(columns=[name]).column(0)
    except (pyarrow.ArrowException, OSError) as e:
        raise ValueError(f"{path}: column {name!r} could not be read ({e}); the file is "
                         "damaged, rewrite it") from e
    if pyarrow.types.is_dictionary(kind):
        column = column.cast(value)
    return column.to_pylist()


def load_parquet(path: str | os.PathLike, text_field: str = "text") -> list[str]:
    """The strings of column `text_field` of a parquet file, in row order.

    Errors name the file and the fix: a missing file (FileNotFoundError, as
    load_jsonl), a file that is not parquet, a missing column (listing the
    columns there are), a non-string column, a null value (naming its row,
    0-based).
    """
    with _open_parquet(path) as pf:
        names = pf.schema_arrow.names
        if text_field not in names:
            raise ValueError(f"{path}: no column {text_field!r}; its columns are {names}; "
                             "pass text_field=<your column>")
        texts = _parquet_strings(pf, path, text_field)
    for row, text in enumerate(texts):
        if text is None:
            raise ValueError(f"{path}: row {row} (0-based) of column {text_field!r} is "
                             "null; drop or fill the null rows")
    return texts


# Any data file: plain texts or SFT (prompt, completion) pairs

# Extension -> format of the files load_records reads.
DATA_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "text"}


def data_format(path: str | os.PathLike, format: str | None = None) -> str:
    """'jsonl', 'parquet' or 'text': `format` if given, else from the extension."""
    if format is not None:
        if format not in set(DATA_FORMATS.values()):
            raise ValueError(f"format={format!r} is not one of "
                             f"{sorted(set(DATA_FORMATS.values()))}")
        return format
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in DATA_FORMATS:
        raise ValueError(f"{path}: unknown data file extension {ext or '(none)'!r}; "
                         "supported: .jsonl or .json (one JSON object per line), .parquet, "
                         ".txt (blank-line-separated documents); rename the file or pass "
                         "format='jsonl' | 'parquet' | 'text'")
    return DATA_FORMATS[ext]


def _parquet_rows(path: str | os.PathLike,
                  fields: Sequence[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row, {field: value or None}) per row, over the `fields` the file has."""
    text_field, prompt_field, completion_field = fields
    with _open_parquet(path) as pf:
        names = pf.schema_arrow.names
        present = [f for f in dict.fromkeys(fields) if f in names]
        if text_field not in present and not {prompt_field, completion_field} <= set(present):
            raise ValueError(
                f"{path}: no column {text_field!r} (plain text) nor columns "
                f"{prompt_field!r} and {completion_field!r} (SFT); its columns are {names}; "
                "pass text_field=, or prompt_field= and completion_field=, naming yours")
        columns = {f: _parquet_strings(pf, path, f) for f in present}
    for row in range(len(columns[present[0]])):
        yield row, {f: c[row] for f, c in columns.items()}


def _record(where: str, record: Any, text_field: str, prompt_field: str,
            completion_field: str) -> str | tuple[str, str]:
    """One record as a text, or an SFT (prompt, completion) pair; None values count
    as absent."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    has = {f for f in (text_field, prompt_field, completion_field) if record.get(f) is not None}
    used = ((prompt_field, completion_field) if {prompt_field, completion_field} <= has
            else (text_field,) if text_field in has else ())
    if not used:
        got = [f for f, v in record.items() if v is not None]
        nulls = [f for f, v in record.items() if v is None]
        raise ValueError(
            f"{where}: expected a string field {text_field!r} (plain text) or string "
            f"fields {prompt_field!r} and {completion_field!r} (SFT), got fields {got}"
            + (f" (null: {nulls})" if nulls else "")
            + "; pass text_field=, or prompt_field= and completion_field=, naming yours")
    for f in used:
        if not isinstance(record[f], str):
            raise ValueError(f"{where}: field {f!r} is a {type(record[f]).__name__}, "
                             "expected a string")
    return tuple(record[f] for f in used) if len(used) == 2 else record[text_field]


def load_records(path: str | os.PathLike, *, text_field: str = "text",
                 prompt_field: str = "prompt", completion_field: str = "completion",
                 format: str | None = None) -> list[str] | list[tuple[str, str]]:
    """The documents of one data file: plain texts, or SFT (prompt, completion) pairs.

    The format comes from the extension (`DATA_FORMATS`; `format` overrides it):
      .jsonl, .json  one JSON object per line (blank lines skipped)
      .parquet       one record per row (read with pyarrow)
      .txt           plain text, blank-line-separated documents (`load_text`)
    A record (JSON object or parquet row) holding both `prompt_field` and
    `completion_field` is an SFT record, trained on the completion only; otherwise
    one holding `text_field` is plain text. A null value counts as absent; a
    field that is used must be a string. One file holds one kind: a record of
    the other kind than the file's first is an error naming both lines/rows.
    An empty file gives [].
    """
    if os.path.isdir(path):  # before the extension: a directory has none
        _require_file(path)
    kind = data_format(path, format)
    if kind == "text":
        return load_text(path)
    fields = (text_field, prompt_field, completion_field)
    if kind == "jsonl":
        records, at, at_path = _json_lines(path), "line {}", "{}:{}"
    else:
        records = _parquet_rows(path, fields)
        at, at_path = "row {} (0-based)", "{}: row {} (0-based)"
    out: list = []
    first = None  # where the first record is
    for i, record in records:
        doc = _record(at_path.format(path, i), record, *fields)
        where = at.format(i)
        if out and isinstance(doc, tuple) != isinstance(out[0], tuple):
            sft, plain = ((where, first) if isinstance(doc, tuple) else (first, where))
            raise ValueError(
                f"{path}: mixes SFT records ({prompt_field!r} + {completion_field!r}; e.g. "
                f"{sft}) with plain-text records ({text_field!r}; e.g. {plain}); a file "
                "must hold one kind: split it into an SFT file and a plain-text file")
        first = first or where
        out.append(doc)
    return out


def encode_sft(tok: Tokenizer, pairs: Sequence[tuple[str, str]]) -> list[Document]:
    """`<bos> prompt completion <eos>` per pair, completion_mask 1 on the completion
    and <eos> (as encode_problem): packed with completion_only=True, loss falls
    exactly on the targets that are completion tokens or <eos>. Prompt and
    completion are tokenized separately, so ids never straddle the boundary."""
    prompts = tok.encode_batch([p for p, _ in pairs], add_bos=True)
    completions = tok.encode_batch([c for _, c in pairs], add_eos=True)
    return [Document(np.asarray(p + c, np.int32),
                     np.concatenate([np.zeros(len(p)), np.ones(len(c))]).astype(np.float32))
            for p, c in zip(prompts, completions)]


def load_documents(tok: Tokenizer, paths: str | os.PathLike | Sequence[str | os.PathLike],
                   *, text_field: str = "text", prompt_field: str = "prompt",
                   completion_field: str = "completion") -> tuple[list[Document], bool]:
    """Reads and encodes data files (`load_records`), in order: (documents, is_sft).

    is_sft is True when the files hold SFT records: pack those with
    completion_only=True so loss falls on completions only. Plain-text files
    give `encode_texts` documents. Mixing SFT and plain-text files is an error
    naming one of each; so is holding no document at all.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    texts: list[str] = []
    pairs: list[tuple[str, str]] = []
    first: dict[bool, str] = {}  # is_sft -> first file of that kind
    for path in paths:
        records = load_records(path, text_field=text_field, prompt_field=prompt_field,
                               completion_field=completion_field)
        if not records:
            continue
        sft = isinstance(records[0], tuple)
        first.setdefault(sft, os.fspath(path))
        if len(first) == 2:
            raise ValueError(
                f"data files mix SFT records ({first[True]!r}) with plain text "
                f"({first[False]!r}); train on one kind per run (SFT trains on "
                "completions only), or turn the texts into (prompt, completion) records")
        (pairs if sft else texts).extend(records)
    if not first:
        raise ValueError(f"the data files {[os.fspath(p) for p in paths]} hold no documents")
    sft = True in first
    return (encode_sft(tok, pairs) if sft else encode_texts(tok, texts)), sft


# ----------------------------------------------------------------------------
# The embedded default task


@dataclasses.dataclass(frozen=True)
class TaskDataset:
    """Packed training rows and the held-out problems for exact-match evaluation."""

    train_rows: dict[str, np.ndarray]  # the batch contract, [n_rows, seq_len]
    test_problems: list[tasks.Problem]
    n_train_documents: int


def passkey_room(tok: Tokenizer, seq_len: int, template: str = "short") -> int:
    """Longest passkey prompt (characters) whose document fits one row of
    seq_len (+1) tokens: a character per token at most, so exact for the
    shipped tokenizer and safe for subword ones."""
    dummy = tasks.Problem(prompt="", reasoning="", answer="99999")
    return seq_len + 1 - len(encode_problem(tok, dummy, template).ids)


def make_task_dataset(tok: Tokenizer, *, n_train: int, n_test: int, seq_len: int,
                      seed: int, max_digits: int = 3, template: str = "short",
                      completion_only: bool = False,
                      kinds: Sequence[str] = tasks.DEFAULT_KINDS,
                      context_chars: int = 0, kind_mix: str = "distinct") -> TaskDataset:
    """Generates, encodes and packs the task corpus; keeps the test split unpacked.

    context_chars: passkey prompt length (kinds with "passkey"); 0 = the
    longest that fits a row (`passkey_room`). kind_mix: the training
    problems' mix of kinds (`tasks.mixed_problems`)."""
    if "passkey" in kinds:
        room = passkey_room(tok, seq_len, template)
        if context_chars > room:
            raise ValueError(f"passkey_chars={context_chars} does not fit a row of seq_len="
                             f"{seq_len} with the {template!r} template (at most {room}); "
                             "lower passkey_chars or raise seq_len.")
        context_chars = context_chars or room
    train = tasks.mixed_problems(n_train, seed=seed, split="train", max_digits=max_digits,
                                 kinds=kinds, context_chars=context_chars, kind_mix=kind_mix)
    test = tasks.generate_problems(n_test, seed=seed, split="test", max_digits=max_digits,
                                   kinds=kinds, context_chars=context_chars)
    docs = [encode_problem(tok, p, template) for p in train]
    rows = pack_documents(docs, seq_len, pad_id=tok.pad_id, completion_only=completion_only)
    return TaskDataset(train_rows=rows, test_problems=test, n_train_documents=len(docs))
