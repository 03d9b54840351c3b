"""DeepSeek-V4 (cfg.arch = "v4"): attention layers, blocks, MTP and the forward.

Held against transformers' `DeepseekV4ForCausalLM` (tests/test_v4.py). A V4
block keeps cfg.hc_mult residual streams (model/hyper.py) and runs, on their
collapse, one of three attention layers (cfg.layer_types) and a MoE FFN
(cfg.mlp_layer_types):

Attention, every type (`V4Attention`): one key/value head shared by all
query heads (the same vector is key and value), partial interleaved RoPE on
the trailing v4_rope_dim channels of each head:
  c_q = RMSNorm(x W_qa)            q = RMS(c_q W_qb) per head (no weight)
  kv  = RMSNorm(x W_kv)            [head_dim]
  RoPE(q), RoPE(kv) at the token's position (rope_theta for sliding layers,
  compress_rope_theta for compressed ones)
  keys: the sliding window (key j for query i when i - sliding_window < j <= i,
  within the segment) plus, in compressed layers, compressed entries
  softmax over [q.k * head_dim^-0.5 ..., sink_h] (a learned per-head logit
  `sinks` that takes probability mass and returns nothing)
  o = probs @ keys, then RoPE at minus the query position on o's rotary
  channels (the value carried its key's rotation), then the grouped output:
  heads in o_groups groups, each [heads/g x head_dim] -> o_lora_rank
  (`wo_a` [g, H hd / g, r]), concatenated, -> dim (`wo_b`).

Compressed entries (`Compressor`): every `rate` tokens become one entry,
  C_w = RMSNorm(sum_{j in window} softmax_j(Z_j + B_j) * K_j), RoPE'd at
  position w * rate, where K = x W_kv, Z = x W_gate, B the learned
  per-slot bias `ape` [rate, .]. HCA (rate compress_rate_hca): windows of
  `rate` tokens. CSA (rate compress_rate_csa): two series per token (W_kv and
  W_gate give 2 head_dim) and entry w pools window w - 1's first series with
  window w's second: windows of 2 rate tokens, stride rate (window 0's first
  half is empty). Query at position t sees entry w only when the entry's
  window has ended: w < (t + 1) // rate.
CSA's lightning indexer (`Indexer`): its own CSA compressor at
  index_head_dim gives keys K^I; queries q^I = c_q W_qI (index_n_heads heads,
  RoPE as the compressed layers), weights w = x W_w * index_n_heads^-0.5;
  I_tw = sum_h w_th ReLU(q^I_th . K^I_w) * index_head_dim^-0.5 and each query
  keeps the index_topk visible entries with the largest I (dsa.select_topk).

MoE (`V4Block`): the DeepSeekMoE layer of model/moe.py with sqrtsoftplus
scores (sqrt(softplus(logit)), normalised over the chosen experts, times
route_scale) and the SwiGLU clamp (cfg.swiglu_limit). "moe" layers choose
experts by top-k of score + bias (the aux-loss-free bias); "hash_moe" layers
take them from a frozen table `tid2eid` [vocab, k] indexed by the token id
(moe.route's replay path: gates from the current scores). The table is not
trained: it lives in the `router_bias` collection (`layers_{i}/tid2eid`),
initialised to (token k + j) mod E (transformers: zeros; checkpoints carry
the real table).

Parameters: `embed`, `layers_{i}` (one module per layer: the layer types
differ in shape, so no scan), `hc_head`, `norm`, `head`, `mtp_{k}`.
The main blocks are wrapped in nn.remat per cfg.remat_policy (as V3's).
MTP (our form; transformers drops V4's MTP weights, so nothing checks it):
module k mixes RMSNorm(Emb(t_{i+k})) and RMSNorm(h^{k-1}) through `eh_proj`
(as V3, model/mtp.py), expands the result to hc_mult streams, runs one V4
block (sliding attention, learned top-k MoE), its own hyper head and norm.

On a mesh: every parameter has logical axes (parallel/rules.py: the
grouped output projection's groups over `tensor`, the mHC mixers FSDP'd,
the hash table replicated) and both MoE kinds dispatch through the same
sharded MoE as V3 (parallel/expert.py; a hash layer's table rows replayed
on each device's tokens); tests/test_v4_mesh.py. No pipeline stage
functions yet (train.step.check_mesh_support refuses pipe > 1).

Inference (`v4_infer`, Transformer modes "prefill" / "decode"; the cache
layout is infer/cache.py's): prefill is the training forward over
right-padded prompts and also returns, per layer, every token's key and
compressor projections; decode runs one token per row over the cache: its
key joins a ring of the last sliding_window keys, its compressor
projections join rings of the window(s) in progress, and the token that
ends a window pools that window's entry (the Compressor's pooling on the
ring, so decode equals the full forward: tests/test_v4_generate.py). The
mHC streams are per token and carry nothing across tokens; CSA's indexer
scores the cached entries of its own compressor. No MTP drafting
(speculative decoding) for V4 yet.

FP8 (cfg.fp8, DeepSeek-V3's recipe: fp8/dot.py, 1 x 128 activation tiles,
128 x 128 weight blocks, fprop / dgrad / wgrad in E4M3; fp8_layers picks
the kinds): "attn" = V4Attention's wq_a, wq_b, wkv, wo_b (Einsum, as MLA's)
and the grouped wo_a (`GroupedProjection`: one FP8 GEMM per o-group, each
group's matrix in its own blocks); "mlp" = the shared expert; "experts" =
the routed experts of both MoE kinds (model/moe.py). Kept in cfg.dtype /
float32, as V3 keeps its embedding, head, norms, MoE gate and attention
core: the embedding, head, every norm, the MoE gate (and the frozen hash
table), the sinks and the attention core; the mHC mixings (HyperConnection
/ HyperHead: a [n d, (2 + n) n] projection whose few outputs go through
sigmoids and Sinkhorn and scale the whole residual stream, router-like and
float32 by design, as transformers keeps attn_hc / ffn_hc / hc_head); the
compressors' wkv and wgate (wgate's logits feed the pooling softmax; the
published V4-Flash checkpoint ships both in BF16 without FP8 scales:
transformers' `_keep_in_fp32_modules`); CSA's indexer (its compressor,
wq_b, weights_proj and scores: in the model dtype like V3.2's indexer,
model/dsa.py; its top-k passes no gradient, so FP8 there would only
perturb a discrete choice; the published checkpoint stores its wq_b in
FP8, a possible inference-only extension); MTP's eh_proj (as V3's).
tests/test_v4_fp8.py holds the FP8 forward against a hand emulation of
exactly these GEMMs.

Memory: the training / prefill attention is the naive [b, H, s, s +
entries] form (the sliding window and the compressed entries are masks
over it); a windowed / gathered kernel is what long contexts need. A decode
step reads sliding_window keys plus every compressed entry of the cache
(CSA: masked to the indexer's top-k, not gathered). Packed rows: the
sliding window stays within a segment, but the compressed entries pool
whatever tokens their window holds (as transformers, which has no
packing): train V4 on unpacked rows.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax import fp8
from deepseek_jax.config import ModelConfig
from deepseek_jax.model.attention import NEG_INF
from deepseek_jax.model.dsa import select_topk
from deepseek_jax.model.hyper import HyperConnection, HyperHead, hc_merge, unweighted_rms
from deepseek_jax.model.layers import Einsum, Embed, RMSNorm, dtype_of, normal_init
from deepseek_jax.model.mla import write_rows
from deepseek_jax.model.moe import MoE
from deepseek_jax.model.mtp import shift_left
from deepseek_jax.model.rope import _correction_dim
from deepseek_jax.model.stages import checkpoint_policy
from deepseek_jax.parallel.rules import constrain

SLIDING, CSA, HCA = ("sliding_attention", "compressed_sparse_attention",
                     "heavily_compressed_attention")


def v4_frequencies(cfg: ModelConfig, compressed: bool) -> np.ndarray:
  """Per-pair RoPE frequencies [v4_rope_dim // 2] float32: base rope_theta
  (sliding layers) or compress_rope_theta (compressed layers, their
  compressors and indexer), YaRN on the latter when cfg.use_yarn (the ramp
  of model/rope.py; V4 applies no mscale)."""
  dim = cfg.v4_rope_dim
  base = cfg.compress_rope_theta if compressed else cfg.rope_theta
  freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  if compressed and cfg.use_yarn:
    low = max(math.floor(_correction_dim(cfg.beta_fast, dim, base, cfg.original_seq_len)), 0)
    high = min(math.ceil(_correction_dim(cfg.beta_slow, dim, base, cfg.original_seq_len)),
               dim - 1)
    high = high + 0.001 if low == high else high
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    freqs = freqs / cfg.rope_factor * ramp + freqs * (1 - ramp)
  return freqs.astype(np.float32)


def rope_tail(x: jax.Array, positions: jax.Array, freqs: np.ndarray) -> jax.Array:
  """Rotates interleaved pairs of the trailing 2 len(freqs) channels of x
  [..., D] by positions (broadcastable to x.shape[:-1]) times freqs."""
  rd = 2 * freqs.shape[0]
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(freqs)
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  pairs = x[..., -rd:].astype(jnp.float32).reshape(x.shape[:-1] + (-1, 2))
  even, odd = pairs[..., 0], pairs[..., 1]
  rot = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], -1).reshape(
      x.shape[:-1] + (rd,))
  return jnp.concatenate([x[..., :-rd], rot.astype(x.dtype)], axis=-1)


def visible_entries(positions: jax.Array, n_entries: int, rate: int) -> jax.Array:
  """bool [b, s, n_entries]: entry w's window has ended by the query's
  position t, w < (t + 1) // rate."""
  return jnp.arange(n_entries)[None, None] < ((positions + 1) // rate)[..., None]


def ring_positions(latest: jax.Array, size: int) -> jax.Array:
  """int [b, size]: the position each slot of a ring buffer holds when the
  row's newest token is at `latest` [b] (slot = position mod size, so slot s
  holds the newest position <= latest congruent to s); negative = empty."""
  latest = latest[:, None]
  return latest - (latest - jnp.arange(size)[None]) % size


def pool_windows(kv: jax.Array, gate: jax.Array, width: int, overlap: bool) -> jax.Array:
  """The compressor's softmax pooling: kv [b, n, rate, k width] and gate
  float32 (ape added) of n consecutive windows -> float32 [b, n, width].
  overlap (CSA): window w pools window w - 1's first series with its own
  second series (window 0 of the block: no predecessor, -inf gates)."""
  if overlap:
    prev_kv = jnp.pad(kv[:, :-1, :, :width], ((0, 0), (1, 0), (0, 0), (0, 0)))
    prev_gate = jnp.pad(gate[:, :-1, :, :width], ((0, 0), (1, 0), (0, 0), (0, 0)),
                        constant_values=-jnp.inf)
    kv = jnp.concatenate([prev_kv, kv[..., width:]], axis=2)           # [b, n, 2r, w]
    gate = jnp.concatenate([prev_gate, gate[..., width:]], axis=2)
  return jnp.sum(kv.astype(jnp.float32) * jax.nn.softmax(gate, axis=2), axis=2)


class Compressor(nn.Module):
  """Compressed entries (module doc); overlap: CSA's two series (windows of
  2 rate, stride rate). Params: wkv, wgate [dim, k width], ape [rate, k
  width] (k = 2 with overlap), norm. Returns (entries, state):

  training / prefill (cache None): x [b, s, dim] -> the s // rate entries
    [b, s // rate, width] and state {"kv" [b, s, k width], "gate" float32
    [b, s, k width] (ape of the token's slot added), "entries"}: every
    token's projections, from which a decode cache keeps the windows in
    progress (infer/cache.py).
  decode (cache {"kv", "gate": rings [b, R, k width] at slot position mod R,
    R = rate, 2 rate with overlap; "entries" [b, N, width] at their window
    index}): x [b, 1, dim] at positions [b, 1] goes into the rings; when it
    ends window w (position + 1 a multiple of rate) entry w is pooled from
    the rings and written. Returns (the cache's entries, the new cache)."""
  cfg: ModelConfig
  rate: int
  width: int
  overlap: bool

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array | None = None, cache=None):
    cfg = self.cfg
    b, s, d = x.shape
    k = 2 if self.overlap else 1
    r, w = self.rate, self.width
    kv = Einsum(cfg, (d, k * w), "bsd,dk->bsk", name="wkv")(x)
    gate = Einsum(cfg, (d, k * w), "bsd,dk->bsk", name="wgate")(x).astype(jnp.float32)
    ape = self.param("ape", nn.initializers.zeros, (r, k * w),
                     dtype_of(cfg.param_dtype)).astype(jnp.float32)
    norm, freqs = RMSNorm(cfg, name="norm"), v4_frequencies(cfg, True)
    if cache is not None:
      return self._decode(kv, gate, ape, norm, freqs, positions[:, 0], cache)
    gate = gate + ape[np.arange(s) % r]
    n_w = s // r
    if n_w == 0:       # shorter than one window: no entries (norm still makes its params)
      entries = norm(jnp.zeros((b, 0, w), cfg.dtype))
    else:
      pooled = pool_windows(kv[:, :n_w * r].reshape(b, n_w, r, -1),
                            gate[:, :n_w * r].reshape(b, n_w, r, -1), w, self.overlap)
      pooled = norm(pooled.astype(cfg.dtype))
      entries = rope_tail(pooled, jnp.broadcast_to(jnp.arange(n_w) * r, (b, n_w)), freqs)
    return entries, {"kv": kv, "gate": gate, "entries": entries}

  def _decode(self, kv, gate, ape, norm, freqs, pos, cache):
    """One token per row at positions pos [b] (class doc)."""
    cfg, r, w = self.cfg, self.rate, self.width
    b, size = cache["kv"].shape[:2]
    ring_kv = write_rows(cache["kv"], kv, pos % size)
    ring_gate = write_rows(cache["gate"], gate + jnp.take(ape, pos % r, axis=0)[:, None],
                           pos % size)
    window = pos // r
    n_win = 2 if self.overlap else 1                # the current window (and its predecessor)
    slots = ((window - n_win + 1) * r)[:, None] + jnp.arange(n_win * r)[None]
    slots = (slots % size)[..., None]
    win_kv = jnp.take_along_axis(ring_kv, slots, axis=1).reshape(b, n_win, r, -1)
    win_gate = jnp.take_along_axis(ring_gate, slots, axis=1).reshape(b, n_win, r, -1)
    if self.overlap:                                # window 0 has no predecessor
      first = (window == 0)[:, None, None, None] & (jnp.arange(n_win) == 0)[None, :, None, None]
      win_gate = jnp.where(first, -jnp.inf, win_gate)
    pooled = pool_windows(win_kv, win_gate, w, self.overlap)[:, -1]      # [b, w]
    entry = rope_tail(norm(pooled.astype(cfg.dtype)), window * r, freqs)
    old = jnp.take_along_axis(cache["entries"], window[:, None, None], axis=1)[:, 0]
    ended = ((pos + 1) % r == 0)[:, None]
    entries = write_rows(cache["entries"], jnp.where(ended, entry, old)[:, None], window)
    return entries, {"kv": ring_kv, "gate": ring_gate, "entries": entries}


class Indexer(nn.Module):
  """CSA's lightning indexer (module doc): (bool [b, s, entries], each
  query's chosen visible entries; its compressor's state, as Compressor's:
  training / prefill without `cache`, decode with it). Params: compressor
  (CSA's, at index_head_dim), wq_b [q_lora_rank, index_n_heads,
  index_head_dim], weights_proj [dim, index_n_heads]."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, c_q: jax.Array, positions: jax.Array, cache=None):
    cfg = self.cfg
    nh, hd = cfg.index_n_heads, cfg.index_head_dim
    keys, state = Compressor(cfg, cfg.compress_rate_csa, hd, True, name="compressor")(
        x, positions, cache)
    q = Einsum(cfg, (cfg.q_lora_rank, nh, hd), "bsr,rhk->bshk", name="wq_b")(c_q)
    q = rope_tail(q, positions[..., None], v4_frequencies(cfg, True))
    w = Einsum(cfg, (cfg.dim, nh), "bsd,dh->bsh", name="weights_proj")(x)
    w = w.astype(jnp.float32) * nh ** -0.5
    dots = jnp.einsum("bshk,btk->bsht", q.astype(jnp.float32), keys.astype(jnp.float32))
    scores = jnp.einsum("bsh,bsht->bst", w, jax.nn.relu(dots) * hd ** -0.5)
    allowed = visible_entries(positions, keys.shape[1], cfg.compress_rate_csa)
    return select_topk(scores, allowed, cfg.index_topk), state


class GroupedProjection(nn.Module):
  """The grouped low-rank output projection `wo_a`: x [b, s, g, i] with
  kernel [g, i, o] -> [b, s, g, o], group j's heads through group j's own
  [i, o] matrix (einsum "bsgi,gio->bsgo").

  FP8 (cfg.fp8_for("attn")): each group's GEMM is its own FP8 GEMM,
  `fp8.fp8_grouped_dot` with one group per o-group, as the routed experts
  (one group per expert): the group's [i, o] matrix in 128 x 128 blocks, its
  input in 1 x 128 tiles along i (per token and group), dgrad / wgrad in
  FP8 per group. Einsum's `fp8_einsum` flattens one [K, N] matrix and has
  no dimension shared by input and kernel, hence this module (same
  parameter, `kernel`). Published FP8 blocks (a `kernel_scale`) are refused:
  V4 checkpoints load as float weights only (interop/hf_load.py)."""
  cfg: ModelConfig
  shape: tuple

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.cfg
    kernel = self.param("kernel", normal_init(cfg), tuple(self.shape), dtype_of(cfg.param_dtype))
    if self.has_variable("params", "kernel_scale"):
      raise NotImplementedError("wo_a: FP8 weight blocks (kernel_scale) are not supported for "
                                "DeepSeek-V4; load the checkpoint with keep_fp8=False.")
    dt = dtype_of(cfg.dtype)
    if not cfg.fp8_for("attn"):
      return jnp.einsum("bsgi,gio->bsgo", x.astype(dt), kernel.astype(dt))
    b, s, g, i = x.shape
    xg = jnp.transpose(x.astype(dt), (2, 0, 1, 3)).reshape(g, b * s, i)
    y = fp8.fp8_grouped_dot(xg, kernel)                                   # f32 [g, b s, o]
    return jnp.transpose(y.reshape(g, b, s, -1), (1, 2, 0, 3)).astype(dt)


def sliding_mask(segment_ids: jax.Array, window: int) -> jax.Array:
  """bool [b, s, s]: key j for query i when i - window < j <= i, same segment."""
  s = segment_ids.shape[1]
  i, j = np.arange(s)[:, None], np.arange(s)[None, :]
  band = jnp.asarray((j <= i) & (i - j < window))
  return band[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])


def sink_attention(q, keys, allowed, sinks, scale: float) -> jax.Array:
  """softmax over [q.k scale (allowed keys), sink_h], the sink's share
  dropped: q [b, s, H, D], keys [b, t, D] (also the values), allowed
  [b, s, t], sinks [H] -> [b, s, H, D] float32."""
  logits = jnp.einsum("bshd,btd->bhst", q.astype(jnp.float32),
                      keys.astype(jnp.float32)) * scale
  logits = jnp.where(allowed[:, None], logits, NEG_INF)
  sink = sinks.astype(jnp.float32)[None, :, None, None]
  top = jnp.maximum(logits.max(-1, keepdims=True), sink)
  p = jnp.exp(logits - top)
  probs = p / (p.sum(-1, keepdims=True) + jnp.exp(sink - top))
  return jnp.einsum("bhst,btd->bshd", probs, keys.astype(jnp.float32))


class V4Attention(nn.Module):
  """One V4 attention layer of `layer_type` (module doc): x [b, s, dim]
  (normalised) -> (out [b, s, dim], state). Params: wq_a, q_norm, wq_b
  [q_lora, H, hd], wkv, kv_norm, sinks [H], wo_a [g, H hd / g, o_lora_rank],
  wo_b [g o_lora_rank, dim], and compressor (CSA / HCA), indexer (CSA).

  Without `cache` (training, prefill) state holds every token's key
  {"window": [b, s, hd]} and the compressors' states (Compressor). With
  `cache` (decode, one token per row at positions [b, 1]): the layer's
  cache {"window": ring [b, sliding_window, hd] at slot position mod
  sliding_window, "compressor", "indexer"}; the token's key goes into the
  ring, it attends to the ring's slots within the window and, in compressed
  layers, to the entries whose windows have ended; state is the new cache."""
  cfg: ModelConfig
  layer_type: str

  @nn.compact
  def __call__(self, x, positions, segment_ids, cache=None):
    cfg = self.cfg
    b, s, d = x.shape
    h, hd, g = cfg.n_heads, cfg.head_dim, cfg.o_groups
    compressed = self.layer_type != SLIDING
    freqs = v4_frequencies(cfg, compressed)
    c_q = RMSNorm(cfg, name="q_norm")(
        Einsum(cfg, (d, cfg.q_lora_rank), "bsd,dr->bsr", "attn", name="wq_a")(x))
    q = Einsum(cfg, (cfg.q_lora_rank, h, hd), "bsr,rhk->bshk", "attn", name="wq_b")(c_q)
    q = unweighted_rms(q, cfg.rms_norm_eps).astype(cfg.dtype)
    q = rope_tail(q, positions[..., None], freqs)
    kv = RMSNorm(cfg, name="kv_norm")(
        Einsum(cfg, (d, hd), "bsd,dk->bsk", "attn", name="wkv")(x))
    kv = rope_tail(kv, positions, freqs)
    if cache is None:
      keys, allowed = kv, sliding_mask(segment_ids, cfg.sliding_window)
    else:
      size = cache["window"].shape[1]
      keys = write_rows(cache["window"], kv, positions[:, 0] % size)
      allowed = (ring_positions(positions[:, 0], size) >= 0)[:, None]      # [b, 1, W]
    state, parts = {"window": keys}, cache or {}
    if compressed:
      csa = self.layer_type == CSA
      rate = cfg.compress_rate_csa if csa else cfg.compress_rate_hca
      entries, state["compressor"] = Compressor(cfg, rate, hd, csa, name="compressor")(
          x, positions, parts.get("compressor"))
      if csa:
        seen, state["indexer"] = Indexer(cfg, name="indexer")(x, c_q, positions,
                                                              parts.get("indexer"))
      else:
        seen = visible_entries(positions, entries.shape[1], rate)
      keys = jnp.concatenate([keys, entries.astype(keys.dtype)], axis=1)
      allowed = jnp.concatenate([allowed, seen], axis=-1)
    sinks = self.param("sinks", nn.initializers.zeros, (h,), dtype_of(cfg.param_dtype))
    out = sink_attention(q, keys, allowed, sinks, hd ** -0.5)
    out = rope_tail(out, -positions[..., None], freqs).astype(cfg.dtype)
    out = out.reshape(b, s, g, h * hd // g)
    out = GroupedProjection(cfg, (g, h * hd // g, cfg.o_lora_rank), name="wo_a")(out)
    return Einsum(cfg, (g * cfg.o_lora_rank, d), "bsr,rd->bsd", "attn", name="wo_b")(
        out.reshape(b, s, -1)), state


def hash_table_init(vocab: int, k: int, n_experts: int) -> jax.Array:
  """tid2eid's initial value [vocab, k] int32: token t's j-th expert
  (t k + j) mod E (distinct within a row for k <= E, every expert used)."""
  t = np.arange(vocab)[:, None] * k + np.arange(k)[None]
  return jnp.asarray(t % n_experts, jnp.int32)


class V4Block(nn.Module):
  """One V4 block on the streams [b, s, hc_mult, dim] (module doc): mHC
  around attention (`attn_hc`, `attn_norm`, `attn`) and around the MoE
  (`ffn_hc`, `ffn_norm`, `ffn`). Returns (streams, the MoE's aux). The
  streams are per token (no state across tokens), so inference needs only
  the attention's: `keep_state` (prefill, decode) adds aux["cache"], the
  attention's state (V4Attention: every token's with `cache` None, else the
  updated cache)."""
  cfg: ModelConfig
  layer_type: str
  mlp_type: str
  record: bool = False
  keep_state: bool = False

  @nn.compact
  def __call__(self, streams, tokens, positions, segment_ids, valid, cache=None):
    cfg = self.cfg
    post, comb, u = HyperConnection(cfg, name="attn_hc")(streams)
    a, state = V4Attention(cfg, self.layer_type, name="attn")(
        RMSNorm(cfg, name="attn_norm")(u), positions, segment_ids, cache)
    streams = hc_merge(streams, a, post, comb)
    post, comb, u = HyperConnection(cfg, name="ffn_hc")(streams)
    routing = None
    if self.mlp_type == "hash_moe":
      table = self.variable("router_bias", "tid2eid", hash_table_init, cfg.vocab_size,
                            cfg.n_activated_experts, cfg.n_routed_experts).value
      routing = jnp.take(table, tokens, axis=0)                          # [b, s, k]
    out, aux = MoE(cfg, record=self.record, name="ffn")(RMSNorm(cfg, name="ffn_norm")(u),
                                                        valid, routing)
    if self.keep_state:
      aux = {**aux, "cache": state}
    return hc_merge(streams, out, post, comb), aux


class V4MTP(nn.Module):
  """MTP module (module doc): (h_prev [b, s, dim] normalised, emb [b, s, dim])
  -> (normalised h^k, block aux)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, h_prev, emb, tokens, positions, segment_ids, valid):
    cfg = self.cfg
    x = jnp.concatenate([RMSNorm(cfg, name="enorm")(emb), RMSNorm(cfg, name="hnorm")(h_prev)],
                        axis=-1)
    x = Einsum(cfg, (2 * cfg.dim, cfg.dim), "bsd,de->bse", name="eh_proj")(x)
    streams = jnp.broadcast_to(x[:, :, None], x.shape[:2] + (cfg.hc_mult, cfg.dim))
    streams, aux = V4Block(cfg, SLIDING, "moe", name="block")(streams, tokens, positions,
                                                              segment_ids, valid)
    return RMSNorm(cfg, name="norm")(HyperHead(cfg, name="hc_head")(streams)), aux


