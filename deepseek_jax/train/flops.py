"""Model FLOPs per token from the config, for MFU.

Forward FLOPs of one token at sequence length S (a multiply-add = 2 FLOPs),
with d = dim, H = n_heads, dn/dr/dv = qk_nope/qk_rope/v head dims, r =
kv_lora_rank, q = q_lora_rank, V = vocab_size, E/k = routed/activated
experts, Fe = moe_inter_dim, Fs = n_shared_experts * Fe, F = inter_dim:

  attention projections (per layer)
    2 * [d*q + q*H*(dn+dr)   (or d*H*(dn+dr) without q LoRA)
         + d*(r+dr) + r*H*(dn+dv) + H*dv*d]
    GQA (attention="gqa", KV kv heads of width hd): 2 * (2*d*H*hd + 2*d*KV*hd),
    core 2 * 2*H*hd * (S+1)/2; a tied head still counts 2 * d*V
  attention core (per layer, causal: a token attends to (S+1)/2 positions
  on average)
    2 * H*(dn+dr) * (S+1)/2  +  2 * H*dv * (S+1)/2
  FFN (per layer)   dense: 2 * 3*d*F
                    MoE:   2 * (d*E + 3*d*(k*Fe + Fs))     (router + experts)
  output head       2 * d*V
  each MTP module   2 * 2d*d (eh_proj) + one MoE block (attention + FFN as
                    above) + the output head again

The embedding lookup, norms, RoPE, softmax and elementwise ops are left out
(they are not matmuls). Training FLOPs = 3x forward (backward = 2x). MFU =
training FLOPs per token x tokens/s / (devices x peak FLOP/s). Tested
against a count from the parameter shapes and a hand count (tests/test_train.py).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig


def attention_projection_flops(cfg: ModelConfig) -> int:
  d, h = cfg.dim, cfg.n_heads
  if cfg.attention == "gqa":     # q, k, v, o: 2 * (d*H*hd + 2*d*KV*hd + H*hd*d)
    hd, kv = cfg.gqa_head_dim, cfg.kv_heads
    return 2 * (2 * d * h * hd + 2 * d * kv * hd)
  qk, dv, r = cfg.qk_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
  q = (d * cfg.q_lora_rank + cfg.q_lora_rank * h * qk) if cfg.use_q_lora else d * h * qk
  return 2 * (q + d * (r + cfg.qk_rope_head_dim) + r * h * (cfg.qk_nope_head_dim + dv)
              + h * dv * d)


def attention_core_flops(cfg: ModelConfig, seq_len: int) -> float:
  ctx = (seq_len + 1) / 2
  if cfg.attention == "gqa":     # scores and values over head_dim each
    return 2 * cfg.n_heads * 2 * cfg.gqa_head_dim * ctx
  return 2 * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * ctx


def ffn_flops(cfg: ModelConfig, moe: bool) -> int:
  d = cfg.dim
  if not moe:
    return 2 * 3 * d * cfg.inter_dim
  experts = cfg.n_activated_experts * cfg.moe_inter_dim + cfg.n_shared_experts * cfg.moe_inter_dim
  return 2 * (d * cfg.n_routed_experts + 3 * d * experts)


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Forward FLOPs of one token at sequence length `seq_len` (formula above)."""
  attn = attention_projection_flops(cfg) + attention_core_flops(cfg, seq_len)
  head = 2 * cfg.dim * cfg.vocab_size
  total = cfg.n_layers * attn + head
  total += cfg.n_dense_layers * ffn_flops(cfg, False)
  total += cfg.n_moe_layers * ffn_flops(cfg, True)
  mtp_block = attn + ffn_flops(cfg, cfg.n_moe_layers > 0)
  total += cfg.n_mtp_depth * (2 * 2 * cfg.dim * cfg.dim + mtp_block + head)
  return float(total)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Forward + backward (2x forward) FLOPs of one trained token."""
  return 3.0 * forward_flops_per_token(cfg, seq_len)


def measured_peak_flops(n: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of the best of `repeats` float32 [n, n] x [n, n] matmuls on the
  default device: a stand-in peak where no data-sheet figure applies (CPU)."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best
