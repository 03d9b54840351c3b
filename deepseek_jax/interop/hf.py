"""Hugging Face checkpoints <-> deepseek_jax variables (DeepSeek-V3 and V2 layouts).

Two families are read and written: DeepSeek-V3 / R1 (`DeepseekV3ForCausalLM`,
model_type `deepseek_v3`) and DeepSeek-V2 / V2-Lite / V2.5 / Coder-V2
(`DeepseekV2ForCausalLM`, `deepseek_v2`). Their tensors share one key layout;
V2 has no router bias (`e_score_correction_bias`) and no MTP layers, routes by
softmax (raw gates times routed_scaling_factor) and limits groups by their best
expert (`topk_method` greedy / group_limited_greedy). Our config says which
family a model is by its router: score_func "sigmoid" is V3, "softmax" is V2.

An HF DeepSeek checkpoint is a directory with `config.json` and
`*.safetensors` shards (plus `model.safetensors.index.json` when sharded).
Each torch `Linear` weight is [out, in]; our kernels are input-major for
einsum, with head axes split out, e.g.

  q_b_proj.weight [heads*(nope+rope), q_lora]  ->  wq_b/kernel [q_lora, heads, nope+rope]
  o_proj.weight   [dim, heads*v]               ->  wo/kernel   [heads, v, dim]

so every mapping is "transpose, then reshape" (`_linear`). Blocks are stacked
along a leading layer axis (`dense_layers`, `moe_layers`), experts along an
expert axis; MTP module k sits at HF layer index num_hidden_layers + k.

Experts come in two layouts, both read: per-expert keys
`mlp.experts.{e}.{gate,up,down}_proj.weight` (published DeepSeek-V3/R1, and
what transformers 5 `save_pretrained` writes: it fuses experts in memory only)
and the fused in-memory layout `experts.gate_up_proj [E, 2I, D]`,
`experts.down_proj [E, D, I]`. We always write per-expert keys.

FP8 checkpoints (published V3) store float8_e4m3fn weights with a
`weight_scale_inv` [ceil(out/128), ceil(in/128)]: w = w_fp8 * scale_inv per
128x128 block. They are dequantised to float32 while loading, or, with
`keep_fp8=True`, kept as they are: the kernel leaf holds the float8 values in
our layout and a sibling `<leaf>_scale` the block scales of the transposed
[in, out] matrix (scale_inv.T), which the model's FP8 layers use directly.

Loading streams: shapes are checked from the headers first (missing,
unexpected and mis-shaped keys fail before anything is read or traced), then
tensors are read one at a time into preallocated stacked arrays.

The JAX-side format (`save_jax_variables` / `load_jax_variables`) is a
directory with `model_config.json` (ModelConfig.to_dict) and
`variables.safetensors` keyed by flattened paths like `params/moe_layers/ffn/w1`.

This module is the DeepSeek side: config.json <-> ModelConfig, which HF key
is which slice of which leaf, FP8 block scales, and the checks and streaming
around them. The safetensors file level (listing shards and headers, raw
float8 reads, atomic writes, flattening trees to "a/b/c" keys) lives in
`safetensors_io`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import json
import logging
import math
import os
import re
import warnings
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors

from deepseek_jax import parallel
from deepseek_jax.config import ModelConfig
from deepseek_jax.interop.safetensors_io import (INDEX_NAME, TensorInfo, atomic_json,
                                                 atomic_write, checkpoint_files, corrupt_error,
                                                 flatten, list_tensors, read_raw, unflatten,
                                                 write_safetensors)
from deepseek_jax.model import abstract_variables

log = logging.getLogger(__name__)

HF_ARCHITECTURE = "DeepseekV3ForCausalLM"
HF_MODEL_TYPE = "deepseek_v3"
HF_V2_ARCHITECTURE = "DeepseekV2ForCausalLM"
HF_V2_MODEL_TYPE = "deepseek_v2"
HF_FAMILIES = {HF_MODEL_TYPE: HF_ARCHITECTURE, HF_V2_MODEL_TYPE: HF_V2_ARCHITECTURE}
V2_TOPK_METHODS = ("greedy", "group_limited_greedy")
CONFIG_NAME = "config.json"
JAX_CONFIG_NAME = "model_config.json"
JAX_VARIABLES_NAME = "variables.safetensors"
DEFAULT_MAX_SHARD_BYTES = 4 * 2**30

# Values transformers' DeepseekV3Config assumes for keys a config.json omits.
_HF_DEFAULTS = {
    "moe_intermediate_size": 2048, "n_shared_experts": 1, "n_routed_experts": 256,
    "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
    "first_k_dense_replace": 3, "routed_scaling_factor": 2.5,
    "q_lora_rank": 1536, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
    "norm_topk_prob": True, "scoring_func": "sigmoid", "num_nextn_predict_layers": 1,
    "initializer_range": 0.02, "rope_theta": 10000.0,
}
# ... and transformers' DeepseekV2Config (num_experts_per_tok has no default).
_HF_V2_DEFAULTS = {
    "moe_intermediate_size": 1407, "n_shared_experts": 2, "n_routed_experts": 64,
    "num_experts_per_tok": None, "first_k_dense_replace": 0, "routed_scaling_factor": 1.0,
    "q_lora_rank": 1536, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
    "norm_topk_prob": False, "scoring_func": "softmax", "initializer_range": 0.02,
    "rope_theta": 10000.0, "topk_method": "greedy",
}
_HF_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
                "qk_rope_head_dim", "v_head_dim")
_FP8_DTYPES = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
_PARAM_DTYPES = ("float32", "bfloat16", "float16")


# ---------------------------------------------------------------------------
# Config mapping
# ---------------------------------------------------------------------------
def _yarn_mscale(factor: float, mscale: float) -> float:
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _rope_from_hf(hf: Mapping[str, Any], max_pos: int) -> dict[str, Any]:
  """ModelConfig RoPE fields from `rope_scaling` (legacy) / `rope_parameters`."""
  # transformers prefers a legacy `rope_scaling` dict when both are present.
  rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
  theta = float(rope.get("rope_theta", hf.get("rope_theta", _HF_DEFAULTS["rope_theta"])))
  kind = rope.get("rope_type", rope.get("type")) or "default"
  if kind == "default":
    # No YaRN: make sure ours stays off too (it turns on past original_seq_len).
    return {"rope_theta": theta, "original_seq_len": max_pos}
  if kind != "yarn":
    raise NotImplementedError(
        f"rope type {kind!r} is not supported; DeepSeek-V3 uses 'yarn' or 'default'.")
  if "original_max_position_embeddings" not in rope:
    raise ValueError("config.json: yarn rope_scaling needs 'original_max_position_embeddings'.")
  orig = int(rope["original_max_position_embeddings"])
  factor = float(rope.get("factor") or max_pos / orig)
  if rope.get("truncate", True) is False:
    raise NotImplementedError(
        "yarn 'truncate': false (un-rounded correction range) is not implemented; "
        "DeepSeek-V3 rounds the range (truncate: true).")
  if factor > 1 and max_pos <= orig:
    raise NotImplementedError(
        f"yarn factor={factor} with max_position_embeddings={max_pos} <= "
        f"original_max_position_embeddings={orig}: transformers applies YaRN at any "
        "length, deepseek_jax (like the official DeepSeek code) only when "
        "max_position_embeddings > original_max_position_embeddings. Raise "
        "max_position_embeddings or drop rope_scaling.")
  mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
  # transformers scales cos/sin (so the rope half of q.k by its square) by
  # attention_factor, and the whole softmax by yarn_mscale(factor, mscale_all_dim)^2.
  # DeepSeek's own code has only the second: one `mscale` (= mscale_all_dim).
  attention_factor = rope.get("attention_factor")
  if attention_factor is None:
    if mscale and mscale_all:
      attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
    else:
      attention_factor = _yarn_mscale(factor, 1.0)
  if abs(attention_factor - 1.0) > 1e-12:
    raise NotImplementedError(
        f"yarn mscale={mscale} / mscale_all_dim={mscale_all} / attention_factor="
        f"{rope.get('attention_factor')} scale only the rotary half of the attention "
        f"logits (by {attention_factor:.6f}^2); deepseek_jax has one softmax mscale "
        "(official DeepSeek code) and needs mscale == mscale_all_dim.")
  return {"rope_theta": theta, "original_seq_len": orig, "rope_factor": factor,
          "beta_fast": float(rope.get("beta_fast") or 32.0),
          "beta_slow": float(rope.get("beta_slow") or 1.0),
          "mscale": float(mscale_all or 1.0)}


def hf_model_type(hf_config: Mapping[str, Any]) -> str:
  """"deepseek_v3" or "deepseek_v2" for a config.json dict; ValueError naming
  what it found for any other architecture."""
  archs = hf_config.get("architectures") or []
  model_type = hf_config.get("model_type")
  if model_type in HF_FAMILIES and (not archs or HF_FAMILIES[model_type] in archs):
    return model_type
  hint = ""
  if model_type == "deepseek":
    hint = (" DeepSeek V1 / DeepSeekMoE 16B (model_type 'deepseek', remote code) has no "
            "MLA and is not supported.")
  raise ValueError(
      f"unknown architecture {archs or None} / model_type {model_type!r}: expected "
      f"{HF_ARCHITECTURE} / {HF_MODEL_TYPE!r} (DeepSeek-V3 / R1) or {HF_V2_ARCHITECTURE} / "
      f"{HF_V2_MODEL_TYPE!r} (DeepSeek-V2 / V2-Lite / V2.5 / Coder-V2).{hint}")


def config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> ModelConfig:
  """ModelConfig from an HF DeepSeek-V3 or DeepSeek-V2 `config.json` dict.

  `overrides` set ModelConfig fields HF configs do not carry (dtype,
  moe_impl, remat_policy, ...). Keys a config.json omits take transformers'
  DeepseekV3Config / DeepseekV2Config defaults. Raises ValueError for other
  architectures and NotImplementedError for HF features deepseek_jax does not
  model (naming the field), rather than loading a different model.

  V2 routing maps onto the one router (model/moe.py `route`): softmax scores,
  raw gates times routed_scaling_factor; `topk_method` "greedy" is top-k over
  all experts (n_expert_groups = 1), "group_limited_greedy" keeps the
  `topk_group` of `n_group` groups with the best single expert (V2's
  device-limited routing: groups = devices).
  """
  hf = dict(hf_config)
  v2 = hf_model_type(hf) == HF_V2_MODEL_TYPE
  defaults = _HF_V2_DEFAULTS if v2 else _HF_DEFAULTS
  missing = [k for k in _HF_REQUIRED if k not in hf]
  if missing:
    raise ValueError(f"config.json lacks {missing}; it does not describe a DeepSeek "
                     f"{'V2' if v2 else 'V3'} model.")

  def get(name):  # transformers' default when the key is absent or null
    value = hf.get(name)
    return defaults[name] if value is None else value

  if hf.get("tie_word_embeddings", False):
    raise ValueError("tie_word_embeddings=true: DeepSeek models have a separate lm_head; "
                     "deepseek_jax does not tie embeddings.")
  unsupported = [("hidden_act", "silu"), ("attention_bias", False), ("moe_layer_freq", 1),
                 ("mlp_bias", False)]
  unsupported += [] if v2 else [("rope_interleave", True)]
  for name, want in unsupported:
    if name in hf and hf[name] != want:
      raise NotImplementedError(
          f"{name}={hf[name]!r} is not supported (DeepSeek models use {want!r}).")
  kv_heads = hf.get("num_key_value_heads")
  if kv_heads is not None and kv_heads != hf["num_attention_heads"]:
    raise NotImplementedError(
        f"num_key_value_heads={kv_heads} != num_attention_heads="
        f"{hf['num_attention_heads']}: MLA has one key/value per head.")
  score_func = get("scoring_func")
  norm_topk = bool(get("norm_topk_prob"))
  n_moe = hf["num_hidden_layers"] - min(get("first_k_dense_replace"), hf["num_hidden_layers"])
  if v2:
    groups, limited = _v2_groups(hf, get)
    if score_func != "softmax":
      raise NotImplementedError(
          f"scoring_func={score_func!r}: DeepSeek-V2 routes by softmax (transformers' "
          "DeepseekV2 router is softmax-only).")
    if norm_topk:
      raise NotImplementedError(
          "norm_topk_prob=true in a DeepSeek-V2 config: transformers' DeepseekV2 ignores "
          "it while DeepSeek's own modeling code renormalises the gates, so the model is "
          "ambiguous; the published V2 models use false.")
    depth = hf.get("num_nextn_predict_layers")
    if depth:
      raise NotImplementedError(
          f"num_nextn_predict_layers={depth} in a DeepSeek-V2 config: V2 has no MTP "
          "layers (transformers' DeepseekV2 would drop them).")
    if n_moe and get("num_experts_per_tok") is None:
      raise ValueError("config.json lacks num_experts_per_tok (DeepseekV2Config has no "
                       "default); set the number of routed experts per token.")
    n_mtp = 0
  else:
    groups = hf.get("n_group", _HF_DEFAULTS["n_group"]) or 1
    limited = hf.get("topk_group", _HF_DEFAULTS["topk_group"]) or 1
    if score_func == "sigmoid" and not norm_topk:
      raise NotImplementedError(
          "scoring_func='sigmoid' with norm_topk_prob=false: deepseek_jax always "
          "normalises sigmoid gates over the chosen experts (V3 eq. 14).")
    if score_func == "softmax" and norm_topk:
      raise NotImplementedError(
          "scoring_func='softmax' with norm_topk_prob=true: deepseek_jax uses the raw "
          "softmax gates (DeepSeek-V2); set norm_topk_prob=false.")
    n_mtp = int(hf.get("num_nextn_predict_layers", hf.get(
        "num_mtp_layers", _HF_DEFAULTS["num_nextn_predict_layers"])) or 0)
  max_pos = int(get("max_position_embeddings"))
  fields = dict(
      vocab_size=hf["vocab_size"], dim=hf["hidden_size"], inter_dim=hf["intermediate_size"],
      moe_inter_dim=get("moe_intermediate_size"), n_layers=hf["num_hidden_layers"],
      n_dense_layers=min(get("first_k_dense_replace"), hf["num_hidden_layers"]),
      n_heads=hf["num_attention_heads"], n_routed_experts=get("n_routed_experts"),
      n_shared_experts=hf.get("n_shared_experts", defaults["n_shared_experts"]) or 0,
      n_activated_experts=get("num_experts_per_tok") or 1,
      n_expert_groups=groups, n_limited_groups=limited,
      score_func=score_func, route_scale=float(get("routed_scaling_factor")),
      q_lora_rank=(hf.get("q_lora_rank", defaults["q_lora_rank"]) or 0),
      kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=hf["qk_nope_head_dim"],
      qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
      max_seq_len=max_pos, rms_norm_eps=float(get("rms_norm_eps")),
      n_mtp_depth=n_mtp, init_std=float(get("initializer_range")))
  fields.update(_rope_from_hf(hf, max_pos))
  fields.update(overrides)
  cfg = ModelConfig.from_dict(fields)
  if cfg.n_mtp_depth and not cfg.n_moe_layers:
    raise NotImplementedError(
        "num_nextn_predict_layers > 0 with first_k_dense_replace >= num_hidden_layers: "
        "transformers' MTP layers are always MoE, deepseek_jax's MTP block is dense "
        "when the model has no MoE layer; set num_nextn_predict_layers=0.")
  return cfg


def _v2_groups(hf: Mapping[str, Any], get) -> tuple[int, int]:
  """(n_expert_groups, n_limited_groups) from a V2 config's topk_method."""
  method = get("topk_method")
  if method == "greedy":      # n_group / topk_group are ignored by this method
    return 1, 1
  if method == "group_limited_greedy":
    groups, limited = hf.get("n_group"), hf.get("topk_group")
    if not isinstance(groups, int) or not isinstance(limited, int):
      raise ValueError(f"topk_method='group_limited_greedy' needs integer n_group and "
                       f"topk_group (got {groups!r}, {limited!r}).")
    return groups, limited
  raise NotImplementedError(
      f"topk_method={method!r} in a DeepSeek-V2 config: supported are {V2_TOPK_METHODS} "
      "(V3's 'noaux_tc' belongs to model_type 'deepseek_v3').")


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """HF `config.json` dict for `cfg`: DeepseekV3ForCausalLM for a sigmoid
  router, DeepseekV2ForCausalLM for a softmax one (V2-shaped: no MTP).

  Inactive YaRN fields (max_seq_len <= original_seq_len) are not written:
  they have no effect, and HF would apply YaRN at any length.
  """
  v2 = cfg.score_func == "softmax"
  if v2 and cfg.n_mtp_depth:
    raise NotImplementedError(
        f"n_mtp_depth={cfg.n_mtp_depth} with score_func='softmax': a softmax-routed model "
        "is written as DeepSeek-V2, which has no MTP layers; set n_mtp_depth=0 (or use "
        "score_func='sigmoid' for a V3 checkpoint).")
  if cfg.n_mtp_depth and not cfg.n_moe_layers:
    raise NotImplementedError(
        "n_mtp_depth > 0 with no MoE layer: our MTP block is then dense but "
        "transformers' MTP layers are always MoE; set n_mtp_depth=0.")
  if cfg.use_yarn:
    rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
            "original_max_position_embeddings": cfg.original_seq_len,
            "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow,
            "mscale": cfg.mscale, "mscale_all_dim": cfg.mscale}
    # Legacy form read by transformers 4 / vLLM (the published config.json).
    legacy = {k: v for k, v in rope.items() if k not in ("rope_type", "rope_theta")}
    legacy["type"] = "yarn"
  else:
    rope, legacy = {"rope_type": "default", "rope_theta": cfg.rope_theta}, None
  out = {
      "architectures": [HF_V2_ARCHITECTURE if v2 else HF_ARCHITECTURE],
      "model_type": HF_V2_MODEL_TYPE if v2 else HF_MODEL_TYPE,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
      "intermediate_size": cfg.inter_dim, "moe_intermediate_size": cfg.moe_inter_dim,
      "num_hidden_layers": cfg.n_layers, "first_k_dense_replace": cfg.n_dense_layers,
      "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_heads,
      "n_routed_experts": cfg.n_routed_experts, "n_shared_experts": cfg.n_shared_experts,
      "num_experts_per_tok": cfg.n_activated_experts, "n_group": cfg.n_expert_groups,
      "topk_group": cfg.n_limited_groups, "scoring_func": cfg.score_func,
      "topk_method": ("greedy" if cfg.n_expert_groups == 1 else "group_limited_greedy")
                     if v2 else "noaux_tc",
      "norm_topk_prob": not v2,
      "routed_scaling_factor": cfg.route_scale,
      "q_lora_rank": cfg.q_lora_rank or None, "kv_lora_rank": cfg.kv_lora_rank,
      "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
      "v_head_dim": cfg.v_head_dim, "max_position_embeddings": cfg.max_seq_len,
      "rope_theta": cfg.rope_theta, "rope_parameters": rope, "rope_scaling": legacy,
      "rope_interleave": True, "rms_norm_eps": cfg.rms_norm_eps,
      "num_nextn_predict_layers": cfg.n_mtp_depth, "tie_word_embeddings": False,
      "attention_bias": False, "hidden_act": "silu", "moe_layer_freq": 1,
      "initializer_range": cfg.init_std, "dtype": cfg.param_dtype,
  }
  if v2:
    for key in ("rope_interleave", "num_nextn_predict_layers"):   # not V2 fields
      del out[key]
  return out


