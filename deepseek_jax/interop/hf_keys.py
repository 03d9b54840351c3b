"""The key map: which HF tensor is which slice of which of our leaves, and how.

One `Slot` per (HF tensor, place in one of our flattened leaves), for both
families (V2 differs only in having no router bias and no MTP layers). Each
torch `Linear` weight is [out, in]; our kernels are input-major for einsum,
with head axes split out, e.g.

  q_b_proj.weight [heads*(nope+rope), q_lora]  ->  wq_b/kernel [q_lora, heads, nope+rope]
  o_proj.weight   [dim, heads*v]               ->  wo/kernel   [heads, v, dim]

so every mapping is "transpose, then reshape" (`_linear`). Blocks are stacked
along a leading layer axis (`dense_layers`, `moe_layers`), experts along an
expert axis; MTP module k sits at HF layer index num_hidden_layers + k.

The 1:1 map (HF key -> our flattened path; "L." is "model.layers.{L}.", our
block is `params/dense_layers` [L] for L < first_k_dense_replace, else
`params/moe_layers` [L - first_k_dense_replace]):

  model.embed_tokens.weight                  params/embed/embedding
  model.norm.weight                          params/norm/scale
  lm_head.weight                             params/head/kernel
  L.input_layernorm.weight                   <block>/attn_norm/scale
  L.post_attention_layernorm.weight          <block>/ffn_norm/scale
  L.self_attn.q_a_proj.weight                <block>/attn/wq_a/kernel
  L.self_attn.q_a_layernorm.weight           <block>/attn/q_norm/scale
  L.self_attn.q_b_proj.weight                <block>/attn/wq_b/kernel
  L.self_attn.q_proj.weight (no q LoRA)      <block>/attn/wq/kernel
  L.self_attn.kv_a_proj_with_mqa.weight      <block>/attn/wkv_a/kernel
  L.self_attn.kv_a_layernorm.weight          <block>/attn/kv_norm/scale
  L.self_attn.kv_b_proj.weight               <block>/attn/wkv_b/kernel
  L.self_attn.o_proj.weight                  <block>/attn/wo/kernel
  L.self_attn.indexer.wq_b.weight (V3.2)     <block>/attn/indexer/wq_b/kernel [q_lora, H, D]
  L.self_attn.indexer.wk.weight              <block>/attn/indexer/wk_index/kernel [dim, D]
  L.self_attn.indexer.k_norm.{weight,bias}   <block>/attn/indexer/k_norm/{scale,bias}
  L.self_attn.indexer.weights_proj.weight    <block>/attn/indexer/weights_proj/kernel [dim, H]
  L.mlp.{gate,up,down}_proj.weight (dense)   <block>/ffn/{w1,w3,w2}/kernel
  L.mlp.gate.weight                          <block>/ffn/gate
  L.mlp.gate.e_score_correction_bias (V3)    router_bias/moe_layers/ffn/bias
  L.mlp.shared_experts.{gate,up,down}_proj.weight   <block>/ffn/shared_experts/{w1,w3,w2}/kernel
  L.mlp.experts.{e}.{gate,up,down}_proj.weight      <block>/ffn/{w1,w3,w2} [e]
  M.enorm.weight, M.hnorm.weight             params/mtp_k/{enorm,hnorm}/scale
  M.eh_proj.weight                           params/mtp_k/eh_proj/kernel
  M.shared_head.norm.weight                  params/mtp_k/norm/scale
  M.<block keys above>                       params/mtp_k/block/..., router_bias/mtp_k/block/...

with M. = "model.layers.{num_hidden_layers + k}.". Dense Llama / Qwen2
checkpoints (attention="gqa", every block in `params/dense_layers`) have
the same norms, MLP, embedding and head keys, and the GQA projections

  L.self_attn.{q,k,v}_proj.weight [heads*hd, dim]   <block>/attn/w{q,k,v}/kernel [dim, heads, hd]
  L.self_attn.{q,k,v}_proj.bias (Qwen2) [heads*hd]  <block>/attn/w{q,k,v}/bias [heads, hd]
  L.self_attn.o_proj.weight [dim, heads*hd]         <block>/attn/wo/kernel [heads, hd, dim]

(heads = num_key_value_heads for k and v). With tie_word_embeddings there
is no lm_head.weight (our head is the embedding, transposed); a tied
checkpoint that stores one anyway has it ignored, as transformers does.

An MTP layer's own
`embed_tokens` / `shared_head.head` are copies of the shared embedding and
head (`mtp_duplicates`): accepted on load, ignored, never written.

Experts come in two layouts, both read: per-expert keys
`mlp.experts.{e}.{gate,up,down}_proj.weight` (published DeepSeek-V3/R1, and
what transformers 5 `save_pretrained` writes: it fuses experts in memory only)
and the fused in-memory layout `experts.gate_up_proj [E, 2I, D]`,
`experts.down_proj [E, D, I]`. We always write per-expert keys.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable

import numpy as np

from deepseek_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Slot:
  """One HF tensor and where it goes in our variables; to_hf is None for a
  layout we read but never write (fused experts)."""
  key: str                       # HF key
  shape: tuple[int, ...]         # HF shape
  leaf: str                      # our flattened path, e.g. "params/moe_layers/ffn/w1"
  index: tuple[int, ...]         # where in the (stacked) leaf this tensor goes
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray] | None


def _copy(key, leaf, index, shape) -> Slot:
  return Slot(key, tuple(shape), leaf, index, lambda w: w, lambda w: w)


def _linear(key, leaf, index, in_shape, out_shape) -> Slot:
  """torch Linear [prod(out), prod(in)] <-> kernel [*in_shape, *out_shape]."""
  n_in, n_out = math.prod(in_shape), math.prod(out_shape)
  return Slot(key, (n_out, n_in), leaf, index,
              lambda w: w.T.reshape(*in_shape, *out_shape),
              lambda k: k.reshape(n_in, n_out).T)


def _bias(key, leaf, index, shape) -> Slot:
  """torch Linear bias [prod(shape)] <-> our per-head bias [*shape]."""
  n = math.prod(shape)
  return Slot(key, (n,), leaf, index, lambda b: b.reshape(shape), lambda b: b.reshape(n))


def _gqa_slots(cfg: ModelConfig, a: str, o: str, idx: tuple) -> list[Slot]:
  """GQA projections (and Qwen2's q/k/v biases) of one block."""
  d, hd = cfg.dim, cfg.gqa_head_dim
  heads = {"q": cfg.n_heads, "k": cfg.kv_heads, "v": cfg.kv_heads}
  s = [_linear(f"{a}.{x}_proj.weight", f"{o}/w{x}/kernel", idx, (d,), (n, hd))
       for x, n in heads.items()]
  s.append(_linear(f"{a}.o_proj.weight", f"{o}/wo/kernel", idx, (cfg.n_heads, hd), (d,)))
  if cfg.attention_bias:
    s += [_bias(f"{a}.{x}_proj.bias", f"{o}/w{x}/bias", idx, (n, hd)) for x, n in heads.items()]
  return s


def _attention_slots(cfg: ModelConfig, hf: str, ours: str, idx: tuple) -> list[Slot]:
  """Norms and MLA (or GQA) projections of one block (see _block_slots)."""
  d, h = cfg.dim, cfg.n_heads
  nope, rope, v, r = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                      cfg.kv_lora_rank)
  p, a, o = f"params/{ours}", f"{hf}.self_attn", f"params/{ours}/attn"
  s = [_copy(f"{hf}.input_layernorm.weight", f"{p}/attn_norm/scale", idx, (d,)),
       _copy(f"{hf}.post_attention_layernorm.weight", f"{p}/ffn_norm/scale", idx, (d,))]
  if cfg.is_gqa:
    return s + _gqa_slots(cfg, a, o, idx)
  if cfg.use_q_lora:
    q = cfg.q_lora_rank
    s += [_linear(f"{a}.q_a_proj.weight", f"{o}/wq_a/kernel", idx, (d,), (q,)),
          _copy(f"{a}.q_a_layernorm.weight", f"{o}/q_norm/scale", idx, (q,)),
          _linear(f"{a}.q_b_proj.weight", f"{o}/wq_b/kernel", idx, (q,), (h, nope + rope))]
  else:
    s += [_linear(f"{a}.q_proj.weight", f"{o}/wq/kernel", idx, (d,), (h, nope + rope))]
  return s + [
      _linear(f"{a}.kv_a_proj_with_mqa.weight", f"{o}/wkv_a/kernel", idx, (d,), (r + rope,)),
      _copy(f"{a}.kv_a_layernorm.weight", f"{o}/kv_norm/scale", idx, (r,)),
      _linear(f"{a}.kv_b_proj.weight", f"{o}/wkv_b/kernel", idx, (r,), (h, nope + v)),
      _linear(f"{a}.o_proj.weight", f"{o}/wo/kernel", idx, (h, v), (d,))] + (
          _indexer_slots(cfg, f"{a}.indexer", f"{o}/indexer", idx) if cfg.use_dsa else [])


