"""Inference: absorbed-MLA cached decode, `generate`, sampling filters,
speculative decoding with MTP.

Oracles: the naive (training) forward over the whole sequence, argmax
continuations computed with it, distributions worked out by hand, and
plain greedy decoding for the speculative path.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import get_preset
from deepseek_jax.infer import cache as cache_lib
from deepseek_jax.infer import generate, sampling_logprobs, stream
from deepseek_jax.model import Transformer, init_variables

PROMPTS = [[1, 5, 9, 20, 7], [3, 4], [8, 8, 8, 9, 10, 11, 12, 13, 14]]


@pytest.fixture(scope="module")
def tiny():
  cfg = get_preset("tiny")
  return cfg, init_variables(cfg, jax.random.key(0))


_NAIVE_LEN = 40


def _naive_logits(cfg, variables, seq):
  """Full forward logits of seq [len(seq), V]: one compilation per config
  (the sequence is right-padded; causal attention ignores the padding)."""
  buf = np.zeros((1, _NAIVE_LEN), np.int32)
  buf[0, :len(seq)] = seq
  return np.asarray(_naive_fn(cfg)(variables, buf)[0, :len(seq)])


_NAIVE = {}


def _naive_fn(cfg):
  if cfg not in _NAIVE:
    _NAIVE[cfg] = jax.jit(Transformer(cfg).apply)
  return _NAIVE[cfg]


def _teacher_forced_cached_logits(cfg, variables, seqs, prefix):
  """Prefill each row's first prefix[b] tokens, then feed the rest of the
  row one token at a time through the absorbed decode path; logits at every
  position [b, L, V] (positions past a row's length are zero)."""
  b, total = len(seqs), max(len(s) for s in seqs)
  model = Transformer(cfg)
  p = max(prefix)
  buf = np.zeros((b, p), np.int32)
  for i, s in enumerate(seqs):
    buf[i, :prefix[i]] = s[:prefix[i]]
  lens = jnp.asarray(prefix, jnp.int32)
  seg = (jnp.arange(p)[None] < lens[:, None]).astype(jnp.int32)
  out = np.zeros((b, total, cfg.vocab_size), np.float32)
  logits, _, entries = jax.jit(lambda v, t, s: model.apply(v, t, segment_ids=s,
                                                            mode="prefill"))(variables, buf, seg)
  for i in range(b):
    out[i, :prefix[i]] = np.asarray(logits[i, :prefix[i]])
  cache = cache_lib.write(cache_lib.init_cache(cfg, b, total), entries,
                          jnp.zeros((b,), jnp.int32))
  step = jax.jit(lambda v, t, pos, c: model.apply(v, t, positions=pos, mode="decode", cache=c))
  pos = np.array(prefix, np.int32)
  for _ in range(total - min(prefix)):
    tok = np.array([s[min(q, len(s) - 1)] for s, q in zip(seqs, pos)], np.int32)
    logits, _, entries = step(variables, tok[:, None], np.minimum(pos, total - 1)[:, None], cache)
    cache = cache_lib.write(cache, entries, jnp.asarray(np.minimum(pos, total - 1)))
    for i, s in enumerate(seqs):
      if pos[i] < len(s):
        out[i, pos[i]] = np.asarray(logits[i, 0])
    pos = pos + 1
  return out


@pytest.mark.parametrize("name,changes", [
    ("q-lora", {}),
    ("no q-lora", {"q_lora_rank": 0}),
    ("yarn past the original length", {"original_seq_len": 16, "max_seq_len": 64,
                                       "rope_factor": 4.0, "mscale": 0.707}),
])
def test_absorbed_cached_decode_reproduces_the_naive_forward(name, changes):
  cfg = get_preset("tiny", **changes)
  variables = init_variables(cfg, jax.random.key(1))
  rng = np.random.default_rng(0)
  total = 40 if "yarn" in name else 20
  seqs = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (total, total - 7, total - 3)]
  cached = _teacher_forced_cached_logits(cfg, variables, seqs, prefix=[5, 1, 9])
  for i, s in enumerate(seqs):
    want = _naive_logits(cfg, variables, s)
    np.testing.assert_allclose(cached[i, :len(s)], want, rtol=1e-5, atol=1e-5,
                               err_msg=f"{name}, row {i}")
  if "yarn" in name:
    assert cfg.use_yarn and total > cfg.original_seq_len


