"""Sequence-level distillation into the dense student (launch/configs/distill_dense_seq.py).

Oracles: the student's parameter count written out by hand for a Llama-style
GQA decoder, and the same ModelConfig as the token-level arm (distill_dense.py);
the first step's loss recomputed in NumPy float64 (log-softmax of the start
weights' logits, the mean over completion targets only) on the run's first
batch; the missing samples file refused on the command line with one line.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from deepseek_jax.data import tasks
from deepseek_jax.model import Transformer, abstract_variables, count_params
from deepseek_jax.train import loop
from deepseek_jax.train.step import init_train_state
from launch.config_flag import load_config
from launch.configs import build_configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = os.path.join(REPO, "launch", "configs", "distill_dense_seq.py")
TOKEN = os.path.join(REPO, "launch", "configs", "distill_dense.py")
ARM_FIELDS = ("objective", "distill_teacher", "data_files", "eval_task")


@pytest.fixture(scope="module")
def records(tmp_path_factory):
  """A tiny samples file as launch.rejection_sample writes it: a perfect
  teacher's completions (the worked solutions) of train-split problems."""
  path = str(tmp_path_factory.mktemp("samples") / "samples.jsonl")
  with open(path, "w") as f:
    for p in tasks.generate_problems(16, seed=5, split="train", max_digits=1):
      f.write(json.dumps({"prompt": tasks.format_prompt(p, "short"),
                          "completion": tasks.format_completion(p), "answer": p.answer,
                          "kind": tasks.kind_of(p)}) + "\n")
  return path


def test_the_student_is_the_token_level_arms_dense_gqa_decoder():
  model_seq, train_seq = build_configs(load_config(SEQ))
  model_tok, train_tok = build_configs(load_config(TOKEN))
  assert model_seq == model_tok                    # the arms differ in the data only
  assert (model_seq.attention, model_seq.n_routed_experts, model_seq.n_mtp_depth) == (
      "gqa", 0, 0)
  # Llama-style by hand: per block q, o (dim x heads*hd), k, v (dim x kv*hd),
  # SwiGLU 3 x dim x inter, two RMSNorm scales; untied embedding and head
  dim, layers, vocab = 128, 4, 128
  block = 2 * dim * 4 * 32 + 2 * dim * 2 * 32 + 3 * dim * 256 + 2 * dim
  assert count_params(abstract_variables(model_seq)["params"]) == (
      layers * block + 2 * vocab * dim + dim) == 623744
  assert (train_seq.objective, train_seq.distill_teacher, train_seq.data_files,
          train_seq.eval_task) == ("lm", "", ("runs/samples.jsonl",), True)
  # everything else (schedule, batch, task, evaluation) is the token-level arm's
  for key, value in train_tok.to_dict().items():
    if key not in ARM_FIELDS:
      assert train_seq.to_dict()[key] == value, key


def _overrides(records_path):
  return [f"--config.data_files=('{records_path}',)", "--config.steps=2",
          "--config.batch_size=8", "--config.seq_len=64", "--config.warmup_steps=1",
          "--config.max_digits=1", "--config.n_eval_problems=2", "--config.eval_batch_size=2",
          "--config.max_new_tokens=4", "--config.log_every=1", "--config.fast_compile=True",
          "--config.async_checkpoints=False", "--config.model.n_layers=2",
          "--config.model.n_dense_layers=2"]


def test_two_steps_on_records_are_plain_ce_on_the_completions(records, tmp_path):
  from launch.train import run
  config = load_config(SEQ, _overrides(records))
  workdir, lines = str(tmp_path / "run"), []
  summary = run(config, workdir, log=lines.append)
  assert any("prompt/completion records (loss on completions only)" in l for l in lines), lines
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  steps = [r for r in rows if "ce" in r]
  assert [r["step"] for r in steps] == [1, 2]
  assert all(np.isfinite(r["loss"]) and r["loss"] == pytest.approx(r["ce"]) for r in steps)
  assert [r["eval_n"] for r in rows if "eval_accuracy" in r] == [2]
  assert summary["final_step"] == 2

  # Step 1's loss by hand: the start weights' logits on the first batch, the
  # float64 mean NLL over the targets the mask keeps; those are completion
  # tokens only (<bos> prompt completion <eos>: no target inside a prompt).
  model_cfg, train_cfg = build_configs(config)
  batch = loop.build_data(model_cfg, train_cfg).iterator.batch_at(0)
  start = init_train_state(model_cfg, train_cfg, jax.random.key(train_cfg.seed))
  logits = np.asarray(Transformer(model_cfg).apply(
      {"params": start.params}, batch["tokens"], segment_ids=batch["segment_ids"],
      positions=batch["positions"]), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  mask = batch["loss_mask"].astype(np.float64)
  assert steps[0]["loss"] == pytest.approx((nll * mask).sum() / mask.sum(), rel=1e-4)
  assert steps[0]["target_tokens"] == mask.sum()
  _assert_mask_is_completion_only(batch, model_cfg, train_cfg)


def _assert_mask_is_completion_only(batch, model_cfg, train_cfg):
  """Each kept target sits after its document's prompt: the first kept
  target of a document is the first id of ' <think>' and every later target
  of that document up to its <eos> is kept."""
  tok = loop.build_data(model_cfg, train_cfg).tokenizer
  think = tok.encode(" <think>")[0]
  for row in range(batch["tokens"].shape[0]):
    seg, mask, targets = (np.asarray(batch[k][row]) for k in ("segment_ids", "loss_mask",
                                                              "targets"))
    for s in set(seg[seg > 0].tolist()):
      kept = np.nonzero((seg == s) & (mask > 0))[0]
      if len(kept):
        assert targets[kept[0]] == think
        assert np.array_equal(kept, np.arange(kept[0], kept[-1] + 1))


def test_missing_samples_file_is_one_line_before_compiling(tmp_path):
  """As-is, from a directory without runs/samples.jsonl: exit 1 with one line
  naming the file, no workdir left behind."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  result = subprocess.run(
      [sys.executable, "-m", "launch.train", f"--config={SEQ}", f"--workdir={tmp_path}/w"],
      cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      "launch.train: error: data file 'runs/samples.jsonl' does not exist"]
  assert not os.path.exists(tmp_path / "w")