# ---------------------------------------------------------------------------
# Key map: one _Slot per (HF tensor, slice of one of our leaves)
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Slot:
  key: str                       # HF key
  shape: tuple[int, ...]         # HF shape
  leaf: str                      # our flattened path, e.g. "params/moe_layers/ffn/w1"
  index: tuple[int, ...]         # where in the (stacked) leaf this tensor goes
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray] | None


def _copy(key, leaf, index, shape) -> _Slot:
  return _Slot(key, tuple(shape), leaf, index, lambda w: w, lambda w: w)


def _linear(key, leaf, index, in_shape, out_shape) -> _Slot:
  """torch Linear [prod(out), prod(in)] <-> kernel [*in_shape, *out_shape]."""
  n_in, n_out = math.prod(in_shape), math.prod(out_shape)
  return _Slot(key, (n_out, n_in), leaf, index,
               lambda w: w.T.reshape(*in_shape, *out_shape),
               lambda k: k.reshape(n_in, n_out).T)


def _block_slots(cfg: ModelConfig, hf: str, ours: str, idx: tuple, *,
                 moe: bool, fused: bool) -> list[_Slot]:
  """One decoder block: HF prefix `hf` (e.g. "model.layers.3"), our path
  `ours` (e.g. "moe_layers" or "mtp_0/block"), stacked index `idx`."""
  d, h = cfg.dim, cfg.n_heads
  nope, rope, v, r = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                      cfg.kv_lora_rank)
  p, a, o = f"params/{ours}", f"{hf}.self_attn", f"params/{ours}/attn"
  s = [_copy(f"{hf}.input_layernorm.weight", f"{p}/attn_norm/scale", idx, (d,)),
       _copy(f"{hf}.post_attention_layernorm.weight", f"{p}/ffn_norm/scale", idx, (d,))]
  if cfg.use_q_lora:
    q = cfg.q_lora_rank
    s += [_linear(f"{a}.q_a_proj.weight", f"{o}/wq_a/kernel", idx, (d,), (q,)),
          _copy(f"{a}.q_a_layernorm.weight", f"{o}/q_norm/scale", idx, (q,)),
          _linear(f"{a}.q_b_proj.weight", f"{o}/wq_b/kernel", idx, (q,), (h, nope + rope))]
  else:
    s += [_linear(f"{a}.q_proj.weight", f"{o}/wq/kernel", idx, (d,), (h, nope + rope))]
  s += [_linear(f"{a}.kv_a_proj_with_mqa.weight", f"{o}/wkv_a/kernel", idx, (d,), (r + rope,)),
        _copy(f"{a}.kv_a_layernorm.weight", f"{o}/kv_norm/scale", idx, (r,)),
        _linear(f"{a}.kv_b_proj.weight", f"{o}/wkv_b/kernel", idx, (r,), (h, nope + v)),
        _linear(f"{a}.o_proj.weight", f"{o}/wo/kernel", idx, (h, v), (d,))]
  m, f = f"{hf}.mlp", f"{p}/ffn"
  if not moe:
    i = cfg.inter_dim
    return s + [_linear(f"{m}.gate_proj.weight", f"{f}/w1/kernel", idx, (d,), (i,)),
                _linear(f"{m}.up_proj.weight", f"{f}/w3/kernel", idx, (d,), (i,)),
                _linear(f"{m}.down_proj.weight", f"{f}/w2/kernel", idx, (i,), (d,))]
  e, i = cfg.n_routed_experts, cfg.moe_inter_dim
  s += [_linear(f"{m}.gate.weight", f"{f}/gate", idx, (d,), (e,))]
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
        _Slot(gu, (e, 2 * i, d), f"{f}/w1", idx, lambda w: w[:, :i].transpose(0, 2, 1), None),
        _Slot(gu, (e, 2 * i, d), f"{f}/w3", idx, lambda w: w[:, i:].transpose(0, 2, 1), None),
        _Slot(f"{m}.experts.down_proj", (e, d, i), f"{f}/w2", idx,
              lambda w: w.transpose(0, 2, 1), None)]
  for j in range(e):
    x = f"{m}.experts.{j}"
    s += [_linear(f"{x}.gate_proj.weight", f"{f}/w1", idx + (j,), (d,), (i,)),
          _linear(f"{x}.up_proj.weight", f"{f}/w3", idx + (j,), (d,), (i,)),
          _linear(f"{x}.down_proj.weight", f"{f}/w2", idx + (j,), (i,), (d,))]
  return s