def test_greedy_generate_is_the_naive_argmax_continuation(tiny):
  cfg, variables = tiny
  gen = generate(cfg, variables, PROMPTS, max_new_tokens=8)
  assert gen.tokens.dtype == np.int32 and gen.tokens.shape == (3, 8)
  assert gen.logprobs.dtype == np.float32 and gen.lengths.tolist() == [8, 8, 8]
  for i, p in enumerate(PROMPTS):
    seq = list(p)
    for j in range(8):
      logits = _naive_logits(cfg, variables, seq)[-1]
      nxt = int(np.argmax(logits))
      assert gen.tokens[i, j] == nxt, (i, j)
      logp = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
      np.testing.assert_allclose(gen.logprobs[i, j], logp[nxt], rtol=1e-5, atol=1e-5)
      seq.append(nxt)
  streamed = []
  it = stream(cfg, variables, PROMPTS, max_new_tokens=8)
  try:
    while True:
      streamed.append(next(it))
  except StopIteration as stop:
    final = stop.value
  np.testing.assert_array_equal(final.tokens, gen.tokens)
  assert [sum((s[i] for s in streamed), []) for i in range(3)] == gen.tokens.tolist()


def test_stop_tokens_end_each_row(tiny):
  cfg, variables = tiny
  free = generate(cfg, variables, PROMPTS, max_new_tokens=8)
  stop = int(free.tokens[0, 2])              # row 0 stops at its 3rd token at the latest
  gen = generate(cfg, variables, PROMPTS, max_new_tokens=8, stop_ids=(stop,))
  for i in range(3):
    row = free.tokens[i].tolist()
    n = row.index(stop) + 1 if stop in row else 8
    assert gen.lengths[i] == n
    assert gen.tokens[i, :n].tolist() == row[:n]
    assert (gen.tokens[i, n:] == -1).all() and (gen.logprobs[i, n:] == 0).all()
  assert gen.lengths[0] <= 3


def test_sampling_filters_match_hand_computed_distributions():
  logits = jnp.log(jnp.asarray([[0.1, 0.4, 0.2, 0.3]], jnp.float32))
  def probs(**kw):
    s = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) | kw
    return np.exp(np.asarray(sampling_logprobs(logits, s["temperature"], s["top_k"],
                                               s["top_p"], s["min_p"])))[0]
  np.testing.assert_allclose(probs(), [0.1, 0.4, 0.2, 0.3], rtol=1e-6)
  np.testing.assert_allclose(probs(top_k=2), [0, 0.4 / 0.7, 0, 0.3 / 0.7], rtol=1e-6)
  # top-p 0.6: 0.4 alone < 0.6, 0.4 + 0.3 reaches it -> {1, 3}
  np.testing.assert_allclose(probs(top_p=0.6), [0, 0.4 / 0.7, 0, 0.3 / 0.7], rtol=1e-6)
  np.testing.assert_allclose(probs(top_p=0.75), [0, 0.4 / 0.9, 0.2 / 0.9, 0.3 / 0.9], rtol=1e-6)
  # min-p 0.45: keep p >= 0.18 -> {1, 2, 3}; 0.6: p >= 0.24 -> {1, 3}
  np.testing.assert_allclose(probs(min_p=0.45), [0, 0.4 / 0.9, 0.2 / 0.9, 0.3 / 0.9], rtol=1e-6)
  np.testing.assert_allclose(probs(min_p=0.6), [0, 0.4 / 0.7, 0, 0.3 / 0.7], rtol=1e-6)
  # top-p after top-k renormalises within the top 3: 0.4/0.9 < 0.5 <= 0.7/0.9
  np.testing.assert_allclose(probs(top_k=3, top_p=0.5), [0, 0.4 / 0.7, 0, 0.3 / 0.7], rtol=1e-6)
  # temperature 2: p ~ sqrt(p)
  t2 = np.sqrt([0.1, 0.4, 0.2, 0.3])
  np.testing.assert_allclose(probs(temperature=2.0), t2 / t2.sum(), rtol=1e-6)
  np.testing.assert_allclose(probs(temperature=0.0), [0, 1, 0, 0])


