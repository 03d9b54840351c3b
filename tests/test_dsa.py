"""DeepSeek-V3.2's sparse attention (model/dsa.py) against transformers'
DeepseekV32ForCausalLM and NumPy float64 transcriptions.

A tiny random DeepseekV32 model (every weight random, the indexer's
LayerNorm and the router bias included) is saved by transformers and read
by `load_hf_checkpoint` (the key map: interop/hf_keys.py; its own tests:
test_hf_v32.py). The top-k (6) is shorter than the sequences, so the
selection changes the logits; the indexer's scores and selection are
checked against float64 NumPy, greedy generation against transformers'
`generate`, packed rows against each document run alone, the indexer's KL
loss against NumPy, and the pipeline's stage functions (model/stages.py)
against the whole model, indexer loss included.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import ModelConfig, get_preset
from deepseek_jax.interop import load_hf_checkpoint
from deepseek_jax.model import Transformer, abstract_variables
from deepseek_jax.model import dsa
from deepseek_jax.model.attention import attention_mask
from deepseek_jax.model.layers import Einsum, RMSNorm
from deepseek_jax.model.mla import MLA
from deepseek_jax.model.rope import rope_frequencies
from random_weights import randomize_torch_model

pytestmark = pytest.mark.torch
try:
  import torch
  import transformers
except ImportError:
  torch = transformers = None

TOL = 1e-4
TOPK = 6
HF = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
    n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4,
    topk_group=2, first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16,
    qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=64,
    routed_scaling_factor=2.5, index_n_heads=8, index_head_dim=16, index_topk=TOPK,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def our_config() -> ModelConfig:
  """HF above in our field names."""
  return ModelConfig(
      vocab_size=128, dim=64, inter_dim=96, moe_inter_dim=32, n_layers=2, n_dense_layers=1,
      n_heads=4, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2,
      n_expert_groups=4, n_limited_groups=2, score_func="sigmoid", route_scale=2.5,
      q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
      original_seq_len=64, max_seq_len=64, rope_type="default", rope_theta=10000.0,
      index_n_heads=8, index_head_dim=16, index_topk=TOPK, attn_block_size=0, init_std=0.02)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  """(HF model, our cfg, our variables) with the same random weights: the
  model saved by transformers, loaded by load_hf_checkpoint."""
  torch.manual_seed(0)
  model = transformers.DeepseekV32ForCausalLM(
      transformers.DeepseekV32Config(**HF, attn_implementation="eager")).eval()
  randomize_torch_model(model)
  with torch.no_grad():
    for name, b in model.named_buffers():
      if name.endswith("e_score_correction_bias"):
        b.copy_(0.5 * torch.rand_like(b))
  path = str(tmp_path_factory.mktemp("hf_v32"))
  model.save_pretrained(path)
  loaded_cfg, variables = load_hf_checkpoint(path)
  cfg = our_config()    # the naive attention path; RoPE without YaRN, as loaded
  assert loaded_cfg.replace(attn_block_size=0, rope_type="default") == cfg
  return model, cfg, variables


def _tokens(seq: int, batch: int = 2, seed: int = 0):
  return np.random.default_rng(seed).integers(0, HF["vocab_size"], (batch, seq)).astype(np.int32)


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def test_logits_match_transformers_with_selection_mattering(pair):
  model, cfg, variables = pair
  tokens = _tokens(24)
  fwd = jax.jit(lambda v, t: Transformer(cfg).apply(v, t))
  ours, ref = np.asarray(fwd(variables, tokens)), _hf_logits(model, tokens)
  err = float(np.abs(ours - ref).max())
  dense = np.asarray(Transformer(cfg.replace(index_topk=0)).apply(variables, tokens))
  gap = float(np.abs(dense - ref).max())
  print(f"\n[dsa] max|ours - hf| = {err:.3g}; dense MLA differs by {gap:.3g}")
  assert err < TOL
  assert gap > 100 * TOL                # top-6 of 24 tokens: the selection matters
  # Within the first TOPK positions every earlier token is selected: dense.
  np.testing.assert_allclose(ours[:, :TOPK], dense[:, :TOPK], atol=TOL)


def _layer0_inputs(model, tokens):
  """HF's layer-0 attention input (after input_layernorm) and its indexer's
  top-k indices, captured by hooks."""
  seen = {}
  attn = model.model.layers[0].self_attn
  h1 = attn.register_forward_pre_hook(
      lambda m, a, kw: seen.update(x=kw["hidden_states"]), with_kwargs=True)
  h2 = attn.indexer.register_forward_hook(lambda m, a, out: seen.update(idx=out))
  _hf_logits(model, tokens)
  h1.remove(), h2.remove()
  return seen["x"].numpy(), seen["idx"].numpy()


def _rms(x, w, eps=1e-6):
  return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def numpy_index_scores(cfg, p, x, positions):
  """Float64 transcription of the indexer (model/dsa.py doc) for one layer's
  params p (our layout, unstacked) and its input x [b, s, dim]."""
  f = {k: np.asarray(v, np.float64) for k, v in _flat(p).items()}
  x = x.astype(np.float64)
  c_q = _rms(x @ f["wq_a/kernel"], f["q_norm/scale"])
  q = np.einsum("bsr,rhk->bshk", c_q, f["indexer/wq_b/kernel"])
  k = x @ f["indexer/wk_index/kernel"]
  k = (k - k.mean(-1, keepdims=True)) / np.sqrt(k.var(-1, keepdims=True) + 1e-6)
  k = k * f["indexer/k_norm/scale"] + f["indexer/k_norm/bias"]
  half = cfg.qk_rope_head_dim // 2
  ang = positions[..., None] * rope_frequencies(cfg).astype(np.float64)    # [b, s, half]

  def rot(v, a):
    c, s = np.cos(a), np.sin(a)
    x1, x2 = v[..., :half], v[..., half:2 * half]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s, v[..., 2 * half:]], -1)

  q, k = rot(q, ang[:, :, None]), rot(k, ang)
  w = x @ f["indexer/weights_proj/kernel"] * cfg.index_n_heads ** -0.5      # [b, s, H]
  per_head = np.maximum(np.einsum("bshd,btd->bsht", q, k) * cfg.index_head_dim ** -0.5, 0)
  return np.einsum("bsh,bsht->bst", w, per_head)


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _layer(variables, stack="dense_layers", i=0):
  return jax.tree.map(lambda a: a[i], variables["params"][stack]["attn"])


def test_indexer_scores_and_topk_match_numpy_and_transformers(pair):
  model, cfg, variables = pair
  tokens = _tokens(24, seed=1)
  x, hf_idx = _layer0_inputs(model, tokens)
  b, s, _ = x.shape
  positions = np.broadcast_to(np.arange(s), (b, s))
  p = _layer(variables)
  want = numpy_index_scores(cfg, p, x, positions)

  def scores(params, x):
    c_q = RMSNorm(cfg).apply({"params": params["q_norm"]}, Einsum(
        cfg, (cfg.dim, cfg.q_lora_rank), "bsd,dr->bsr").apply(
            {"params": params["wq_a"]}, x))
    q, k, w = dsa.Indexer(cfg).apply({"params": params["indexer"]}, x, c_q,
                                     jnp.asarray(positions))
    return dsa.index_scores(cfg, q, k, w)

  got = np.asarray(jax.jit(scores)(p, jnp.asarray(x)))
  indexed = jax.jit(lambda params, x: dsa.Indexer(cfg).apply(
      {"params": params["indexer"]}, x, RMSNorm(cfg).apply(
          {"params": params["q_norm"]}, x @ params["wq_a"]["kernel"]), jnp.asarray(positions)))(
              p, jnp.asarray(x))
  causal = np.tril(np.ones((s, s), bool))[None]
  np.testing.assert_allclose(np.where(causal, got, 0), np.where(causal, want, 0),
                             rtol=1e-5, atol=1e-5)
  # The top-k sets: ours (from our scores), NumPy's, transformers' agree.
  ours_sel = np.asarray(dsa.select_topk(jnp.asarray(got), jnp.asarray(causal), TOPK))
  masked = np.where(causal, want, -np.inf)
  order = np.argsort(-masked, axis=-1, kind="stable")
  np_sel = np.zeros_like(ours_sel)
  np.put_along_axis(np_sel, order[..., :TOPK], True, axis=-1)
  np_sel &= causal
  hf_sel = np.zeros_like(ours_sel)
  np.put_along_axis(hf_sel, hf_idx.astype(np.int64), True, axis=-1)
  hf_sel &= causal
  # No near-tie at the k-th score (else the sets may differ by rounding).
  srt = -np.sort(-masked, axis=-1)[:, TOPK:]                 # rows with > TOPK keys
  gap = srt[..., TOPK - 1] - srt[..., TOPK]
  assert gap.min() > 1e-4, gap.min()
  assert (ours_sel == np_sel).all() and (np_sel == hf_sel).all()
  for block in (5, 8):                 # query blocks at a time (padded last block)
    by_block = dsa.select(cfg, indexed, jnp.asarray(np.broadcast_to(causal, (b, s, s))), block)
    np.testing.assert_array_equal(np.asarray(by_block), ours_sel)
  assert (ours_sel.sum(-1) == np.minimum(np.arange(1, s + 1), TOPK)).all()
  # Not the trivial "most recent k": some selected keys lie further back.
  recent = causal & ~np.tril(np.ones((s, s), bool), -TOPK)[None]
  assert (ours_sel != recent).any()


def test_packed_rows_attend_within_their_document(pair):
  _, cfg, variables = pair
  a, b = _tokens(13, 1, seed=2)[0], _tokens(11, 1, seed=3)[0]
  packed = np.concatenate([a, b])[None]
  seg = np.array([[1] * 13 + [2] * 11], np.int32)
  pos = np.array([list(range(13)) + list(range(11))], np.int32)
  fwd = jax.jit(lambda v, t, s, p: Transformer(cfg).apply(v, t, segment_ids=s, positions=p))
  got = np.asarray(fwd(variables, packed, seg, pos))
  # Each document alone, padded to the packed length (segment 0 after it).
  alone = np.zeros((2, 24), np.int32)
  alone[0, :13], alone[1, :11] = a, b
  seg_alone = (np.arange(24)[None] < np.array([[13], [11]])).astype(np.int32)
  ref = np.asarray(fwd(variables, alone, seg_alone, np.broadcast_to(np.arange(24), (2, 24))))
  alone_a, alone_b = ref[:1, :13], ref[1:, :11]
  np.testing.assert_allclose(got[0, :13], alone_a[0], atol=TOL)
  np.testing.assert_allclose(got[0, 13:], alone_b[0], atol=TOL)


def test_blockwise_path_equals_naive_with_gradients(pair):
  """attn_block_size < seq: the selection by query blocks and the blockwise
  softmax reading it tile by tile, packed rows included: the naive path's
  logits and parameter gradients."""
  _, cfg, variables = pair
  tokens = _tokens(24, 2, seed=8)
  seg = np.array([[1] * 24, [1] * 10 + [2] * 9 + [0] * 5], np.int32)
  pos = np.array([list(range(24)), list(range(10)) + list(range(9)) + [0] * 5], np.int32)
  weights = jnp.asarray(np.random.default_rng(9).standard_normal((2, 24, cfg.vocab_size)),
                        jnp.float32)

  def run(c):
    def loss(v):
      logits = Transformer(c).apply(v, tokens, segment_ids=seg, positions=pos)
      return jnp.sum(logits * weights * (seg != 0)[..., None]), logits
    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables)
    return logits, grads

  ref_logits, ref_grads = run(cfg)
  assert attention_mask(cfg.replace(attn_block_size=8), jnp.asarray(seg)).bias is None
  logits, grads = run(cfg.replace(attn_block_size=8))
  valid = seg != 0
  np.testing.assert_allclose(np.asarray(logits)[valid], np.asarray(ref_logits)[valid],
                             atol=TOL)
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-4, rtol=1e-4,
                               err_msg=jax.tree_util.keystr(path))


def test_greedy_generation_matches_transformers(pair):
  from deepseek_jax.infer import generate
  model, cfg, variables = pair
  prompts = [[5, 9, 17, 3, 44, 2, 8, 90, 11], [60, 1], [7, 7, 100, 12]]
  gen = generate(cfg, variables, prompts, max_new_tokens=14)
  # No stop token on either side (the config's eos id 1 is an ordinary token here).
  greedy = transformers.GenerationConfig(max_new_tokens=14, do_sample=False, eos_token_id=None,
                                         pad_token_id=0)
  for i, p in enumerate(prompts):
    with torch.no_grad():
      out = model.generate(torch.tensor([p]), attention_mask=torch.ones_like(torch.tensor([p])),
                           generation_config=greedy)
    assert out[0, len(p):].tolist() == gen.tokens[i].tolist(), i
  assert 1 in gen.tokens                                      # that id was generated


def test_decode_steps_equal_the_full_forward(pair):
  """Token by token through the cache (indexer keys cached, top-k per step)
  gives the training forward's logits: every step's selection runs."""
  from deepseek_jax.infer import cache as cache_lib
  _, cfg, variables = pair
  tokens = _tokens(20, 2, seed=4)
  full = np.asarray(Transformer(cfg).apply(variables, tokens))
  model = Transformer(cfg)
  cache = cache_lib.init_cache(cfg, 2, 20)
  assert cache["dense_layers"]["k_index"].shape == (1, 2, 20, cfg.index_head_dim)

  @jax.jit
  def step(cache, tok, pos):
    logits, _, entries = model.apply(variables, tok, positions=pos, mode="decode", cache=cache)
    return logits, cache_lib.write(cache, entries, pos[:, 0])

  got = []
  for t in range(20):
    pos = jnp.full((2, 1), t, jnp.int32)
    logits, cache = step(cache, jnp.asarray(tokens[:, t:t + 1]), pos)
    got.append(np.asarray(logits[:, 0]))
  np.testing.assert_allclose(np.stack(got, 1), full, atol=TOL)


# ---------------------------------------------------------------------------
# The indexer's training loss (the V3.2 report's continued pre-training)

def numpy_kl(scores, attn_heads, keep):
  """sum over keys of p log(p / softmax(I)), p = L1-normalised head-summed
  attention; all restricted to `keep`; float64, per query [b, s]."""
  p = np.where(keep, attn_heads.sum(1), 0.0)
  p = p / p.sum(-1, keepdims=True)
  z = np.where(keep, scores, -np.inf)
  z = z - z.max(-1, keepdims=True)
  log_q = z - np.log(np.exp(z).sum(-1, keepdims=True))
  terms = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - np.where(keep, log_q, 0)), 0)
  return terms.sum(-1)


def test_indexer_kl_matches_numpy():
  rng = np.random.default_rng(0)
  b, h, s = 2, 3, 10
  scores = rng.standard_normal((b, s, s))
  logits = rng.standard_normal((b, h, s, s))
  causal = np.tril(np.ones((s, s), bool))[None].repeat(b, 0)
  attn = np.where(causal[:, None], np.exp(logits), 0)
  attn = attn / attn.sum(-1, keepdims=True)                       # per-head softmax
  keep_sparse = causal & (rng.random((b, s, s)) < 0.5)
  keep_sparse |= np.eye(s, dtype=bool)[None]
  for keep in (keep_sparse, causal):
    want = numpy_kl(scores, attn, keep)
    got = dsa.indexer_kl(jnp.asarray(scores, jnp.float32), jnp.asarray(attn.mean(1), jnp.float32),
                         jnp.asarray(keep))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  assert (want[:, 1:] > 0).all()            # dense: row 0 keeps one key (KL 0), others > 0
  # The minimum: the indexer's softmax equal to the target gives 0.
  p = np.where(causal, attn.sum(1), 0)
  p /= p.sum(-1, keepdims=True)
  at_target = dsa.indexer_kl(jnp.asarray(np.log(np.where(causal, p, 1)), jnp.float32),
                             jnp.asarray(p, jnp.float32), jnp.asarray(causal))
  np.testing.assert_allclose(np.asarray(at_target), 0, atol=1e-5)


def numpy_mla_probs(cfg, p, x, positions, bias):
  """Head-summed attention probabilities of MLA (float64), bias [b, s, t]."""
  f = {k: np.asarray(v, np.float64) for k, v in _flat(p).items()}
  x = x.astype(np.float64)
  c_q = _rms(x @ f["wq_a/kernel"], f["q_norm/scale"])
  q = np.einsum("bsr,rhk->bhsk", c_q, f["wq_b/kernel"])
  kv_a = x @ f["wkv_a/kernel"]
  r, nope = cfg.kv_lora_rank, cfg.qk_nope_head_dim
  c_kv, k_rope = _rms(kv_a[..., :r], f["kv_norm/scale"]), kv_a[..., r:]
  ang = positions[..., None] * rope_frequencies(cfg).astype(np.float64)

  def inter(v, a):          # MLA's interleaved pairs
    e, o = v[..., 0::2], v[..., 1::2]
    out = np.empty_like(v)
    out[..., 0::2], out[..., 1::2] = e * np.cos(a) - o * np.sin(a), e * np.sin(a) + o * np.cos(a)
    return out

  q_rope, k_rope = inter(q[..., nope:], ang[:, None]), inter(k_rope, ang)
  k_nope = np.einsum("bsr,rhk->bhsk", c_kv, f["wkv_b/kernel"])[..., :nope]
  logits = (np.einsum("bhsk,bhtk->bhst", q[..., :nope], k_nope)
            + np.einsum("bhsk,btk->bhst", q_rope, k_rope)) * cfg.softmax_scale + bias[:, None]
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("stage", ["warmup", "sparse"])
def test_layer_indexer_loss_matches_numpy_and_trains_only_the_indexer(pair, stage):
  _, cfg, variables = pair
  cfg = cfg.replace(dsa_stage=stage)
  rng = np.random.default_rng(5)
  b, s = 2, 16
  x = rng.standard_normal((b, s, cfg.dim)).astype(np.float32)
  positions = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s))
  seg = np.ones((b, s), np.int32)
  seg[1, 12:] = 0                                              # padding: not counted
  p = _layer(variables)
  mask = attention_mask(cfg, jnp.asarray(seg))

  def loss(params):
    return MLA(cfg).apply({"params": params}, jnp.asarray(x), jnp.asarray(positions), mask)[1]

  got, grads = jax.value_and_grad(loss)(p)
  allowed = np.asarray(mask.bias[:, 0]) == 0
  scores = numpy_index_scores(cfg, p, x, positions)
  if stage == "warmup":
    keep = allowed
  else:
    keep = np.asarray(dsa.select_topk(jnp.asarray(scores, jnp.float32), jnp.asarray(allowed),
                                      TOPK))
  probs = numpy_mla_probs(cfg, p, x, positions, np.where(keep, 0.0, -1e30))
  kl = numpy_kl(scores, probs, keep)
  valid = seg != 0
  want = (kl * valid).sum() / valid.sum()
  print(f"\n[dsa] {stage} indexer loss {float(got):.6f} (numpy {want:.6f})")
  np.testing.assert_allclose(float(got), want, rtol=1e-4)
  norms = {k: float(jnp.abs(g).max()) for k, g in _flat(grads).items()}
  assert all(v == 0 for k, v in norms.items() if not k.startswith("indexer/")), norms
  assert all(v > 0 for k, v in norms.items() if k.startswith("indexer/")), norms


def test_dsa_loss_reaches_the_block_aux(pair):
  from deepseek_jax.model.block import Block
  _, cfg, variables = pair
  cfg = cfg.replace(dsa_stage="sparse")
  params = jax.tree.map(lambda a: a[0], variables["params"]["dense_layers"])
  x = jnp.asarray(np.random.default_rng(6).standard_normal((1, 12, cfg.dim)), jnp.float32)
  seg = jnp.ones((1, 12), jnp.int32)
  pos = jnp.arange(12, dtype=jnp.int32)[None]
  out, aux = Block(cfg, False).apply({"params": params}, x, pos, attention_mask(cfg, seg),
                                     seg != 0)
  assert aux["indexer_loss"].shape == () and float(aux["indexer_loss"]) > 0
  out_off, aux_off = Block(cfg.replace(dsa_stage="off"), False).apply(
      {"params": params}, x, pos, attention_mask(cfg, seg), seg != 0)
  assert "indexer_loss" not in aux_off
  np.testing.assert_allclose(np.asarray(out), np.asarray(out_off), atol=1e-6)  # sparse both
  # The warm-up stage attends densely: V3's block on the same weights.
  warm, _ = Block(cfg.replace(dsa_stage="warmup"), False).apply(
      {"params": params}, x, pos, attention_mask(cfg, seg), seg != 0)
  dense, _ = Block(cfg.replace(dsa_stage="off", index_topk=0), False).apply(
      {"params": params}, x, pos, attention_mask(cfg, seg), seg != 0)
  np.testing.assert_allclose(np.asarray(warm), np.asarray(dense), atol=1e-6)
  assert np.abs(np.asarray(warm) - np.asarray(out)).max() > 1e-3


def test_pipeline_stage_functions_equal_the_model_with_the_indexer_loss():
  """A tiny V3.2 (1 dense + 2 MoE blocks, MTP; sparse indexer training) cut
  in two stages as the pipeline runs it: stages.embed, stages.blocks on
  each stage's slots (the second stage's MoE stack padded with an inactive
  slot), stages.head and merge_aux give the whole model's logits and aux;
  aux["indexer_loss"] is the sum of every block's own (each Block and the
  MTP module applied alone, in a loop)."""
  from random_weights import random_variables
  from deepseek_jax.model import stages
  from deepseek_jax.model.block import Block
  from deepseek_jax.model.layers import RMSNorm
  from deepseek_jax.model.mtp import MTPModule
  cfg = get_preset("tiny_v32", index_topk=5, dsa_stage="sparse", attn_block_size=0)
  assert (cfg.n_dense_layers, cfg.n_moe_layers, cfg.n_mtp_depth) == (1, 2, 1)
  variables = random_variables(cfg, seed=4)
  p, rb = variables["params"], variables["router_bias"]
  tokens = _tokens(16, 2, seed=10)
  targets = np.roll(tokens, -1, axis=1)
  seg = np.ones((2, 16), np.int32)
  seg[1, 12:] = 0
  pos = np.broadcast_to(np.arange(16, dtype=np.int32), (2, 16))

  rows = lambda tree, lo, hi: jax.tree.map(lambda a: a[lo:hi], tree)           # noqa: E731
  padded = lambda tree: jax.tree.map(lambda a: jnp.concatenate([a, 7 + a]), tree)  # noqa: E731

  def pipelined(p, rb):
    x = stages.embed(cfg, p, tokens)
    x, aux0 = stages.blocks(cfg, {"dense_layers": p["dense_layers"],
                                  "moe_layers": rows(p["moe_layers"], 0, 1)},
                            {"moe_layers": rows(rb["moe_layers"], 0, 1)}, x, seg, pos)
    x, aux1 = stages.blocks(cfg, {"moe_layers": padded(rows(p["moe_layers"], 1, 2))},
                            {"moe_layers": padded(rows(rb["moe_layers"], 1, 2))}, x, seg, pos,
                            active={"moe_layers": jnp.array([True, False])})
    logits, head_aux = stages.head(cfg, p, rb, x, targets, seg, pos)
    layers = {"dense_layers": aux0["dense_layers"],
              "moe_layers": jax.tree.map(lambda a, b: jnp.concatenate([a, b[:1]]),
                                         aux0["moe_layers"], aux1["moe_layers"])}
    return logits, stages.merge_aux(cfg, layers, head_aux), aux1["moe_layers"]["indexer_loss"]

  def block_by_block(p, rb):
    """Every block alone, in order, then the MTP module: their indexer losses."""
    mask, valid = attention_mask(cfg, jnp.asarray(seg)), jnp.asarray(seg != 0)
    h, out = p["embed"]["embedding"][tokens], []
    for name, moe, n in (("dense_layers", False, 1), ("moe_layers", True, 2)):
      for i in range(n):
        v = {"params": p[name], **({"router_bias": rb[name]} if moe else {})}
        h, block_aux = Block(cfg, moe).apply(jax.tree.map(lambda a: a[i], v), h, pos, mask,
                                             valid)
        out.append(block_aux["indexer_loss"])
    h = RMSNorm(cfg).apply({"params": p["norm"]}, h)
    _, mtp_aux = MTPModule(cfg, True, "train").apply(
        {"params": p["mtp_0"], "router_bias": rb["mtp_0"]}, h, p["embed"]["embedding"][targets],
        pos, mask, valid)
    return jnp.stack(out + [mtp_aux["indexer_loss"]])

  @jax.jit          # one compile for the three
  def run(v):
    ref = Transformer(cfg).apply(v, tokens, segment_ids=seg, targets=targets, return_aux=True)
    return ref, pipelined(v["params"], v["router_bias"]), block_by_block(
        v["params"], v["router_bias"])

  (ref_logits, ref_aux), (logits, aux, stage1_rows), per_block = run(variables)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-5)
  assert sorted(aux) == sorted(ref_aux)
  for key in ("indexer_loss", "balance_loss", "mtp_logits", "expert_load", "mtp_expert_load"):
    np.testing.assert_allclose(np.asarray(aux[key]), np.asarray(ref_aux[key]), atol=1e-5,
                               err_msg=key)
  assert float(stage1_rows[1]) == 0                          # the padded slot adds nothing

  per_block = np.asarray(per_block)
  print(f"\n[dsa] indexer losses per block {np.round(per_block, 5).tolist()}")
  assert per_block.min() > 0
  np.testing.assert_allclose(float(aux["indexer_loss"]), per_block.sum(), rtol=1e-5)
  # Off: no indexer loss anywhere (shapes only).
  off_aux = jax.eval_shape(lambda v: Transformer(cfg.replace(dsa_stage="off")).apply(
      v, tokens, segment_ids=seg, targets=targets, return_aux=True)[1], variables)
  assert "indexer_loss" not in off_aux and "mtp_logits" in off_aux


# ---------------------------------------------------------------------------
# Config

def test_presets_and_parameter_count():
  v32, v3 = get_preset("v32_671b"), get_preset("v3_671b")
  assert (v32.index_n_heads, v32.index_head_dim, v32.index_topk) == (64, 128, 2048)
  assert v32.replace(index_n_heads=0, index_head_dim=0, index_topk=0,
                     max_seq_len=v3.max_seq_len) == v3
  from deepseek_jax.model import count_params
  extra = count_params(abstract_variables(v32)) - count_params(abstract_variables(v3))
  per_layer = 1536 * 64 * 128 + 7168 * 128 + 2 * 128 + 7168 * 64
  assert extra == per_layer * (61 + 1)                        # every MLA, MTP's included
  tiny = get_preset("tiny_v32")
  assert tiny.use_dsa and not get_preset("tiny").use_dsa


@pytest.mark.parametrize("changes,match", [
    (dict(index_topk=200), "index_topk=200 exceeds max_seq_len=128"),
    (dict(index_head_dim=4), "index_head_dim=4 must be >= qk_rope_head_dim=8"),
    (dict(index_n_heads=0), "index_n_heads=0 must be >= 1"),
    (dict(q_lora_rank=0), "set q_lora_rank > 0 or index_topk=0"),
    (dict(attention="gqa", n_kv_heads=2, head_dim=16), "needs attention='mla'"),
    (dict(index_topk=-1), "index_topk=-1 must be a non-negative integer"),
    (dict(dsa_stage="dense"), "dsa_stage='dense' must be one of"),
    (dict(index_topk=0, dsa_stage="sparse"), "set index_topk > 0 or dsa_stage='off'"),
])
def test_bad_dsa_configs_are_refused_in_one_line(changes, match):
  with pytest.raises(ValueError, match=match) as err:
    get_preset("tiny_v32", **changes)
  assert "\n" not in str(err.value)


def test_dsa_off_builds_no_indexer():
  cfg = get_preset("tiny")
  assert get_preset("tiny", index_topk=None) == cfg.replace(index_topk=None)
  names = {"/".join(str(getattr(k, "key", k)) for k in path)
           for path, _ in jax.tree_util.tree_leaves_with_path(abstract_variables(cfg))}
  assert not any("indexer" in n for n in names)
  mask = attention_mask(cfg.replace(attn_block_size=4), jnp.ones((1, 8), jnp.int32))
  assert mask.bias is None                                 # blockwise path as before


# ---------------------------------------------------------------------------
# On a mesh. parallel/rules.py names parameters by (module, parameter); the
# indexer's three new ones need these entries (wq_b and k_norm/scale reuse
# existing ones). Set here until rules.py has them; identical values then.
INDEXER_AXES = {("wk_index", "kernel"): ("embed", "head_dim"),
                ("k_norm", "bias"): ("norm",),
                ("weights_proj", "kernel"): ("embed", "heads")}


def test_sharded_forward_and_decode_equal_one_device(pair, monkeypatch):
  from deepseek_jax.infer import generate
  from deepseek_jax.parallel import MeshConfig, activate, batch_sharding, setup, tree_shardings
  from deepseek_jax.parallel import rules as rules_lib
  for key, names in INDEXER_AXES.items():
    monkeypatch.setitem(rules_lib._PARAM_AXES, key, names)
  _, cfg, variables = pair
  tokens = _tokens(16, batch=4, seed=7)
  fwd = jax.jit(lambda v, t: Transformer(cfg).apply(v, t))
  ref = np.asarray(fwd(variables, tokens))
  mesh, rules = setup(MeshConfig(data=1, fsdp=2, tensor=2, expert=2, rules="ep_fsdp"))
  with activate(mesh, rules):
    v = jax.device_put(variables, tree_shardings(variables, mesh, rules))
    got = np.asarray(fwd(v, jax.device_put(tokens, batch_sharding(mesh, rules))))
  np.testing.assert_allclose(got, ref, atol=1e-5)
  prompts = [[5, 9, 17], [60, 1, 2, 3, 4], [7], [8, 8]]
  one = generate(cfg, variables, prompts, max_new_tokens=10)
  split = generate(cfg, v, prompts, max_new_tokens=10, mesh=mesh, rules=rules)
  np.testing.assert_array_equal(split.tokens, one.tokens)


def test_speculative_decoding_keeps_greedy_output():
  """MTP drafting (its block has its own indexer and cached keys) verified
  by the main model: the greedy tokens of plain decoding."""
  from deepseek_jax.infer import generate
  from random_weights import random_variables
  cfg = get_preset("tiny_v32", vocab_size=64, max_seq_len=64, original_seq_len=64,
                   index_topk=5)
  variables = random_variables(cfg, seed=3)
  assert "k_index" in __import__("deepseek_jax.infer.cache", fromlist=["x"]).init_cache(
      cfg, 1, 4, mtp=True)["mtp_0"]
  prompts = [[5, 9, 17, 3, 44, 2, 8, 30], [60, 1]]
  plain = generate(cfg, variables, prompts, max_new_tokens=12)
  spec = generate(cfg, variables, prompts, max_new_tokens=12, speculative=True)
  np.testing.assert_array_equal(spec.tokens, plain.tokens)
  assert spec.drafted > 0
