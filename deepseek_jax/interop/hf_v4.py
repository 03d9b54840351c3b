"""DeepSeek-V4 <-> transformers' `DeepseekV4ForCausalLM`: config and tensors.

`config_from_hf_v4(hf)` maps a `DeepseekV4Config` dict (config.to_dict(),
or DeepSeek's own config.json: legacy keys and omitted ones are read as
transformers reads them) onto ModelConfig(arch="v4"), refusing what
model/v4.py cannot represent, naming the field; `config_to_hf_v4(cfg)` is
its inverse. `v4_variables_from_state_dict(cfg, state, base)` maps a
transformers state_dict (HF module names, NumPy arrays) onto our variables
(model/v4.py's tree): the weights transposed to our [in, out] kernels, the
hash layers' `tid2eid` (int64 there) as int32 in `router_bias`, the top-k
routers' `e_score_correction_bias` as our router bias. transformers builds
no MTP module (it drops V4's `mtp.*` tensors), so `base`'s MTP variables are
kept.

Checkpoint files (`v4_key_map`, used by load_hf_checkpoint /
save_hf_checkpoint): transformers converts V4 tensors on load and back on
save, so a V4 directory holds DeepSeek's own tensor names, torch [out, in]
weights, one tensor per expert. What transformers 5.23's save_pretrained
writes (and so what we write), "L." = "model.layers.{i}.":

  model.embed_tokens.weight [V, d]        params/embed/embedding
  model.norm.weight                       params/norm/scale
  head.weight [V, d]                      params/head/kernel [d, V]
  model.hc_head.hc_{fn,base,scale}        params/hc_head/{fn,base,scale} (fn transposed)
  L.{attn,ffn}_norm.weight                layers_i/{attn,ffn}_norm/scale
  L.hc_{attn,ffn}_{fn,base,scale}         layers_i/{attn,ffn}_hc/{fn,base,scale}
  L.attn.attn_sink                        layers_i/attn/sinks
  L.attn.{wq_a,wq_b,wkv,wo_b}.weight      layers_i/attn/<same>/kernel (wq_b [q, H, hd])
  L.attn.{q_norm,norm}.weight             layers_i/attn/{q_norm,kv_norm}/scale
  L.attn.wo_a.weight [g r, H hd / g]      layers_i/attn/wo_a/kernel [g, H hd / g, r]
  L.attn.compressor.{ape, wkv.weight, wgate.weight, norm.weight}   .../compressor/...
  L.attn.indexer.compressor.*             .../indexer/compressor/... (CSA layers)
  L.attn.indexer.{wq_b,weights_proj}.weight   .../indexer/{wq_b,weights_proj}/kernel
  L.ffn.gate.weight                       layers_i/ffn/gate [d, E]
  L.ffn.gate.bias ("moe" layers)          router_bias/layers_i/ffn/bias
  L.ffn.gate.tid2eid int64 ("hash_moe")   router_bias/layers_i/tid2eid int32
  L.ffn.shared_experts.w{1,2,3}.weight    layers_i/ffn/shared_experts/w{1,2,3}/kernel
  L.ffn.experts.{e}.w{1,2,3}.weight       layers_i/ffn/w{1,2,3} [e]

DeepSeek's native layout (no "model." prefix: `embed.weight`, `norm.weight`,
`hc_head_fn`, `layers.{i}.`...) is read too. A hash layer's router bias
(unused by hash routing) is not stored: zeros on load, dropped on save. MTP
module k is written under `mtp.{k}.` (our names: enorm / hnorm / eh_proj /
norm / hc_head_{fn,base,scale} and the block's names above; its block is a
sliding-attention "moe" layer), which transformers ignores on load
(`_keys_to_ignore_on_load_unexpected`); a checkpoint without `mtp.*`
tensors (transformers' own saves) loads with n_mtp_depth=0.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.interop.hf_keys import Slot
from deepseek_jax.interop.safetensors_io import flatten
from deepseek_jax.model import abstract_variables

V4_MODEL_TYPE = "deepseek_v4"
V4_ARCHITECTURE = "DeepseekV4ForCausalLM"
# The model's dimensions: a config.json without them describes no V4 model.
_V4_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "head_dim")
# transformers' DeepseekV4Config defaults (V4-Flash) for the keys a config.json omits.
_V4_DEFAULTS = {
    "moe_intermediate_size": 2048, "num_key_value_heads": 1, "q_lora_rank": 1024,
    "num_experts_per_tok": 6, "n_routed_experts": 256, "n_shared_experts": 1,
    "scoring_func": "sqrtsoftplus", "norm_topk_prob": True, "routed_scaling_factor": 1.5,
    "max_position_embeddings": 1048576, "rope_theta": 10000.0, "compress_rope_theta": 160000.0,
    "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "swiglu_limit": 10.0,
    "sliding_window": 128, "o_groups": 8, "o_lora_rank": 1024, "index_n_heads": 64,
    "index_head_dim": 128, "index_topk": 512, "num_nextn_predict_layers": 1,
    "rms_norm_eps": 1e-6, "initializer_range": 0.02, "hidden_act": "silu",
    "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
}
_V4_LAYER_BY_RATIO = {0: "sliding_attention", 4: "compressed_sparse_attention",
                      128: "heavily_compressed_attention"}


def _v4_normalized(hf: dict[str, Any]) -> dict[str, Any]:
  """`hf` as DeepseekV4Config's to_dict() would give it: defaults for omitted
  keys, and the legacy keys DeepSeek's own config.json may carry
  (compress_ratios, compress_rate_csa / _hca, num_hash_layers,
  qk_rope_head_dim, a flat rope_parameters / rope_scaling) folded in as
  transformers folds them."""
  missing = [k for k in _V4_REQUIRED if hf.get(k) is None]
  if missing:
    raise ValueError(f"config.json lacks {missing}; it does not describe a DeepSeek-V4 model.")
  out = {**_V4_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
  n = out["num_hidden_layers"]
  rates = dict(out.get("compress_rates") or {"compressed_sparse_attention": 4,
                                               "heavily_compressed_attention": 128})
  for legacy, kind in (("compress_rate_csa", "compressed_sparse_attention"),
                       ("compress_rate_hca", "heavily_compressed_attention")):
    if legacy in out:
      rates[kind] = out.pop(legacy)
  out["compress_rates"] = rates
  ratios = out.pop("compress_ratios", None)
  if "layer_types" not in out and ratios is not None:
    bad = sorted({r for r in ratios if r not in _V4_LAYER_BY_RATIO})
    if bad:
      raise ValueError(f"compress_ratios has {bad}: DeepSeek-V4 layers compress by 0 "
                       "(sliding), 4 (CSA) or 128 (HCA); write layer_types instead.")
    out["layer_types"] = [_V4_LAYER_BY_RATIO[r] for r in ratios]
  if "layer_types" not in out:     # transformers' default: 2 HCA, then CSA / HCA
    out["layer_types"] = (["heavily_compressed_attention"] * min(n, 2) + [
        "compressed_sparse_attention" if i % 2 else "heavily_compressed_attention"
        for i in range(max(n - 2, 0))])
  n_hash = out.pop("num_hash_layers", 3)
  if "mlp_layer_types" not in out:
    out["mlp_layer_types"] = ["hash_moe"] * min(n, n_hash) + ["moe"] * max(0, n - n_hash)
  rope_dim = out.pop("qk_rope_head_dim", None)
  if "partial_rotary_factor" not in out:
    out["partial_rotary_factor"] = rope_dim / out["head_dim"] if rope_dim else 64 / 512
  ropes = out.pop("rope_scaling", None) or out.get("rope_parameters") or {}
  if not (isinstance(ropes.get("main"), dict) and isinstance(ropes.get("compress"), dict)):
    flat = {k: v for k, v in ropes.items() if k not in ("main", "compress")}
    flat.setdefault("rope_type", flat.pop("type", "default"))
    ropes = {"main": {"rope_type": "default"}, "compress": flat}
  out["rope_parameters"] = ropes
  return out


def config_from_hf_v4(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
  """ModelConfig(arch="v4") from a DeepseekV4Config dict (module doc);
  omitted keys take transformers' defaults, legacy ones are folded in
  (_v4_normalized)."""
  hf = _v4_normalized(hf)

  def need(name, want):
    got = hf.get(name, want)
    if got != want:
      raise NotImplementedError(f"DeepSeek-V4 {name}={got!r} is not supported (only "
                                f"{want!r}).")
  for name, want in (("num_key_value_heads", 1), ("n_shared_experts", 1),
                     ("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                     ("tie_word_embeddings", False), ("norm_topk_prob", True)):
    need(name, want)
  ropes = hf.get("rope_parameters") or {}
  rope = ropes.get("compress") or {}
  kind = rope.get("rope_type", "default")
  if kind not in ("default", "yarn"):
    raise NotImplementedError(f"DeepSeek-V4 rope_parameters.compress.rope_type={kind!r}: "
                              "only 'default' and 'yarn'.")
  main = (ropes.get("main") or {}).get("rope_type", "default")
  if main != "default":
    raise NotImplementedError(f"DeepSeek-V4 rope_parameters.main.rope_type={main!r}: the "
                              "sliding layers use plain RoPE ('default') only.")
  if kind == "yarn":
    if "original_max_position_embeddings" not in rope or "factor" not in rope:
      raise ValueError("DeepSeek-V4 yarn rope_parameters.compress needs 'factor' and "
                       "'original_max_position_embeddings'.")
    if rope.get("attention_factor", 1.0) != 1.0:
      raise NotImplementedError(
          f"DeepSeek-V4 rope_parameters.compress.attention_factor="
          f"{rope['attention_factor']}: V4 does not scale cos/sin (1.0 only).")
    if (float(rope.get("factor", 1.0)) > 1.0 and hf["max_position_embeddings"]
        <= rope.get("original_max_position_embeddings", 0)):
      raise NotImplementedError(
          "DeepSeek-V4 yarn with max_position_embeddings <= rope_parameters.compress."
          "original_max_position_embeddings: transformers applies YaRN at any length, "
          "deepseek_jax only past original_max_position_embeddings; raise "
          "max_position_embeddings or use rope_type 'default'.")
  rates = hf["compress_rates"]
  head_dim = hf["head_dim"]
  values = dict(
      arch="v4", vocab_size=hf["vocab_size"], dim=hf["hidden_size"],
      inter_dim=hf["moe_intermediate_size"], moe_inter_dim=hf["moe_intermediate_size"],
      n_layers=hf["num_hidden_layers"], n_dense_layers=0, n_heads=hf["num_attention_heads"],
      head_dim=head_dim, n_kv_heads=1, q_lora_rank=hf["q_lora_rank"],
      n_routed_experts=hf["n_routed_experts"], n_shared_experts=1,
      n_activated_experts=hf["num_experts_per_tok"], n_expert_groups=1, n_limited_groups=1,
      score_func=hf["scoring_func"],
      route_scale=float(hf["routed_scaling_factor"]),
      rope_theta=float((ropes.get("main") or {}).get("rope_theta", hf["rope_theta"])),
      compress_rope_theta=float(rope.get("rope_theta", hf["compress_rope_theta"])),
      rope_type=kind, max_seq_len=hf["max_position_embeddings"],
      partial_rotary_factor=float(hf["partial_rotary_factor"]), hc_mult=hf["hc_mult"],
      hc_sinkhorn_iters=hf["hc_sinkhorn_iters"], hc_eps=float(hf["hc_eps"]),
      o_groups=hf["o_groups"], o_lora_rank=hf["o_lora_rank"],
      sliding_window=hf["sliding_window"],
      compress_rate_csa=rates.get("compressed_sparse_attention", 4),
      compress_rate_hca=rates.get("heavily_compressed_attention", 128),
      layer_types=tuple(hf["layer_types"]), mlp_layer_types=tuple(hf["mlp_layer_types"]),
      swiglu_limit=float(hf["swiglu_limit"]), index_n_heads=hf["index_n_heads"],
      index_head_dim=hf["index_head_dim"],
      # transformers keeps min(index_topk, compressed entries): past max_position_embeddings
      # that is every entry, as index_topk = max_position_embeddings (our limit) gives.
      index_topk=min(hf["index_topk"], hf["max_position_embeddings"]),
      n_mtp_depth=hf["num_nextn_predict_layers"], rms_norm_eps=hf["rms_norm_eps"],
      original_seq_len=hf["max_position_embeddings"],
      init_std=float(hf["initializer_range"]))
  if kind == "yarn":
    values.update(rope_factor=float(rope["factor"]),
                  original_seq_len=rope["original_max_position_embeddings"],
                  beta_fast=float(rope.get("beta_fast", 32.0)),
                  beta_slow=float(rope.get("beta_slow", 1.0)))
  return ModelConfig(**(values | overrides))


def _t(w: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(w).T)


def _compressor(state, prefix: str) -> dict:
  return {"ape": state[f"{prefix}.position_bias"],
          "wkv": {"kernel": _t(state[f"{prefix}.kv_proj.weight"])},
          "wgate": {"kernel": _t(state[f"{prefix}.gate_proj.weight"])},
          "norm": {"scale": state[f"{prefix}.kv_norm.weight"]}}


def _attention(cfg: ModelConfig, state, p: str, kind: str) -> dict:
  h, hd, g, r = cfg.n_heads, cfg.head_dim, cfg.o_groups, cfg.o_lora_rank
  o_a = state[f"{p}.o_a_proj.weight"]                        # [g r, H hd / g]
  out = {"sinks": state[f"{p}.sinks"],
         "wq_a": {"kernel": _t(state[f"{p}.q_a_proj.weight"])},
         "q_norm": {"scale": state[f"{p}.q_a_norm.weight"]},
         "wq_b": {"kernel": _t(state[f"{p}.q_b_proj.weight"]).reshape(-1, h, hd)},
         "wkv": {"kernel": _t(state[f"{p}.kv_proj.weight"])},
         "kv_norm": {"scale": state[f"{p}.kv_norm.weight"]},
         "wo_a": {"kernel": np.asarray(o_a).reshape(g, r, -1).transpose(0, 2, 1)},
         "wo_b": {"kernel": _t(state[f"{p}.o_b_proj.weight"])}}
  if kind != "sliding_attention":
    out["compressor"] = _compressor(state, f"{p}.compressor")
  if kind == "compressed_sparse_attention":
    i = f"{p}.compressor.indexer"
    out["indexer"] = {
        "compressor": _compressor(state, i),
        "wq_b": {"kernel": _t(state[f"{i}.q_b_proj.weight"]).reshape(
            -1, cfg.index_n_heads, cfg.index_head_dim)},
        "weights_proj": {"kernel": _t(state[f"{i}.scorer.weights_proj.weight"])}}
  return out


def _moe(cfg: ModelConfig, state, p: str) -> dict:
  f = cfg.moe_inter_dim
  gate_up = np.asarray(state[f"{p}.experts.gate_up_proj"])          # [E, 2F, D]
  return {"gate": _t(state[f"{p}.gate.weight"]),
          "w1": gate_up[:, :f].transpose(0, 2, 1), "w3": gate_up[:, f:].transpose(0, 2, 1),
          "w2": np.asarray(state[f"{p}.experts.down_proj"]).transpose(0, 2, 1),
          "shared_experts": {n: {"kernel": _t(state[f"{p}.shared_experts.{hf}.weight"])}
                             for n, hf in (("w1", "gate_proj"), ("w3", "up_proj"),
                                           ("w2", "down_proj"))}}


def _hc(state, p: str) -> dict:
  return {"fn": _t(state[f"{p}.fn"]), "base": state[f"{p}.base"], "scale": state[f"{p}.scale"]}


def v4_variables_from_state_dict(cfg: ModelConfig, state: dict[str, np.ndarray],
                                 base: dict) -> dict:
  """Our {"params", "router_bias"} from a DeepseekV4ForCausalLM state_dict
  (module doc); `base` (e.g. init_variables(cfg, key)) supplies the MTP
  modules and checks every mapped leaf's shape."""
  params = {"embed": {"embedding": state["model.embed_tokens.weight"]},
            "norm": {"scale": state["model.norm.weight"]},
            "head": {"kernel": _t(state["lm_head.weight"])},
            "hc_head": {"fn": _t(state["model.hc_head.hc_fn"]),
                        "base": state["model.hc_head.hc_base"],
                        "scale": state["model.hc_head.hc_scale"]}}
  bias = {}
  for i, (kind, mlp) in enumerate(zip(cfg.layer_types, cfg.mlp_layer_types)):
    p = f"model.layers.{i}"
    params[f"layers_{i}"] = {
        "attn_hc": _hc(state, f"{p}.attn_hc"), "ffn_hc": _hc(state, f"{p}.ffn_hc"),
        "attn_norm": {"scale": state[f"{p}.input_layernorm.weight"]},
        "ffn_norm": {"scale": state[f"{p}.post_attention_layernorm.weight"]},
        "attn": _attention(cfg, state, f"{p}.self_attn", kind),
        "ffn": _moe(cfg, state, f"{p}.mlp")}
    layer_bias = dict(base["router_bias"][f"layers_{i}"])
    if mlp == "hash_moe":
      layer_bias["tid2eid"] = np.asarray(state[f"{p}.mlp.gate.tid2eid"]).astype(np.int32)
    else:
      layer_bias["ffn"] = {"bias": state[f"{p}.mlp.gate.e_score_correction_bias"]}
    bias[f"layers_{i}"] = layer_bias
  for name in base["params"]:
    if name.startswith("mtp_"):
      params[name] = base["params"][name]
      bias[name] = base["router_bias"][name]
  out = {"params": params, "router_bias": bias}
  got = jax.tree_util.tree_structure(out)
  want = jax.tree_util.tree_structure(base)
  if got != want:
    raise ValueError(f"V4 state_dict maps to a different tree than cfg builds:\n{got}\n"
                     f"vs\n{want}")

  def check(path, a, b):
    if tuple(np.shape(a)) != tuple(b.shape):
      raise ValueError(f"{jax.tree_util.keystr(path)}: state_dict gives shape "
                       f"{np.shape(a)}, the model wants {tuple(b.shape)}.")
    return np.asarray(a).astype(b.dtype)
  return jax.tree_util.tree_map_with_path(check, out, base)


