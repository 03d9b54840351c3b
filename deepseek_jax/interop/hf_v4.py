"""DeepSeek-V4 <-> transformers' `DeepseekV4ForCausalLM`: config and tensors.

`config_from_hf_v4(hf)` maps a `DeepseekV4Config` dict (config.to_dict())
onto ModelConfig(arch="v4"), refusing what model/v4.py cannot represent,
naming the field. `v4_variables_from_state_dict(cfg, state, base)` maps a
transformers state_dict (HF module names, NumPy arrays) onto our variables
(model/v4.py's tree): the weights transposed to our [in, out] kernels, the
hash layers' `tid2eid` (int64 there) as int32 in `router_bias`, the top-k
routers' `e_score_correction_bias` as our router bias. transformers builds
no MTP module (it drops V4's `mtp.*` tensors), so `base`'s MTP variables are
kept. DeepSeek's own checkpoint names (`attn.compressor.ape`, `ffn.gate.
tid2eid`, `hc_attn_fn`, `head.weight`, ...), which transformers converts
on load, are not read here yet: load them through transformers.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from deepseek_jax.config import ModelConfig


def config_from_hf_v4(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
  """ModelConfig(arch="v4") from a DeepseekV4Config dict (module doc)."""
  def need(name, want):
    got = hf.get(name, want)
    if got != want:
      raise NotImplementedError(f"DeepSeek-V4 {name}={got!r} is not supported (only "
                                f"{want!r}).")
  for name, want in (("num_key_value_heads", 1), ("n_shared_experts", 1),
                     ("hidden_act", "silu"), ("attention_bias", False),
                     ("tie_word_embeddings", False), ("norm_topk_prob", True)):
    need(name, want)
  rope = (hf.get("rope_parameters") or {}).get("compress") or {}
  kind = rope.get("rope_type", "default")
  if kind not in ("default", "yarn"):
    raise NotImplementedError(f"DeepSeek-V4 rope_parameters.compress.rope_type={kind!r}: "
                              "only 'default' and 'yarn'.")
  rates = hf.get("compress_rates") or {}
  head_dim = hf["head_dim"]
  values = dict(
      arch="v4", vocab_size=hf["vocab_size"], dim=hf["hidden_size"],
      inter_dim=hf["moe_intermediate_size"], moe_inter_dim=hf["moe_intermediate_size"],
      n_layers=hf["num_hidden_layers"], n_dense_layers=0, n_heads=hf["num_attention_heads"],
      head_dim=head_dim, n_kv_heads=1, q_lora_rank=hf["q_lora_rank"],
      n_routed_experts=hf["n_routed_experts"], n_shared_experts=1,
      n_activated_experts=hf["num_experts_per_tok"], n_expert_groups=1, n_limited_groups=1,
      score_func=hf.get("scoring_func", "sqrtsoftplus"),
      route_scale=float(hf["routed_scaling_factor"]),
      rope_theta=float(hf.get("rope_theta", 10000.0)),
      compress_rope_theta=float(hf.get("compress_rope_theta", 160000.0)),
      rope_type=kind, max_seq_len=hf["max_position_embeddings"],
      partial_rotary_factor=float(hf["partial_rotary_factor"]), hc_mult=hf["hc_mult"],
      hc_sinkhorn_iters=hf["hc_sinkhorn_iters"], hc_eps=float(hf["hc_eps"]),
      o_groups=hf["o_groups"], o_lora_rank=hf["o_lora_rank"],
      sliding_window=hf["sliding_window"],
      compress_rate_csa=rates.get("compressed_sparse_attention", 4),
      compress_rate_hca=rates.get("heavily_compressed_attention", 128),
      layer_types=tuple(hf["layer_types"]), mlp_layer_types=tuple(hf["mlp_layer_types"]),
      swiglu_limit=float(hf["swiglu_limit"]), index_n_heads=hf["index_n_heads"],
      index_head_dim=hf["index_head_dim"], index_topk=hf["index_topk"],
      n_mtp_depth=hf.get("num_nextn_predict_layers", 0), rms_norm_eps=hf["rms_norm_eps"],
      original_seq_len=hf["max_position_embeddings"],
      init_std=float(hf.get("initializer_range", 0.02)))
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
