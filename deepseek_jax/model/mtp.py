"""Multi-Token Prediction modules (V3 report sec. 2.2, eqs. 21-25).

Module k (k = 1..D) predicts token t_{i+k+1} at position i from the depth k-1
representation of position i and the embedding of token t_{i+k}:

  h'_i^k = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h_i^{k-1})]       (eq. 21)
  h^k    = TRM_k(h'^k)                                            (eq. 22)
  P^k    = OutHead(RMSNorm_k(h^k))                                (eq. 23)

The embedding and output head are shared with the main model. The
concatenation puts the embedding first, as the published checkpoints store
`eh_proj` (names: `enorm`, `hnorm`, `eh_proj`, the block, and the module's
own final `norm` = HF `shared_head.norm`). As in the HF / vLLM drafting code,
h^{k-1} is the *normalised* representation the previous head reads: the main
model's final-norm output for k = 1, RMSNorm_{k-1}(h^{k-1}) after that.

Training teacher-forces the future tokens: at depth k position i reads
t_{i+k} = targets[i + k - 1]; the last k - 1 positions have no such token and
read token 0 (their losses are masked by `losses.mtp_targets`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.block import Block
from deepseek_jax.model.layers import Einsum, RMSNorm


def shift_left(x: jax.Array, k: int, fill=0) -> jax.Array:
  """x[:, i + k] at position i, `fill` past the end. x: [batch, seq]."""
  if k == 0:
    return x
  pad = jnp.full(x.shape[:1] + (k,) + x.shape[2:], fill, x.dtype)
  return jnp.concatenate([x[:, k:], pad], axis=1)


class MTPModule(nn.Module):
  cfg: ModelConfig
  moe: bool   # the block's FFN: MoE unless the model has no MoE layers
  mode: str = "train"   # the block's attention mode (Block); decode drafts tokens
  balance_devices: int = 0       # the block's V2 balance losses (Block); 0 = off
  balance_max_devices: int = 0

  @nn.compact
  def __call__(self, h_prev, emb, positions, mask, valid, cache=None):
    """h_prev, emb: [batch, seq, dim] -> (normalised h^k, block aux); mask:
    the main model's (an AttentionMask, or decode_bias when decoding)."""
    cfg = self.cfg
    x = jnp.concatenate([RMSNorm(cfg, name="enorm")(emb),
                         RMSNorm(cfg, name="hnorm")(h_prev)], axis=-1)
    x = Einsum(cfg, (2 * cfg.dim, cfg.dim), "bsd,de->bse", name="eh_proj")(x)
    x, aux = Block(cfg, self.moe, self.mode, self.balance_devices, self.balance_max_devices,
                   name="block")(x, positions, mask, valid, cache)
    return RMSNorm(cfg, name="norm")(x), aux