def test_sampling_is_reproducible_and_follows_the_filters(tiny):
  cfg, variables = tiny
  kw = dict(max_new_tokens=6, temperature=1.0, top_k=5)
  a = generate(cfg, variables, PROMPTS, rng=jax.random.key(3), **kw)
  b = generate(cfg, variables, PROMPTS, rng=jax.random.key(3), **kw)
  c = generate(cfg, variables, PROMPTS, rng=jax.random.key(4), **kw)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert (a.tokens != c.tokens).any()
  for i, p in enumerate(PROMPTS):                # every sample is in its step's top 5
    seq = list(p)
    for j in range(6):
      logits = _naive_logits(cfg, variables, seq)[-1]
      assert a.tokens[i, j] in np.argsort(-logits)[:5]
      seq.append(int(a.tokens[i, j]))


@pytest.fixture(scope="module")
def trained_mtp():
  """tiny, trained 120 steps on arithmetic progressions mod vocab (the
  next token depends on the last two): MTP module 1 learns to draft."""
  from deepseek_jax.train.config import TrainConfig
  from deepseek_jax.train.step import init_train_state, make_train_step
  cfg = get_preset("tiny", vocab_size=64)
  tcfg = TrainConfig(steps=120, batch_size=16, seq_len=24, warmup_steps=10, lr=3e-3,
                     fast_compile=True)
  state = init_train_state(cfg, tcfg, jax.random.key(0))
  step = make_train_step(cfg, tcfg)
  rng = np.random.default_rng(0)
  for _ in range(tcfg.steps):
    start = rng.integers(0, 64, (16, 1))
    stride = rng.integers(1, 4, (16, 1))
    ids = ((start + stride * np.arange(25)) % 64).astype(np.int32)
    batch = {"tokens": ids[:, :24], "targets": ids[:, 1:25],
             "segment_ids": np.ones((16, 24), np.int32),
             "positions": np.broadcast_to(np.arange(24, dtype=np.int32), (16, 24)).copy(),
             "loss_mask": np.ones((16, 24), np.float32)}
    state, metrics = step(state, batch)
  assert float(metrics["ce"]) < 0.5, float(metrics["ce"])
  return cfg, {"params": state.params, "router_bias": state.router_bias}


@pytest.mark.slow   # 20-60 s on 2 cores: CI's slow step keeps the default suite under 15 min
def test_speculative_greedy_equals_plain_greedy_and_drafts_get_accepted(trained_mtp, tiny):
  cfg, variables = trained_mtp
  prompts = [[3, 5, 7], [10, 11], [0, 3, 6, 9, 12]]
  plain = generate(cfg, variables, prompts, max_new_tokens=12)
  spec = generate(cfg, variables, prompts, max_new_tokens=12, speculative=True)
  np.testing.assert_array_equal(spec.tokens, plain.tokens)
  np.testing.assert_allclose(spec.logprobs, plain.logprobs, rtol=1e-4, atol=1e-4)
  assert plain.tokens[0, :4].tolist() == [9, 11, 13, 15]        # it learned the task
  assert spec.acceptance_rate > 0.8 and spec.steps < plain.steps, (spec.acceptance_rate,
                                                                  spec.steps)
  # a random model's drafts are rejected, and the output is still plain greedy
  cfg0, v0 = tiny
  np.testing.assert_array_equal(
      generate(cfg0, v0, PROMPTS, max_new_tokens=6, speculative=True).tokens,
      generate(cfg0, v0, PROMPTS, max_new_tokens=6).tokens)
  # sampling: same rng, same samples; stop ids respected
  kw = dict(max_new_tokens=12, temperature=0.8, speculative=True, stop_ids=(20,))
  s1 = generate(cfg, variables, prompts, rng=jax.random.key(1), **kw)
  s2 = generate(cfg, variables, prompts, rng=jax.random.key(1), **kw)
  np.testing.assert_array_equal(s1.tokens, s2.tokens)
  for row, n in zip(s1.tokens, s1.lengths):
    assert 20 not in row[:n - 1].tolist() and (row[n:] == -1).all()


