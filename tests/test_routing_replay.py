"""MoE routing replay (R3): the sampler records each token's experts, the
training forward replays them.

Oracles: the rollout's own log-probs (the decode path's, recorded while
sampling), a NumPy float64 transcription of the MoE with given experts and
of its router gradient, hand-built layouts, and one device against a mesh.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import get_preset
from deepseek_jax.infer import Generation, generate, rollout_routing, stream, token_logprobs
from deepseek_jax.model import Transformer, init_variables, moe
from deepseek_jax.parallel import MeshConfig, activate, batch_sharding, setup, tree_shardings
from test_moe import naive_route

CFG = get_preset("tiny")          # 2 MoE layers, 8 experts, k = 2, sigmoid router
PROMPTS = [[1, 5, 9, 20, 7], [3, 4], [8, 8, 8, 9, 10, 11, 12, 13, 14]]
MAX_NEW = 12
SEQ = 24                          # >= longest prompt + MAX_NEW


@pytest.fixture(scope="module")
def tiny():
  return init_variables(CFG, jax.random.key(0))


def _with_bias(variables, bias):
  out = jax.tree.map(lambda x: x, variables)
  out["router_bias"]["moe_layers"]["ffn"]["bias"] = jnp.asarray(bias, jnp.float32)
  return out


def _rollout_arrays(gen):
  """tokens / targets / segment ids [3, SEQ] of prompt + completion, and
  where completion token j is predicted (prompt length - 1 + j)."""
  seq = np.zeros((len(PROMPTS), SEQ + 1), np.int32)
  seg = np.zeros((len(PROMPTS), SEQ + 1), np.int32)
  for i, (p, c) in enumerate(zip(PROMPTS, gen.sequences())):
    seq[i, :len(p) + len(c)] = p + c
    seg[i, :len(p) + len(c)] = 1
  gather = np.array([len(p) for p in PROMPTS])[:, None] - 1 + np.arange(MAX_NEW)[None]
  return seq[:, :-1], seq[:, 1:], seg[:, :-1], np.minimum(gather, SEQ - 1)


@pytest.fixture(scope="module")
def rollout(tiny):
  # A quarter of the vocabulary stops a row: rows end at different lengths.
  gen = generate(CFG, tiny, PROMPTS, max_new_tokens=MAX_NEW, temperature=1.0,
                 stop_ids=tuple(range(0, CFG.vocab_size, 4)), rng=jax.random.key(3),
                 return_routing=True)
  return gen


def test_generate_records_each_fed_tokens_experts(rollout):
  """gen.routing [b, new, n_moe, k]: distinct experts in range for every token
  that was fed to the model (all but each row's last), -1 from the last on;
  gen.prompt_routing -1 past each prompt."""
  gen = rollout
  assert gen.routing.shape == (3, MAX_NEW, CFG.n_moe_layers, CFG.n_activated_experts)
  assert gen.routing.dtype == np.int32
  assert len(set(gen.lengths.tolist())) > 1            # the stop ids ended rows early
  for i, n in enumerate(gen.lengths):
    fed = gen.routing[i, :n - 1]
    assert ((fed >= 0) & (fed < CFG.n_routed_experts)).all()
    assert (fed[..., 0] != fed[..., 1]).all()
    assert (gen.routing[i, n - 1:] == -1).all()
    p = gen.prompt_routing[i]
    assert ((p[:len(PROMPTS[i])] >= 0).all() and (p[len(PROMPTS[i]):] == -1).all())


def test_stream_records_what_generate_records(tiny):
  """Greedy, so both runs emit the same tokens: the same record step by step."""
  kw = dict(max_new_tokens=5, return_routing=True)
  gen = generate(CFG, tiny, PROMPTS, **kw)
  it = stream(CFG, tiny, PROMPTS, **kw)
  while True:
    try:
      next(it)
    except StopIteration as stop:
      streamed = stop.value
      break
  np.testing.assert_array_equal(streamed.tokens, gen.tokens)
  np.testing.assert_array_equal(streamed.routing, gen.routing)
  np.testing.assert_array_equal(streamed.prompt_routing, gen.prompt_routing)
  assert (gen.routing[:, :4] >= 0).all() and (gen.routing[:, 4] == -1).all()


def test_replay_reproduces_the_rollout_logprobs_after_the_router_flips(tiny, rollout):
  """The issue's oracle: the training forward's log-probs of the rollout with
  routing= built from the record equal the rollout's own (decode path) to
  1e-6, also after the router bias moved enough to flip top-k choices (it
  steers selection only, so the replayed gates are unchanged); without
  replay they differ."""
  gen = rollout
  tokens, targets, seg, gather = _rollout_arrays(gen)
  routing = rollout_routing(gen, [len(p) for p in PROMPTS], SEQ)
  bias = np.random.default_rng(0).normal(scale=0.05, size=(CFG.n_moe_layers, 8))
  moved = _with_bias(tiny, bias)
  score = jax.jit(lambda v, r: token_logprobs(CFG, v, tokens, targets, segment_ids=seg,
                                              routing=r))
  valid = np.arange(MAX_NEW)[None] < gen.lengths[:, None]

  def completion(v, r):
    return np.where(valid, np.take_along_axis(np.asarray(score(v, r)), gather, 1), 0)

  # The moved router's own choices differ from the record at many positions.
  chosen = np.asarray(Transformer(CFG).apply(moved, tokens, segment_ids=seg, mode="prefill",
                                             return_routing=True)[3])
  recorded = routing[..., 0] >= 0
  flipped = (np.sort(chosen, -1) != np.sort(routing, -1)).any(-1) & recorded
  assert flipped.sum() >= 10
  for v in (tiny, moved):
    err = np.abs(completion(v, routing) - gen.logprobs).max()
    print(f"max |replayed - rollout| log-prob: {err:.2e}; flipped {flipped.sum()} "
          f"of {recorded.sum()}")
    np.testing.assert_allclose(completion(v, routing), gen.logprobs, rtol=0, atol=1e-6)
  assert np.abs(completion(moved, None) - gen.logprobs).max() > 1e-3


def test_all_negative_routing_is_the_default_path_bit_for_bit(tiny):
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, CFG.vocab_size)
  none = jnp.full((2, 16, CFG.n_moe_layers, CFG.n_activated_experts), -1, jnp.int32)
  fwd = jax.jit(lambda v, r: Transformer(CFG).apply(v, tokens, routing=r))
  np.testing.assert_array_equal(fwd(tiny, none), fwd(tiny, None))


def _swiglu64(x, w1, w3, w2):
  a, b = x @ w1, x @ w3
  return (a / (1 + np.exp(-a)) * b) @ w2


def test_replayed_gates_and_router_gradient_match_numpy():
  """MoE layer with every token's experts given (mostly not its top-k): the
  output and d(sum(out * probe))/d(router weight) against a NumPy float64
  transcription (gates s_e / sum_k s * route_scale over the given experts,
  chain rule through the sigmoid by hand); the loads count the given
  experts."""
  cfg = CFG
  b, s, d, n_exp, k = 2, 6, cfg.dim, cfg.n_routed_experts, cfg.n_activated_experts
  rng = np.random.default_rng(1)
  x = rng.normal(size=(b, s, d)).astype(np.float32)
  valid = jnp.ones((b, s), bool)
  layer = moe.MoE(cfg)
  variables = layer.init(jax.random.key(2), x, valid)
  params = jax.tree.map(lambda a: a * 10, variables["params"])   # scores away from 0.5
  # Each token's two least favoured experts (what top-k never picks).
  logits = x.reshape(-1, d) @ np.asarray(params["gate"])
  given = np.argsort(logits, -1)[:, :k].reshape(b, s, k).astype(np.int32)
  given[0, 0] = -1                                        # one token routes normally
  probe = rng.normal(size=(b, s, d)).astype(np.float32)

  def loss(p):
    out, aux = layer.apply({**variables, "params": p}, x, valid, given)
    return (out * probe).sum(), (out, aux["load"])
  (_, (out, load)), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  xs, probes = x.reshape(-1, d).astype(np.float64), probe.reshape(-1, d)
  sc = 1 / (1 + np.exp(-(xs @ p64["gate"])))
  shared = p64["shared_experts"]
  ref = _swiglu64(xs, shared["w1"]["kernel"], shared["w3"]["kernel"], shared["w2"]["kernel"])
  ref_grad = np.zeros_like(p64["gate"])
  experts = given.reshape(-1, k).copy()
  experts[0] = naive_route(xs[:1] @ p64["gate"], np.zeros(n_exp), cfg)[1][0]
  for t, e in enumerate(experts):
    y = [_swiglu64(xs[t], p64["w1"][j], p64["w3"][j], p64["w2"][j]) for j in e]
    total = sc[t, e].sum()
    gates = sc[t, e] / total * cfg.route_scale
    ref[t] += sum(g * yj for g, yj in zip(gates, y))
    d_gate = np.array([probes[t] @ yj for yj in y])               # dL/dg_j
    d_score = cfg.route_scale * (d_gate / total - (d_gate * sc[t, e]).sum() / total ** 2)
    ref_grad[:, e] += np.outer(xs[t], d_score * sc[t, e] * (1 - sc[t, e]))
  np.testing.assert_allclose(np.asarray(out).reshape(-1, d), ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(grad["gate"]), ref_grad, rtol=1e-4, atol=1e-5)
  assert np.abs(ref_grad[:, np.unique(given[given >= 0])]).max() > 1e-3
  np.testing.assert_array_equal(np.asarray(load), np.bincount(experts.ravel(), minlength=n_exp))


MESHES = {"data2_expert2_tensor2": MeshConfig(data=2, expert=2, tensor=2),
          "fsdp2_expert4": MeshConfig(data=1, fsdp=2, expert=4)}


@pytest.fixture(scope="module")
def replay_case(tiny):
  """8 rows with random distinct experts (a quarter of the tokens -1), and
  one device's logits and d(sum(logits * probe))/d(params) with them, and
  its logits without them."""
  rng = np.random.default_rng(4)
  tokens = rng.integers(0, CFG.vocab_size, size=(8, 8)).astype(np.int32)
  routing = np.stack([[[rng.choice(8, 2, replace=False) for _ in range(CFG.n_moe_layers)]
                       for _ in range(8)] for _ in range(8)]).astype(np.int32)
  routing[rng.random((8, 8)) < 0.25] = -1
  probe = rng.normal(size=(8, 8, CFG.vocab_size)).astype(np.float32)
  fn = jax.jit(jax.value_and_grad(_probed, has_aux=True))
  (_, ref), grads = jax.device_get(fn(tiny["params"], tiny["router_bias"], tokens, routing,
                                      probe))
  (_, plain), _ = jax.device_get(fn(tiny["params"], tiny["router_bias"], tokens, None, probe))
  return tokens, routing, probe, ref, grads, plain


def _probed(params, router_bias, tokens, routing, probe):
  logits = Transformer(CFG).apply({"params": params, "router_bias": router_bias}, tokens,
                                  routing=routing)
  return (logits * probe).sum(), logits


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_replay_on_an_expert_parallel_mesh_equals_one_device(tiny, replay_case, mesh_name):
  """The forward and its parameter gradients with routing= under expert
  parallelism (each device replays its own rows inside the dispatch's
  shard_map) equal one device's: logits to 1e-5, gradients to 1e-5 of each
  leaf's largest entry (float32 sums over another split of the batch)."""
  tokens, routing, probe, ref, ref_grads, plain = replay_case
  assert np.abs(ref - plain).max() > 1e-3                  # the routing changes the result
  mesh, rules = setup(MESHES[mesh_name])
  with activate(mesh, rules):
    v = jax.device_put(tiny, tree_shardings(tiny, mesh, rules))
    rows = batch_sharding(mesh, rules)
    args = (v["params"], v["router_bias"], *jax.device_put((tokens, routing, probe), rows))
    fn = jax.jit(jax.value_and_grad(_probed, has_aux=True))   # traced under the mesh
    (_, out), grads = jax.device_get(fn(*args))
    assert "all-to-all" in fn.lower(*args).as_text().replace("_", "-")
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_rollout_routing_lays_out_prompt_then_completion():
  """Hand-built record: prompt entries, then completion entries up to each
  row's length, -1 elsewhere; prompt=False leaves the prompt -1."""
  routing = np.arange(2 * 3 * 1 * 2, dtype=np.int32).reshape(2, 3, 1, 2)
  prompt_routing = 100 + np.arange(2 * 4 * 1 * 2, dtype=np.int32).reshape(2, 4, 1, 2)
  gen = Generation(np.zeros((2, 3), np.int32), np.array([3, 1], np.int32),
                   np.zeros((2, 3), np.float32), 2, routing=routing,
                   prompt_routing=prompt_routing)
  out = rollout_routing(gen, [2, 4], 7)
  want = np.full((2, 7, 1, 2), -1, np.int32)
  want[0, :2], want[0, 2:5] = prompt_routing[0, :2], routing[0]
  want[1, :4], want[1, 4:5] = prompt_routing[1], routing[1, :1]
  np.testing.assert_array_equal(out, want)
  no_prompt = rollout_routing(gen, [2, 4], 7, prompt=False)
  assert (no_prompt[0, :2] == -1).all() and (no_prompt[1, 4] == routing[1, 0]).all()
  with pytest.raises(ValueError, match="shorter than a row"):
    rollout_routing(gen, [2, 4], 4)


@pytest.mark.parametrize("shape_fn,fill,match", [
    (lambda s: s[:-1] + (3,), 0, "routing shape"),
    (lambda s: s, 8, "outside \\[0, n_routed_experts=8\\)"),
    (lambda s: s, 1, "repeats an expert"),
])
def test_bad_routing_is_refused_before_compiling(tiny, shape_fn, fill, match):
  tokens = np.zeros((1, 4), np.int32)
  routing = np.full(shape_fn((1, 4, CFG.n_moe_layers, CFG.n_activated_experts)), fill,
                    np.int32)
  with pytest.raises(ValueError, match=match):
    Transformer(CFG).apply(tiny, tokens, routing=routing)


def test_speculative_decoding_does_not_record(tiny):
  with pytest.raises(ValueError, match="speculative"):
    generate(CFG, tiny, PROMPTS, max_new_tokens=2, speculative=True, return_routing=True)


def test_generate_with_rules_splits_rows_and_equals_one_device(tiny):
  """generate(..., mesh=, rules=): rows split over the batch axes and the loop
  run under activate (the expert-parallel dispatch, as in training) give one
  device's tokens and routing record, log-probs to 1e-5; the program holds
  the dispatch's all-to-all."""
  from deepseek_jax.infer import decode
  prompts = [p for p in PROMPTS + [[2, 3]] for _ in range(2)]          # 8 rows
  kw = dict(max_new_tokens=6, temperature=1.0, rng=jax.random.key(9), return_routing=True,
            group_size=2)
  one = generate(CFG, tiny, prompts, **kw)
  mesh, rules = setup(MeshConfig(data=2, expert=2, fsdp=2))
  v = jax.device_put(tiny, tree_shardings(tiny, mesh, rules))
  got = generate(CFG, v, prompts, mesh=mesh, rules=rules, **kw)
  np.testing.assert_array_equal(got.tokens, one.tokens)
  np.testing.assert_array_equal(got.routing, one.routing)
  np.testing.assert_allclose(got.logprobs, one.logprobs, rtol=0, atol=1e-5)
  assert decode._rows_split(mesh, 8) and not decode._rows_split(mesh, 6)
  prompts = [p for p in prompts for _ in range(2)]     # 16 rows: the shared prefill splits
  kw["group_size"] = 2                                 # 8 first rows: split
  one, got = (generate(CFG, v, prompts, mesh=m, rules=r, **kw)
              for m, r in ((None, None), (mesh, rules)))
  np.testing.assert_array_equal(got.tokens, one.tokens)
