"""Preference learning foundations: preference files and batches
(data/preferences.py), the Bradley-Terry loss and the value head
(rl/reward_model.py), DPO / IPO (rl/dpo.py), and the shipped example
(launch/data/arith_prefs*.jsonl)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import get_preset
from deepseek_jax.data import default_tokenizer, pipeline, preferences, prompts, tasks
from deepseek_jax.data.preferences import PreferenceRecord
from deepseek_jax.data.prompts import PromptFormat
from deepseek_jax.model import Transformer, init_variables
from deepseek_jax.rl import dpo, reward_model, verifiers

DATA = os.path.join(os.path.dirname(__file__), "..", "launch", "data")


def _jsonl(path, lines):
  path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
  return str(path)


# ----------------------------------------------------------------------------- files


def test_preference_files_read_jsonl_and_parquet_records(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  a = _jsonl(tmp_path / "a.jsonl", [
      {"prompt": "2+2", "chosen": " 4", "rejected": " 5"}, "",
      {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away.", "kind": "chat",
       "system": "Be kind.", "extra": [1, 2]},
      {"prompt": "7*6", "chosen": "42", "rejected": "41", "kind": None}])
  b = str(tmp_path / "b.parquet")
  pq.write_table(pa.table({"prompt": ["x?", "y?"], "chosen": ["1", "2"],
                           "rejected": ["3", "4"], "kind": ["k", None]}), b)
  records = preferences.load_preference_files([a, b])
  assert [(r.prompt, r.chosen, r.rejected, r.kind, r.system) for r in records] == [
      ("2+2", " 4", " 5", "", ""), ("Hi", "Hello!", "Go away.", "chat", "Be kind."),
      ("7*6", "42", "41", "", ""), ("x?", "1", "3", "k", ""), ("y?", "2", "4", "", "")]
  assert records[1].where == f"{a}:3" and records[4].where == f"{b}: row 1 (0-based)"
  assert preferences.load_preference_files(a) == records[:3]          # one path


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "1+1", "chosen": "2"}', "missing field(s) ['rejected']"),
    ('{"prompt": "1+1", "chosen": null, "rejected": "3"}', "missing field(s) ['chosen']"),
    ('{"chosen": "2", "rejected": "3"}', "missing field(s) ['prompt']"),
    ('["1+1", "2", "3"]', "expected a JSON object"),
    ('{"prompt": "1+1", "chosen": "2", "rejected": "3"', "invalid JSON"),
    ('{"prompt": 11, "chosen": "2", "rejected": "3"}', "field 'prompt' is a int"),
    ('{"prompt": "1+1", "chosen": 2, "rejected": "3"}', "field 'chosen' is a int"),
    ('{"prompt": "1+1", "chosen": "2", "rejected": [{"role": "assistant", "content": "3"}]}',
     "field 'rejected' is a list, expected a string; conversational records"),
    ('{"prompt": "1+1", "chosen": "2", "rejected": "3", "kind": 3}', "field 'kind' is a int"),
    ('{"prompt": "1+1", "chosen": "2", "rejected": "3", "system": true}',
     "field 'system' is a bool"),
    ('{"prompt": "  ", "chosen": "2", "rejected": "3"}', "field 'prompt' is empty"),
    ('{"prompt": "1+1", "chosen": "", "rejected": "3"}', "field 'chosen' is empty"),
    ('{"prompt": "1+1", "chosen": "2", "rejected": "\\n"}', "field 'rejected' is empty"),
    ('{"prompt": "1+1", "chosen": "2", "rejected": "2"}', "are the same text"),
])
def test_malformed_preference_records_are_refused_naming_file_and_line(tmp_path, line,
                                                                       message):
  path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"},
                                       line])
  with pytest.raises(ValueError) as e:
    preferences.load_preference_files([path])
  assert f"{path}:2:" in str(e.value) and message in str(e.value)


def test_other_bad_preference_files(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  text = tmp_path / "p.txt"
  text.write_text("2+2\n")
  with pytest.raises(ValueError, match="not plain text"):
    preferences.load_preference_files([str(text)])
  with pytest.raises(FileNotFoundError, match="does not exist"):
    preferences.load_preference_files([str(tmp_path / "missing.jsonl")])
  with pytest.raises(ValueError, match="hold no records"):
    preferences.load_preference_files([_jsonl(tmp_path / "e.jsonl", [])])
  with pytest.raises(ValueError, match="no preference files"):
    preferences.load_preference_files([])
  with pytest.raises(ValueError, match="unknown data file extension"):
    preferences.load_preference_files([str(tmp_path / "p.csv")])
  q = str(tmp_path / "q.parquet")
  pq.write_table(pa.table({"prompt": ["x"], "chosen": ["1"], "loser": ["2"]}), q)
  with pytest.raises(ValueError, match=r"no column\(s\) \['rejected'\]; its columns are"):
    preferences.load_preference_files([q])
  pq.write_table(pa.table({"prompt": ["x"], "chosen": [1], "rejected": [2]}), q)
  with pytest.raises(ValueError, match="column 'chosen' has type int64, not string"):
    preferences.load_preference_files([q])
  pq.write_table(pa.table({"prompt": ["x", "y"], "chosen": ["1", None],
                           "rejected": ["2", "3"]}), q)
  with pytest.raises(ValueError, match=rf"{q}: row 1 \(0-based\): missing field\(s\) "
                                       r"\['chosen'\]"):
    preferences.load_preference_files([q])


# ----------------------------------------------------------------------------- batches


def _records():
  return [PreferenceRecord("12+34", " <answer>46</answer>", " <answer>47</answer>", where="f:1"),
          PreferenceRecord("9*9", " 81", " it is 18", system="Multiply.", where="f:2"),
          PreferenceRecord("1-1", " zero", " 0", where="f:3")]


@pytest.mark.parametrize("fmt", [PromptFormat("short"), PromptFormat("none")])
def test_encode_pairs_matches_one_sft_document_per_row(fmt):
  """Oracle: pipeline.encode_sft + pack_documents (completion_only), one document
  per row: the same tokens / targets / segments / positions, and response_mask
  equals the SFT loss_mask."""
  tok, records, seq_len = default_tokenizer(), _records(), 40
  got = preferences.encode_pairs(tok, records, fmt, seq_len=seq_len)
  assert set(got) == set(preferences.PAIR_DTYPES)
  for key, dtype in preferences.PAIR_DTYPES.items():
    assert got[key].shape == (6, seq_len) and got[key].dtype == dtype, key
  for row in range(6):
    record = records[row // 2]
    response = (record.chosen, record.rejected)[row % 2]
    doc = pipeline.encode_sft(tok, [(fmt.text(record.prompt_record()), response)])[0]
    want = pipeline.pack_documents([doc], seq_len, pad_id=tok.pad_id, completion_only=True)
    for key in ("tokens", "targets", "segment_ids", "positions"):
      np.testing.assert_array_equal(got[key][row], want[key][0], err_msg=f"{key} row {row}")
    np.testing.assert_array_equal(got["response_mask"][row], want["loss_mask"][0])
  # the response mask's last 1 has <eos> as its target; its first has the response's first id
  last = np.asarray(reward_model.last_response_index(jnp.asarray(got["response_mask"])))
  assert np.all(got["targets"][np.arange(6), last] == tok.eos_id)
  chosen, rejected = preferences.split_pairs(got["tokens"])
  assert chosen.shape == rejected.shape == (3, seq_len)


def test_encode_pairs_with_a_chat_template_and_the_length_limit(tmp_path):
  tok = default_tokenizer()
  chat = prompts.ChatTemplate("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]"
                              "{{ m['content'] }}{% endfor %}[assistant]", bos_token="<bos>")
  fmt = PromptFormat("none", chat)
  record = PreferenceRecord("hi", "yo", "no", system="S")
  got = preferences.encode_pairs(tok, [record], fmt, seq_len=40, pad_id=5)
  text = "<bos>[system]S[user]hi[assistant]"
  want = tok.encode(text) + tok.encode("yo", add_eos=True)
  assert want.count(tok.bos_id) == 1                       # the template's <bos>, not a second
  n = len(want)
  np.testing.assert_array_equal(got["tokens"][0, :n - 1], want[:-1])
  assert np.all(got["tokens"][0, n:] == 5) and np.all(got["targets"][0, n - 1:] == 5)
  # exactly seq_len + 1 ids fit (the last one only as a target); one more does not
  exact = preferences.encode_pairs(tok, [record], fmt, seq_len=n - 1)
  np.testing.assert_array_equal(exact["targets"][0], want[1:])
  assert exact["response_mask"][0, -1] == 1 and exact["segment_ids"][0].min() == 1
  with pytest.raises(ValueError, match=rf"f:7: <bos> prompt chosen <eos> is {n + 1} tokens "
                                       rf".* seq_len\+1={n}.*raise seq_len to >= {n}"):
    preferences.encode_pairs(tok, [PreferenceRecord("hi", "yo!", "no", system="S",
                                                    where="f:7")], fmt, seq_len=n - 1)
  with pytest.raises(ValueError, match="record 0: <bos> prompt rejected <eos>"):
    preferences.encode_pairs(tok, [PreferenceRecord("hi", "y", "no!!", system="S")], fmt,
                             seq_len=n - 1)
  with pytest.raises(ValueError, match="at least one"):
    preferences.encode_pairs(tok, [], fmt, seq_len=8)
  with pytest.raises(ValueError, match="even number"):
    preferences.split_pairs(np.zeros((3, 2)))


def test_encode_responses_rows_are_encode_pairs_rows():
  """One row per (prompt, response): the rows encode_pairs makes for the same
  texts (what a reward model scores), and the counts checked."""
  tok, records, fmt = default_tokenizer(), _records(), PromptFormat("short")
  pairs = preferences.encode_pairs(tok, records, fmt, seq_len=40)
  prompts = [r.prompt_record() for r in records]
  for which in (0, 1):
    got = preferences.encode_responses(
        tok, prompts, [(r.chosen, r.rejected)[which] for r in records], fmt, seq_len=40)
    for key in preferences.PAIR_DTYPES:
      np.testing.assert_array_equal(got[key], pairs[key][which::2], err_msg=key)
  with pytest.raises(ValueError, match="2 responses for 3 prompts; expected 1 per prompt"):
    preferences.encode_responses(tok, prompts, ["a", "b"], fmt, seq_len=40)
  with pytest.raises(ValueError, match="f:2: <bos> prompt response <eos> is"):
    preferences.encode_responses(tok, prompts[1:2], ["x" * 50], fmt, seq_len=40)


# ----------------------------------------------------------------------------- losses


def _np_log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _pairs(n, scale, seed):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=n) * scale for _ in range(4)]


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_bradley_terry_loss_and_gradient_against_numpy(scale):
  rc, rr, m, _ = _pairs(16, scale, 0)
  m = np.abs(m)
  for margin in (0.0, 0.7, m):
    want = -_np_log_sigmoid(rc - rr - margin)             # float64
    got = reward_model.bradley_terry_loss(jnp.float32(rc), jnp.float32(rr),
                                          margin=jnp.float32(margin) if np.ndim(margin)
                                          else margin)
    assert got.shape == (16,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # d/d rc = -sigmoid(-(rc - rr - margin)) = -(1 - sigmoid(x)); d/d rr the opposite
    g_c, g_r = jax.grad(lambda a, b: reward_model.bradley_terry_loss(a, b, margin=margin
                                                                      ).sum(),
                        argnums=(0, 1))(jnp.float32(rc), jnp.float32(rr))
    s = 1.0 / (1.0 + np.exp(rc - rr - margin))
    np.testing.assert_allclose(g_c, -s, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g_r, s, rtol=1e-5, atol=1e-7)


def test_losses_are_stable_at_huge_gaps():
  big = jnp.float32([1e4, -1e4, 80.0, -80.0])
  zero = jnp.zeros(4, jnp.float32)
  bt = reward_model.bradley_terry_loss(big, zero)
  np.testing.assert_allclose(bt, [0.0, 1e4, 0.0, 80.0], atol=1e-6, rtol=1e-6)
  g = jax.grad(lambda r: reward_model.bradley_terry_loss(r, zero).sum())(big)
  np.testing.assert_allclose(g, [0.0, -1.0, 0.0, -1.0], atol=1e-6)
  loss = dpo.dpo_loss(big, zero, zero, zero, beta=0.5)
  np.testing.assert_allclose(loss, [0.0, 5e3, 0.0, 40.0], atol=1e-6, rtol=1e-6)
  g = jax.grad(lambda c: dpo.dpo_loss(c, zero, zero, zero, beta=0.5).sum())(big)
  assert np.all(np.isfinite(g))
  np.testing.assert_allclose(g, [0.0, -0.5, 0.0, -0.5], atol=1e-6)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_dpo_and_ipo_loss_and_gradients_against_numpy(loss_type, beta):
  c, r, rc, rr = (x * 5 - 40 for x in _pairs(12, 1.0, 1))   # summed log-probs: negative
  h = (c - rc) - (r - rr)
  if loss_type == "sigmoid":
    want = -_np_log_sigmoid(beta * h)
    dh = -beta / (1.0 + np.exp(beta * h))                   # d loss / d h
  else:
    want = (h - 1.0 / (2.0 * beta)) ** 2
    dh = 2.0 * (h - 1.0 / (2.0 * beta))
  args = [jnp.float32(x) for x in (c, r, rc, rr)]
  got = dpo.dpo_loss(*args, beta=beta, loss_type=loss_type)
  assert got.shape == (12,)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5)
  grads = jax.grad(lambda *a: dpo.dpo_loss(*a, beta=beta, loss_type=loss_type).sum(),
                   argnums=(0, 1, 2, 3))(*args)
  for g, sign in zip(grads, (1, -1, -1, 1)):               # dh/dc, dh/dr, dh/drc, dh/drr
    np.testing.assert_allclose(g, sign * dh, rtol=1e-4, atol=1e-5)


def test_loss_arguments_are_checked():
  x = jnp.zeros(3)
  for beta in (0.0, -1.0, float("nan"), float("inf")):
    with pytest.raises(ValueError, match=f"beta={beta}"):
      dpo.dpo_loss(x, x, x, x, beta=beta)
  with pytest.raises(ValueError, match="loss_type='hinge'"):
    dpo.dpo_loss(x, x, x, x, beta=0.1, loss_type="hinge")
  with pytest.raises(ValueError, match=r"ref_rejected_logp has shape \(2,\)"):
    dpo.dpo_loss(x, x, x, jnp.zeros(2), beta=0.1)
  with pytest.raises(ValueError, match=r"chosen_logp has shape \(3, 1\)"):
    dpo.dpo_loss(x[:, None], x, x, x, beta=0.1)
  with pytest.raises(ValueError, match=r"r_rejected has shape \(4,\)"):
    reward_model.bradley_terry_loss(x, jnp.zeros(4))
  with pytest.raises(ValueError, match=r"margin has shape \(2,\)"):
    reward_model.bradley_terry_loss(x, x, margin=jnp.zeros(2))
  with pytest.raises(ValueError, match=r"pair_mask has shape \(2,\)"):
    dpo.dpo_metrics(x, x, x, x, beta=0.1, pair_mask=jnp.ones(2))
  # a traced beta is accepted (validated by the caller)
  out = jax.jit(lambda b: dpo.dpo_loss(x, x, x, x, beta=b))(0.1)
  np.testing.assert_allclose(out, np.log(2.0), rtol=1e-6)


def test_metrics_against_numpy_and_padding_pairs_do_not_count():
  c, r, rc, rr = _pairs(10, 3.0, 2)
  r[0] = c[0] - rc[0] + rr[0]                               # a tie: counts as wrong
  beta, mask = 0.2, np.array([1, 1, 1, 1, 1, 1, 1, 0, 0, 0], np.float32)
  got = dpo.dpo_metrics(*(jnp.float32(x) for x in (c, r, rc, rr)), beta=beta,
                        pair_mask=jnp.asarray(mask))
  k = mask > 0
  margin = beta * ((c - rc) - (r - rr))
  want = {"reward_accuracy": np.mean(margin[k] > 1e-6), "margin": margin[k].mean(),
          "chosen_reward": beta * (c - rc)[k].mean(), "rejected_reward": beta * (r - rr)[k].mean(),
          "chosen_logp": c[k].mean(), "rejected_logp": r[k].mean(),
          "logp_margin": (c - r)[k].mean()}
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5, err_msg=key)
  # padding pairs may hold anything (NaN included) without changing a metric
  poisoned = [np.where(k, x, np.nan) for x in (c, r, rc, rr)]
  again = dpo.dpo_metrics(*(jnp.float32(x) for x in poisoned), beta=beta,
                          pair_mask=jnp.asarray(mask))
  for key in want:
    np.testing.assert_allclose(again[key], got[key], rtol=1e-6, err_msg=key)
  rm = reward_model.reward_metrics(jnp.float32(c), jnp.float32(r), jnp.asarray(mask))
  np.testing.assert_allclose(rm["accuracy"], np.mean((c - r)[k] > 0), rtol=1e-6)
  np.testing.assert_allclose(rm["margin"], (c - r)[k].mean(), rtol=1e-5)
  np.testing.assert_allclose(rm["chosen_reward"], c[k].mean(), rtol=1e-5)
  np.testing.assert_allclose(rm["rejected_reward"], r[k].mean(), rtol=1e-5)


# ----------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def tiny():
  cfg = get_preset("tiny")
  return cfg, init_variables(cfg, jax.random.key(0))


_NAIVE_LEN = 48
_NAIVE = {}


def _naive(cfg, variables, ids, hidden=False):
  """Transformer(cfg).apply over ids alone (no segment ids, positions or padding
  mask: the row is right-padded to _NAIVE_LEN, which causal attention never
  reads from): float64 logits (or final hidden states) [len(ids), .]. One
  compilation per kind, shared by the tests."""
  if hidden not in _NAIVE:
    _NAIVE[hidden] = jax.jit(lambda v, t: Transformer(cfg).apply(v, t, return_hidden=hidden))
  buf = np.zeros((1, _NAIVE_LEN), np.int32)
  buf[0, :len(ids)] = ids
  return np.asarray(_NAIVE[hidden](variables, buf)[0, :len(ids)], np.float64)


def _docs(tok, records, fmt):
  """(ids, number of prompt ids) of each row's unpadded document, built
  without encode_pairs: the oracle's view of the batch."""
  out = []
  for record in records:
    prompt = tok.encode(fmt.text(record.prompt_record()), add_bos=True)
    for response in (record.chosen, record.rejected):
      out.append((np.asarray(prompt + tok.encode(response, add_eos=True)), len(prompt)))
  return out