# ---------------------------------------------------------------------------
# ModelConfig -> config.json
# ---------------------------------------------------------------------------
# ModelConfig fields config.json carries for V4: an exported config must give
# these back unchanged (config_to_hf_v4 refuses otherwise, naming the field).
_V4_FIELDS = ("vocab_size", "dim", "moe_inter_dim", "n_layers", "n_dense_layers",
              "n_heads", "head_dim", "n_kv_heads", "q_lora_rank", "n_routed_experts",
              "n_shared_experts", "n_activated_experts", "n_expert_groups",
              "n_limited_groups", "score_func", "route_scale", "rope_theta",
              "compress_rope_theta", "max_seq_len", "partial_rotary_factor", "hc_mult",
              "hc_sinkhorn_iters", "hc_eps", "o_groups", "o_lora_rank", "sliding_window",
              "compress_rate_csa", "compress_rate_hca", "layer_types", "mlp_layer_types",
              "swiglu_limit", "index_n_heads", "index_head_dim", "index_topk", "n_mtp_depth",
              "rms_norm_eps", "attention_bias", "tie_word_embeddings")
_V4_YARN_FIELDS = ("rope_factor", "original_seq_len", "beta_fast", "beta_slow")


def config_to_hf_v4(cfg: ModelConfig) -> dict[str, Any]:
  """The DeepseekV4Config dict (config.json) of a V4 `cfg`: the inverse of
  config_from_hf_v4. NotImplementedError naming the field when the written
  config.json would read back as another model (a safety net: ModelConfig's
  own V4 checks refuse most such fields first). inter_dim is not written
  (V4 has no dense FFN; it reads back as moe_inter_dim)."""
  rope_dim_factor = cfg.partial_rotary_factor
  main = {"rope_type": "default", "rope_theta": cfg.rope_theta,
          "partial_rotary_factor": rope_dim_factor}
  compress = {"rope_type": "default", "rope_theta": cfg.compress_rope_theta,
              "partial_rotary_factor": rope_dim_factor}
  if cfg.use_yarn:
    compress.update(rope_type="yarn", factor=cfg.rope_factor,
                    original_max_position_embeddings=cfg.original_seq_len,
                    beta_fast=cfg.beta_fast, beta_slow=cfg.beta_slow, attention_factor=1.0)
  out = {
      "architectures": [V4_ARCHITECTURE], "model_type": V4_MODEL_TYPE,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
      "moe_intermediate_size": cfg.moe_inter_dim, "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads, "num_key_value_heads": 1, "head_dim": cfg.head_dim,
      "q_lora_rank": cfg.q_lora_rank, "n_routed_experts": cfg.n_routed_experts,
      "n_shared_experts": cfg.n_shared_experts, "num_experts_per_tok": cfg.n_activated_experts,
      "scoring_func": cfg.score_func, "norm_topk_prob": True,
      "routed_scaling_factor": cfg.route_scale, "rope_theta": cfg.rope_theta,
      "compress_rope_theta": cfg.compress_rope_theta,
      "rope_parameters": {"main": main, "compress": compress},
      "partial_rotary_factor": rope_dim_factor, "max_position_embeddings": cfg.max_seq_len,
      "hc_mult": cfg.hc_mult, "hc_sinkhorn_iters": cfg.hc_sinkhorn_iters, "hc_eps": cfg.hc_eps,
      "o_groups": cfg.o_groups, "o_lora_rank": cfg.o_lora_rank,
      "sliding_window": cfg.sliding_window,
      "compress_rates": {"compressed_sparse_attention": cfg.compress_rate_csa,
                         "heavily_compressed_attention": cfg.compress_rate_hca},
      "layer_types": list(cfg.layer_types), "mlp_layer_types": list(cfg.mlp_layer_types),
      "swiglu_limit": cfg.swiglu_limit, "index_n_heads": cfg.index_n_heads,
      "index_head_dim": cfg.index_head_dim, "index_topk": cfg.index_topk,
      "num_nextn_predict_layers": cfg.n_mtp_depth, "rms_norm_eps": cfg.rms_norm_eps,
      "initializer_range": cfg.init_std, "hidden_act": "silu", "attention_bias": False,
      "mlp_bias": False, "tie_word_embeddings": False, "dtype": cfg.param_dtype,
  }
  back = config_from_hf_v4(out)
  fields = _V4_FIELDS + (_V4_YARN_FIELDS if cfg.use_yarn else ())
  for name in fields:
    if getattr(back, name) != getattr(cfg, name):
      raise NotImplementedError(
          f"{name}={getattr(cfg, name)!r}: a DeepSeek-V4 config.json cannot hold it (it "
          f"reads back as {getattr(back, name)!r}); set {name}={getattr(back, name)!r} to "
          "export this model.")
  if back.use_yarn != cfg.use_yarn:
    raise NotImplementedError(f"rope_type={cfg.rope_type!r}: the exported config would "
                              f"{'' if back.use_yarn else 'not '}apply YaRN.")
  return out


