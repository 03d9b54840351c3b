"""DeepSeekMoE with auxiliary-loss-free balancing (V3 report sec. 2.1.2).

  h' = u + sum_{shared} FFN_s(u) + sum_i g_i FFN_i(u)                    (eq. 12)
  s_i = sigmoid(u . e_i)            (router in float32)                  (eq. 15)
  selection: top-k of s_i + b_i, group-limited: a group's score is the sum
    of its two best biased scores, only the best `n_limited_groups` groups
    stay eligible                                                  (eqs. 13, 16)
  g_i = s_i / sum_{j in top-k} s_j * route_scale    (un-biased scores)   (eq. 14)

The bias b (one per routed expert) steers selection only. It is not a
trainable parameter: it lives in the `router_bias` variable collection and
the trainer moves it by b_i += gamma * sign(mean_load - load_i) after each
step, from the per-expert token counts this layer returns. The complementary
sequence-wise balance loss (eqs. 17-20) is returned unscaled (alpha is a
training hyperparameter):

  L_bal = sum_i f_i P_i,  f_i = E / (k T) sum_t 1[t selects i],
  P_i = 1/T sum_t s'_{i,t},  s'_{i,t} = s_{i,t} / sum_j s_{j,t},  per sequence.

DeepSeek-V2's three auxiliary balance losses (expert-, device- and
communication-level; `v2_balance_losses`) are computed too when the layer is
built with `balance_devices` D > 0 (and `balance_max_devices` M), for
ablations against the aux-loss-free scheme; off (D = 0) by default.

Dispatch is dropless: every (token, expert) pair is computed. Rows are sorted
by expert and fed to a grouped matmul; `moe_impl` picks how:
  "blocked"  each expert's rows padded to a multiple of a block size bs, the
             three GEMMs run as `grouped_matmul.gmm` over the blocks (its own
             custom VJP): a chunk of blocks at a time with the chunk's expert
             weights gathered (under 64 MiB), so memory and FLOPs follow the
             real rows plus < one block of padding per expert; at small
             widths one chunk holds every block (one batched einsum, no
             loop). The CPU kernel, and the FP8 one: XLA:CPU lowers
             `jax.lax.ragged_dot` to a dense dot over every expert, masked
             (E times the FLOPs, at 8-17 GFLOP/s against 110-350 for a dense
             einsum); this runs 10-20x faster (DESIGN.md §8).
  "ragged"   `jax.lax.ragged_dot` over the sorted rows, for TPU. On CPU it is
             the masked dense dot above; on CUDA GPUs XLA (jaxlib 0.10.x)
             also expands it to a dense dot over every expert by default
             (marin-community/marin#7012 reports the [rows, E K] operand
             materialised; a cuDNN grouped path sits behind a flag). Not
             measured here.
  "dense"    every expert on every token, masked by the gates: E/k times the
             FLOPs; kept as an exact, obviously-correct reference.
A row whose expert id is outside [0, E) is not a row: "blocked" computes
nothing for it and returns 0 there (the expert exchange marks its empty
buffer slots with expert id E).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax import fp8 as fp8_lib
from deepseek_jax.buffers import bits_weight, take_bits
from deepseek_jax.config import ModelConfig, default_moe_block_size
from deepseek_jax.model.grouped_matmul import gmm
from deepseek_jax.model.layers import MLP, dtype_of, normal_init
from deepseek_jax.parallel.expert import routed_experts, sort_by_group
from deepseek_jax.parallel.rules import current_rules, mesh_axes_of


# ---------------------------------------------------------------------------
# Router
# ---------------------------------------------------------------------------
def route(logits: jax.Array, bias: jax.Array, cfg: ModelConfig,
          replay: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Group-limited top-k routing (official `Gate.forward`).

  logits: [tokens, E] float32; bias: [E] float32.
  Returns (gates [tokens, k] f32, experts [tokens, k] int32, scores [tokens, E]).
  replay [tokens, k] int (routing replay, R3): a token whose k entries are all
  >= 0 uses those experts instead of its top-k; its gates are recomputed from
  the current scores over them (`expert_gates`, the normalisation and
  route_scale of normal routing), so they stay differentiable in the router.
  A token with any entry < 0 routes normally. None: normal routing only (the
  same operations as without the argument).
  """
  n_tok, n_exp = logits.shape
  if cfg.score_func == "sigmoid":
    scores = jax.nn.sigmoid(logits)
  elif cfg.score_func == "sqrtsoftplus":      # DeepSeek-V4
    scores = jnp.sqrt(jax.nn.softplus(logits))
  else:
    scores = jax.nn.softmax(logits, axis=-1)
  choice = scores + bias
  g = cfg.n_expert_groups
  if g > 1:
    grouped = choice.reshape(n_tok, g, n_exp // g)
    if cfg.score_func == "sigmoid":   # V3: sum of each group's best two
      group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)
    else:                             # V2: each group's best expert
      group_scores = grouped.max(-1)
    _, keep = jax.lax.top_k(group_scores, cfg.n_limited_groups)      # [n, lg]
    group_ok = jnp.zeros((n_tok, g), bool).at[
        jnp.arange(n_tok)[:, None], keep].set(True)
    choice = jnp.where(jnp.repeat(group_ok, n_exp // g, axis=1), choice, -jnp.inf)
  _, experts = jax.lax.top_k(choice, cfg.n_activated_experts)          # [n, k]
  experts = experts.astype(jnp.int32)
  if replay is not None:
    given = replay.astype(jnp.int32)
    experts = jnp.where(jnp.all(given >= 0, axis=-1, keepdims=True), given, experts)
  return expert_gates(scores, experts, cfg), experts, scores


def expert_gates(scores: jax.Array, experts: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Gate weights [tokens, k] of the given experts [tokens, k] from the
  un-biased scores [tokens, E]: normalised over the k (sigmoid router, V3
  eq. 14), times route_scale."""
  gates = jnp.take_along_axis(scores, experts, axis=-1)
  if cfg.score_func in ("sigmoid", "sqrtsoftplus"):
    gates = gates / gates.sum(-1, keepdims=True)
  return gates * cfg.route_scale


def sequence_balance_loss(scores: jax.Array, experts: jax.Array,
                          valid: jax.Array, n_experts: int) -> jax.Array:
  """Sequence-wise balance loss sum_i f_i P_i (V3 eqs. 17-20), batch mean.

  scores: [batch, seq, E] un-biased affinities; experts: [batch, seq, k];
  valid: [batch, seq] bool (padding tokens excluded from T and from sums).
  """
  total, n_seqs = balance_loss_terms(scores, experts, valid, n_experts)
  return total / jnp.maximum(n_seqs, 1.0)


def balance_loss_terms(scores: jax.Array, experts: jax.Array, valid: jax.Array,
                       n_experts: int) -> tuple[jax.Array, jax.Array]:
  """(sum over sequences of sum_i f_i P_i, number of non-empty sequences).

  The balance loss is their ratio; a batch split over devices sums both
  over the devices first (parallel/expert.py).
  """
  k = experts.shape[-1]
  valid_f = valid.astype(jnp.float32)
  n_valid = valid_f.sum(-1)                                     # T per sequence
  t = jnp.maximum(n_valid, 1.0)[:, None]
  picked = jax.nn.one_hot(experts, n_experts, dtype=jnp.float32).sum(-2)
  f = n_experts / (k * t) * jnp.einsum("bse,bs->be", picked, valid_f)
  normed = scores / scores.sum(-1, keepdims=True)
  p = jnp.einsum("bse,bs->be", normed, valid_f) / t
  per_seq = (f * p).sum(-1)
  has_tokens = (n_valid > 0).astype(jnp.float32)
  return (per_seq * has_tokens).sum(), has_tokens.sum()


V2_BALANCE_KEYS = ("expert", "device", "comm")


def check_v2_devices(n_experts: int, n_devices: int, max_devices: int) -> None:
  """ValueError unless n_devices D divides n_experts and 1 <= max_devices M <= D."""
  if not (isinstance(n_devices, int) and n_devices >= 1) or n_experts % n_devices:
    raise ValueError(
        f"n_devices={n_devices} must be a positive divisor of the {n_experts} routed "
        f"experts (each device holds a contiguous group of E/D experts); pick D among "
        f"{[d for d in range(1, n_experts + 1) if n_experts % d == 0]}.")
  if not (isinstance(max_devices, int) and 1 <= max_devices <= n_devices):
    raise ValueError(
        f"max_devices={max_devices} must be in [1, n_devices={n_devices}] (M, the "
        "devices a token may send to under device-limited routing; M = D when the "
        "routing does not limit devices).")


def v2_balance_terms(scores: jax.Array, topk_idx: jax.Array, *, n_devices: int,
                     max_devices: int, valid: jax.Array | None = None
                     ) -> tuple[dict[str, jax.Array], jax.Array]:
  """({"expert", "device", "comm"}: sums over sequences of the per-sequence
  losses, number of non-empty sequences). `v2_balance_losses` is their ratio;
  a batch split over devices sums both over the devices first (as
  parallel/expert.py does for `balance_loss_terms`). Arguments: see
  `v2_balance_losses`.
  """
  b, t, n_exp = scores.shape
  k = topk_idx.shape[-1]
  check_v2_devices(n_exp, n_devices, max_devices)
  if valid is None:
    valid = jnp.ones((b, t), bool)
  valid_f = valid.astype(jnp.float32)
  n_valid = valid_f.sum(-1)                                      # T per sequence
  t_seq = jnp.maximum(n_valid, 1.0)[:, None]
  picked = jax.nn.one_hot(topk_idx, n_exp, dtype=jnp.float32).sum(-2)     # [b, t, E]
  counts = jnp.einsum("bte,bt->be", picked, valid_f)           # tokens choosing i
  f = n_exp / (k * t_seq) * counts                               # f_i
  p = jnp.einsum("bte,bt->be", scores.astype(jnp.float32), valid_f) / t_seq   # P_i
  per_dev = n_exp // n_devices
  p_dev = p.reshape(b, n_devices, per_dev).sum(-1)               # P'_d = P''_d
  f_dev = f.reshape(b, n_devices, per_dev).mean(-1)              # f'_d
  sends = picked.reshape(b, t, n_devices, per_dev).max(-1)       # token -> device d, once
  f_comm = n_devices / (max_devices * t_seq) * jnp.einsum("btd,bt->bd", sends, valid_f)
  has_tokens = (n_valid > 0).astype(jnp.float32)
  per_seq = {"expert": (f * p).sum(-1), "device": (f_dev * p_dev).sum(-1),
             "comm": (f_comm * p_dev).sum(-1)}
  return {key: (v * has_tokens).sum() for key, v in per_seq.items()}, has_tokens.sum()


def v2_balance_losses(scores: jax.Array, topk_idx: jax.Array, *, n_devices: int,
                      max_devices: int, valid: jax.Array | None = None
                      ) -> dict[str, jax.Array]:
  """DeepSeek-V2's auxiliary balance losses (V2 report sec. 2.2.3), batch mean.

  scores [B, T, E]: the routing affinities s_{i,t}, used as given (a softmax
  router's probabilities; for a sigmoid-scored V3 router pass them normalised
  to sum 1 per token, as `balance_loss_terms` and the training integration
  do). topk_idx [B, T, K]: the experts each token chose. The E routed experts
  sit on D = `n_devices` devices in contiguous groups E_1..E_D of E/D (D must
  divide E); M = `max_devices` is the bound of device-limited routing
  (1 <= M <= D). valid [B, T] bool (default all True): padding is excluded
  from T and from every sum; a sequence without valid tokens contributes
  nothing and is not counted. Per sequence, with T its valid tokens and N_r = E:

    expert  sum_i f_i P_i,     f_i = N_r / (K T) #{t: t chose i},
                               P_i = 1/T sum_t s_{i,t}
    device  sum_d f'_d P'_d,   f'_d = mean_{j in E_d} f_j,  P'_d = sum_{j in E_d} P_j
    comm    sum_d f''_d P''_d, f''_d = D / (M T) #{t: t sent to device d}
                               (a token counted once per device however many
                               of its experts sit there), P''_d = P'_d

  Returns {"expert", "device", "comm"}: each averaged over the non-empty
  sequences, without its alpha factor (V2: alpha1 0.003, alpha2 0.05, alpha3
  0.02). Device-limited routing (each token's experts on at most M devices)
  is this repo's group-limited router with ModelConfig `n_expert_groups = D`
  and `n_limited_groups = M`. Raises ValueError for a bad D or M.
  """
  sums, n_seqs = v2_balance_terms(scores, topk_idx, n_devices=n_devices,
                                  max_devices=max_devices, valid=valid)
  return {key: v / jnp.maximum(n_seqs, 1.0) for key, v in sums.items()}


# ---------------------------------------------------------------------------
# Grouped expert FFNs: x [n, D], experts/gates [n, k], w1/w3 [E, D, F], w2 [E, F, D]
# ---------------------------------------------------------------------------
def glu(gate, up, limit: float = 0.0):
  """silu(gate) * up; limit > 0 (DeepSeek-V4's swiglu_limit) first clamps
  gate above at limit and up to [-limit, limit]. 0: the plain SwiGLU."""
  if limit:
    gate = jnp.minimum(gate, limit)
    up = jnp.clip(up, -limit, limit)
  return jax.nn.silu(gate) * up


def _swiglu(x, w1, w3, w2, eq_in, eq_out, limit: float = 0.0):
  return jnp.einsum(eq_out, glu(jnp.einsum(eq_in, x, w1), jnp.einsum(eq_in, x, w3), limit),
                    w2)


default_block_size = default_moe_block_size   # (config.py: the planner counts it too)


def _swiglu_grouped(xg, w1, w3, w2, fp8: bool, limit: float = 0.0):
  """SwiGLU of each group g's rows xg[g] [M, D] with expert weights w*[g]
  (every GEMM through fp8_grouped_dot when fp8); limit: `glu`'s clamp."""
  if not fp8:
    return _swiglu(xg, w1, w3, w2, "gmd,gdf->gmf", "gmf,gfd->gmd", limit)
  def dot(a, w):
    return fp8_lib.fp8_grouped_dot(a, w).astype(a.dtype)
  return dot(glu(dot(xg, w1), dot(xg, w3), limit), w2)


def _n_experts(w) -> int:
  return (w.q if isinstance(w, fp8_lib.Quantized) else w).shape[0]


def _take_rows(a, idx):
  """a[idx] along axis 0; an index outside [0, len(a)) reads a zero row."""
  return take_bits(a, idx, mode="fill", fill_value=0)      # 16-bit: gathered as bits


@jax.custom_vjp
def move_rows(a, idx, back):
  """a[idx] (out-of-range ids read 0), whose backward is a gather too.

  idx [m] int, back [len(a), j] int: back[r] lists the output rows that
  read row r (out-of-range entries for none), so the cotangent of row r is
  the sum of ct[back[r]]. `jnp.take`'s own VJP is a scatter-add into a
  zero [len(a), ...] buffer; at V3 widths XLA:CPU materialised that as f32
  scatters and converts next to the output (6.25 GiB at the DualPipeV
  peak). A gather reads only what it needs and sums j > 1 rows in float32."""
  return _take_rows(a, idx)


def _move_rows_fwd(a, idx, back):
  return _take_rows(a, idx), back


def _move_rows_bwd(back, ct):
  if back.shape[1] == 1:           # a permutation: the gather alone, in ct's dtype
    return _take_rows(ct, back[:, 0]), None, None
  g = jnp.sum(_take_rows(ct, back), axis=1, dtype=jnp.float32)
  return g.astype(ct.dtype), None, None


move_rows.defvjp(_move_rows_fwd, _move_rows_bwd)


def experts_blocked(x, experts, gates, w1, w3, w2, block_size: int = 0, fp8: bool = False,
                    embed_axes: tuple[str, ...] = (), swiglu_limit: float = 0.0):
  """Routed SwiGLU experts on block-padded rows: sum_j gates[t, j] FFN_{e_tj}(x_t).

  x [n, D], experts/gates [n, k], w1/w3 [E, D, F], w2 [E, F, D] (or FP8
  blocks with fp8). The n k (token, expert) rows are sorted by expert, each
  expert's rows padded to a multiple of the block size bs (so every block of
  bs rows has one expert), and the three GEMMs run as `gmm` over the blocks
  (model/grouped_matmul.py): FLOPs and memory follow the real rows. An expert
  id outside [0, E) marks a row that is not one (the expert exchange's empty
  buffer slots): it is sorted into an extra last group that gets no block,
  so it is never computed and its output is 0.
  embed_axes (inside `jax.shard_map`): the weights are this device's FSDP
  slices, the model width D split over these mesh axes (w1/w3 [E, D/f, F],
  w2 [E, F, D/f]); `gmm` gathers one expert's whole weight at a time instead
  of every expert's at once (10.5 GiB per V3 layer at tensor=2, and as much
  again for the gradient). swiglu_limit: `glu`'s clamp (V4; 0 = none), as
  in the other kernels.
  """
  n, d = x.shape
  k = experts.shape[1]
  n_exp = _n_experts(w1)
  rows = n * k
  bs = block_size or default_block_size(rows, n_exp)
  n_blocks = -(-rows // bs) + n_exp          # static bound on sum_e ceil(c_e / bs)
  flat = experts.reshape(-1)
  flat = jnp.where((flat >= 0) & (flat < n_exp), flat, n_exp)          # not-a-row: group E
  order, sorted_e, counts, position = sort_by_group(flat, n_exp + 1)
  padded = (counts[:n_exp] + bs - 1) // bs * bs
  pad_end = jnp.cumsum(padded)
  # Group E's rows get distinct slots past the end: dropped by the scatter,
  # read back as 0.
  pad_start = jnp.append(pad_end - padded, n_blocks * bs)
  slot_sorted = (pad_start[sorted_e] + position).astype(jnp.int32)
  slot = jnp.zeros((rows,), jnp.int32).at[order].set(slot_sorted)     # row -> slot
  # Each slot's token (n: padding, read as 0): a gather from x, no [n k, D] copy.
  slot_token = jnp.full((n_blocks * bs,), n, jnp.int32).at[slot].set(
      jnp.arange(rows, dtype=jnp.int32) // k, mode="drop", unique_indices=True)
  # Row r of the flat (token, expert) rows sits in slot slot[r]; backward
  # maps: token t's k slots, and each slot's row (rows: a padding slot).
  xs = move_rows(x, slot_token, slot.reshape(n, k))
  block_e = jnp.minimum(
      jnp.searchsorted(pad_end, jnp.arange(n_blocks) * bs, side="right"), n_exp - 1)
  n_used = (pad_end[-1] // bs).astype(jnp.int32)
  # With fp8 each block quantizes its rows in 1x128 tiles along d (fprop)
  # and along its <= 128 rows (wgrad): a block is at most one M tile.
  mm = functools.partial(gmm, block_group=block_e, n_used=n_used, fp8=fp8,
                         gather_axes=tuple(embed_axes))
  h = glu(mm(xs, w1, gather_dim=1), mm(xs, w3, gather_dim=1), swiglu_limit)
  y = mm(h, w2, gather_dim=2)
  slot_row = jnp.full((n_blocks * bs, 1), rows, jnp.int32).at[slot, 0].set(
      jnp.arange(rows, dtype=jnp.int32), mode="drop", unique_indices=True)
  y_rows = move_rows(y, slot, slot_row).reshape(n, k, d)
  return jnp.einsum("nkd,nk->nd", y_rows, gates.astype(y_rows.dtype))


def experts_ragged(x, experts, gates, w1, w3, w2, swiglu_limit: float = 0.0):
  n, d = x.shape
  k = experts.shape[1]
  order, _, counts, _ = sort_by_group(experts.reshape(-1), w1.shape[0])
  counts = counts.astype(jnp.int32)
  xs = jnp.take(x, order // k, axis=0)                                 # [rows, D]
  h = glu(jax.lax.ragged_dot(xs, w1, counts), jax.lax.ragged_dot(xs, w3, counts),
          swiglu_limit)
  ys = jax.lax.ragged_dot(h, w2, counts)
  y_rows = jnp.zeros_like(ys).at[order].set(ys, unique_indices=True).reshape(n, k, d)
  return jnp.einsum("nkd,nk->nd", y_rows, gates.astype(y_rows.dtype))


def experts_dense(x, experts, gates, w1, w3, w2, fp8: bool = False,
                  swiglu_limit: float = 0.0):
  n, n_exp = x.shape[0], _n_experts(w1)
  dense_gates = jnp.zeros((n, n_exp), gates.dtype).at[
      jnp.arange(n)[:, None], experts].set(gates)
  # Expert-major [E, n, *] operands: batched GEMMs over the expert axis, the
  # layout XLA:CPU runs without transposing the weights (~8x faster than
  # "nd,edf->nef" at decode sizes).
  y = _swiglu_grouped(jnp.broadcast_to(x, (n_exp,) + x.shape), w1, w3, w2, fp8, swiglu_limit)
  return jnp.einsum("end,ne->nd", y, dense_gates.astype(y.dtype))


def experts_picked(x, experts, gates, w1, w3, w2, swiglu_limit: float = 0.0):
  """`experts_dense` reading only the experts the tokens picked (decoding).

  The m = n k picked ids, made unique (sorted, padded to the static bound m
  with id E), select m expert matrices by a gather; each runs on all n
  tokens (the per-expert GEMMs of `experts_dense`, same shapes) and the
  outputs go back to expert-major [E, n, D] (zeros for experts nobody
  picked) for `experts_dense`'s own gated sum, so the result equals it: a
  step reads m of the E expert matrices. Padding slots gather zero weights
  and are dropped by the scatter. Unquantized weights only."""
  n, n_exp = x.shape[0], w1.shape[0]
  m = experts.size
  ids = jnp.unique(experts.reshape(-1), size=m, fill_value=n_exp)          # [m], sorted
  # 16-bit weights (bfloat16 decoding) gathered as bits: XLA:CPU would gather
  # from a float32 copy of every expert's weights, each step.
  picked = [take_bits(w, ids, mode="fill", fill_value=0) for w in (w1, w3, w2)]
  y = _swiglu_grouped(jnp.broadcast_to(x, (m,) + x.shape), *picked, False, swiglu_limit)
  y_all = jnp.zeros((n_exp,) + y.shape[1:], y.dtype).at[ids].set(y, mode="drop")
  dense_gates = jnp.zeros((n, n_exp), gates.dtype).at[
      jnp.arange(n)[:, None], experts].set(gates)
  return jnp.einsum("end,ne->nd", y_all, dense_gates.astype(y.dtype))


def picks_few_experts(cfg: ModelConfig, n_tokens: int) -> bool:
  """Whether an inference forward of n_tokens should run `experts_picked`:
  its static bound of n k gathered experts is below the E that
  `experts_dense` reads (n k < E), so it never reads more."""
  return n_tokens * cfg.n_activated_experts < cfg.n_routed_experts


def routed_ffn(x, valid, gate, bias, w1, w3, w2, cfg: ModelConfig, kernel, *,
               balance_devices: int = 0, balance_max_devices: int = 0, routing=None):
  """Route x [b, s, d] and run the routed experts with `kernel`.

  Returns (out [b, s, d], load [E] token counts, numerators, denominator):
  the balance losses' sums over sequences and the number of non-empty
  sequences (see `balance_loss_terms`). numerators: {"balance": V3's} plus,
  when balance_devices D > 0, V2's "expert", "device", "comm"
  (`v2_balance_terms` with M = balance_max_devices, on the scores normalised
  per token like V3's) and "device_tokens" [D] (tokens sent to each device,
  counted once per token and device). The one routing code path: the MoE
  layer calls it on the whole batch without a mesh; under one it hands it to
  `parallel.expert.routed_experts`, which runs it on each device's rows (with
  an exchanging kernel when experts are split over devices). routing
  [b, s, k] int (optional): experts to replay (`route`'s `replay`).
  """
  b, s, d = x.shape
  n_exp = cfg.n_routed_experts
  tokens = x.reshape(b * s, d)
  gates, experts, scores = router(tokens, gate, bias, cfg, routing)
  out = kernel(tokens, experts, gates, w1, w3, w2).reshape(b, s, d)
  experts_bsk = experts.reshape(b, s, -1)
  load = jnp.einsum("bske,bs->e", jax.nn.one_hot(experts_bsk, n_exp, dtype=jnp.float32),
                    valid.astype(jnp.float32))
  scores_bse = scores.reshape(b, s, n_exp)
  num, den = balance_loss_terms(scores_bse, experts_bsk, valid, n_exp)
  nums = {"balance": num}
  if balance_devices:
    normed = scores_bse / scores_bse.sum(-1, keepdims=True)
    v2, _ = v2_balance_terms(normed, experts_bsk, n_devices=balance_devices,
                             max_devices=balance_max_devices, valid=valid)
    nums.update(v2)
    # Tokens each device receives (a token counted once per device): the
    # traffic device-limited routing bounds and the comm loss evens out.
    sends = jax.nn.one_hot(experts_bsk, n_exp, dtype=jnp.float32).sum(-2).reshape(
        b, s, balance_devices, n_exp // balance_devices).max(-1)
    nums["device_tokens"] = jnp.einsum("bsd,bs->d", sends, valid.astype(jnp.float32))
  return out, load, nums, den


def router(tokens, gate, bias, cfg: ModelConfig, routing=None):
  """`route` on tokens [n, d] with the router weight gate [d, E] (float32
  logits); routing: experts to replay, [..., k] with n rows in all, or None."""
  logits = jnp.einsum("nd,de->ne", tokens.astype(jnp.float32), gate.astype(jnp.float32))
  replay = None if routing is None else routing.reshape(tokens.shape[0], -1)
  return route(logits, bias, cfg, replay)


def _local_rows(routing: jax.Array, n_local: int, rules) -> jax.Array:
  """Inside `routed_experts`' shard_map: this device's rows of the whole
  batch's routing [B, ...] (closed over, hence replicated), the rows its x
  holds: x is split over the batch mesh axes in their order, so its block
  is the linear index of this device along them (`axis_index`)."""
  if routing.shape[0] == n_local:
    return routing
  axes = mesh_axes_of("batch", rules)
  return jax.lax.dynamic_slice_in_dim(routing, jax.lax.axis_index(axes) * n_local, n_local)


def resolve_moe_impl(cfg: ModelConfig, n_tokens: int | None = None) -> str:
  """The kernel `moe_impl` names. "auto": "dense" for a handful of tokens
  (decoding: computing every expert on n tokens, E n rows, is then less work
  than blocked dispatch, >= n k rows plus up to a block of padding per
  expert, and skips the sort); else "ragged" on TPU without FP8 experts
  (ragged_dot takes no block scales), "blocked" elsewhere (CPU and GPU, where
  ragged_dot is a dense dot over every expert; module doc)."""
  if cfg.moe_impl != "auto":
    return cfg.moe_impl
  if n_tokens is not None and n_tokens * (cfg.n_routed_experts - cfg.n_activated_experts) \
      <= 8 * cfg.n_routed_experts:
    return "dense"
  if cfg.fp8_for("experts"):
    return "blocked"
  return "ragged" if jax.default_backend() == "tpu" else "blocked"


class MoE(nn.Module):
  """Shared + routed SwiGLU experts. Returns (output, {balance_loss, load}),
  plus "v2_balance" {"expert", "device", "comm"} (DeepSeek-V2's losses,
  `v2_balance_losses`) and "device_tokens" [D] (per sequence: tokens that
  send to each device) when balance_devices D > 0, with M =
  balance_max_devices: static, set by the trainer (0 = off). record: also
  "experts" [batch, seq, k] int32, each token's chosen experts (what the
  sampler keeps for routing replay)."""
  cfg: ModelConfig
  balance_devices: int = 0
  balance_max_devices: int = 0
  record: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array, routing: jax.Array | None = None):
    """x: [batch, seq, dim]; valid: [batch, seq] bool (False on padding);
    routing [batch, seq, k] int (routing replay): each token's experts to
    use, entries < 0 = route normally (`route`)."""
    cfg = self.cfg
    d = x.shape[-1]
    n_exp, f = cfg.n_routed_experts, cfg.moe_inter_dim
    gate = self.param("gate", normal_init(cfg), (d, n_exp), dtype_of(cfg.param_dtype))
    bias = self.variable("router_bias", "bias",
                         lambda: jnp.zeros((n_exp,), jnp.float32)).value
    pdt = dtype_of(cfg.param_dtype)
    w1 = self.param("w1", normal_init(cfg), (n_exp, d, f), pdt)
    w3 = self.param("w3", normal_init(cfg), (n_exp, d, f), pdt)
    w2 = self.param("w2", normal_init(cfg), (n_exp, f, d), pdt)

    dt = dtype_of(cfg.dtype)
    impl = resolve_moe_impl(cfg, x.shape[0] * x.shape[1])
    fp8 = cfg.fp8_for("experts")
    if self.has_variable("params", "w1_scale"):
      # Published FP8 blocks (load_hf_checkpoint keep_fp8=True), frozen.
      w1, w3, w2 = (fp8_lib.Quantized(*jax.lax.stop_gradient(
          (w, self.get_variable("params", f"{n}_scale"))))
          for n, w in (("w1", w1), ("w3", w3), ("w2", w2)))
      if not fp8:
        w1, w3, w2 = (fp8_lib.dequantize_weight(w) for w in (w1, w3, w2))
      elif current_rules() is not None:
        raise NotImplementedError(
            "FP8 expert blocks (keep_fp8=True) run without a mesh for now; load with "
            "keep_fp8=False (dequantized weights) to shard them.")
    if not isinstance(w1, fp8_lib.Quantized):
      w1, w3, w2 = (w.astype(dt) for w in (w1, w3, w2))
      if impl == "blocked":
        # 16-bit weights reach the kernel with their gather bits made here,
        # in the cast's fusion (buffers.py: no separate bf16 copy).
        w1, w3, w2 = (bits_weight(w) for w in (w1, w3, w2))
    clamp = dict(swiglu_limit=cfg.swiglu_limit) if cfg.swiglu_limit else {}
    if impl == "blocked":
      kernel = functools.partial(experts_blocked, block_size=cfg.moe_block_size, fp8=fp8,
                                 **clamp)
      kernel.gathers_weights = True     # takes FSDP-sliced weights (embed_axes)
    elif impl == "ragged":
      kernel = functools.partial(experts_ragged, **clamp) if clamp else experts_ragged
    elif (self.record and cfg.moe_impl == "auto" and not fp8
          and not isinstance(w1, fp8_lib.Quantized) and current_rules() is None
          and picks_few_experts(cfg, x.shape[0] * x.shape[1])):
      # Inference (record: prefill / decode) on a few tokens, moe_impl "auto",
      # no mesh: only the picked experts are read (equal to experts_dense).
      kernel = functools.partial(experts_picked, **clamp)
    else:
      kernel = functools.partial(experts_dense, fp8=fp8, **clamp)

    v2 = dict(balance_devices=self.balance_devices,
              balance_max_devices=self.balance_max_devices)
    if self.balance_devices:
      check_v2_devices(n_exp, self.balance_devices, self.balance_max_devices)
    rules = current_rules()
    if rules is not None:
      # Under a mesh: route and dispatch per device in shard_map (expert
      # parallelism when the rules split `exp`); loads summed over the mesh.
      def ffn(x, valid, gate, bias, w1, w3, w2, kernel):
        local = None if routing is None else _local_rows(routing, x.shape[0], rules)
        return routed_ffn(x, valid, gate, bias, w1, w3, w2, cfg, kernel, routing=local,
                          **v2)
      routed, load, bal = routed_experts(ffn, kernel, x.astype(dt), valid, gate, bias,
                                         w1, w3, w2, cfg=cfg, rules=rules)
    else:
      routed, load, nums, den = routed_ffn(x, valid, gate, bias, w1, w3, w2, cfg, kernel,
                                           routing=routing, **v2)
      bal = {key: v / jnp.maximum(den, 1.0) for key, v in nums.items()}
    out = routed.astype(dt)
    if cfg.n_shared_experts:
      out = out + MLP(cfg, cfg.n_shared_experts * f, name="shared_experts")(x)
    aux = {"balance_loss": bal.pop("balance"), "load": load}
    if bal:
      aux["v2_balance"] = bal
    if self.record:
      # The router again on the whole batch (outside the mesh's shard_map,
      # which returns only the FFN's output): the same float32 computation,
      # so the same choices; unused results are dropped by XLA.
      b, s = x.shape[:2]
      x_in = x if rules is None else x.astype(dt)      # what routed_ffn routed
      chosen = router(x_in.reshape(b * s, d), gate, bias, cfg, routing)[1]
      aux["experts"] = chosen.reshape(b, s, -1)
    return out, aux