def _indexer_slots(cfg: ModelConfig, hf: str, ours: str, idx: tuple) -> list[Slot]:
  """DeepSeek-V3.2's lightning indexer (model/dsa.py) of one block: H =
  index_n_heads heads of D = index_head_dim."""
  d, q, h, k = cfg.dim, cfg.q_lora_rank, cfg.index_n_heads, cfg.index_head_dim
  return [_linear(f"{hf}.wq_b.weight", f"{ours}/wq_b/kernel", idx, (q,), (h, k)),
          _linear(f"{hf}.wk.weight", f"{ours}/wk_index/kernel", idx, (d,), (k,)),
          _copy(f"{hf}.k_norm.weight", f"{ours}/k_norm/scale", idx, (k,)),
          _copy(f"{hf}.k_norm.bias", f"{ours}/k_norm/bias", idx, (k,)),
          _linear(f"{hf}.weights_proj.weight", f"{ours}/weights_proj/kernel", idx, (d,), (h,))]


def _moe_slots(cfg: ModelConfig, hf: str, ours: str, idx: tuple, fused: bool) -> list[Slot]:
  """Router, its bias (V3), shared and routed experts of one MoE block."""
  d, e, i = cfg.dim, cfg.n_routed_experts, cfg.moe_inter_dim
  m, f = f"{hf}.mlp", f"params/{ours}/ffn"
  s = [_linear(f"{m}.gate.weight", f"{f}/gate", idx, (d,), (e,))]
  if cfg.score_func == "sigmoid":   # V3's balancing bias; V2 has none (ours stays 0)
    s += [_copy(f"{m}.gate.e_score_correction_bias", f"router_bias/{ours}/ffn/bias", idx,
                (e,))]
  if cfg.n_shared_experts:
    si, sh = cfg.n_shared_experts * i, f"{f}/shared_experts"
    s += [_linear(f"{m}.shared_experts.gate_proj.weight", f"{sh}/w1/kernel", idx, (d,), (si,)),
          _linear(f"{m}.shared_experts.up_proj.weight", f"{sh}/w3/kernel", idx, (d,), (si,)),
          _linear(f"{m}.shared_experts.down_proj.weight", f"{sh}/w2/kernel", idx, (si,), (d,))]
  if fused:  # transformers' in-memory layout; gate rows first, then up rows
    gu = f"{m}.experts.gate_up_proj"
    return s + [
        Slot(gu, (e, 2 * i, d), f"{f}/w1", idx, lambda w: w[:, :i].transpose(0, 2, 1), None),
        Slot(gu, (e, 2 * i, d), f"{f}/w3", idx, lambda w: w[:, i:].transpose(0, 2, 1), None),
        Slot(f"{m}.experts.down_proj", (e, d, i), f"{f}/w2", idx,
             lambda w: w.transpose(0, 2, 1), None)]
  for j in range(e):
    x = f"{m}.experts.{j}"
    s += [_linear(f"{x}.gate_proj.weight", f"{f}/w1", idx + (j,), (d,), (i,)),
          _linear(f"{x}.up_proj.weight", f"{f}/w3", idx + (j,), (d,), (i,)),
          _linear(f"{x}.down_proj.weight", f"{f}/w2", idx + (j,), (i,), (d,))]
  return s


