"""experiments/distillation.ipynb at tiny size: a teacher trained to memorise 16
one-digit problems, its rejection-sampled completions, three dense students.

Oracles: every kept sample's answer against Python's own arithmetic on the
prompt (and the prompt among the teacher's training problems); each arm's
config.json (the objective, data and teacher it claims; one student
architecture for all); the curves behind the RESULT lines against
metrics.jsonl (loss = CE for the SFT arms, = KL for the token-level one);
the held-out figure against a greedy decode of the final checkpoint by hand
(the model's logits, argmax token by token, no cache) on the same problems.
"""

import json
import math
import os
import re
import sys

import jax.numpy as jnp
import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "experiments"))

from run_notebook import image_outputs, run_notebook, result_records  # noqa: E402

NOTEBOOK = os.path.join(REPO_ROOT, "experiments", "distillation.ipynb")
ARMS = ["scratch", "token", "sequence"]
N_PROBLEMS, STEPS, EVAL_EVERY, N_EVAL, NEW = 16, 6, 3, 4, 48
TASK = ["--config.max_digits=1", f"--config.n_train_problems={N_PROBLEMS}",
        f"--config.n_eval_problems={N_EVAL}", "--config.batch_size=8", "--config.seq_len=64",
        f"--config.max_new_tokens={NEW}", f"--config.eval_batch_size={N_EVAL}",
        "--config.fast_compile=True"]
TEACHER = [*TASK, "--config.steps=120", "--config.warmup_steps=5", "--config.end_lr=3e-3",
           "--config.model.n_layers=2", "--config.model.n_mtp_depth=0", "--config.ckpt_every=1000"]
STUDENT = [*TASK, f"--config.steps={STEPS}", "--config.warmup_steps=1",
           "--config.model.n_layers=2", "--config.model.n_dense_layers=2",
           "--config.distill_k=16"]


@pytest.fixture(scope="module")
def distill_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("distillation"))
  params = dict(teacher_overrides=TEACHER, n_prompts=N_PROBLEMS, k=2, arms=ARMS, seeds=[0],
                student_overrides=STUDENT, eval_every=EVAL_EVERY, log_every=2,
                workdir_root=workdir, jax_cache_dir=os.environ["DSJ_TEST_JAX_CACHE"])
  nb = run_notebook(NOTEBOOK, params, out=os.path.join(workdir, "executed.ipynb"), timeout=600)
  assert image_outputs(nb) > 0 and os.path.getsize(os.path.join(workdir, "distillation.png"))
  results = result_records(nb)
  return workdir, results[0], results[1:]