# ---------------------------------------------------------------------------
# The checkpoint files' tensors (module doc)
# ---------------------------------------------------------------------------
def _slot_copy(key: str, leaf: str, shape, index=()) -> Slot:
  return Slot(key, tuple(shape), leaf, index, lambda w: w, lambda w: w)


def _slot_linear(key: str, leaf: str, shape, index=()) -> Slot:
  """torch [out, in] <-> our kernel [in, *out] of (per-index) `shape`."""
  n_in, out = shape[0], tuple(shape[1:])
  n_out = math.prod(out)
  return Slot(key, (n_out, n_in), leaf, index, lambda w: w.T.reshape(n_in, *out),
              lambda k: k.reshape(n_in, n_out).T)


def _slot_wo_a(key: str, leaf: str, shape) -> Slot:
  """wo_a.weight [g r, H hd / g] <-> our [g, H hd / g, r]."""
  g, n, r = shape
  return Slot(key, (g * r, n), leaf, (), lambda w: w.reshape(g, r, n).transpose(0, 2, 1),
              lambda k: k.transpose(0, 2, 1).reshape(g * r, n))


def _slot_table(key: str, leaf: str, shape) -> Slot:
  """The hash table: int64 on disk (torch long), int32 ours."""
  return Slot(key, tuple(shape), leaf, (), lambda w: np.asarray(w).astype(np.int32),
              lambda w: np.asarray(w).astype(np.int64))