def _slots(cfg: ModelConfig, fused_layers: frozenset[int] = frozenset()) -> list[_Slot]:
  """All tensors of an HF checkpoint for `cfg`; `fused_layers`: HF layer ids
  stored with the fused expert layout."""
  d = cfg.dim
  s = [_copy("model.embed_tokens.weight", "params/embed/embedding", (), (cfg.vocab_size, d)),
       _copy("model.norm.weight", "params/norm/scale", (), (d,)),
       _linear("lm_head.weight", "params/head/kernel", (), (d,), (cfg.vocab_size,))]
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


def _mtp_duplicates(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Per-MTP-layer copies of the shared embedding / head (ignored on load)."""
  shape = (cfg.vocab_size, cfg.dim)
  out = {}
  for k in range(cfg.n_mtp_depth):
    out[f"model.layers.{cfg.n_layers + k}.embed_tokens.weight"] = shape
    out[f"model.layers.{cfg.n_layers + k}.shared_head.head.weight"] = shape
  return out


# ---------------------------------------------------------------------------
# Reading HF checkpoints
# ---------------------------------------------------------------------------
def dequantize_fp8_blocks(w: np.ndarray, scale_inv: np.ndarray,
                          block: tuple[int, int] = (128, 128)) -> np.ndarray:
  """float32 w_fp8 * scale_inv, one scale per [block] tile (edge tiles partial).

  w: [out, in]; scale_inv: [ceil(out/b0), ceil(in/b1)] (DeepSeek-V3 FP8 format).
  """
  (n_out, n_in), (b0, b1) = w.shape, block
  expected = (-(-n_out // b0), -(-n_in // b1))
  if tuple(scale_inv.shape) != expected:
    raise ValueError(f"weight_scale_inv shape {tuple(scale_inv.shape)} != {expected} "
                     f"for a {w.shape} weight with {block} blocks.")
  scale = np.repeat(np.repeat(scale_inv.astype(np.float32), b0, 0), b1, 1)[:n_out, :n_in]
  return w.astype(np.float32) * scale


def _fail_keys(path: str, what: str, keys, fix: str) -> ValueError:
  keys = sorted(keys)
  shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
  return ValueError(f"{path}: {len(keys)} {what} tensors: {shown}; {fix}")


def _check_tensors(path: str, slots: list[_Slot], infos: dict[str, TensorInfo],
                   block: tuple[int, int], extra: dict[str, tuple[int, ...]]) -> None:
  expected = {s.key: s.shape for s in slots}
  scales = {}
  for key, info in infos.items():
    if info.dtype in _FP8_DTYPES:
      if len(info.shape) != 2:
        raise ValueError(f"{key} in {info.file}: {info.dtype} tensor of rank "
                         f"{len(info.shape)}; only 2-D block-quantised weights are supported.")
      scales[key + "_scale_inv"] = tuple(-(-n // b) for n, b in zip(info.shape, block))
  ignorable = {k for k, v in infos.items()
               if k.endswith("rotary_emb.inv_freq") or (0 in v.shape and ".shared_experts." in k)}
  missing = set(expected) - set(infos) - ignorable
  missing |= set(scales) - set(infos)
  if missing:
    raise _fail_keys(path, "missing", missing,
                     "check that config.json matches the weights (num_hidden_layers, "
                     "first_k_dense_replace, q_lora_rank, n_routed_experts, "
                     "num_nextn_predict_layers) and that every shard is present.")
  unexpected = set(infos) - set(expected) - set(scales) - set(extra) - ignorable
  if unexpected:
    raise _fail_keys(path, "unexpected", unexpected,
                     "config.json does not describe these weights (check num_hidden_layers, "
                     "num_nextn_predict_layers, q_lora_rank, n_shared_experts).")
  for key, shape in list(expected.items()) + list(scales.items()) + list(extra.items()):
    if key in infos and infos[key].shape != shape:
      raise ValueError(f"{key} in {infos[key].file}: expected shape {shape} from "
                       f"config.json, got {infos[key].shape}; config.json and the "
                       "weights describe different models.")


def _param_dtype(dtype) -> str:
  name = "float32" if dtype is None else jnp.dtype(dtype).name
  if name not in _PARAM_DTYPES:
    raise ValueError(f"dtype={dtype!r} must be one of {_PARAM_DTYPES}.")
  return name


def _np_dtype(name: str):
  return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def read_hf_config(path: str) -> dict[str, Any]:
  """The config.json dict of an HF checkpoint directory (clear errors for a
  missing directory or file and for invalid JSON)."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path!r} is not a directory: an HF checkpoint is a directory "
                            "with config.json and *.safetensors.")
  config_path = os.path.join(path, CONFIG_NAME)
  if not os.path.exists(config_path):
    raise FileNotFoundError(
        f"{config_path} not found: an HF checkpoint directory needs config.json next "
        "to its *.safetensors (copy it from the model repo or use save_pretrained).")
  with open(config_path) as f:
    try:
      hf = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{config_path}: not valid JSON ({e}).") from None
  if not isinstance(hf, dict):
    raise ValueError(f"{config_path}: expected a JSON object, got {type(hf).__name__}.")
  return hf


