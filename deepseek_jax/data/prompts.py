"""Prompt datasets for RL, rejection sampling and evaluation, and chat templates.

A prompt file holds one record per JSON line (`.jsonl` / `.json`) or parquet
row (`.parquet`):

  prompt   the user turn (string, required)
  answer   the reference answer the verifier compares against (string or
           number, required; numbers are written as their decimal text)
  kind     optional label; metrics and evaluations are reported per kind
  system   optional system turn

`load_prompt_files(paths)` reads them (errors name the file and line, or the
parquet row, before anything compiles). `PromptFormat` turns a record into
the text the model reads:

  chat template  a HuggingFace `chat_template` (jinja2, rendered the way
                 transformers' `apply_chat_template` renders it: sandboxed,
                 trim_blocks / lstrip_blocks, `raise_exception`, `tojson`,
                 with the system turn first when the record has one and the
                 generation prompt appended);
  "short", "r1"  the project's templates (data/tasks.py), the record's prompt
                 in place of the arithmetic expression, the system turn (if
                 any) on a line before it;
  "none"         the prompt as written (system turn on a line before it).

`resolve_format(choice, tokenizer_path, run_template)` picks one: "auto" (the
default) takes the chat template of the tokenizer's `tokenizer_config.json`
when there is one (a published checkpoint's) and the run's own template
otherwise; "none" and "short"/"r1" force those; any other value is read as a
jinja2 template file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterator, Sequence

from deepseek_jax.data import tasks
from deepseek_jax.data.pipeline import _json_lines, _open_parquet, _parquet_strings, data_format

PROMPT_FIELDS = ("prompt", "answer", "kind", "system")
CHAT_CHOICES = ("auto", "none") + tuple(tasks.TEMPLATES)
TOKENIZER_CONFIG = "tokenizer_config.json"


@dataclasses.dataclass(frozen=True)
class PromptRecord:
  """One prompt: the user turn, the reference answer, an optional kind and
  system turn. `where` is "file:line" (or "file: row N") for messages."""

  prompt: str
  answer: str
  kind: str = ""
  system: str = ""
  where: str = ""


def _answer_text(where: str, value: Any) -> str:
  if isinstance(value, bool) or not isinstance(value, (str, int, float)):
    raise ValueError(f"{where}: field 'answer' is a {type(value).__name__}; write the "
                     "reference answer as a string (or a number)")
  return value if isinstance(value, str) else repr(value) if isinstance(value, float) else str(value)


def _prompt_record(where: str, record: Any) -> PromptRecord:
  if not isinstance(record, dict):
    raise ValueError(f"{where}: expected a JSON object with fields 'prompt' and 'answer', "
                     f"got {type(record).__name__}")
  missing = [f for f in ("prompt", "answer") if record.get(f) is None]
  if missing:
    raise ValueError(f"{where}: missing field(s) {missing} (fields present: "
                     f"{sorted(k for k, v in record.items() if v is not None)}); a prompt "
                     "record needs 'prompt' and 'answer' (optional 'kind', 'system')")
  for f in ("prompt", "kind", "system"):
    if record.get(f) is not None and not isinstance(record[f], str):
      raise ValueError(f"{where}: field {f!r} is a {type(record[f]).__name__}, expected a "
                       "string")
  if not record["prompt"].strip():
    raise ValueError(f"{where}: field 'prompt' is empty")
  return PromptRecord(prompt=record["prompt"], answer=_answer_text(where, record["answer"]),
                      kind=record.get("kind") or "", system=record.get("system") or "",
                      where=where)


def _parquet_records(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
  import pyarrow
  with _open_parquet(path) as pf:
    names = pf.schema_arrow.names
    missing = [f for f in ("prompt", "answer") if f not in names]
    if missing:
      raise ValueError(f"{path}: no column(s) {missing}; its columns are {names}; a prompt "
                       "file needs columns 'prompt' and 'answer' (optional 'kind', "
                       "'system')")
    columns = {}
    for f in PROMPT_FIELDS:
      if f not in names:
        continue
      kind = pf.schema_arrow.field(f).type
      if f == "answer" and (pyarrow.types.is_integer(kind) or pyarrow.types.is_floating(kind)):
        columns[f] = pf.read(columns=[f]).column(0).to_pylist()
      else:
        columns[f] = _parquet_strings(pf, path, f)
  for row in range(len(columns["prompt"])):
    yield f"{path}: row {row} (0-based)", {f: c[row] for f, c in columns.items()}


def read_record_files(paths: str | os.PathLike | Sequence[str | os.PathLike], *, what: str,
                      fields: str, parquet_rows: Callable[[str], Iterator[tuple[str, Any]]],
                      make: Callable[[str, Any], Any]) -> list:
  """make(where, record) for every record of every file (JSON lines, or
  parquet rows from parquet_rows(path)), in order; `where` is "file:line" or
  "file: row N". ValueError naming the files when there are none, and for a
  plain-text file (what: "prompt", "preference"; fields: what a record holds)."""
  paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
  if not paths:
    raise ValueError(f"no {what} files given")
  out = []
  for path in map(os.fspath, paths):
    kind = data_format(path)
    if kind == "text":
      raise ValueError(f"{path}: a {what} file is .jsonl / .json or .parquet (records with "
                       f"{fields}), not plain text")
    rows = (((f"{path}:{i}", r) for i, r in _json_lines(path)) if kind == "jsonl"
            else parquet_rows(path))
    out.extend(make(where, record) for where, record in rows)
  if not out:
    raise ValueError(f"the {what} files {[os.fspath(p) for p in paths]} hold no records")
  return out


def load_prompt_files(paths: str | os.PathLike | Sequence[str | os.PathLike]
                      ) -> list[PromptRecord]:
  """The records of every file, in order; ValueError when there are none."""
  return read_record_files(paths, what="prompt", fields="'prompt' and 'answer'",
                           parquet_rows=_parquet_records, make=_prompt_record)


# ----------------------------------------------------------------------------
# Chat templates


def _environment():
  try:
    from jinja2.sandbox import ImmutableSandboxedEnvironment
  except ImportError as e:  # pragma: no cover (a declared dependency)
    raise ImportError("chat templates need jinja2: pip install 'jinja2>=3.1'") from e
  from jinja2.ext import loopcontrols

  def raise_exception(message):
    raise ValueError(f"chat template: {message}")

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  return env


def _token_text(value: Any) -> str:
  """A tokenizer_config special-token entry: a string or {"content": ...}."""
  if isinstance(value, dict):
    return str(value.get("content", ""))
  return "" if value is None else str(value)


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """A jinja2 chat template and the special-token strings it may use."""

  source: str
  bos_token: str = ""
  eos_token: str = ""
  origin: str = ""

  def render(self, messages: Sequence[dict[str, str]], *,
             add_generation_prompt: bool = True) -> str:
    from jinja2 import TemplateError
    try:
      template = _environment().from_string(self.source)
      return template.render(messages=list(messages), bos_token=self.bos_token,
                             eos_token=self.eos_token,
                             add_generation_prompt=add_generation_prompt)
    except TemplateError as e:
      raise ValueError(f"chat template {self.origin or '(inline)'}: {e}") from e


def load_chat_template(tokenizer_config: str | os.PathLike) -> ChatTemplate | None:
  """The `chat_template` of a tokenizer_config.json (a string, or a list of
  named templates of which "default" is taken), or None when it has none."""
  path = os.fspath(tokenizer_config)
  try:
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
  template = config.get("chat_template")
  if isinstance(template, list):
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default")
  if template is None:
    return None
  if not isinstance(template, str):
    raise ValueError(f"{path}: 'chat_template' is a {type(template).__name__}, expected a "
                     "string (or a list of {name, template})")
  return ChatTemplate(template, _token_text(config.get("bos_token")),
                      _token_text(config.get("eos_token")), origin=path)


@dataclasses.dataclass(frozen=True)
class PromptFormat:
  """How a record becomes the model's input text: a chat template, one of the
  project's templates ("short", "r1"), or "none" (see the module docstring)."""

  template: str = "none"
  chat: ChatTemplate | None = None

  def text(self, record: PromptRecord) -> str:
    if self.chat is not None:
      messages = ([{"role": "system", "content": record.system}] if record.system else [])
      return self.chat.render(messages + [{"role": "user", "content": record.prompt}])
    body = (record.prompt if self.template == "none"
            else tasks.TEMPLATES[self.template].format(prompt=record.prompt))
    return f"{record.system}\n{body}" if record.system else body

  @property
  def adds_bos(self) -> bool:
    """Whether the rendered text already starts the sequence (a chat template
    writing {{ bos_token }}): then no <bos> id is prepended."""
    return self.chat is not None and "bos_token" in self.chat.source

  def describe(self) -> str:
    return f"chat template {self.chat.origin}" if self.chat else f"template {self.template!r}"


def resolve_format(choice: str, tokenizer_path: str, run_template: str) -> PromptFormat:
  """The PromptFormat of `--config.chat_template=choice` (module docstring)."""
  if choice in ("none",) + tuple(tasks.TEMPLATES):
    return PromptFormat(choice)
  if choice == "auto":
    config = (os.path.join(os.path.dirname(tokenizer_path), TOKENIZER_CONFIG)
              if tokenizer_path else "")
    chat = load_chat_template(config) if config and os.path.isfile(config) else None
    return PromptFormat(run_template, chat) if chat else PromptFormat(run_template)
  if not os.path.isfile(choice):
    raise ValueError(f"chat_template={choice!r} is neither one of {CHAT_CHOICES} nor a "
                     "jinja2 template file; pass auto, none, short, r1 or a file path")
  with open(choice, encoding="utf-8") as f:
    return PromptFormat("none", ChatTemplate(f.read(), origin=choice))


def encode_records(tok, records: Sequence[PromptRecord], fmt: PromptFormat) -> list[list[int]]:
  """Prompt ids of every record: <bos> (unless the chat template writes it) +
  the formatted text."""
  texts = [fmt.text(r) for r in records]
  return tok.encode_batch(texts, add_bos=not fmt.adds_bos)