def _block_names(hf: str, ours: str, kind: str, mlp: str, n_experts: int
                 ) -> list[tuple[str, str, str]]:
  """(disk key, our leaf, how) of one V4 block: `hf` its key prefix (e.g.
  "model.layers.3"), `ours` its module path (e.g. "layers_3", "mtp_0/block")."""
  p, a = f"params/{ours}", f"params/{ours}/attn"
  out = [(f"{hf}.attn_norm.weight", f"{p}/attn_norm/scale", "copy"),
         (f"{hf}.ffn_norm.weight", f"{p}/ffn_norm/scale", "copy")]
  for hc in ("attn", "ffn"):
    out += [(f"{hf}.hc_{hc}_fn", f"{p}/{hc}_hc/fn", "linear"),
            (f"{hf}.hc_{hc}_base", f"{p}/{hc}_hc/base", "copy"),
            (f"{hf}.hc_{hc}_scale", f"{p}/{hc}_hc/scale", "copy")]
  out += [(f"{hf}.attn.attn_sink", f"{a}/sinks", "copy"),
          (f"{hf}.attn.q_norm.weight", f"{a}/q_norm/scale", "copy"),
          (f"{hf}.attn.norm.weight", f"{a}/kv_norm/scale", "copy"),
          (f"{hf}.attn.wo_a.weight", f"{a}/wo_a/kernel", "wo_a")]
  out += [(f"{hf}.attn.{w}.weight", f"{a}/{w}/kernel", "linear")
          for w in ("wq_a", "wq_b", "wkv", "wo_b")]

  def compressor(k, o):
    return [(f"{k}.ape", f"{o}/ape", "copy"), (f"{k}.norm.weight", f"{o}/norm/scale", "copy"),
            (f"{k}.wkv.weight", f"{o}/wkv/kernel", "linear"),
            (f"{k}.wgate.weight", f"{o}/wgate/kernel", "linear")]
  if kind != "sliding_attention":
    out += compressor(f"{hf}.attn.compressor", f"{a}/compressor")
  if kind == "compressed_sparse_attention":
    i, o = f"{hf}.attn.indexer", f"{a}/indexer"
    out += compressor(f"{i}.compressor", f"{o}/compressor")
    out += [(f"{i}.wq_b.weight", f"{o}/wq_b/kernel", "linear"),
            (f"{i}.weights_proj.weight", f"{o}/weights_proj/kernel", "linear")]
  f, fo = f"{hf}.ffn", f"{p}/ffn"
  out.append((f"{f}.gate.weight", f"{fo}/gate", "linear"))
  out.append((f"{f}.gate.tid2eid", f"router_bias/{ours}/tid2eid", "table") if mlp == "hash_moe"
             else (f"{f}.gate.bias", f"router_bias/{ours}/ffn/bias", "copy"))
  out += [(f"{f}.shared_experts.{w}.weight", f"{fo}/shared_experts/{w}/kernel", "linear")
          for w in ("w1", "w2", "w3")]
  out += [(f"{f}.experts.{e}.{w}.weight", f"{fo}/{w}", f"expert{e}")
          for e in range(n_experts) for w in ("w1", "w2", "w3")]
  return out


