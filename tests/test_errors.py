"""The catalogue of user mistakes reaching `launch.train` and `launch.convert`.

Each case builds one bad input (a config field, a data file, a tokenizer, a
workdir, a checkpoint, an HF directory, convert's flags) and runs the
launcher in-process through the function its absl `main` wraps
(`launch.train.run`, `launch.convert.convert`). It must raise one of the
launcher's USER_ERRORS (which `main` turns into one line on stderr and a
non-zero exit) whose message is a single line containing the expected
fragment, which names the field, file or line; launch.train cases must fail
before anything compiles (building the train state or calling the update
step is an AssertionError here). A few subprocess cases check the command
line end to end: a non-zero exit, one line on stderr, no traceback.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import pytest

from deepseek_jax.interop import save_hf_checkpoint, save_jax_variables
from deepseek_jax.train import checkpoint, hf_init, loop, start, step
from launch import convert as convert_lib
from launch import train as train_lib
from launch.config_flag import load_config
from launch.configs import build_configs
from random_weights import random_variables

# The corrupt-checkpoint cases leave orbax's read coroutines to be collected
# after the error they raised (their "Exception ignored in" reports are
# orbax's, not a failure here): kept out of the warnings summary.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "launch/configs/tiny.py"
SAVED_STEP = 3


# ---------------------------------------------------------------------------
# Fixtures: one valid HF directory, one trained run's workdir (module scope);
# each case breaks a copy.
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A valid HF checkpoint of the tiny config's model (launch/configs/tiny.py)."""
  model_cfg, _ = build_configs(load_config(TINY))
  path = str(tmp_path_factory.mktemp("hf"))
  save_hf_checkpoint(model_cfg, random_variables(model_cfg, seed=0), path)
  return path


@pytest.fixture(scope="module")
def jax_dir(tmp_path_factory):
  """The same model in the deepseek_jax format (launch.convert --to_jax)."""
  model_cfg, _ = build_configs(load_config(TINY))
  path = str(tmp_path_factory.mktemp("jax"))
  save_jax_variables(model_cfg, random_variables(model_cfg, seed=0), path)
  return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """The workdir of a launch.train run of the tiny config, checkpointed at
  step SAVED_STEP (an initial state saved, no training)."""
  model_cfg, train_cfg = build_configs(load_config(TINY))
  workdir = str(tmp_path_factory.mktemp("run"))
  state = step.init_train_state(model_cfg, train_cfg, jax.random.key(0))
  ckpts = checkpoint.Checkpoints(workdir, model_cfg, train_cfg.to_dict(), every=1,
                                 async_save=False)
  ckpts.save(SAVED_STEP, state, {"step": SAVED_STEP, "seed": train_cfg.seed}, force=True)
  ckpts.close()
  return workdir


SHARD = "<shard>"     # in a file name: the HF directory's (only) safetensors shard


class Ctx:
  """What a case builds its inputs from: its scratch directory and copies of
  the module's valid checkpoints, each broken in one way."""

  def __init__(self, tmp: str, request):
    self.tmp = tmp
    self._request = request

  def path(self, name: str) -> str:
    return os.path.join(self.tmp, name)

  def write(self, name: str, data: str | bytes) -> str:
    path = self.path(name)
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
      f.write(data)
    return path

  def parquet(self, name: str, columns: dict) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table(columns), self.path(name))
    return self.path(name)

  def _copy(self, fixture: str, name: str) -> str:
    dst = self.path(name)
    shutil.copytree(self._request.getfixturevalue(fixture), dst)
    return dst

  def _file(self, directory: str, name: str) -> str:
    if name == SHARD:
      (name,) = [n for n in os.listdir(directory) if n.endswith(".safetensors")]
    return os.path.join(directory, name)

  def hf(self, edit_config=None, *, remove=(), write=None, truncate=None,
         edit_tensors=None) -> str:
    """A copy of the valid HF directory: config.json edited in place by
    `edit_config`, files removed, {file: data} written, a file truncated, or
    the shard's tensors edited in place by `edit_tensors`."""
    path = self._copy("hf_dir", "hf")
    if edit_config:
      with open(self._file(path, "config.json")) as f:
        config = json.load(f)
      edit_config(config)
      with open(self._file(path, "config.json"), "w") as f:
        json.dump(config, f)
    _change(path, self._file, remove, write, truncate)
    if edit_tensors:
      import safetensors.numpy
      shard = self._file(path, SHARD)
      tensors = safetensors.numpy.load_file(shard)
      edit_tensors(tensors)
      safetensors.numpy.save_file(tensors, shard, metadata={"format": "pt"})
    return path

  def jax(self, *, remove=(), write=None, truncate=None) -> str:
    """A copy of the valid deepseek_jax directory, changed as `hf` does."""
    path = self._copy("jax_dir", "jax")
    _change(path, self._file, remove, write, truncate)
    return path

  def run(self, *, garble: str | None = None, truncate_arrays: bool = False,
          remove: str | None = None) -> str:
    """A copy of the trained run's workdir; in its checkpoint, item `garble`
    ("state" / "meta") overwritten with garbage, the arrays' data files cut in
    half, or item `remove` deleted."""
    path = self._copy("run_dir", "run")
    step_dir = os.path.join(path, "checkpoints", str(SAVED_STEP))
    if garble:
      for root, _, files in os.walk(os.path.join(step_dir, garble)):
        for name in files:
          with open(os.path.join(root, name), "wb") as f:
            f.write(b"\x00garbage")
    if truncate_arrays:
      data = os.path.join(step_dir, "state", "ocdbt.process_0", "d")
      for name in os.listdir(data):
        _truncate(os.path.join(data, name))
    if remove:
      shutil.rmtree(os.path.join(step_dir, remove))
    return path


