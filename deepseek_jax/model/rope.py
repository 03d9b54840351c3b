"""Rotary position embedding in DeepSeek's interleaved layout, with YaRN;
Llama's half-split layout and Llama-3 scaling for the dense (GQA) models.

DeepSeek rotates interleaved channel pairs (x0, x1), (x2, x3), ... of the
`qk_rope_head_dim` rotary part, pair j by angle pos * freq_j. Only dot products
between rotated queries and keys matter, so the layout must just match the
checkpoint's weights (HF's `rope_interleave=True` holds the same weights).

YaRN (V2 paper, sec. "Long context extension") stretches low frequencies by
`rope_factor` and keeps high ones, with a linear ramp between the correction
dims found from `beta_fast` / `beta_slow` rotations over `original_seq_len`
tokens. As in DeepSeek-V3's `precompute_freqs_cis`, it is applied only when
max_seq_len > original_seq_len; the matching attention-logit factor mscale^2
lives in `ModelConfig.softmax_scale`.

Dense models (cfg.attention = "gqa": Llama, Qwen2, DeepSeek LLM) rotate the
whole head, channel j with channel j + d/2 (HF's `rotate_half`), and may use
Llama 3.1's frequency scaling (cfg.rope_type = "llama3"; HF's
`_compute_llama3_parameters`): wavelengths longer than original_seq_len /
llama3_low_freq_factor are stretched by rope_factor, those shorter than
original_seq_len / llama3_high_freq_factor kept, and the band between
interpolated smoothly.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import ModelConfig


def _correction_dim(n_rotations: float, dim: int, base: float, seq_len: int) -> float:
  # The channel pair index whose wavelength fits n_rotations times in seq_len.
  return dim * math.log(seq_len / (n_rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_correction_range(cfg: ModelConfig) -> tuple[int, int]:
  dim, base = cfg.rope_dim, cfg.rope_theta
  low = math.floor(_correction_dim(cfg.beta_fast, dim, base, cfg.original_seq_len))
  high = math.ceil(_correction_dim(cfg.beta_slow, dim, base, cfg.original_seq_len))
  return max(low, 0), min(high, dim - 1)


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
  """Per-pair angular frequencies [cfg.rope_dim // 2] (float32, computed in
  float64)."""
  dim = cfg.rope_dim
  freqs = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  if cfg.rope_type == "llama3":
    return _llama3(cfg, freqs).astype(np.float32)
  if cfg.use_yarn:
    low, high = yarn_correction_range(cfg)
    if low == high:
      high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    keep = 1.0 - ramp  # 1 = keep original (high-frequency) pair
    freqs = freqs / cfg.rope_factor * (1 - keep) + freqs * keep
  return freqs.astype(np.float32)


def _llama3(cfg: ModelConfig, freqs: np.ndarray) -> np.ndarray:
  """Llama 3.1's scaled frequencies (module doc), float64."""
  factor, old = cfg.rope_factor, cfg.original_seq_len
  low, high = cfg.llama3_low_freq_factor, cfg.llama3_high_freq_factor
  wavelen = 2 * math.pi / freqs
  scaled = np.where(wavelen > old / low, freqs / factor, freqs)
  smooth = (old / wavelen - low) / (high - low)
  medium = (wavelen >= old / high) & (wavelen <= old / low)
  return np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Rotates channel pairs of the last axis of x: interleaved (x0, x1), ...
  for MLA, the halves (x_j, x_{j + d/2}) for GQA (module doc).

  x: [..., cfg.rope_dim]; positions: int, broadcastable to x.shape[:-1]
  (e.g. [b, s] for x [b, s, d]; [b, 1, s] for heads-major x [b, h, s, d]).
  """
  freqs = jnp.asarray(rope_frequencies(cfg))
  angles = positions.astype(jnp.float32)[..., None] * freqs   # [..., d/2]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  if cfg.is_gqa:
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin],
                           axis=-1).astype(x.dtype)
  pairs = x.astype(jnp.float32).reshape(x.shape[:-1] + (-1, 2))
  even, odd = pairs[..., 0], pairs[..., 1]
  rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
  return rotated.reshape(x.shape).astype(x.dtype)