def v4_key_map(cfg: ModelConfig, native: bool = False) -> list[Slot]:
  """Every tensor of a V4 checkpoint for `cfg` (module doc), in writing
  order: transformers' on-disk names, or with `native` DeepSeek's own
  top-level names (`embed.weight`, `norm.weight`, `hc_head_fn`, `layers.`)."""
  shapes = {k: tuple(v.shape) for k, v in flatten(abstract_variables(cfg)).items()}
  m = "" if native else "model."
  hc_head = "hc_head_" if native else "model.hc_head.hc_"
  names = [(f"{m}embed{'' if native else '_tokens'}.weight", "params/embed/embedding", "copy"),
           (f"{m}norm.weight", "params/norm/scale", "copy"),
           ("head.weight", "params/head/kernel", "linear")]
  names += [(f"{hc_head}{w}", f"params/hc_head/{w}", "linear" if w == "fn" else "copy")
            for w in ("fn", "base", "scale")]
  for i, (kind, mlp) in enumerate(zip(cfg.layer_types, cfg.mlp_layer_types)):
    names += _block_names(f"{m}layers.{i}", f"layers_{i}", kind, mlp, cfg.n_routed_experts)
  for k in range(cfg.n_mtp_depth):
    t, o = f"mtp.{k}", f"params/mtp_{k}"
    names += [(f"{t}.enorm.weight", f"{o}/enorm/scale", "copy"),
              (f"{t}.hnorm.weight", f"{o}/hnorm/scale", "copy"),
              (f"{t}.eh_proj.weight", f"{o}/eh_proj/kernel", "linear"),
              (f"{t}.norm.weight", f"{o}/norm/scale", "copy")]
    names += [(f"{t}.hc_head_{w}", f"{o}/hc_head/{w}", "linear" if w == "fn" else "copy")
              for w in ("fn", "base", "scale")]
    names += _block_names(t, f"mtp_{k}/block", "sliding_attention", "moe",
                          cfg.n_routed_experts)
  make: dict[str, Callable[..., Slot]] = {"copy": _slot_copy, "linear": _slot_linear,
                                          "wo_a": _slot_wo_a, "table": _slot_table}
  slots = []
  for key, leaf, how in names:
    if leaf not in shapes:   # the key map and model/v4.py disagree: a bug
      raise AssertionError(f"V4 key map names {leaf} ({key}), which cfg does not build")
    if how.startswith("expert"):
      slots.append(_slot_linear(key, leaf, shapes[leaf][1:], (int(how[6:]),)))
    else:
      slots.append(make[how](key, leaf, shapes[leaf]))
  return slots