def check_hf_checkpoint(path: str, dtype=None) -> ModelConfig:
  """The ModelConfig of an HF checkpoint directory after checking, from the
  safetensors headers alone (no tensor is read), that every tensor the config
  implies is there with its shape: a missing, incomplete or mismatched
  checkpoint fails here, before anything is compiled."""
  return _open_checkpoint(path, _param_dtype(dtype))[0]


def _open_checkpoint(path: str, param_dtype: str):
  """(cfg, files, infos, slots, block) of a checked checkpoint directory."""
  hf = read_hf_config(path)
  config_path = os.path.join(path, CONFIG_NAME)
  try:
    hf_model_type(hf)           # another architecture: say so before looking at tensors
  except ValueError as e:
    raise ValueError(f"{config_path}: {e}") from None
  files = checkpoint_files(path)
  infos = list_tensors(files)

  n_layers = hf.get("num_hidden_layers")
  layer_ids = {int(m.group(1)) for k in infos
               if (m := re.match(r"model\.layers\.(\d+)\.", k))}
  depth = hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers"))
  if depth and isinstance(n_layers, int) and not any(i >= n_layers for i in layer_ids):
    warnings.warn(f"{path}: config.json has num_nextn_predict_layers={depth} but the "
                  "checkpoint holds no MTP weights; loading with n_mtp_depth=0.")
    hf["num_nextn_predict_layers"] = 0
    hf.pop("num_mtp_layers", None)
  try:
    cfg = config_from_hf(hf, param_dtype=param_dtype)
  except (ValueError, NotImplementedError) as e:   # name the file, not just "config.json"
    text = str(e)
    text = (text[len(CONFIG_NAME):] if text.startswith(CONFIG_NAME) else f": {text}")
    kind = NotImplementedError if isinstance(e, NotImplementedError) else ValueError
    raise kind(config_path + text) from None

  fused = frozenset(i for i in layer_ids if f"model.layers.{i}.mlp.experts.gate_up_proj" in infos)
  slots = _slots(cfg, fused)
  quant = hf.get("quantization_config") or {}
  block = tuple(quant.get("weight_block_size") or (128, 128))
  if quant and quant.get("quant_method", "fp8") != "fp8":
    raise NotImplementedError(f"{config_path}: quantization {quant.get('quant_method')!r}: "
                              "only DeepSeek's block FP8 checkpoints are supported.")
  _check_tensors(path, slots, infos, block, _mtp_duplicates(cfg))
  return cfg, files, infos, slots, block