@pytest.mark.slow    # CI runs it in leg 1's slow step (.ci/run)
def test_speculative_sampling_keeps_the_target_distribution(trained_mtp):
  """The second generated token's histogram over 1024 rows, speculative vs
  plain, sampling from each step's top 2 at temperature 2: drafts are
  accepted only sometimes, so both the accept and the resample path run."""
  cfg, variables = trained_mtp
  prompts = [[3, 5, 7]] * 1024
  kw = dict(max_new_tokens=2, temperature=2.0, top_k=2)
  plain = generate(cfg, variables, prompts, rng=jax.random.key(0), **kw)
  spec = generate(cfg, variables, prompts, rng=jax.random.key(1), speculative=True, **kw)
  assert 0.2 < spec.acceptance_rate < 0.95, spec.acceptance_rate
  pairs = [np.bincount(g.tokens[:, 0] * cfg.vocab_size + g.tokens[:, 1],
                       minlength=cfg.vocab_size ** 2) / len(prompts) for g in (plain, spec)]
  assert 0.5 * np.abs(pairs[0] - pairs[1]).sum() < 0.06


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
    (dict(prompts=[[1] * 125]), "prompt 0 has 125 tokens; .* at most max_seq_len - "
                                "max_new_tokens = 124"),
    (dict(prompts=[[1, 256]]), "prompt 0 holds token id 256, outside \\[0, vocab_size=256\\)"),
    (dict(temperature=-0.5), "temperature=-0.5 must be >= 0"),
    (dict(top_p=0.0), "top_p=0.0 must lie in \\(0, 1\\]"),
    (dict(top_p=1.5), "top_p=1.5 must lie in \\(0, 1\\]"),
    (dict(top_k=-1), "top_k=-1 must be an integer >= 0"),
    (dict(min_p=1.0), "min_p=1.0 must lie in \\[0, 1\\)"),
    (dict(max_new_tokens=0), "max_new_tokens=0 must be a positive integer"),
    (dict(stop_ids=(999,)), "stop id 999 is not a token id"),
    (dict(prompts="hello"), "prompts must be a non-empty list"),
])
def test_bad_requests_fail_before_compiling(tiny, kwargs, match):
  cfg, variables = tiny
  args = dict(prompts=[[1, 2]], max_new_tokens=4) | kwargs
  with pytest.raises(ValueError, match=match):
    generate(cfg, variables, args.pop("prompts"), **args)
  with pytest.raises(ValueError, match="n_mtp_depth=0"):
    generate(cfg.replace(n_mtp_depth=0), variables, [[1]], max_new_tokens=2, speculative=True)


def test_cache_holds_only_the_latent_and_the_rotary_key():
  cfg = get_preset("v3_671b")
  assert cfg.dtype == "bfloat16"
  assert cache_lib.bytes_per_token(cfg) == (512 + 64) * 61 * 2           # 70 KB
  assert cache_lib.full_kv_bytes_per_token(cfg) == 128 * (128 + 64 + 128) * 61 * 2
  small = get_preset("tiny")
  c = jax.eval_shape(lambda: cache_lib.init_cache(small, 2, 16))
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(c))
  assert total == cache_lib.bytes_per_token(small) * 2 * 16


