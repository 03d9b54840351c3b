"""The inference cache: MLA's latent c_kv and rotary key k_R, nothing else
(DeepSeek Sparse Attention, cfg.index_topk > 0: also the lightning indexer's
key per token, "k_index" [..., T, index_head_dim], from which each decode
step selects its top-k columns; dense models, cfg.attention = "gqa": each
layer's rotated keys and values per kv head, {"k", "v": [layers, b, T,
n_kv_heads, head_dim]}).

    cache = init_cache(cfg, batch, length)        # zeros, preallocated
    {"dense_layers": {"c_kv": [n_dense, b, T, kv_lora_rank],
                      "k_rope": [n_dense, b, T, qk_rope_head_dim]},
     "moe_layers":   {... [n_moe, b, T, ...]},
     "mtp_0":        {"c_kv": [b, T, r], "k_rope": [b, T, d_rope]}}   # mtp=True

Column j of row b holds the token at position j of that row (prompts are
right-padded, so a row's generated tokens follow its prompt directly and
overwrite its padding). The model returns the new tokens' entries
(`Transformer(..., mode="prefill" | "decode")`); `write` puts them at each
row's column. A plain pytree: jit donates it and XLA updates it in place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.mla import write_rows

STACKS = ("dense_layers", "moe_layers")


def _entry(cfg: ModelConfig, lead: tuple[int, ...], length: int) -> dict:
  dt = jnp.dtype(cfg.dtype)
  if cfg.is_gqa:
    shape = lead + (length, cfg.kv_heads, cfg.gqa_head_dim)
    return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)}
  entry = {"c_kv": jnp.zeros(lead + (length, cfg.kv_lora_rank), dt),
           "k_rope": jnp.zeros(lead + (length, cfg.qk_rope_head_dim), dt)}
  if cfg.use_dsa:     # DeepSeek Sparse Attention: the indexer's shared key per token
    entry["k_index"] = jnp.zeros(lead + (length, cfg.index_head_dim), dt)
  return entry


def init_cache(cfg: ModelConfig, batch: int, length: int, *, mtp: bool = False) -> dict:
  """Zeros for `length` positions of `batch` rows (cfg.dtype); `mtp` adds
  MTP module 1's own block cache (speculative decoding)."""
  if cfg.is_v4:
    raise NotImplementedError("init_cache: DeepSeek-V4 (arch='v4') has no decode cache yet "
                              "(sliding window, compressor and indexer state).")
  cache = {}
  for name, n in zip(STACKS, (cfg.n_dense_layers, cfg.n_moe_layers)):
    if n:
      cache[name] = _entry(cfg, (n, batch), length)
  if mtp:
    cache["mtp_0"] = _entry(cfg, (batch,), length)
  return cache


def write(cache: dict, entries: dict, start: jax.Array) -> dict:
  """cache with entries[name][key] ([layers,] b, t, ...) written at columns
  start[b] .. start[b] + t - 1 of each row."""
  out = dict(cache)
  for name, new in entries.items():
    stacked = name in STACKS
    fn = jax.vmap(write_rows, in_axes=(0, 0, None)) if stacked else write_rows
    out[name] = {k: fn(cache[name][k], new[k], start) for k in cache[name]}
  return out


def bytes_per_token(cfg: ModelConfig) -> int:
  """Main-model cache bytes per token: (kv_lora_rank + qk_rope_head_dim
  (+ index_head_dim with DSA)) x n_layers x bytes per element (GQA:
  2 n_kv_heads head_dim per layer; MTP's drafting cache not included)."""
  per_layer = (2 * cfg.kv_heads * cfg.gqa_head_dim if cfg.is_gqa
               else cfg.kv_lora_rank + cfg.qk_rope_head_dim
               + (cfg.index_head_dim if cfg.use_dsa else 0))
  return per_layer * cfg.n_layers * np.dtype(jnp.dtype(cfg.dtype)).itemsize


def full_kv_bytes_per_token(cfg: ModelConfig) -> int:
  """What a per-head K/V cache of the same model would hold (the naive path's
  K [heads, nope + rope] and V [heads, v] per layer), for comparison."""
  if cfg.is_gqa:
    return 2 * cfg.n_heads * cfg.gqa_head_dim * cfg.n_layers * np.dtype(
        jnp.dtype(cfg.dtype)).itemsize
  per_layer = cfg.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
  return per_layer * cfg.n_layers * np.dtype(jnp.dtype(cfg.dtype)).itemsize
