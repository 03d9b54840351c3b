"""Decoding in bfloat16 (`generate(..., dtype="bfloat16")`) and the MoE
kernel that reads only the experts a decode step picked (`experts_picked`).

Oracles: float32 greedy generation and the float32 naive forward (bfloat16
may only change a greedy token where float32's top two logits lie within a
bfloat16-rounding bound of each other), `experts_dense` (every expert,
masked by the gates) for the picked-experts kernel, `generate` for the CLI.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import get_preset
from deepseek_jax.infer import decode, generate
from deepseek_jax.model import Transformer, init_variables, moe

PROMPTS = [[1, 5, 9, 20, 7], [3, 4], [8, 8, 8, 9, 10, 11, 12, 13, 14]]
STEPS = 12
U_BF16 = 2.0 ** -8          # bfloat16's unit roundoff (8 significant bits)


@pytest.fixture(scope="module")
def model():
  """A tiny V3 (1 dense + 2 MoE layers) with 16 routed experts, top-2."""
  cfg = get_preset("tiny").replace(n_routed_experts=16, n_activated_experts=2)
  return cfg, init_variables(cfg, jax.random.key(0))


@pytest.fixture(scope="module")
def greedy(model):
  cfg, variables = model
  return (generate(cfg, variables, PROMPTS, max_new_tokens=STEPS),
          generate(cfg, variables, PROMPTS, max_new_tokens=STEPS, dtype="bfloat16"))


def _forward(cfg, variables, seq):
  """The naive (training) forward's float32 logits [len(seq), V]."""
  return np.asarray(jax.jit(Transformer(cfg).apply)(variables, jnp.asarray([seq]))[0],
                    np.float32)


def test_bf16_casts_weights_once_and_keeps_the_router_in_float32(model):
  cfg, variables = model
  cfg16, v16 = decode.inference_model(cfg, variables, "bfloat16")
  assert cfg16.dtype == "bfloat16" and cfg16.param_dtype == cfg.param_dtype
  flat = {jax.tree_util.keystr(p): x for p, x in
          jax.tree_util.tree_leaves_with_path(v16["params"])}
  kept = [k for k in flat if k.endswith(("['scale']", "['gate']"))]
  assert kept and all(flat[k].dtype == jnp.float32 for k in kept)
  assert all(x.dtype == jnp.bfloat16 for k, x in flat.items() if k not in kept)
  assert v16["router_bias"] is variables["router_bias"]
  # already bfloat16: a second cast changes nothing
  again = decode.cast_variables(v16, "bfloat16")
  assert all(a.dtype == b.dtype for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(v16)))
  assert decode.inference_model(cfg, variables, None) == (cfg, variables)
  for bad in ("float16", "bf16", 3):
    with pytest.raises(ValueError, match=r"dtype=.* must be one of \('float32', 'bfloat16'\)"):
      generate(cfg, variables, PROMPTS, max_new_tokens=2, dtype=bad)


def test_bf16_greedy_tokens_follow_float32_up_to_a_rounding_tie(model, greedy):
  """Every row's bfloat16 greedy tokens equal float32's, except from a step
  whose float32 top-2 logit gap is below the bfloat16 rounding bound
  B = 4 (n_layers + 1) u max_v sum_d |h_d W_dv| (u = 2^-8: rounding each of
  the head's products h_d W_dv, and the error each layer passes on, is a
  relative u-sized change per term): there the two logits may swap."""
  cfg, variables = model
  f32, b16 = greedy
  cfg16, v16 = decode.inference_model(cfg, variables, "bfloat16")
  head = np.abs(np.asarray(variables["params"]["head"]["kernel"], np.float64))
  n_equal_steps = 0
  for i, p in enumerate(PROMPTS):
    a, b = f32.sequences()[i], b16.sequences()[i]
    diverge = next((j for j in range(STEPS) if a[j] != b[j]), None)
    n_equal_steps += STEPS if diverge is None else diverge
    if diverge is None:
      continue
    seq = p + a[:diverge]                  # the tokens both runs fed before the split
    logits32 = _forward(cfg, variables, seq)[-1].astype(np.float64)
    logits16 = _forward(cfg16, v16, seq)[-1].astype(np.float64)
    h = _hidden(cfg, variables, seq)
    bound = 4 * (cfg.n_layers + 1) * U_BF16 * float((np.abs(h) @ head).max())
    top2 = np.sort(logits32)[-2:]
    gap = top2[1] - top2[0]
    err = np.abs(logits16 - logits32).max()
    assert err <= bound, ("bf16 error beyond rounding", err, bound)
    # a swap needs the gap within the two logits' errors, and those within B
    assert gap <= min(2 * err, bound), (i, diverge, gap, err, bound)
  # not vacuous: most steps agree
  assert n_equal_steps >= STEPS * len(PROMPTS) // 2, (f32.tokens, b16.tokens)


def _hidden(cfg, variables, seq):
  """The normalised final hidden state of seq's last token (the head's input), f64."""
  h = jax.jit(lambda v, t: Transformer(cfg).apply(v, t, return_hidden=True))(
      variables, jnp.asarray([seq]))
  return np.asarray(h[0, -1], np.float64)