def test_generate_cli_prints_the_generation_and_refuses_bad_input(tiny, tmp_path):
  """launch.generate --from_hf on a tiny checkpoint with token-id prompts (no
  tokenizer): the printed rows are `generate`'s; a malformed prompts file and
  an over-long prompt exit non-zero with the reason, before compiling."""
  import json
  import os
  import subprocess
  import sys

  from deepseek_jax.interop import save_hf_checkpoint
  cfg, variables = tiny
  save_hf_checkpoint(cfg, variables, str(tmp_path / "hf"))
  good = tmp_path / "prompts.jsonl"
  good.write_text("".join(json.dumps({"tokens": p}) + "\n" for p in PROMPTS))
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=repo,
             JAX_COMPILATION_CACHE_DIR=os.environ["DSJ_TEST_JAX_CACHE"])

  def run(*args):
    return subprocess.run([sys.executable, "-m", "launch.generate", *args], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300)

  out = run(f"--from_hf={tmp_path / 'hf'}", f"--prompts_file={good}", "--max_new_tokens=5",
            "--speculative", "--max_seq_len=256", "--rope_factor=2")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "max_seq_len=256, original_seq_len=128, rope_factor=2.0 (YaRN on)" in out.stderr
  want = generate(cfg.replace(max_seq_len=256, rope_factor=2.0), variables, PROMPTS,
                  max_new_tokens=5)
  lines = sorted(line for line in out.stdout.splitlines() if line.startswith("["))
  assert lines == [f"[{i}] {p!r} -> {' '.join(map(str, want.tokens[i]))!r}"
                   for i, p in enumerate(PROMPTS)]
  assert "15 tokens (3 prompts)" in out.stderr and "MTP drafts accepted" in out.stderr

  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"tokens": [1, 2]}\n{"text": "hi"}\n')
  out = run(f"--from_hf={tmp_path / 'hf'}", f"--prompts_file={bad}")
  assert out.returncode != 0 and "bad.jsonl:2: each line needs" in out.stderr
  long = tmp_path / "long.jsonl"
  long.write_text(json.dumps({"tokens": [1] * 100}) + "\n")
  out = run(f"--from_hf={tmp_path / 'hf'}", f"--prompts_file={long}", "--max_new_tokens=64")
  assert out.returncode != 0 and "prompt 0 has 100 tokens" in out.stderr


def _np_sampled_logp(logits, targets, temperature, top_p, floor):
  """log p(target) under logits / T after the top-p filter, in float64: keep
  the most likely tokens until the mass before a token reaches top_p."""
  out = np.empty(targets.shape)
  for idx in np.ndindex(targets.shape):
    z = logits[idx].astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    before = np.cumsum(p[order]) - p[order]
    keep = order[(before < top_p) | (np.arange(len(p)) == 0)]
    q = p[keep] / p[keep].sum()
    t = targets[idx]
    out[idx] = np.log(q[list(keep).index(t)]) if t in keep else floor
  return out


def test_token_logprobs_score_the_tempered_top_p_distribution(tiny):
  """GRPO's ratio and KL need log-probs of the distribution the sampler drew
  from: at temperature 0.7, top_p 0.9 against a NumPy computation over the
  same masked distribution (targets outside the nucleus: the floor)."""
  from deepseek_jax.infer import token_logprobs
  from deepseek_jax.infer.scoring import LOGP_FLOOR
  cfg, variables = tiny
  rng = np.random.default_rng(7)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 12)), jnp.int32)
  logits = np.asarray(Transformer(cfg).apply(variables, tokens))
  # Half the targets are the most likely token (inside any nucleus), half random.
  targets = np.where(rng.random((2, 12)) < 0.5, logits.argmax(-1),
                     rng.integers(0, cfg.vocab_size, (2, 12))).astype(np.int32)
  got = np.asarray(token_logprobs(cfg, variables, tokens, jnp.asarray(targets), chunk=8,
                                  temperature=0.7, top_p=0.9))
  want = _np_sampled_logp(logits, targets, 0.7, 0.9, LOGP_FLOOR)
  assert (want == LOGP_FLOOR).any() and (want > LOGP_FLOOR).any()
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # The ratio on a rollout's first pass: pi / pi_old of one distribution is 1;
  # against the temperature-1 log-probs it is not.
  plain = np.asarray(token_logprobs(cfg, variables, tokens, jnp.asarray(targets), chunk=8))
  inside = want > LOGP_FLOOR
  assert np.abs(np.exp(got - want)[inside] - 1).max() < 1e-3
  assert np.abs(np.exp(got - plain)[inside] - 1).max() > 0.05
  with pytest.raises(ValueError, match="temperature=0"):
    token_logprobs(cfg, variables, tokens, jnp.asarray(targets), temperature=0.0)
  # gather=: the head on chosen positions only (GRPO's completion tokens)
  gather = jnp.asarray([[3, 4, 5, 11], [0, 7, 7, 2]], jnp.int32)
  picked = np.asarray(token_logprobs(cfg, variables, tokens, jnp.asarray(targets), chunk=8,
                                     temperature=0.7, top_p=0.9, gather=gather))
  np.testing.assert_allclose(picked, np.take_along_axis(got, np.asarray(gather), 1),
                             rtol=1e-6, atol=1e-6)