def v4_forward(cfg: ModelConfig, embed: Embed, head, final_norm: RMSNorm, tokens, positions,
               segment_ids, targets, hidden: bool):
  """The V4 training forward, called inside Transformer's compact __call__
  (its submodules are the Transformer's): (logits [b, s, V] f32, or h with
  `hidden`; aux as Transformer documents: balance_loss, expert_load
  [n_layers, E], and with targets and MTP mtp_logits / mtp_hidden and
  mtp_expert_load)."""
  valid = segment_ids != 0
  # On a mesh (a no-op without one) the activations keep their rows on the
  # batch axes and everything else whole, as V3's (model/stages.py).
  x = constrain(embed(tokens), ("batch", "seq", None))
  streams = jnp.broadcast_to(x[:, :, None], x.shape[:2] + (cfg.hc_mult, cfg.dim))
  balance, loads = jnp.zeros((), jnp.float32), []
  block = V4Block if cfg.remat_policy == "none" else nn.remat(
      V4Block, policy=checkpoint_policy(cfg), prevent_cse=False)
  for i, (kind, mlp) in enumerate(zip(cfg.layer_types, cfg.mlp_layer_types)):
    streams, aux = block(cfg, kind, mlp, name=f"layers_{i}")(streams, tokens, positions,
                                                               segment_ids, valid)
    streams = constrain(streams, ("batch", "seq", None, None))
    balance = balance + aux["balance_loss"]
    loads.append(aux["load"])
  h = final_norm(HyperHead(cfg, name="hc_head")(streams))
  out = h if hidden else constrain(head(h), ("batch", "seq", "vocab"))
  aux = {"balance_loss": balance, "expert_load": jnp.stack(loads)}
  if targets is None or not cfg.n_mtp_depth:
    return out, aux
  mtp_out, mtp_loads = [], []
  for k in range(1, cfg.n_mtp_depth + 1):
    nxt = shift_left(targets, k - 1)                                    # t_{i+k}
    emb = constrain(embed(nxt), ("batch", "seq", None))
    h, block_aux = V4MTP(cfg, name=f"mtp_{k - 1}")(h, emb, nxt, positions, segment_ids, valid)
    aux["balance_loss"] = aux["balance_loss"] + block_aux["balance_loss"]
    mtp_loads.append(block_aux["load"])
    mtp_out.append(h if hidden else head(h))
  aux["mtp_hidden" if hidden else "mtp_logits"] = jnp.stack(mtp_out)
  aux["mtp_expert_load"] = jnp.stack(mtp_loads)
  return out, aux