def _block_slots(cfg: ModelConfig, hf: str, ours: str, idx: tuple, *,
                 moe: bool, fused: bool) -> list[Slot]:
  """One decoder block: HF prefix `hf` (e.g. "model.layers.3"), our path
  `ours` (e.g. "moe_layers" or "mtp_0/block"), stacked index `idx`."""
  s = _attention_slots(cfg, hf, ours, idx)
  if moe:
    return s + _moe_slots(cfg, hf, ours, idx, fused)
  d, i, m, f = cfg.dim, cfg.inter_dim, f"{hf}.mlp", f"params/{ours}/ffn"
  return s + [_linear(f"{m}.gate_proj.weight", f"{f}/w1/kernel", idx, (d,), (i,)),
              _linear(f"{m}.up_proj.weight", f"{f}/w3/kernel", idx, (d,), (i,)),
              _linear(f"{m}.down_proj.weight", f"{f}/w2/kernel", idx, (i,), (d,))]


def key_map(cfg: ModelConfig, fused_layers: frozenset[int] = frozenset()) -> list[Slot]:
  """All tensors of an HF checkpoint for `cfg`, in the order they are written;
  `fused_layers`: HF layer ids stored with the fused expert layout."""
  d = cfg.dim
  s = [_copy("model.embed_tokens.weight", "params/embed/embedding", (), (cfg.vocab_size, d)),
       _copy("model.norm.weight", "params/norm/scale", (), (d,))]
  if not cfg.tie_word_embeddings:
    s.append(_linear("lm_head.weight", "params/head/kernel", (), (d,), (cfg.vocab_size,)))
  for layer in range(cfg.n_layers):
    moe = layer >= cfg.n_dense_layers
    ours, idx = (("moe_layers", (layer - cfg.n_dense_layers,)) if moe
                 else ("dense_layers", (layer,)))
    s += _block_slots(cfg, f"model.layers.{layer}", ours, idx, moe=moe,
                      fused=layer in fused_layers)
  for k in range(cfg.n_mtp_depth):
    layer = cfg.n_layers + k
    hf, ours = f"model.layers.{layer}", f"params/mtp_{k}"
    s += [_copy(f"{hf}.enorm.weight", f"{ours}/enorm/scale", (), (d,)),
          _copy(f"{hf}.hnorm.weight", f"{ours}/hnorm/scale", (), (d,)),
          _linear(f"{hf}.eh_proj.weight", f"{ours}/eh_proj/kernel", (), (2 * d,), (d,)),
          _copy(f"{hf}.shared_head.norm.weight", f"{ours}/norm/scale", (), (d,))]
    s += _block_slots(cfg, hf, f"mtp_{k}/block", (), moe=True, fused=layer in fused_layers)
  return s


