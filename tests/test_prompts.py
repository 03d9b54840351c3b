"""Prompt files and chat templates (data/prompts.py)."""

import json

import pytest

from deepseek_jax.data import default_tokenizer, prompts, tasks
from deepseek_jax.data.prompts import PromptFormat, PromptRecord


def _jsonl(path, lines):
  path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
  return str(path)


def test_prompt_files_read_jsonl_and_parquet_records(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  a = _jsonl(tmp_path / "a.jsonl", [
      {"prompt": "2+2", "answer": "4"}, "",
      {"prompt": "What is 1/2 + 1/4?", "answer": 0.75, "kind": "frac", "system": "Be brief."},
      {"prompt": "7*6", "answer": 42, "kind": None}])
  b = str(tmp_path / "b.parquet")
  pq.write_table(pa.table({"prompt": ["x?", "y?"], "answer": [3, 5], "kind": ["k", "k"]}), b)
  records = prompts.load_prompt_files([a, b])
  assert [(r.prompt, r.answer, r.kind, r.system) for r in records] == [
      ("2+2", "4", "", ""), ("What is 1/2 + 1/4?", "0.75", "frac", "Be brief."),
      ("7*6", "42", "", ""), ("x?", "3", "k", ""), ("y?", "5", "k", "")]
  assert records[1].where == f"{a}:3" and records[4].where == f"{b}: row 1 (0-based)"


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "1+1"}', "missing field(s) ['answer']"),
    ('{"prompt": "1+1", "answer": null}', "missing field(s) ['answer']"),
    ('["1+1", "2"]', "expected a JSON object"),
    ('{"prompt": "1+1", "answer": "2"', "invalid JSON"),
    ('{"prompt": 11, "answer": "2"}', "field 'prompt' is a int"),
    ('{"prompt": "  ", "answer": "2"}', "field 'prompt' is empty"),
    ('{"prompt": "1+1", "answer": true}', "field 'answer' is a bool"),
    ('{"prompt": "1+1", "answer": "2", "kind": 3}', "field 'kind' is a int"),
])
def test_malformed_prompt_records_are_refused_naming_file_and_line(tmp_path, line, message):
  path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "ok", "answer": "1"}, line])
  with pytest.raises(ValueError) as e:
    prompts.load_prompt_files([path])
  assert f"{path}:2" in str(e.value) and message in str(e.value)


def test_other_bad_prompt_files(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  text = tmp_path / "p.txt"
  text.write_text("2+2\n")
  with pytest.raises(ValueError, match="not plain text"):
    prompts.load_prompt_files([str(text)])
  with pytest.raises(FileNotFoundError, match="does not exist"):
    prompts.load_prompt_files([str(tmp_path / "missing.jsonl")])
  empty = _jsonl(tmp_path / "e.jsonl", [])
  with pytest.raises(ValueError, match="hold no records"):
    prompts.load_prompt_files([empty])
  pq.write_table(pa.table({"question": ["x"], "answer": ["1"]}), tmp_path / "q.parquet")
  with pytest.raises(ValueError, match=r"no column\(s\) \['prompt'\]; its columns are"):
    prompts.load_prompt_files([str(tmp_path / "q.parquet")])


def test_project_templates_and_none():
  r = PromptRecord("12+34", "46")
  assert PromptFormat("short").text(r) == tasks.format_prompt(tasks.Problem("12+34", "", "46"))
  assert PromptFormat("none").text(r) == "12+34"
  assert PromptFormat("none").text(PromptRecord("q", "a", system="S")) == "S\nq"
  tok = default_tokenizer()
  ids = prompts.encode_records(tok, [r], PromptFormat("short"))
  assert ids == [tok.encode("User: 12+34\nAssistant:", add_bos=True)]


# A DeepSeek-style template written for this test (system first, user / assistant
# turns, generation prompt), with a loop control, a filter and raise_exception.
CHAT = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ m['content'] }}\n{% elif m['role'] == 'user' %}<|User|>{{ m['content'] | trim }}"
        "{% elif m['role'] == 'assistant' %}<|Assistant|>{{ m['content'] }}{{ eos_token }}"
        "{% else %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
        "{% if loop.index > 8 %}{% break %}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|Assistant|><think>\n{% endif %}")


def _tokenizer_dir(tmp_path, template=CHAT):
  tok = default_tokenizer()
  d = tmp_path / "ckpt"
  d.mkdir()
  tok.hf.save(str(d / "tokenizer.json"))
  (d / "tokenizer_config.json").write_text(json.dumps({
      "bos_token": {"__type": "AddedToken", "content": "<bos>", "special": True}, "eos_token": "<eos>",
      "chat_template": template}))
  return d


def test_auto_format_takes_the_tokenizers_chat_template(tmp_path):
  d = _tokenizer_dir(tmp_path)
  fmt = prompts.resolve_format("auto", str(d / "tokenizer.json"), "short")
  assert fmt.chat is not None and fmt.adds_bos
  text = fmt.text(PromptRecord("  12+34 ", "46", system="You add."))
  assert text == "<bos>You add.\n<|User|>12+34<|Assistant|><think>\n"
  tok = default_tokenizer()
  ids = prompts.encode_records(tok, [PromptRecord("1+1", "2")], fmt)[0]
  assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1    # the template's bos, once
  # without a tokenizer_config (the demo run): the run's template; none / files forced
  assert prompts.resolve_format("auto", "", "short") == PromptFormat("short")
  assert prompts.resolve_format("none", str(d / "tokenizer.json"), "short") == PromptFormat("none")
  path = tmp_path / "t.jinja"
  path.write_text("Q: {{ messages[-1]['content'] }} A:")
  assert prompts.resolve_format(str(path), "", "short").text(PromptRecord("x", "1")) == "Q: x A:"
  with pytest.raises(ValueError, match="neither one of"):
    prompts.resolve_format("chatml", "", "short")
  bad = prompts.ChatTemplate(CHAT, origin="t")
  with pytest.raises(ValueError, match="unknown role tool"):
    bad.render([{"role": "tool", "content": "x"}])


@pytest.mark.torch
def test_chat_template_renders_as_transformers_does(tmp_path):
  transformers = pytest.importorskip("transformers")
  d = _tokenizer_dir(tmp_path)
  hf = transformers.AutoTokenizer.from_pretrained(str(d))
  ours = prompts.load_chat_template(d / "tokenizer_config.json")
  for messages in ([{"role": "user", "content": "12+34"}],
                   [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": " What is 1/2? "},
                    {"role": "assistant", "content": "0.5"},
                    {"role": "user", "content": "And 1/4?"}]):
    for gen in (True, False):
      want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
      assert ours.render(messages, add_generation_prompt=gen) == want