def load_hf_checkpoint(path: str, *, dtype=None, mesh=None, rules=None,
                       keep_fp8: bool = False) -> tuple[ModelConfig, dict]:
  """Reads an HF DeepSeek-V3 or V2 checkpoint directory into (cfg, variables).

  Tensors are streamed one at a time into preallocated stacked arrays of
  `dtype` (default float32; FP8 weights are dequantised first), so peak host
  memory is about one copy of the model. Every key and shape is checked
  against config.json before any tensor is read. A checkpoint without MTP
  weights (transformers' save_pretrained drops them) loads with n_mtp_depth=0.

  mesh, rules (parallel.setup; rules may be a rule-set name): place every
  leaf straight onto the mesh in its sharding under `rules`, shard by shard
  (`jax.make_array_from_callback`): each process builds only the shards of
  its own devices, from the HF tensors that overlap them, so no host ever
  holds a whole leaf, let alone the model (peak: one device shard plus one HF
  tensor). An HF tensor split over several shards (a leaf sharded along a
  non-stacked dimension, e.g. the embedding over `vocab`) is read once per
  shard that needs it.

  keep_fp8: keep a block-FP8 checkpoint's projection and expert weights as
  FP8 (1 byte per weight instead of 4) for FP8 inference: each such kernel
  leaf holds the float8 values (our layout) and a sibling `<name>_scale`
  [..., ceil(in/128), ceil(out/128)] its float32 block scales (the
  checkpoint's weight_scale_inv, transposed), and the returned cfg has
  fp8=True, so those layers run FP8 GEMMs on the blocks as published (with
  cfg.replace(fp8=False) they are dequantized on the fly instead). The FP8
  weights are frozen: gradients flow through them to the inputs and to the
  high-precision parameters (norms, router, embedding, head) but not into
  them; load with keep_fp8=False for float master weights to train. Needs
  128 x 128 blocks and no mesh; a checkpoint without FP8 weights loads as
  usual (with a warning).
  """
  param_dtype = _param_dtype(dtype)
  cfg, files, infos, slots, block = _open_checkpoint(path, param_dtype)
  abstract = flatten(abstract_variables(cfg))
  kept = _fp8_leaves(slots, infos, abstract) if keep_fp8 else {}
  if keep_fp8:
    if mesh is not None:
      raise NotImplementedError("load_hf_checkpoint(keep_fp8=True) loads onto one device for "
                                "now; drop mesh= or load with keep_fp8=False.")
    if not kept:
      warnings.warn(f"{path}: keep_fp8=True but the checkpoint has no block-FP8 projection "
                    "weights; loaded as usual.")
    elif block != (128, 128):
      raise ValueError(f"{path}: keep_fp8=True needs 128 x 128 weight blocks (the FP8 GEMMs "
                       f"tile by 128); quantization_config.weight_block_size is {list(block)}. "
                       "Load with keep_fp8=False to dequantize.")
    else:
      cfg = cfg.replace(fp8=True)
  if mesh is not None:
    return cfg, _load_onto_mesh(cfg, files, infos, slots, block, param_dtype, mesh, rules)

  # Preallocate every leaf in its final (stacked) layout, then fill it.
  arrays = {name: np.empty(a.shape, np.float32 if name.startswith("router_bias/")
                           else _np_dtype(param_dtype))
            for name, a in abstract.items()}
  by_key: dict[str, list[_Slot]] = {}
  for s in slots:
    by_key.setdefault(s.key, []).append(s)
  for name, (fp8_dtype, scale_shape) in kept.items():
    arrays[name] = np.empty(abstract[name].shape, fp8_dtype)
    arrays[name + "_scale"] = np.empty(scale_shape, np.float32)
  filled = dict.fromkeys(arrays, 0)
  for name in _unslotted_biases(slots, arrays):   # V2: no router bias in the checkpoint
    arrays[name] = np.zeros(arrays[name].shape, np.float32)
    filled[name] = arrays[name].size
  for n, file in enumerate(files):
    keys = [k for k, info in infos.items() if info.file == file and k in by_key]
    with safetensors.safe_open(file, framework="numpy") as f:
      for key in keys:
        if by_key[key][0].leaf in kept:
          w, scale_inv = _read_fp8(infos, key)
          for s in by_key[key]:
            arrays[s.leaf + "_scale"][s.index] = scale_inv.T
            filled[s.leaf + "_scale"] += scale_inv.size
        else:
          w = _read_tensor(f, infos, key, block)
        for s in by_key[key]:
          target = arrays[s.leaf]
          target[s.index] = s.to_ours(w)
          filled[s.leaf] += math.prod(target.shape[len(s.index):])
        del w
    log.info("read %s (%d/%d shards, %d tensors)", os.path.basename(file), n + 1,
             len(files), len(keys))
  unfilled = [k for k, a in arrays.items() if filled[k] != a.size]
  if unfilled:  # the key map does not match the model tree: a bug, not bad input
    raise AssertionError(f"key map left leaves partially filled: {unfilled}")
  variables = {}
  for name in list(arrays):
    variables[name] = jnp.asarray(arrays.pop(name))
  return cfg, unflatten(variables)


