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

DeepSeek-V4 (cfg.arch = "v4", model/v4.py) keeps per layer what its
attention reads across tokens, most of it in rings whose slot for position
p is p mod size (`v4.ring_positions`):

    {"layers_{i}": {"window": [b, sliding_window, head_dim],    # K = V, RoPE'd
                    # compressed layers (HCA rate r, k = 1; CSA r, k = 2):
                    "compressor": {"kv":   [b, k r, k head_dim],   # window(s) in
                                   "gate": [b, k r, k head_dim] f32, # progress
                                   "entries": [b, T // r + 1, head_dim]},
                    # CSA: the lightning indexer's own compressor, at index_head_dim
                    "indexer": {"kv", "gate", "entries"}}}

so it grows by head_dim / r (+ index_head_dim / r) per token and compressed
layer, besides a fixed sliding_window x head_dim per layer. Entry w (at
index w) is written when the token at position (w + 1) r - 1 arrives and
read by the queries after it. `fill_v4` builds it from a prefill of
right-padded prompts: each row's last sliding_window keys and last k r
projections, and the prompt's entries (those of windows reaching past a
row's prompt hold padding: never read before decoding rewrites them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.mla import write_rows
from deepseek_jax.model.v4 import CSA, SLIDING, ring_positions

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
    if mtp:
      raise NotImplementedError("init_cache: DeepSeek-V4 has no MTP drafting cache "
                                "(speculative decoding) yet.")
    return _v4_cache(cfg, batch, length)
  cache = {}
  for name, n in zip(STACKS, (cfg.n_dense_layers, cfg.n_moe_layers)):
    if n:
      cache[name] = _entry(cfg, (n, batch), length)
  if mtp:
    cache["mtp_0"] = _entry(cfg, (batch,), length)
  return cache


def _compressor_zeros(cfg: ModelConfig, batch: int, length: int, rate: int, width: int,
                      overlap: bool) -> dict:
  k = 2 if overlap else 1
  return {"kv": jnp.zeros((batch, k * rate, k * width), cfg.dtype),
          "gate": jnp.zeros((batch, k * rate, k * width), jnp.float32),
          "entries": jnp.zeros((batch, length // rate + 1, width), cfg.dtype)}


def _v4_cache(cfg: ModelConfig, batch: int, length: int) -> dict:
  """V4's zero cache (module doc) for positions < length."""
  cache = {}
  for i, kind in enumerate(cfg.layer_types):
    layer = {"window": jnp.zeros((batch, cfg.sliding_window, cfg.head_dim), cfg.dtype)}
    if kind != SLIDING:
      csa = kind == CSA
      rate = cfg.compress_rate_csa if csa else cfg.compress_rate_hca
      layer["compressor"] = _compressor_zeros(cfg, batch, length, rate, cfg.head_dim, csa)
      if csa:
        layer["indexer"] = _compressor_zeros(cfg, batch, length, rate, cfg.index_head_dim,
                                             True)
    cache[f"layers_{i}"] = layer
  return cache


def _ring(rows: jax.Array, last: jax.Array, size: int) -> jax.Array:
  """The ring [b, size, ...] of a row's newest `size` tokens from every
  token's values rows [b, P, ...], the newest at position last [b]
  (slots of positions < 0 hold position 0's values, never read)."""
  pos = jnp.clip(ring_positions(last, size), 0, rows.shape[1] - 1)
  return jnp.take_along_axis(rows, pos.reshape(pos.shape + (1,) * (rows.ndim - 2)), axis=1)


def fill_v4(cache: dict, states: dict, lengths: jax.Array) -> dict:
  """A V4 cache (init_cache) filled from the prefill's states
  (Transformer(mode="prefill") on right-padded prompts of `lengths` [b]
  tokens; module doc)."""
  last = lengths - 1
  out = {}
  for name, layer in cache.items():
    new = states[name]
    filled = {"window": _ring(new["window"], last, layer["window"].shape[1])}
    for part in ("compressor", "indexer"):
      if part in layer:
        c, n = layer[part], new[part]
        filled[part] = {
            "kv": _ring(n["kv"], last, c["kv"].shape[1]).astype(c["kv"].dtype),
            "gate": _ring(n["gate"], last, c["gate"].shape[1]).astype(jnp.float32),
            "entries": write_rows(c["entries"], n["entries"],
                                  jnp.zeros(lengths.shape, jnp.int32))}
    out[name] = filled
  return out


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
  2 n_kv_heads head_dim per layer; MTP's drafting cache not included).
  V4: what grows with the context, the compressed entries (head_dim / rate
  per compressed layer, plus index_head_dim / rate per CSA layer), rounded
  down; the sliding window and the windows in progress are a fixed size."""
  if cfg.is_v4:
    per = 0.0
    for kind in cfg.layer_types:
      if kind == CSA:
        per += (cfg.head_dim + cfg.index_head_dim) / cfg.compress_rate_csa
      elif kind != SLIDING:
        per += cfg.head_dim / cfg.compress_rate_hca
    return int(per * np.dtype(jnp.dtype(cfg.dtype)).itemsize)
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