@pytest.mark.slow   # 20-60 s on 2 cores: CI's slow step keeps the default suite under 15 min
def test_chunked_token_logprobs_equal_the_full_logits_and_never_build_them(tiny):
  """Against log_softmax of the full [b, s, vocab] logits, values and
  gradients; the traced computation has no [b, s, vocab] array."""
  from deepseek_jax.infer import token_logprobs
  cfg, variables = tiny
  rng = np.random.default_rng(5)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 20)), jnp.int32)
  targets = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 20)), jnp.int32)

  def full(v):
    logits = Transformer(cfg).apply(v, tokens)
    return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]

  def chunked(v):
    return token_logprobs(cfg, v, tokens, targets, chunk=8)     # 3 chunks, the last padded

  np.testing.assert_allclose(chunked(variables), full(variables), rtol=1e-5, atol=1e-5)
  g_full = jax.grad(lambda v: full(v).sum())(variables)
  g_chunk = jax.grad(lambda v: chunked(v).sum())(variables)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_full), jax.tree.leaves(g_chunk)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  shapes = set()

  def collect(jaxpr):                 # every equation, inside scans / remat / pjit too
    for eqn in jaxpr.eqns:
      shapes.update(tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars)
      for p in eqn.params.values():
        for sub in p if isinstance(p, (list, tuple)) else [p]:
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            collect(inner)
  collect(jax.make_jaxpr(jax.grad(lambda v: chunked(v).sum()))(variables).jaxpr)
  assert (2, 20, cfg.vocab_size) not in shapes and (2, 8, cfg.vocab_size) in shapes


def test_prefix_sharing_prefills_each_group_once_and_changes_nothing(tiny):
  """generate(..., group_size=G) on runs of G equal prompts (GRPO's groups):
  the same tokens, log-probs and routing record as prefilling every row, with
  the prefill run on one row per group (its traced batch is b / G)."""
  cfg, variables = tiny
  prompts = [p for p in PROMPTS for _ in range(3)]
  kw = dict(max_new_tokens=6, temperature=1.0, rng=jax.random.key(11), return_routing=True)
  plain = generate(cfg, variables, prompts, **kw)
  shared = generate(cfg, variables, prompts, group_size=3, **kw)
  np.testing.assert_array_equal(shared.tokens, plain.tokens)
  np.testing.assert_array_equal(shared.routing, plain.routing)
  np.testing.assert_array_equal(shared.prompt_routing, plain.prompt_routing)
  np.testing.assert_allclose(shared.logprobs, plain.logprobs, rtol=0, atol=1e-6)
  assert len({tuple(r) for r in plain.tokens.tolist()}) > len(PROMPTS)   # rows sampled apart
  from deepseek_jax.infer import decode
  batches = []
  apply = decode.Transformer.apply

  def spy(self, variables, tokens, *args, **kwargs):
    if kwargs.get("mode") == "prefill":
      batches.append(tokens.shape[0])
    return apply(self, variables, tokens, *args, **kwargs)
  decode.Transformer.apply = spy
  try:
    decode._compiled.cache_clear()
    generate(cfg, variables, prompts, group_size=3, max_new_tokens=6)
  finally:
    decode.Transformer.apply = apply
  assert batches == [len(PROMPTS)]
  with pytest.raises(ValueError, match="prompt 1 differs from prompt 0"):
    generate(cfg, variables, PROMPTS[:2] * 2, group_size=2, max_new_tokens=4)
  with pytest.raises(ValueError, match="must divide the 3 prompts"):
    generate(cfg, variables, PROMPTS, group_size=2, max_new_tokens=4)