def mtp_duplicates(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Per-MTP-layer copies of the shared embedding / head (ignored on load)."""
  shape = (cfg.vocab_size, cfg.dim)
  out = {}
  for k in range(cfg.n_mtp_depth):
    out[f"model.layers.{cfg.n_layers + k}.embed_tokens.weight"] = shape
    out[f"model.layers.{cfg.n_layers + k}.shared_head.head.weight"] = shape
  return out


def ignored_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Tensors a checkpoint may hold that loading ignores (shapes still checked):
  the MTP layers' copies of embedding and head, and a tied model's
  lm_head.weight (transformers ties it to the embedding on load)."""
  out = mtp_duplicates(cfg)
  if cfg.tie_word_embeddings:
    out["lm_head.weight"] = (cfg.vocab_size, cfg.dim)
  return out


def unmapped_router_biases(slots: list[Slot], leaves: Iterable[str]) -> list[str]:
  """Router-bias leaves no checkpoint tensor fills (V2 checkpoints): zeros on
  load, and they must be zero to be written."""
  mapped = {s.leaf for s in slots}
  return [n for n in leaves if n.startswith("router_bias/") and n not in mapped]


def slots_by(slots: list[Slot], field: str) -> dict[str, list[Slot]]:
  """`slots` grouped by their HF "key" or our "leaf" (one tensor can fill
  several leaves, one leaf takes many tensors)."""
  out: dict[str, list[Slot]] = {}
  for s in slots:
    out.setdefault(getattr(s, field), []).append(s)
  return out