def _change(path, file_of, remove, write, truncate) -> None:
  for name in remove:
    os.remove(file_of(path, name))
  for name, data in (write or {}).items():
    with open(file_of(path, name), "wb" if isinstance(data, bytes) else "w") as f:
      f.write(data)
  if truncate:
    _truncate(file_of(path, truncate))


def _truncate(file: str) -> None:
  with open(file, "r+b") as f:
    f.truncate(os.path.getsize(file) // 2)


def _without(*keys):
  """An edit removing `keys` from a dict (config.json, tensors)."""
  def edit(d):
    for k in keys:
      del d[k]
  return edit


def _shorter(key):
  """An edit cutting tensor `key` short by one row."""
  def edit(tensors):
    tensors[key] = tensors[key][:-1]
  return edit


def _data(*files):
  """The --config.data_files override for `files`."""
  return f"--config.data_files={tuple(files)!r}"


def _word_tokenizer(n: int, specials=("<pad>", "<bos>", "<eos>")) -> str:
  """A tokenizer.json (word level) of n ids, the first ones `specials`."""
  import tokenizers
  words = [*specials, *(f"w{i}" for i in range(n - len(specials)))]
  model = tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0")
  return tokenizers.Tokenizer(model).to_str()


# ---------------------------------------------------------------------------
# The catalogue: (id, build(ctx) -> arguments, expected fragment); `{tmp}` in
# a fragment is the case's scratch directory.
# launch.train arguments, T(...): config overrides, plus run()'s keyword
# arguments and optionally config= (the config file) and workdir=.
# ---------------------------------------------------------------------------
def T(*overrides, **kw):   # noqa: N802
  return {"overrides": list(overrides), **kw}


def HF(*overrides, **kw):   # noqa: N802
  """A launch.train case fine-tuning c.hf(**kw) (config.init_from_hf)."""
  return lambda c: T(f"--config.init_from_hf={c.hf(**kw)}", *overrides)


TRAIN_CASES = [
    # config files, fields and presets
    ("no_config_file", lambda c: T(config="launch/configs/no_such.py"),
     "no such config file 'launch/configs/no_such.py'"),
    ("unknown_model_key", lambda c: T("--config.model.n_layerz=3"),
     'config does not have: n_layerz Did you mean "n_layers"'),
    ("unknown_train_key", lambda c: T("--config.stepz=3"),
     'config does not have: stepz Did you mean "steps"'),
    ("non_integer_value", lambda c: T("--config.steps=abc"),
     "flag error: flag --config.steps=abc: invalid literal for int()"),
    ("unknown_preset", lambda c: T(preset="huge"), "config error: Unknown preset 'huge'"),
    ("empty_preset", lambda c: T("--config.preset="), "config error: no model: config.preset"),
    ("impossible_model_field", lambda c: T("--config.model.n_activated_experts=9"),
     "config error: n_activated_experts=9 must be in [1, n_routed_experts=8]"),
    ("zero_model_field", lambda c: T("--config.model.n_heads=0"), "config error: n_heads=0"),
    ("seq_len_over_model", lambda c: T("--config.seq_len=1000"),
     "config error: seq_len=1000 exceeds the model's max_seq_len=128"),
    ("zero_steps", lambda c: T("--config.steps=0"), "config error: steps=0 must be a positive"),
    ("warmup_over_steps", lambda c: T("--config.warmup_steps=100"),
     "config error: warmup_steps=100 exceeds steps=6"),
    ("zero_lr", lambda c: T("--config.lr=0"), "config error: lr=0.0 must be > 0"),
    ("keep_every", lambda c: T("--config.keep_every=4"),
     "config error: keep_every=4 must be a multiple of ckpt_every=3"),
    ("unknown_task_kind", lambda c: T("--config.task_kinds=('div',)"),
     "config error: task_kinds=('div',)"),
    ("unknown_kind_mix", lambda c: T("--config.kind_mix=even"),
     "config error: kind_mix='even' must be one of ('distinct', 'uniform')"),
    ("fim_without_data", lambda c: T("--config.fim_rate=0.5"),
     "config error: fim_rate=0.5 applies to plain-text data_files"),
    ("unknown_rule_set", lambda c: T("--config.mesh.rules=nope"),
     "config error: mesh.rules='nope' is not a rule set"),
    ("mesh_over_devices", lambda c: T("--config.mesh.expert=3"),
     "mesh data=-1 x expert=3: the fixed axes multiply to 3"),
    ("batch_over_mesh", lambda c: T("--config.batch_size=4", "--config.mesh.fsdp=8",
                                    "--config.eval_batch_size=4"),
     "batch_size=4 must be a multiple of the batch mesh axes"),
    ("pipeline_schedule", lambda c: T("--config.pipeline_schedule=interleaved"),
     "pipeline_schedule='interleaved' must be one of"),
    ("dualpipe_microbatches", lambda c: T("--config.mesh.pipe=2", "--config.num_microbatches=2",
                                          "--config.pipeline_schedule=dualpipe"),
     "pipeline_schedule='dualpipe', num_microbatches=2, mesh.pipe=2: n_microbatches=2 with "
     "n_stages=2: DualPipe feeds half"),
    ("pipeline_batch", lambda c: T("--config.mesh.pipe=2", "--config.num_microbatches=4"),
     "must be a multiple of num_microbatches x the batch mesh axes = 4 x 4"),
    ("pipeline_stages", lambda c: T("--config.mesh.pipe=8", "--config.mesh.data=1",
                                    "--config.num_microbatches=1", "--config.batch_size=8"),
     "the model's 3 blocks (n_dense_layers=1 + n_moe_layers=2) cannot be split into pipe=8"),
    # multi-process flags
    ("half_multiprocess_flags", lambda c: T(num_processes=2, process_id=0),
     "flag error: multi-process launch: num_processes, process_id given but not "
     "coordinator_address"),
    ("coordinator_without_port",
     lambda c: T(coordinator_address="localhost", num_processes=2, process_id=0),
     "flag error: coordinator_address='localhost' must be HOST:PORT"),
    # data files
    ("missing_data_file", lambda c: T(_data(c.path("nope.jsonl"))),
     "data file '{tmp}/nope.jsonl' does not exist"),
    ("data_file_is_directory", lambda c: T(_data(c.tmp + "/")),
     "data file '{tmp}/' is a directory"),
    ("data_dir_with_extension", lambda c: (os.mkdir(c.path("d.jsonl")),
                                           T(_data(c.path("d.jsonl"))))[1],
     "data file '{tmp}/d.jsonl' is a directory"),
    ("empty_jsonl", lambda c: T(_data(c.write("e.jsonl", ""))),
     "the data files ['{tmp}/e.jsonl'] hold no documents"),
    ("blank_txt", lambda c: T(_data(c.write("e.txt", "\n\n  \n"))),
     "the data files ['{tmp}/e.txt'] hold no documents"),
    ("not_json", lambda c: T(_data(c.write("bad.jsonl", '{"text": "a"}\n{text: b}\n'))),
     "{tmp}/bad.jsonl:2: invalid JSON"),
    ("json_array_not_lines",
     lambda c: T(_data(c.write("a.json", '[{"text": "a"},\n{"text": "b"}]\n'))),
     "{tmp}/a.json:1: invalid JSON"),
    ("jsonl_without_text_field", lambda c: T(_data(c.write("f.jsonl", '{"body": "hi"}\n'))),
     "{tmp}/f.jsonl:1: expected a string field 'text'"),
    ("jsonl_wrong_text_field", lambda c: T(_data(c.write("g.jsonl", '{"text": "hi"}\n')),
                                           "--config.text_field=body"),
     "{tmp}/g.jsonl:1: expected a string field 'body'"),
    ("jsonl_number_text", lambda c: T(_data(c.write("n.jsonl", '{"text": 3}\n'))),
     "{tmp}/n.jsonl:1: field 'text' is a int, expected a string"),
    ("jsonl_not_object", lambda c: T(_data(c.write("l.jsonl", '["a", "b"]\n'))),
     "{tmp}/l.jsonl:1: expected a JSON object, got list"),
    ("mixed_sft_and_text", lambda c: T(_data(
        c.write("m.jsonl", '{"text": "a"}\n{"prompt": "p", "completion": "c"}\n'))),
     "{tmp}/m.jsonl: mixes SFT records"),
    ("sft_file_and_text_file", lambda c: T(_data(
        c.write("s.jsonl", '{"prompt": "p", "completion": "c"}\n'),
        c.write("t.txt", "plain text\n"))),
     "data files mix SFT records ('{tmp}/s.jsonl') with plain text ('{tmp}/t.txt')"),
    ("fim_on_sft", lambda c: T(_data(c.write("s.jsonl", '{"prompt": "p", "completion": "c"}\n')),
                               "--config.fim_rate=0.5"),
     "fim_rate=0.5 rewrites plain-text documents"),
    ("txt_not_utf8", lambda c: T(_data(c.write("b.txt", b"ok\n\xff\xfe bad\n"))),
     "{tmp}/b.txt:2: not UTF-8"),
    ("unknown_extension", lambda c: T(_data(c.write("d.csv", "text\nhi\n"))),
     "{tmp}/d.csv: unknown data file extension '.csv'"),
    ("garbage_parquet", lambda c: T(_data(c.write("g.parquet", b"not parquet at all"))),
     "{tmp}/g.parquet: not a readable parquet file"),
    ("parquet_without_column", lambda c: T(_data(c.parquet("c.parquet", {"body": ["hi"]}))),
     "{tmp}/c.parquet: no column 'text'"),
    ("parquet_int_column", lambda c: T(_data(c.parquet("i.parquet", {"text": [1, 2]}))),
     "{tmp}/i.parquet: column 'text' has type int64, not string"),
    ("document_over_seq_len", lambda c: T(_data(c.write("long.txt", "x" * 300))),
     "document 0 has 302 tokens but a row holds seq_len+1=65; raise seq_len"),
    ("too_few_rows", lambda c: T(_data(c.write("one.txt", "one short document\n"))),
     "batch_size=8 must be in [1, n_rows=1]"),
    # tokenizers
    ("missing_tokenizer", lambda c: T(f"--config.tokenizer_path={c.path('tok.json')}"),
     "tokenizer file '{tmp}/tok.json' does not exist"),
    ("tokenizer_is_directory", lambda c: T(f"--config.tokenizer_path={c.tmp}"),
     "tokenizer file '{tmp}' is a directory"),
    ("garbage_tokenizer", lambda c: T(f"--config.tokenizer_path={c.write('tok.json', '{oops')}"),
     "tokenizer file '{tmp}/tok.json' is not a valid HuggingFace tokenizer.json"),
    ("tokenizer_without_bos", lambda c: T(
        f"--config.tokenizer_path={c.write('tok.json', _word_tokenizer(50, specials=()))}"),
     "tokenizer file '{tmp}/tok.json': bos_token: none of"),
    ("tokenizer_over_vocab", lambda c: T("--config.model.vocab_size=64"),
     "the tokenizer has 107 ids but vocab_size=64; set model.vocab_size >= 107"),
    # workdirs and their checkpoints
    ("workdir_is_file", lambda c: T(workdir=c.write("file", "x")),
     "workdir '{tmp}/file' is a file"),
    ("workdir_of_another_model", lambda c: T("--config.model.n_layers=4", workdir=c.run()),
     "were trained with a different model config; differing fields: n_layers: saved 3, "
     "requested 4"),
    ("resume_with_new_schedule", lambda c: T("--config.lr=0.01", workdir=c.run()),
     "the learning-rate schedule differs from the checkpointed run's in {tmp}/run/checkpoints "
     "(lr: 0.003 -> 0.01)"),
    ("corrupt_checkpoint_meta", lambda c: T(workdir=c.run(garble="meta")),
     "checkpoint {tmp}/run/checkpoints/3 is unreadable"),
    ("corrupt_checkpoint_state", lambda c: T(workdir=c.run(garble="state")),
     "checkpoint {tmp}/run/checkpoints/3 is unreadable"),
    ("truncated_checkpoint_arrays", lambda c: T(workdir=c.run(truncate_arrays=True)),
     "checkpoint {tmp}/run/checkpoints/3 is unreadable"),
    ("init_from_without_checkpoints", lambda c: T(f"--config.init_from={c.tmp}"),
     "init_from='{tmp}' holds no checkpoints/"),
    ("init_from_another_model",
     lambda c: T(f"--config.init_from={c.run()}", "--config.model.n_layers=4"),
     "init_from='{tmp}/run': its model differs in n_layers: 3 -> 4"),
    # fine-tuning from an HF directory (config.init_from_hf)
    ("init_from_hf_missing", lambda c: T(f"--config.init_from_hf={c.path('nope')}"),
     "config error: '{tmp}/nope' is not a directory"),
    ("init_from_hf_and_preset", lambda c: T(f"--config.init_from_hf={c.hf()}", preset="tiny"),
     "config error: --preset=tiny and init_from_hf='{tmp}/hf' both name the model"),
    ("hf_without_config_json", HF(remove=["config.json"]),
     "config error: {tmp}/hf/config.json not found"),
    ("hf_config_not_json", HF(write={"config.json": "{,"}),
     "config error: {tmp}/hf/config.json: not valid JSON"),
    ("hf_config_without_fields", HF(edit_config=_without("hidden_size")),
     "config error: {tmp}/hf/config.json lacks ['hidden_size']"),
    ("hf_mixtral", HF(edit_config=lambda h: h.update(model_type="mixtral",
                                                    architectures=["MixtralForCausalLM"])),
     "{tmp}/hf/config.json: unknown architecture ['MixtralForCausalLM'] / model_type "
     "'mixtral'"),
    ("hf_truncated_safetensors", HF(truncate=SHARD),
     "{tmp}/hf/model-00001-of-00001.safetensors: corrupt safetensors header"),
    ("hf_missing_tensor", HF(edit_tensors=_without("lm_head.weight")),
     "{tmp}/hf: 1 missing tensors: lm_head.weight"),
    ("hf_wrong_shape", HF(edit_tensors=_shorter("model.norm.weight")),
     "model.norm.weight in {tmp}/hf/model-00001-of-00001.safetensors: expected shape (64,)"),
    ("hf_override_changes_shapes", HF("--config.model.dim=32"),
     "init_from_hf='{tmp}/hf': the model overrides (dim: 64 -> 32) change parameter shapes"),
    ("hf_tokenizer_over_vocab", HF(write={"tokenizer.json": _word_tokenizer(300)}),
     "the tokenizer has 300 ids but vocab_size=256; set model.vocab_size >= 300"),
]


CONVERT_CASES = [
    # flags
    ("nothing_to_do", lambda c: {}, "give either --from_hf DIR --to_jax DIR"),
    ("both_directions", lambda c: dict(from_hf=c.hf(), to_hf=c.path("out")),
     "give either --from_hf DIR --to_jax DIR"),
    ("no_destination", lambda c: dict(from_hf=c.hf()),
     "both a source and a destination are needed (got '{tmp}/hf' -> None)"),
    ("missing_source", lambda c: dict(from_hf=c.path("nope"), to_jax=c.path("out")),
     "source directory '{tmp}/nope' does not exist"),
    ("source_is_file", lambda c: dict(from_hf=c.write("f", "x"), to_jax=c.path("out")),
     "source '{tmp}/f' is a file"),
    ("same_source_and_destination", lambda c: dict(from_hf=c.hf(), to_jax=c.path("hf/")),
     "source and destination are the same directory '{tmp}/hf'"),
    ("destination_is_file", lambda c: dict(from_hf=c.hf(), to_jax=c.write("f", "x")),
     "destination '{tmp}/f' is a file"),
    ("bad_dtype", lambda c: dict(from_hf=c.hf(), to_jax=c.path("o"), dtype="int8"),
     "dtype='int8' must be one of"),
    # HF directories
    ("hf_without_config_json", lambda c: dict(from_hf=c.hf(remove=["config.json"]),
                                              to_jax=c.path("o")),
     "{tmp}/hf/config.json not found"),
    ("hf_config_not_json", lambda c: dict(from_hf=c.hf(write={"config.json": "not json"}),
                                          to_jax=c.path("o")),
     "{tmp}/hf/config.json: not valid JSON"),
    ("hf_config_is_a_list", lambda c: dict(from_hf=c.hf(write={"config.json": "[1]"}),
                                           to_jax=c.path("o")),
     "{tmp}/hf/config.json: expected a JSON object, got list"),
    ("hf_config_without_fields",
     lambda c: dict(from_hf=c.hf(_without("num_hidden_layers", "vocab_size")),
                    to_jax=c.path("o")),
     "{tmp}/hf/config.json lacks ['vocab_size', 'num_hidden_layers']"),
    ("hf_mixtral", lambda c: dict(from_hf=c.hf(lambda h: h.update(model_type="mixtral")),
                                  to_jax=c.path("o")),
     "{tmp}/hf/config.json: unknown architecture ['DeepseekV3ForCausalLM'] / model_type "
     "'mixtral'"),
    ("hf_unsupported_feature",
     lambda c: dict(from_hf=c.hf(lambda h: h.update(rope_scaling={"type": "dynamic",
                                                                   "factor": 2.0})),
                    to_jax=c.path("o")),
     "{tmp}/hf/config.json: rope type 'dynamic' is not supported"),
    ("hf_no_safetensors", lambda c: dict(
        from_hf=c.hf(remove=[SHARD, "model.safetensors.index.json"]), to_jax=c.path("o")),
     "no *.safetensors files in {tmp}/hf"),
    ("hf_index_lists_missing_shard", lambda c: dict(from_hf=c.hf(remove=[SHARD]),
                                                    to_jax=c.path("o")),
     "{tmp}/hf/model.safetensors.index.json lists shard model-00001-of-00001.safetensors"),
    ("hf_garbage_index",
     lambda c: dict(from_hf=c.hf(write={"model.safetensors.index.json": "{"}),
                    to_jax=c.path("o")),
     "{tmp}/hf/model.safetensors.index.json: not a safetensors index"),
    ("hf_truncated_safetensors", lambda c: dict(from_hf=c.hf(truncate=SHARD),
                                                to_jax=c.path("o")),
     "{tmp}/hf/model-00001-of-00001.safetensors: corrupt safetensors header"),
    ("hf_garbage_safetensors", lambda c: dict(from_hf=c.hf(write={SHARD: b"\xff" * 64}),
                                              to_jax=c.path("o")),
     "{tmp}/hf/model-00001-of-00001.safetensors: corrupt safetensors header"),
    ("hf_missing_tensor",
     lambda c: dict(from_hf=c.hf(edit_tensors=_without("model.embed_tokens.weight")),
                    to_jax=c.path("o")),
     "{tmp}/hf: 1 missing tensors: model.embed_tokens.weight"),
    ("hf_fewer_layers_than_weights",
     lambda c: dict(from_hf=c.hf(lambda h: h.update(num_hidden_layers=2)), to_jax=c.path("o")),
     "{tmp}/hf: 4 missing tensors: model.layers.2.eh_proj.weight"),
    ("hf_wrong_shape",
     lambda c: dict(from_hf=c.hf(edit_tensors=_shorter("model.embed_tokens.weight")),
                    to_jax=c.path("o")),
     "model.embed_tokens.weight in {tmp}/hf/model-00001-of-00001.safetensors: expected shape "
     "(256, 64) from config.json, got (255, 64)"),
    # deepseek_jax directories
    ("jax_missing_config", lambda c: dict(from_jax=c.jax(remove=["model_config.json"]),
                                          to_hf=c.path("o")),
     "{tmp}/jax/model_config.json not found"),
    ("jax_config_not_json", lambda c: dict(from_jax=c.jax(write={"model_config.json": "{"}),
                                           to_hf=c.path("o")),
     "{tmp}/jax/model_config.json: not valid JSON"),
    ("jax_config_is_a_list", lambda c: dict(from_jax=c.jax(write={"model_config.json": "[]"}),
                                            to_hf=c.path("o")),
     "{tmp}/jax/model_config.json: expected a JSON object"),
    ("jax_config_unknown_field",
     lambda c: dict(from_jax=c.jax(write={"model_config.json": '{"n_layerz": 3}'}),
                    to_hf=c.path("o")),
     "{tmp}/jax/model_config.json: Unknown ModelConfig field 'n_layerz'; did you mean "
     "'n_layers'?"),
    ("jax_impossible_config",
     lambda c: dict(from_jax=c.jax(write={"model_config.json": '{"n_heads": 0}'}),
                    to_hf=c.path("o")),
     "{tmp}/jax/model_config.json: n_heads=0"),
    ("jax_truncated_variables", lambda c: dict(from_jax=c.jax(truncate="variables.safetensors"),
                                               to_hf=c.path("o")),
     "{tmp}/jax/variables.safetensors: corrupt safetensors header"),
    ("jax_config_of_another_model",
     lambda c: dict(from_jax=c.jax(write={"model_config.json": '{"preset": "small"}'}),
                    to_hf=c.path("o")),
     "{tmp}/jax/variables.safetensors: params/"),
    # training runs' workdirs
    ("workdir_without_checkpoints", lambda c: dict(from_workdir=c.tmp, to_hf=c.path("o")),
     "{tmp}/checkpoints does not exist"),
    ("workdir_with_both_outputs",
     lambda c: dict(from_workdir=c.run(), to_hf=c.path("o"), to_jax=c.path("p")),
     "give --from_workdir DIR with exactly one of --to_hf / --to_jax"),
    ("workdir_step_not_saved", lambda c: dict(from_workdir=c.run(), to_jax=c.path("o"), step=7),
     "step 7 is not saved in {tmp}/run/checkpoints; saved steps: [3]"),
    ("workdir_corrupt_state", lambda c: dict(from_workdir=c.run(garble="state"),
                                             to_hf=c.path("o")),
     "checkpoint {tmp}/run/checkpoints/3 is unreadable"),
    ("workdir_checkpoint_without_meta", lambda c: dict(from_workdir=c.run(remove="meta"),
                                                       to_jax=c.path("o")),
     "checkpoint {tmp}/run/checkpoints/3 is unreadable"),
    ("workdir_corrupt_meta", lambda c: dict(from_workdir=c.run(garble="meta"),
                                            to_hf=c.path("o")),
     "checkpoint {tmp}/run/checkpoints/3 is unreadable"),
]


@pytest.fixture
def no_compiling(monkeypatch):
  """Building a train state or the update step is an error: user errors must
  be found before anything compiles."""
  def compiled(*args, **kwargs):
    raise AssertionError("compiled: the error was not found before compiling")
  monkeypatch.setattr(loop, "make_train_step", compiled)
  monkeypatch.setattr(start, "init_train_state", compiled)
  monkeypatch.setattr(hf_init, "init_state_from_hf", compiled)


def _check(error: Exception, fragment: str, tmp: str) -> None:
  message = str(error)
  fragment = fragment.replace("{tmp}", tmp)
  assert "\n" not in message, message
  assert fragment in message, message


@pytest.mark.parametrize("build,fragment", [c[1:] for c in TRAIN_CASES],
                         ids=[c[0] for c in TRAIN_CASES])
def test_train_user_errors(build, fragment, tmp_path, request, no_compiling):
  ctx = Ctx(str(tmp_path), request)
  args = build(ctx)
  config = args.pop("config", TINY)
  overrides = args.pop("overrides")
  workdir = args.pop("workdir", ctx.path("workdir"))
  fresh = not os.path.exists(workdir)
  with pytest.raises(train_lib.USER_ERRORS) as info:
    train_lib.run(load_config(config, overrides), workdir, log=lambda line: None, **args)
  _check(info.value, fragment, ctx.tmp)
  if "config error" in fragment or "flag error" in fragment:
    assert fresh and not os.path.exists(workdir)     # failed before the trainer started


@pytest.mark.parametrize("build,fragment", [c[1:] for c in CONVERT_CASES],
                         ids=[c[0] for c in CONVERT_CASES])
def test_convert_user_errors(build, fragment, tmp_path, request):
  ctx = Ctx(str(tmp_path), request)
  kwargs = build(ctx)
  with pytest.raises(convert_lib.USER_ERRORS) as info:
    convert_lib.convert(**kwargs)
  _check(info.value, fragment, ctx.tmp)
  for out in ("to_hf", "to_jax"):     # nothing written
    dst = kwargs.get(out)
    if dst and dst != kwargs.get("from_hf", "") + "/":
      assert not os.path.isdir(dst) or not os.listdir(dst)


def test_every_case_names_a_field_flag_or_file():
  cases = TRAIN_CASES + CONVERT_CASES
  assert len(cases) >= 30
  assert all(len({c[0] for c in table}) == len(table) for table in (TRAIN_CASES, CONVERT_CASES))
  # a path, a field=value, a --flag, a quoted name, a snake_case field, config.<field>
  named = re.compile(r"\{tmp\}|[\w.]+=|--\w+|'[^']+'|\"\w+\"|\b[a-z]+(_[a-z]+)+\b|config\.\w")
  assert [c[0] for c in cases if not named.search(c[2])] == []


# ---------------------------------------------------------------------------
# The command line: one line on stderr, non-zero, no traceback.
# ---------------------------------------------------------------------------
def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu",
              PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.mark.parametrize("launcher,args,line", [
    ("launch.train", lambda t: [f"--config={TINY}", "--config.model.n_layerz=3",
                                f"--workdir={t}/w"],
     "launch.train: config error: an override names a field the config does not have: "
     'n_layerz Did you mean "n_layers" instead of "n_layerz"? (see the config file; '
     "config.model.* are ModelConfig fields)"),
    ("launch.train", lambda t: [f"--config={TINY}", f"--workdir={t}/w",
                                f"--config.data_files=('{t}/missing.jsonl',)"],
     "launch.train: error: data file '{tmp}/missing.jsonl' does not exist"),
    ("launch.convert", lambda t: [f"--from_hf={t}", f"--to_jax={t}/out"],
     "launch.convert: error: {tmp}/config.json not found: an HF checkpoint directory needs "
     "config.json next to its *.safetensors (copy it from the model repo or use "
     "save_pretrained)."),
    ("launch.convert", lambda t: ["--from_jax=x", "--to_hf=y", "--dtype=int8"],
     "launch.convert: flag error: flag --dtype=int8: value should be one of "
     "<float32|bfloat16|float16> (pass --helpshort or --helpfull to see help on flags)"),
    ("launch.generate", lambda t: [f"--from_hf={t}", "--prompt=7*8", "--prompt= "],
     "launch.generate: error: prompt 1 is empty: every prompt needs text (or at least one "
     "token id in --prompts_file)."),
    ("launch.train", lambda t: [f"--config={TINY}", f"--workdir={t}/w",
                                "--config.max_digits=1", "--config.n_train_problems=5000"],
     "launch.train: error: n_train_problems=5000: the 'train' split holds only 229 "
     "distinct problems with max_digits=1 and task_kinds=('add', 'sub', 'mul'); set "
     "--config.n_train_problems=229 or lower, or raise --config.max_digits."),
    ("launch.train", lambda t: [f"--config={TINY}", f"--workdir={t}/w",
                                "--config.mesh.expert=4"],
     "launch.train: error: mesh data=-1 x expert=4: the fixed axes multiply to 4, which "
     "does not divide the 1 devices. On CPU, start with "
     "XLA_FLAGS=--xla_force_host_platform_device_count=4 (or JAX_NUM_CPU_DEVICES=4) for 4 "
     "fake devices."),
], ids=["train_unknown_key", "train_missing_data_file", "convert_no_config_json",
        "convert_bad_flag", "generate_empty_prompt", "train_too_few_problems",
        "train_mesh_on_one_cpu"])
def test_command_line_prints_one_line(launcher, args, line, tmp_path):
  """One line naming the field, flag or file; a run that fails to start
  leaves no empty workdir or checkpoints/ behind."""
  result = subprocess.run([sys.executable, "-m", launcher, *args(str(tmp_path))], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert not os.path.exists(tmp_path / "w"), os.listdir(tmp_path / "w")
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  # absl's log lines (W0102 12:00:00.000 ...) aside, if any
  lines = [s for s in result.stderr.splitlines() if s.strip() and not s[:5].startswith(
      ("W0", "W1", "I0", "I1", "E0", "E1"))]
  assert lines == [line.replace("{tmp}", str(tmp_path))], result.stderr[-3000:]