def test_response_logprobs_against_a_per_row_loop(tiny):
  cfg, variables = tiny
  tok, fmt, records = default_tokenizer(), PromptFormat("short"), _records()
  want_sum, want_mean = [], []
  for ids, n_prompt in _docs(tok, records, fmt):
    logits = _naive(cfg, variables, ids[:-1])
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    picked = logp[np.arange(len(ids) - 1), ids[1:]][n_prompt - 1:]  # response ids and <eos>
    want_sum.append(picked.sum())
    want_mean.append(picked.mean())
  want_sum, want_mean = np.array(want_sum), np.array(want_mean)
  fn = jax.jit(dpo.response_logprobs, static_argnums=0, static_argnames=("chunk", "average"))
  batch = preferences.encode_pairs(tok, records, fmt, seq_len=40)
  got = fn(cfg, variables, batch, chunk=16)
  assert got.shape == (6,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want_sum, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(fn(cfg, variables, batch, average=True), want_mean, rtol=1e-4)
  # padding does not count: another pad id and a longer row give the same values
  padded = preferences.encode_pairs(tok, records, fmt, seq_len=56, pad_id=7)
  np.testing.assert_allclose(fn(cfg, variables, padded), got, rtol=1e-5, atol=1e-4)
  # and the DPO loss through it has the float64 value of the oracle's log-probs
  c, r = preferences.split_pairs(got)
  wc, wr = preferences.split_pairs(want_sum)
  loss = dpo.dpo_loss(c, r, c * 0 - 10, r * 0 - 12, beta=0.1)
  np.testing.assert_allclose(loss, -_np_log_sigmoid(0.1 * ((wc + 10) - (wr + 12))),
                             rtol=1e-4)


def test_response_logprobs_gradient_reaches_the_model(tiny):
  cfg, variables = tiny
  tok = default_tokenizer()
  batch = preferences.encode_pairs(tok, _records()[:1], PromptFormat("short"), seq_len=32)

  def loss(v):
    c, r = preferences.split_pairs(dpo.response_logprobs(cfg, v, batch, chunk=16))
    return dpo.dpo_loss(c, r, jax.lax.stop_gradient(c) - 1, jax.lax.stop_gradient(r),
                        beta=0.1).mean()

  grads = jax.jit(jax.grad(loss))(variables)["params"]
  norms = {k: float(_norm(g)) for k, g in grads.items()}
  assert all(np.isfinite(v) for v in norms.values()) and norms["head"] > 0
  assert norms["embed"] > 0


def _norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                      for x in jax.tree.leaves(tree)))