def v4_infer(cfg: ModelConfig, embed: Embed, head, final_norm: RMSNorm, tokens, positions,
             segment_ids, cache, logits_index):
  """V4's inference modes, called inside Transformer's compact __call__ as
  v4_forward (the same parameters): (logits, h, states) with h the
  normalised final state [b, s, dim] and states {f"layers_{i}": the layer's
  attention state}. prefill (cache None): the training forward over padded
  prompts (segment_ids, 0 = padding), states with every token's key and
  compressor projections (infer/cache.py turns them into the decode cache);
  decode (cache as infer/cache.py builds it): tokens [b, 1] at positions
  [b, 1], states = the updated cache. logits_index [b]: logits only there."""
  valid = segment_ids != 0
  x = constrain(embed(tokens), ("batch", "seq", None))
  streams = jnp.broadcast_to(x[:, :, None], x.shape[:2] + (cfg.hc_mult, cfg.dim))
  states = {}
  for i, (kind, mlp) in enumerate(zip(cfg.layer_types, cfg.mlp_layer_types)):
    name = f"layers_{i}"
    streams, aux = V4Block(cfg, kind, mlp, keep_state=True, name=name)(
        streams, tokens, positions, segment_ids, valid, None if cache is None else cache[name])
    states[name] = aux["cache"]
  h = final_norm(HyperHead(cfg, name="hc_head")(streams))
  h_out = h if logits_index is None else jnp.take_along_axis(
      h, logits_index[:, None, None], axis=1)
  return head(h_out), h, states