def _unslotted_biases(slots: list[_Slot], leaves) -> list[str]:
  """Router-bias leaves no checkpoint tensor fills (V2 checkpoints): zeros."""
  slotted = {s.leaf for s in slots}
  return [n for n in leaves if n.startswith("router_bias/") and n not in slotted]


def _fp8_leaves(slots: list[_Slot], infos: dict[str, TensorInfo], shapes: Mapping[str, Any]
                ) -> dict[str, tuple[Any, tuple[int, ...]]]:
  """Leaves keep_fp8 keeps as FP8 blocks -> (float8 dtype, scale leaf shape):
  projection kernels and routed-expert weights whose every HF tensor is a
  block-FP8 Linear weight of one float8 format."""
  by_leaf: dict[str, list[_Slot]] = {}
  for s in slots:
    by_leaf.setdefault(s.leaf, []).append(s)
  kept = {}
  for leaf, group in by_leaf.items():
    dtypes = {infos[s.key].dtype for s in group if s.key in infos}
    if (not re.search(r"/kernel$|/ffn/w[123]$", leaf) or len(dtypes) != 1
        or not dtypes <= set(_FP8_DTYPES) or any(s.to_hf is None for s in group)):
      continue
    n_out, n_in = group[0].shape
    stack = tuple(shapes[leaf].shape[:len(group[0].index)])
    kept[leaf] = (_FP8_DTYPES[dtypes.pop()], stack + (-(-n_in // 128), -(-n_out // 128)))
  return kept


def _read_fp8(infos: dict[str, TensorInfo], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(float8 values [out, in], float32 weight_scale_inv) of a block-FP8 weight."""
  info, scale_info = infos[key], infos[key + "_scale_inv"]
  with safetensors.safe_open(scale_info.file, framework="numpy") as g:
    scale_inv = g.get_tensor(key + "_scale_inv").astype(np.float32)
  return read_raw(info.file, key, _FP8_DTYPES[info.dtype]), scale_inv


def _read_tensor(f, infos: dict[str, TensorInfo], key: str, block: tuple[int, int]) -> np.ndarray:
  """Tensor `key` from the open safetensors file `f` that holds it (FP8
  weights dequantised with their scales, which may sit in another file)."""
  if infos[key].dtype in _FP8_DTYPES:
    return dequantize_fp8_blocks(*_read_fp8(infos, key), block)
  return f.get_tensor(key)


def _load_onto_mesh(cfg: ModelConfig, files: list[str], infos: dict[str, TensorInfo],
                    slots: list[_Slot], block: tuple[int, int], param_dtype: str,
                    mesh, rules) -> dict:
  """Every leaf as a global array in its sharding, built shard by shard."""
  if rules is None:
    raise ValueError("load_hf_checkpoint(mesh=...) needs rules= too (a rule-set name "
                     f"from {tuple(parallel.RULE_SETS)} or parallel.setup's rules).")
  abstract = abstract_variables(cfg)
  shardings = flatten(parallel.tree_shardings(abstract, mesh, parallel.rules.resolve(rules)))
  by_leaf: dict[str, list[_Slot]] = {}
  for s in slots:
    by_leaf.setdefault(s.leaf, []).append(s)
  zero = set(_unslotted_biases(slots, flatten(abstract)))
  out = {}
  with contextlib.ExitStack() as stack:
    handles: dict[str, Any] = {}

    def read(key):
      file = infos[key].file
      if file not in handles:
        handles[file] = stack.enter_context(safetensors.safe_open(file, framework="numpy"))
      return _read_tensor(handles[file], infos, key, block)

    for name, a in flatten(abstract).items():
      dtype = np.float32 if name.startswith("router_bias/") else _np_dtype(param_dtype)
      done: dict[tuple, np.ndarray] = {}     # replicas of one shard are built once

      def shard(index, name=name, shape=a.shape, dtype=dtype, done=done):
        bounds = tuple(sl.indices(n)[:2] for sl, n in zip(index, shape))
        bounds += tuple((0, n) for n in shape[len(bounds):])
        if bounds in done:
          return done[bounds]
        buf = np.zeros([hi - lo for lo, hi in bounds], dtype)
        if name in zero:
          done[bounds] = buf
          return buf
        filled = 0
        for s in by_leaf[name]:
          k = len(s.index)
          if not all(lo <= i < hi for i, (lo, hi) in zip(s.index, bounds)):
            continue
          w = s.to_ours(read(s.key))[tuple(slice(lo, hi) for lo, hi in bounds[k:])]
          buf[tuple(i - lo for i, (lo, _) in zip(s.index, bounds))] = w
          filled += w.size
        if filled != buf.size:   # the key map does not cover the leaf: a bug
          raise AssertionError(f"{name}: shard {bounds} left partially filled")
        done[bounds] = buf
        return buf

      out[name] = jax.make_array_from_callback(a.shape, shardings[name], shard)
      done.clear()
  return unflatten(out)


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------
def _check_shapes(cfg: ModelConfig, shapes: Mapping[str, tuple[int, ...]], where: str) -> None:
  """Flattened variable shapes must be exactly those `cfg` builds."""
  want = {k: tuple(v.shape) for k, v in flatten(abstract_variables(cfg)).items()}
  missing, extra = set(want) - set(shapes), set(shapes) - set(want)
  if missing:
    raise _fail_keys(where, "missing", missing, "the variables do not match the config.")
  if extra:
    raise _fail_keys(where, "unexpected", extra, "the variables do not match the config.")
  for k, shape in want.items():
    if tuple(shapes[k]) != shape:
      raise ValueError(f"{where}: {k} has shape {tuple(shapes[k])}, the config needs {shape}.")


def save_hf_checkpoint(cfg: ModelConfig, variables: Mapping[str, Any], path: str, *,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                       dtype=None) -> None:
  """Writes an HF DeepSeek checkpoint (config.json, shards, index): V3 for a
  sigmoid router, V2 for a softmax one (config_to_hf; its router bias must be 0).

  Per-expert keys as published; MTP module k at layer num_hidden_layers + k.
  Tensors keep their dtype unless `dtype` is given (the router bias stays
  float32). Every file is written to a temp file and renamed into place;
  the index is written last, then shards of an earlier save into `path`
  (`model.safetensors`, `model-*-of-*.safetensors`) that it no longer lists
  are removed so that no reader picks them up.
  """
  hf_config = config_to_hf(cfg)
  flat = flatten(variables)
  _check_shapes(cfg, {k: np.shape(v) for k, v in flat.items()}, "variables")
  slots = _slots(cfg)
  for name in _unslotted_biases(slots, flat):
    if np.any(np.asarray(flat[name]) != 0):
      raise ValueError(
          f"{name} is not zero, but a softmax-routed (DeepSeek-V2) checkpoint has no router "
          "bias to hold it: the exported model would route differently. Train V2-shaped "
          "models with bias_update_speed=0 (V2's balance losses instead), or export a "
          "sigmoid-routed model as V3.")
  os.makedirs(path, exist_ok=True)
  out_dtype = None if dtype is None else _np_dtype(_param_dtype(dtype))

  def tensor_dtype(s: _Slot):
    if out_dtype is None or s.leaf.startswith("router_bias/"):
      return np.dtype(flat[s.leaf].dtype)
    return np.dtype(out_dtype)

  shards: list[list[_Slot]] = [[]]
  size = 0
  for s in slots:
    nbytes = math.prod(s.shape) * tensor_dtype(s).itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(s)
    size += nbytes
  host = functools.lru_cache(maxsize=4)(lambda leaf: np.asarray(flat[leaf]))
  weight_map, total = {}, 0
  for n, shard in enumerate(shards):
    name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
    tensors = {}
    for s in shard:
      tensors[s.key] = np.ascontiguousarray(
          s.to_hf(host(s.leaf)[s.index]).astype(tensor_dtype(s)))
      weight_map[s.key] = name
      total += tensors[s.key].nbytes
    atomic_write(os.path.join(path, name),
                 lambda tmp, t=tensors: write_safetensors(t, tmp, {"format": "pt"}))
    log.info("wrote %s (%d tensors)", name, len(tensors))
    del tensors
  hf_config["dtype"] = (str(np.dtype(out_dtype)) if out_dtype is not None
                        else str(np.dtype(flat["params/embed/embedding"].dtype)))
  atomic_json(hf_config, os.path.join(path, CONFIG_NAME))
  atomic_json({"metadata": {"total_size": total}, "weight_map": weight_map},
              os.path.join(path, INDEX_NAME))
  stale = glob.glob(os.path.join(path, "model-*-of-*.safetensors"))
  stale += glob.glob(os.path.join(path, "model.safetensors"))
  for file in stale:
    if os.path.basename(file) not in weight_map.values():
      os.remove(file)


# ---------------------------------------------------------------------------
# The JAX-side format
# ---------------------------------------------------------------------------
def save_jax_variables(cfg: ModelConfig, variables: Mapping[str, Any], directory: str) -> None:
  """Writes `model_config.json` + `variables.safetensors` (flattened paths)."""
  flat = flatten(variables)
  _check_shapes(cfg, {k: np.shape(v) for k, v in flat.items()}, "variables")
  os.makedirs(directory, exist_ok=True)
  tensors = {k: np.ascontiguousarray(np.asarray(v)) for k, v in flat.items()}
  atomic_write(os.path.join(directory, JAX_VARIABLES_NAME),
               lambda tmp: write_safetensors(tensors, tmp, {"format": "deepseek_jax"}))
  atomic_json(cfg.to_dict(), os.path.join(directory, JAX_CONFIG_NAME))


def load_jax_variables(directory: str) -> tuple[ModelConfig, dict]:
  """Reads what `save_jax_variables` wrote: (cfg, variables)."""
  config_path = os.path.join(directory, JAX_CONFIG_NAME)
  weights_path = os.path.join(directory, JAX_VARIABLES_NAME)
  for p in (config_path, weights_path):
    if not os.path.exists(p):
      raise FileNotFoundError(f"{p} not found: a deepseek_jax checkpoint directory holds "
                              f"{JAX_CONFIG_NAME} and {JAX_VARIABLES_NAME}.")
  cfg = ModelConfig.from_json(config_path)
  try:
    with safetensors.safe_open(weights_path, framework="numpy") as f:
      shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
      _check_shapes(cfg, shapes, weights_path)
      flat = {k: jnp.asarray(f.get_tensor(k)) for k in f.keys()}
  except safetensors.SafetensorError as e:
    raise corrupt_error(weights_path, e) from None
  return cfg, unflatten(flat)