def _answer(prompt):
  """The true result of 'User: a+b\\nAssistant:' by Python's arithmetic."""
  a, op, b = re.fullmatch(r"User: (\d+)([+*-])(\d+)\nAssistant:", prompt).groups()
  return str({"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op])


@pytest.mark.slow   # the fixture runs the notebook: 50 s warm, ~95 s cold on 2 busy cores
def test_kept_samples_are_correct_completions_of_training_prompts(distill_run):
  from deepseek_jax.data import tasks
  _, samples, _ = distill_run
  assert samples["part"] == "samples" and samples["n_sampled"] == 2 * N_PROBLEMS
  with open(samples["samples_path"]) as f:
    records = [json.loads(line) for line in f]
  assert len(records) == samples["n_samples"] > 0
  # kept = accepted less repeats of a completion for the same prompt
  assert len(records) <= round(samples["acceptance"] * 2 * N_PROBLEMS)
  assert len({(r["prompt"], r["completion"]) for r in records}) == len(records)
  taught = {tasks.format_prompt(p) for p in tasks.generate_problems(
      N_PROBLEMS, seed=0, split="train", max_digits=1)}
  for r in records:
    assert r["prompt"] in taught
    assert r["answer"] == _answer(r["prompt"])
    assert re.fullmatch(r"\s*<think>.*</think>\s*<answer>(.*)</answer>\s*", r["completion"],
                        re.DOTALL).group(1).strip() == r["answer"]


def _metrics(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_each_arm_trained_what_it_claims_on_one_student(distill_run):
  _, samples, arms = distill_run
  assert [(r["arm"], r["seed"]) for r in arms] == [(a, 0) for a in ARMS]
  configs = {}
  for r in arms:
    with open(os.path.join(r["workdir"], "config.json")) as f:
      configs[r["arm"]] = json.load(f)
  train = {arm: c["train"] for arm, c in configs.items()}
  assert (train["scratch"]["objective"], train["scratch"]["data_files"]) == ("lm", [])
  assert (train["token"]["objective"], train["token"]["data_files"]) == ("distill", [])
  assert train["token"]["distill_teacher"] == samples["teacher"]
  assert (train["sequence"]["objective"], train["sequence"]["data_files"]) == (
      "lm", [samples["samples_path"]])
  models = [c["model"] for c in configs.values()]
  assert models[0] == models[1] == models[2]
  assert models[0]["attention"] == "gqa" and models[0]["n_routed_experts"] == 0


@pytest.mark.slow
def test_curves_and_held_out_figures_are_the_runs_own(distill_run):
  _, _, arms = distill_run
  for r in arms:
    with open(r["curves_path"]) as f:
      c = json.load(f)
    records = _metrics(r["workdir"])
    steps = [x for x in records if "ce" in x]
    evals = [x for x in records if "eval_accuracy" in x]
    assert r["steps"] == STEPS and c["step"] == list(range(1, STEPS + 1))
    assert c["ce"] == [x["ce"] for x in steps] and c["loss"] == [x["loss"] for x in steps]
    for x in steps:    # the loss each arm minimises
      want = x["kl"] if r["arm"] == "token" else x["ce"]
      assert math.isfinite(x["loss"]) and x["loss"] == pytest.approx(want, rel=1e-6)
    assert c["eval_step"] == [EVAL_EVERY, STEPS] and r["eval_n"] == N_EVAL
    assert r["accuracy"] == evals[-1]["eval_accuracy"] == c["eval_accuracy"][-1]
    # training seconds from the end of step 1 (its compile left out), monotone
    assert c["time"][0] == 0 and np.all(np.diff(c["time"]) >= 0)
    assert 0 < c["time"][-1] == r["train_seconds"]
    assert r["train_seconds"] <= r["wall_seconds"]


def _greedy_accuracy(run_dir, problems, template):
  """Exact match of greedy completions, decoded without a KV cache: the whole
  buffer through the model each token (causal, so what follows a row's
  position cannot change its logits), argmax, stop at <eos>."""
  import jax
  from deepseek_jax.data import tasks
  from deepseek_jax.data.tokenizer import default_tokenizer
  from deepseek_jax.model import Transformer
  from deepseek_jax.train import export
  cfg, _, variables, _ = export.load_trained_run(run_dir)
  tok = default_tokenizer()
  forward = jax.jit(Transformer(cfg).apply)
  prompts = [tok.encode(tasks.format_prompt(p, template), add_bos=True) for p in problems]
  buf = np.full((len(prompts), max(map(len, prompts)) + NEW), tok.pad_id, np.int32)
  for i, ids in enumerate(prompts):
    buf[i, :len(ids)] = ids
  pos = np.array([len(ids) for ids in prompts])
  out, done = [[] for _ in prompts], np.zeros(len(prompts), bool)
  for _ in range(NEW):
    logits = np.asarray(forward(variables, jnp.asarray(buf)))
    for i in range(len(prompts)):
      nxt = int(np.argmax(logits[i, pos[i] - 1]))
      done[i] |= nxt == tok.eos_id
      if not done[i]:
        out[i].append(nxt)
        buf[i, pos[i]] = nxt
        pos[i] += 1
  answers = [tasks.extract_answer(tok.decode(ids)) for ids in out]
  return sum(a == _answer(tasks.format_prompt(p)) for a, p in zip(answers, problems)) / len(
      problems)


@pytest.mark.slow
def test_held_out_accuracy_matches_a_greedy_decode_by_hand(distill_run):
  from deepseek_jax.data import tasks
  _, _, arms = distill_run
  problems = tasks.generate_problems(N_EVAL, seed=0, split="test", max_digits=1)
  for r in arms:
    assert r["accuracy"] == pytest.approx(_greedy_accuracy(r["workdir"], problems, "short"))
