"""One transformer block (DeepSeek-V3): pre-norm MLA, then a dense or MoE FFN.
Dense decoders (cfg.attention = "gqa") run grouped-query attention instead."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.gqa import GQA
from deepseek_jax.model.layers import MLP, RMSNorm
from deepseek_jax.model.mla import MLA
from deepseek_jax.model.moe import MoE
from deepseek_jax.parallel.rules import constrain


class Block(nn.Module):
  """Pre-norm block: h = x + MLA(norm(x)); out = h + FFN(norm(h)) (GQA in
  place of MLA when cfg.attention = "gqa": same modes and arguments).

  FFN is the dense SwiGLU MLP, or DeepSeekMoE when `moe` (then the aux dict
  carries its balance loss and expert loads; zeros otherwise). mode: MLA's
  ("train", "prefill", "decode"); outside training aux["cache"] holds the
  new tokens' cache entries, and `cache` (decode) the layer's cache.
  mask: MLA's, shared by every layer of a forward pass: an AttentionMask
  (model/attention.py: segment ids, plus the bias on the naive path) in
  training and prefill, the additive `decode_bias` when decoding.
  balance_devices, balance_max_devices: the MoE's DeepSeek-V2 balance losses
  (D, M; 0 = off): aux["v2_balance"] when on (MoE blocks only).
  active (training; a bool scalar, None = on): off, the block passes x
  through and its aux is zero: a pipeline stage's padded slot
  (parallel/pipeline_layout.py) still computes, every rank running one program.
  routing [batch, seq, k] int (MoE blocks; routing replay): the experts each
  token uses, entries < 0 = route normally (moe.route). Outside training
  aux["experts"] [batch, seq, k] holds the MoE's chosen experts (what the
  sampler records for replay). A DSA model training its indexer
  (cfg.dsa_stage != "off", model/dsa.py) adds aux["indexer_loss"], the
  layer's indexer KL (a float32 scalar).
  """
  cfg: ModelConfig
  moe: bool
  mode: str = "train"
  balance_devices: int = 0
  balance_max_devices: int = 0

  @nn.compact
  def __call__(self, x, positions, mask, valid, cache=None, active=None, routing=None):
    cfg = self.cfg
    attention = GQA if cfg.is_gqa else MLA
    attn = attention(cfg, self.mode, name="attn")(RMSNorm(cfg, name="attn_norm")(x),
                                                  positions, mask, cache)
    entries = index_loss = None
    if self.mode != "train":
      attn, entries = attn
    elif cfg.use_dsa and cfg.dsa_stage != "off":
      attn, index_loss = attn
    h = x + attn
    y = RMSNorm(cfg, name="ffn_norm")(h)
    if self.moe:
      out, aux = MoE(cfg, self.balance_devices, self.balance_max_devices,
                     record=self.mode != "train", name="ffn")(y, valid, routing)
    else:
      out = MLP(cfg, cfg.inter_dim, name="ffn")(y)
      aux = {"balance_loss": jnp.zeros((), jnp.float32),
             "load": jnp.zeros((max(cfg.n_routed_experts, 1),), jnp.float32)}
    if entries is not None:
      aux = {**aux, "cache": entries}
    if index_loss is not None:
      aux = {**aux, "indexer_loss": index_loss}
    out = constrain(h + out, ("batch", "seq", None))
    if active is not None:
      out = jnp.where(active, out, x)
      aux = jax.tree.map(lambda a: jnp.where(active, a, jnp.zeros_like(a)), aux)
    return out, aux