def test_reward_scores_read_the_last_response_token(tiny):
  cfg, variables = tiny
  tok, fmt, records = default_tokenizer(), PromptFormat("none"), _records()
  head = reward_model.init_value_head(cfg, jax.random.key(1))
  assert head["kernel"].shape == (cfg.dim,) and head["bias"].shape == ()
  head = {"kernel": head["kernel"], "bias": jnp.float32(0.25)}
  h_last = []
  for ids, _ in _docs(tok, records, fmt):
    h = _naive(cfg, variables, ids[:-1], hidden=True)
    h_last.append(h[len(ids) - 2])         # the input position whose target is <eos>
  h_last = np.array(h_last)
  want = h_last @ np.asarray(head["kernel"], np.float64) + 0.25
  fn = jax.jit(reward_model.reward_scores, static_argnums=0)
  batch = preferences.encode_pairs(tok, records, fmt, seq_len=40)
  got = fn(cfg, variables, head, batch)
  assert got.shape == (6,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  padded = preferences.encode_pairs(tok, records, fmt, seq_len=48, pad_id=9)
  np.testing.assert_allclose(fn(cfg, variables, head, padded), got, rtol=1e-5, atol=1e-5)
  # reward_model_loss_fn: the mean Bradley-Terry loss over the scores, its metrics, and
  # gradients that reach the value head (against the oracle) and the model
  loss_fn = reward_model.reward_model_loss_fn(cfg, margin=0.5)
  params = dict(variables["params"], value_head=head)
  (value, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      params, variables["router_bias"], batch)
  g_head = grads.pop("value_head")
  g_model = grads
  wc, wr = preferences.split_pairs(want)
  np.testing.assert_allclose(value, np.mean(-_np_log_sigmoid(wc - wr - 0.5)), rtol=1e-4)
  # d loss / d kernel = mean_i -sigmoid(-(x_i)) (h_chosen_i - h_rejected_i); the bias cancels
  s = 1.0 / (1.0 + np.exp(wc - wr - 0.5))
  hc, hr = preferences.split_pairs(h_last)
  np.testing.assert_allclose(g_head["kernel"], -(s[:, None] * (hc - hr)).mean(0), rtol=1e-3,
                             atol=1e-5)
  assert abs(float(g_head["bias"])) < 1e-6
  assert float(_norm(g_model)) > 0
  np.testing.assert_allclose(aux["metrics"]["accuracy"], np.mean(wc > wr), rtol=1e-6)
  np.testing.assert_allclose(aux["metrics"]["margin"], np.mean(wc - wr), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("loss_type, average", [("sigmoid", False), ("ipo", True)])
def test_dpo_update_step_learns_the_preferences(tiny, loss_type, average):
  """dpo_loss_fn through train.step.make_update_step (AdamW): at step 0 the policy is
  the reference (loss log 2 / IPO's (1 / (2 beta))^2, no pair ranked right); a few
  steps on one batch raise the chosen-minus-rejected margin and rank every pair."""
  from deepseek_jax.train.config import TrainConfig
  from deepseek_jax.train.step import init_train_state, make_update_step
  cfg = get_preset("tiny")
  tcfg = TrainConfig(steps=8, batch_size=6, seq_len=40, warmup_steps=1, lr=3e-3,
                     weight_decay=0.0)
  beta = 0.5
  state = init_train_state(cfg, tcfg, jax.random.key(0))
  batch = preferences.encode_pairs(default_tokenizer(), _records(), PromptFormat("short"),
                                   seq_len=40)
  ref_variables = {"params": state.params, "router_bias": state.router_bias}
  batch["ref_logp"] = np.asarray(jax.jit(dpo.response_token_logprobs, static_argnums=0)(
      cfg, ref_variables, batch))
  assert batch["ref_logp"].shape == (6, 40) and np.all(batch["ref_logp"][
      batch["response_mask"] == 0] == 0)
  ref = batch["ref_logp"].sum(1) / (batch["response_mask"].sum(1) if average else 1.0)
  ref = preferences.split_pairs(ref)
  # the loss fn's value and gradient are dpo_loss over response_logprobs
  loss_fn = dpo.dpo_loss_fn(cfg, beta=beta, loss_type=loss_type, average=average)

  def composed(params):
    c, r = preferences.split_pairs(dpo.response_logprobs(
        cfg, {"params": params, "router_bias": state.router_bias}, batch, average=average))
    return dpo.dpo_loss(c, r, *ref, beta=beta, loss_type=loss_type).mean()

  want_loss, want_grad = jax.jit(jax.value_and_grad(composed))(state.params)
  step = make_update_step(cfg, tcfg, loss_fn)
  state, m0 = step(state, batch)
  first = np.log(2.0) if loss_type == "sigmoid" else (1.0 / (2 * beta)) ** 2
  np.testing.assert_allclose([m0["loss"], want_loss], first, rtol=1e-5)
  np.testing.assert_allclose(m0["grad_norm"], _norm(want_grad), rtol=1e-4)
  assert float(m0["reward_accuracy"]) == 0.0 and abs(float(m0["margin"])) < 1e-5
  for _ in range(7):
    state, m = step(state, batch)
  assert float(m["loss"]) < float(m0["loss"])
  assert float(m["logp_margin"]) > float(m0["logp_margin"]) and float(m["margin"]) > 0
  assert float(m["reward_accuracy"]) == 1.0
  with pytest.raises(ValueError, match="loss_type='kto'"):
    dpo.dpo_loss_fn(cfg, beta=0.1, loss_type="kto")
  with pytest.raises(ValueError, match="beta=0"):
    dpo.dpo_loss_fn(cfg, beta=0)


def test_last_response_index():
  mask = jnp.asarray([[0, 1, 1, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]], jnp.float32)
  np.testing.assert_array_equal(reward_model.last_response_index(mask), [2, 4, 0])


# ----------------------------------------------------------------------------- example


def _lines(name):
  with open(os.path.join(DATA, name)) as f:
    return [json.loads(line) for line in f]


def test_shipped_preference_example():
  from launch.data import make_examples
  train = preferences.load_preference_files(os.path.join(DATA, "arith_prefs.jsonl"))
  held = preferences.load_preference_files(os.path.join(DATA, "arith_prefs_eval.jsonl"))
  assert len(train) == 1000 and len(held) == 100
  for records, name in ((train, "arith_prefs.jsonl"), (held, "arith_prefs_eval.jsonl")):
    raw = _lines(name)
    for record, line in zip(records, raw):
      answer = str(eval(record.prompt))                   # the independent oracle
      assert line["answer"] == answer and record.kind == tasks.kind_of(
          tasks.Problem(record.prompt, "", answer))
      assert verifiers.math(record.chosen, answer) == 1.0, record
      assert verifiers.math(record.rejected, answer) == 0.0, record
      assert tasks.format_ok(record.rejected)
      wrong = tasks.extract_answer(record.rejected)
      assert len(wrong) == len(answer) and sum(a != b for a, b in zip(wrong, answer)) == 1
      # only the last reasoning line and the answer differ, by one digit each
      c_lines, r_lines = record.chosen.split("\n"), record.rejected.split("\n")
      assert c_lines[:-1] == r_lines[:-1] and len(c_lines) == len(r_lines)
      assert sum(a != b for a, b in zip(c_lines[-1], r_lines[-1])) == 2  # partial + answer
  # splits: held-out pairs are arith_eval.jsonl's test problems; train pairs are train
  # problems that no SFT or GRPO example file uses
  assert [r.prompt for r in held] == [line["prompt"] for line in _lines("arith_eval.jsonl")]
  assert all(tasks.split_of(r.prompt) == "test" for r in held)
  assert all(tasks.split_of(r.prompt) == "train" for r in train)
  used = {line["prompt"] for line in _lines("arith_prompts.jsonl")}
  used |= {line["prompt"].split("User: ")[1].split("\n")[0] for line in _lines("arith_sft.jsonl")}
  assert not used & {r.prompt for r in train} and len({r.prompt for r in train}) == 1000
  # general prompts (R1 stage 4's model-scored kind): train problems nothing else uses
  general = _lines("general_prompts.jsonl")
  assert len(general) == 200 and {(g["kind"], g["answer"]) for g in general} == {("general", "")}
  assert all(tasks.split_of(g["prompt"]) == "train" for g in general)
  assert not {g["prompt"] for g in general} & (used | {r.prompt for r in train})
  # deterministic: the generator rebuilds every shipped file line for line
  for name, records in make_examples.examples().items():
    assert records == _lines(name), name
  # and every pair fits the tiny preset's rows with the shipped template
  batch = preferences.encode_pairs(default_tokenizer(), train, PromptFormat("short"),
                                   seq_len=get_preset("tiny").max_seq_len)
  assert batch["tokens"].shape == (2000, 128)
  assert np.all(batch["response_mask"].sum(1) > 0)