@pytest.mark.parametrize("limit", [0.0, 0.5])
def test_picked_experts_kernel_equals_dense(limit):
  """experts_picked == experts_dense (same float32 numbers) on 3 tokens x
  top-2 of 16 experts, two tokens sharing an expert and one expert picked
  twice across rows (the unique ids then fill the static bound with E)."""
  n, d, f, e = 3, 32, 16, 16
  ks = jax.random.split(jax.random.key(1), 5)
  x = jax.random.normal(ks[0], (n, d))
  w1, w3 = (jax.random.normal(k, (e, d, f)) * 0.2 for k in ks[1:3])
  w2 = jax.random.normal(ks[3], (e, f, d)) * 0.2
  experts = jnp.array([[3, 11], [11, 0], [15, 3]], jnp.int32)
  gates = jax.random.uniform(ks[4], (n, 2))
  want = jax.jit(moe.experts_dense, static_argnames="swiglu_limit")(
      x, experts, gates, w1, w3, w2, swiglu_limit=limit)
  got = jax.jit(moe.experts_picked, static_argnames="swiglu_limit")(
      x, experts, gates, w1, w3, w2, swiglu_limit=limit)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(want)).max() > 0.1


def _decode_logits(cfg, variables, prompts):
  """Prefill right-padded prompts, then one decode step of each row's last
  prompt token again at its next position: the decode forward's logits."""
  from deepseek_jax.infer import cache as cache_lib
  p = max(len(q) for q in prompts)
  buf, lens = decode.pad_prompts(prompts, p)
  lens = jnp.asarray(lens)
  seg = (jnp.arange(p)[None] < lens[:, None]).astype(jnp.int32)
  model = Transformer(cfg)

  def run(v, buf):
    _, _, entries = model.apply(v, buf, segment_ids=seg, mode="prefill")
    cache = cache_lib.write(cache_lib.init_cache(cfg, len(prompts), p + 2), entries,
                            jnp.zeros((len(prompts),), jnp.int32))
    last = jnp.take_along_axis(buf, lens[:, None] - 1, axis=1)
    return model.apply(v, last, positions=lens[:, None], mode="decode", cache=cache)[0]
  return np.asarray(jax.jit(run)(variables, jnp.asarray(buf)))


@pytest.mark.parametrize("rows", [1, 2])
def test_decode_reads_only_the_picked_experts(model, monkeypatch, rows):
  """A decode step of 1-2 rows (rows x k = 2-4 < E = 16) runs experts_picked
  in every MoE layer, and its logits equal the all-experts kernel's
  (moe_impl="dense"); the training forward never takes it."""
  cfg, variables = model
  calls = []
  real = moe.experts_picked

  def spy(x, *args, **kw):
    calls.append(x.shape[0])
    return real(x, *args, **kw)
  monkeypatch.setattr(moe, "experts_picked", spy)
  prompts = PROMPTS[:rows]
  got = _decode_logits(cfg, variables, prompts)
  n_prefill = rows * max(len(q) for q in prompts)      # a short prefill takes it too
  few = n_prefill * cfg.n_activated_experts < cfg.n_routed_experts
  want_calls = [n_prefill] * cfg.n_moe_layers * few + [rows] * cfg.n_moe_layers
  assert calls == want_calls
  want = _decode_logits(cfg.replace(moe_impl="dense"), variables, prompts)
  assert calls == want_calls
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  jax.jit(Transformer(cfg).apply)(variables, jnp.asarray([[1, 2]]))   # training: 2 tokens
  assert calls == want_calls


def test_generate_cli_dtype_bfloat16(model, greedy, tmp_path):
  """launch.generate --dtype=bfloat16 on a saved checkpoint prints
  `generate(..., dtype="bfloat16")`'s rows (its stream path casts the same
  way); an unknown --dtype exits non-zero naming the choices."""
  from deepseek_jax.interop import save_hf_checkpoint
  cfg, variables = model
  save_hf_checkpoint(cfg, variables, str(tmp_path / "hf"))
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"tokens": p}) + "\n" for p in PROMPTS))
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=repo,
             JAX_COMPILATION_CACHE_DIR=os.environ["DSJ_TEST_JAX_CACHE"])

  def run(*args):
    return subprocess.run([sys.executable, "-m", "launch.generate", f"--from_hf={tmp_path / 'hf'}",
                           f"--prompts_file={prompts}", *args], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300)

  out = run(f"--max_new_tokens={STEPS}", "--dtype=bfloat16")
  assert out.returncode == 0, out.stderr[-2000:]
  want = greedy[1]
  lines = sorted(line for line in out.stdout.splitlines() if line.startswith("["))
  assert lines == [f"[{i}] {p!r} -> {' '.join(map(str, want.tokens[i]))!r}"
                   for i, p in enumerate(PROMPTS)]
  out = run("--dtype=float16")
  assert out.returncode != 0 and "--dtype" in out.stderr and "bfloat16" in out.stderr
