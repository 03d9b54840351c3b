"""Hugging Face `config.json` <-> ModelConfig: DeepSeek-V4 / V3.2 / V3 / V2, Llama, Qwen2.

Six families are read and written; this module dispatches on model_type.
DeepSeek-V4 (`DeepseekV4ForCausalLM`, `deepseek_v4`) is mapped in hf_v4.py.
The dense decoders (`LlamaForCausalLM`: DeepSeek LLM, R1-Distill-Llama;
`Qwen2ForCausalLM`: R1-Distill-Qwen) map onto attention="gqa" in hf_dense.py.
Two are DeepSeek's MoE families: DeepSeek-V3 / R1 (`DeepseekV3ForCausalLM`,
model_type `deepseek_v3`) and DeepSeek-V2 / V2-Lite / V2.5 / Coder-V2
(`DeepseekV2ForCausalLM`, `deepseek_v2`). Their tensors share one key layout
(hf_keys.py); V2 has no router bias (`e_score_correction_bias`) and no MTP
layers, routes by softmax (raw gates times routed_scaling_factor) and limits
groups by their best expert (`topk_method` greedy / group_limited_greedy).
Our config says which family a model is by its router: score_func "sigmoid"
is V3, "softmax" is V2.

DeepSeek-V3.2 (`DeepseekV32ForCausalLM`, `deepseek_v32`) is V3 plus DeepSeek
Sparse Attention: `index_n_heads`, `index_head_dim` and `index_topk` map 1:1
onto ours (an MLA model with index_topk > 0 is written as V3.2), its router
is V3's (sigmoid only). transformers' DeepseekV32Config has no MTP field and
its model has no MTP layers; DeepSeek's published config.json has
`num_nextn_predict_layers` (its MTP layer, with its own indexer, at layer
num_hidden_layers). We read that field when present (default 0) and write
it: our MTP modules are exported at layer num_hidden_layers + k as for V3,
transformers ignores them (with an "unexpected keys" note) and loads the
same main model; a checkpoint without them loads with n_mtp_depth=0.

A config.json feature deepseek_jax does not model is refused by name
(NotImplementedError) rather than loaded as a different model; keys a
config.json omits take transformers' defaults.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Mapping

from deepseek_jax.config import ModelConfig
from deepseek_jax.interop.hf_dense import (DENSE_FAMILIES, dense_config_from_hf,
                                           dense_config_to_hf)
from deepseek_jax.interop.hf_v4 import (V4_ARCHITECTURE, V4_MODEL_TYPE, config_from_hf_v4,
                                        config_to_hf_v4)

HF_ARCHITECTURE = "DeepseekV3ForCausalLM"
HF_MODEL_TYPE = "deepseek_v3"
HF_V2_ARCHITECTURE = "DeepseekV2ForCausalLM"
HF_V2_MODEL_TYPE = "deepseek_v2"
HF_V32_ARCHITECTURE = "DeepseekV32ForCausalLM"
HF_V32_MODEL_TYPE = "deepseek_v32"
HF_FAMILIES = {HF_MODEL_TYPE: HF_ARCHITECTURE, HF_V2_MODEL_TYPE: HF_V2_ARCHITECTURE,
               HF_V32_MODEL_TYPE: HF_V32_ARCHITECTURE, V4_MODEL_TYPE: V4_ARCHITECTURE,
               **DENSE_FAMILIES}
V2_TOPK_METHODS = ("greedy", "group_limited_greedy")
CONFIG_NAME = "config.json"

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
# ... and transformers' DeepseekV32Config (which has no MTP field: 0 when absent).
_HF_V32_DEFAULTS = {
    **_HF_DEFAULTS, "max_position_embeddings": 163840, "num_nextn_predict_layers": 0,
    "index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048,
}
_HF_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
                "qk_rope_head_dim", "v_head_dim")


# ---------------------------------------------------------------------------
# config.json -> ModelConfig
# ---------------------------------------------------------------------------
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


def hf_model_type(hf_config: Mapping[str, Any]) -> str:
  """"deepseek_v4", "deepseek_v32", "deepseek_v3", "deepseek_v2", "llama" or "qwen2" for a
  config.json dict;
  ValueError naming what it found for any other architecture."""
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
      f"{V4_ARCHITECTURE} / {V4_MODEL_TYPE!r} (DeepSeek-V4), "
      f"{HF_V32_ARCHITECTURE} / {HF_V32_MODEL_TYPE!r} (DeepSeek-V3.2), "
      f"{HF_ARCHITECTURE} / {HF_MODEL_TYPE!r} (DeepSeek-V3 / R1) or {HF_V2_ARCHITECTURE} / "
      f"{HF_V2_MODEL_TYPE!r} (DeepSeek-V2 / V2-Lite / V2.5 / Coder-V2), LlamaForCausalLM / "
      f"'llama' (DeepSeek LLM, R1-Distill-Llama) or Qwen2ForCausalLM / 'qwen2' "
      f"(R1-Distill-Qwen).{hint}")


def config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> ModelConfig:
  """ModelConfig from an HF DeepSeek-V4, V3.2, V3, V2, Llama or Qwen2
  `config.json` dict (the dense two: hf_dense.py; V4: hf_v4.py).

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
  model_type = hf_model_type(hf)
  if model_type in DENSE_FAMILIES:
    return dense_config_from_hf(hf, model_type, **overrides)
  if model_type == V4_MODEL_TYPE:
    return config_from_hf_v4(hf, **overrides)
  v2, v32 = model_type == HF_V2_MODEL_TYPE, model_type == HF_V32_MODEL_TYPE
  defaults = _HF_V2_DEFAULTS if v2 else _HF_V32_DEFAULTS if v32 else _HF_DEFAULTS
  missing = [k for k in _HF_REQUIRED if k not in hf]
  if missing:
    raise ValueError(f"config.json lacks {missing}; it does not describe a DeepSeek "
                     f"{'V2' if v2 else 'V3.2' if v32 else 'V3'} model.")

  def get(name):  # transformers' default when the key is absent or null
    value = hf.get(name)
    return defaults[name] if value is None else value

  _refuse_unsupported(hf, v2)
  routing = _v2_routing(hf, get) if v2 else _v3_routing(hf, get, defaults)
  max_pos = int(get("max_position_embeddings"))
  if v32:
    routing.update(_v32_indexer(hf, get, max_pos))
  fields = dict(
      vocab_size=hf["vocab_size"], dim=hf["hidden_size"], inter_dim=hf["intermediate_size"],
      moe_inter_dim=get("moe_intermediate_size"), n_layers=hf["num_hidden_layers"],
      n_dense_layers=min(get("first_k_dense_replace"), hf["num_hidden_layers"]),
      n_heads=hf["num_attention_heads"], n_routed_experts=get("n_routed_experts"),
      n_shared_experts=hf.get("n_shared_experts", defaults["n_shared_experts"]) or 0,
      n_activated_experts=get("num_experts_per_tok") or 1,
      score_func=get("scoring_func"), route_scale=float(get("routed_scaling_factor")),
      q_lora_rank=(hf.get("q_lora_rank", defaults["q_lora_rank"]) or 0),
      kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=hf["qk_nope_head_dim"],
      qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
      max_seq_len=max_pos, rms_norm_eps=float(get("rms_norm_eps")),
      init_std=float(get("initializer_range")), **routing)
  fields.update(_rope_from_hf(hf, max_pos))
  fields.update(overrides)
  cfg = ModelConfig.from_dict(fields)
  if cfg.n_mtp_depth and not cfg.n_moe_layers:
    raise NotImplementedError(
        "num_nextn_predict_layers > 0 with first_k_dense_replace >= num_hidden_layers: "
        "transformers' MTP layers are always MoE, deepseek_jax's MTP block is dense "
        "when the model has no MoE layer; set num_nextn_predict_layers=0.")
  return cfg


def _refuse_unsupported(hf: Mapping[str, Any], v2: bool) -> None:
  """NotImplementedError / ValueError for config.json features neither family
  uses (tied embeddings, biases, other activations, GQA)."""
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


def _v32_indexer(hf: Mapping[str, Any], get: Callable[[str], Any],
                 max_pos: int) -> dict[str, int]:
  """index_n_heads, index_head_dim, index_topk of a V3.2 config, after
  refusing (by field) what transformers' DeepseekV32 runs and we do not: a
  softmax router, a layer pattern other than first_k_dense_replace dense
  layers then MoE ones, attention other than DSA, no query LoRA."""
  score_func = get("scoring_func")
  if score_func != "sigmoid":
    raise NotImplementedError(f"scoring_func={score_func!r} in a DeepSeek-V3.2 config: "
                              "transformers' DeepseekV32 router is sigmoid-only.")
  method = hf.get("topk_method")
  if method not in (None, "noaux_tc"):
    raise NotImplementedError(f"topk_method={method!r} in a DeepSeek-V3.2 config: V3.2 "
                              "routes by 'noaux_tc' (sigmoid, bias-corrected group top-k).")
  n_layers = hf["num_hidden_layers"]
  n_dense = min(get("first_k_dense_replace"), n_layers)
  mlp_types = hf.get("mlp_layer_types")
  if mlp_types is not None and list(mlp_types) != ["dense"] * n_dense + ["sparse"] * (
      n_layers - n_dense):
    raise NotImplementedError(
        f"mlp_layer_types (dense at layers {[i for i, t in enumerate(mlp_types) if t == 'dense']})"
        f": deepseek_jax has first_k_dense_replace={n_dense} 'dense' layers, then 'sparse' "
        "(MoE) ones; drop mlp_layer_types or make it that pattern.")
  layer_types = hf.get("layer_types")
  if layer_types is not None and set(layer_types) - {"indexed_attention"}:
    raise NotImplementedError(
        f"layer_types with {sorted(set(layer_types) - {'indexed_attention'})}: every "
        "DeepSeek-V3.2 layer is 'indexed_attention' in deepseek_jax.")
  q_lora = hf.get("q_lora_rank", _HF_V32_DEFAULTS["q_lora_rank"])
  if not q_lora:
    raise NotImplementedError(f"q_lora_rank={q_lora!r} in a DeepSeek-V3.2 config: the "
                              "indexer projects MLA's query latent; set q_lora_rank > 0.")
  topk = get("index_topk")
  if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
    raise ValueError(f"index_topk={topk!r} in a DeepSeek-V3.2 config must be an integer >= 1.")
  # transformers selects min(index_topk, length) keys: beyond max_position_embeddings
  # every allowed key, as index_topk = max_position_embeddings does (our limit).
  return dict(index_n_heads=get("index_n_heads"), index_head_dim=get("index_head_dim"),
              index_topk=min(topk, max_pos))


def _v3_routing(hf: Mapping[str, Any], get: Callable[[str], Any],
                defaults: Mapping[str, Any] = _HF_DEFAULTS) -> dict[str, int]:
  """n_expert_groups, n_limited_groups and n_mtp_depth of a V3 (or V3.2) config."""
  score_func, norm_topk = get("scoring_func"), bool(get("norm_topk_prob"))
  if score_func == "sigmoid" and not norm_topk:
    raise NotImplementedError(
        "scoring_func='sigmoid' with norm_topk_prob=false: deepseek_jax always "
        "normalises sigmoid gates over the chosen experts (V3 eq. 14).")
  if score_func == "softmax" and norm_topk:
    raise NotImplementedError(
        "scoring_func='softmax' with norm_topk_prob=true: deepseek_jax uses the raw "
        "softmax gates (DeepSeek-V2); set norm_topk_prob=false.")
  n_mtp = int(hf.get("num_nextn_predict_layers", hf.get(
      "num_mtp_layers", defaults["num_nextn_predict_layers"])) or 0)
  return dict(n_expert_groups=hf.get("n_group", _HF_DEFAULTS["n_group"]) or 1,
              n_limited_groups=hf.get("topk_group", _HF_DEFAULTS["topk_group"]) or 1,
              n_mtp_depth=n_mtp)


def _v2_routing(hf: Mapping[str, Any], get: Callable[[str], Any]) -> dict[str, int]:
  """n_expert_groups, n_limited_groups and n_mtp_depth (0) of a V2 config."""
  groups, limited = _v2_groups(hf, get)
  score_func = get("scoring_func")
  if score_func != "softmax":
    raise NotImplementedError(
        f"scoring_func={score_func!r}: DeepSeek-V2 routes by softmax (transformers' "
        "DeepseekV2 router is softmax-only).")
  if get("norm_topk_prob"):
    raise NotImplementedError(
        "norm_topk_prob=true in a DeepSeek-V2 config: transformers' DeepseekV2 ignores "
        "it while DeepSeek's own modeling code renormalises the gates, so the model is "
        "ambiguous; the published V2 models use false.")
  depth = hf.get("num_nextn_predict_layers")
  if depth:
    raise NotImplementedError(
        f"num_nextn_predict_layers={depth} in a DeepSeek-V2 config: V2 has no MTP "
        "layers (transformers' DeepseekV2 would drop them).")
  n_moe = hf["num_hidden_layers"] - min(get("first_k_dense_replace"), hf["num_hidden_layers"])
  if n_moe and get("num_experts_per_tok") is None:
    raise ValueError("config.json lacks num_experts_per_tok (DeepseekV2Config has no "
                     "default); set the number of routed experts per token.")
  return dict(n_expert_groups=groups, n_limited_groups=limited, n_mtp_depth=0)


def _v2_groups(hf: Mapping[str, Any], get: Callable[[str], Any]) -> tuple[int, int]:
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


# ---------------------------------------------------------------------------
# ModelConfig -> config.json
# ---------------------------------------------------------------------------
def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """HF `config.json` dict for `cfg`: DeepseekV4ForCausalLM for arch="v4"
  (hf_v4.py), DeepseekV32ForCausalLM for an MLA
  model with DSA (index_topk > 0; sigmoid router), DeepseekV3ForCausalLM for
  a sigmoid router, DeepseekV2ForCausalLM for a softmax one (V2-shaped: no
  MTP); a dense GQA model as Qwen2ForCausalLM (q/k/v biases) or
  LlamaForCausalLM (hf_dense.py). dsa_stage (training only) is not written.

  Inactive YaRN fields (max_seq_len <= original_seq_len) are not written:
  they have no effect, and HF would apply YaRN at any length.
  """
  if cfg.is_gqa:
    return dense_config_to_hf(cfg)
  if cfg.is_v4:
    return config_to_hf_v4(cfg)
  if cfg.tie_word_embeddings or cfg.rope_type == "llama3":
    field = "tie_word_embeddings=True" if cfg.tie_word_embeddings else "rope_type='llama3'"
    raise NotImplementedError(f"{field} with attention='mla': DeepSeek-V2/V3 checkpoints "
                              "have neither (separate lm_head, YaRN or plain RoPE).")
  v2, v32 = cfg.score_func == "softmax", cfg.use_dsa
  if v32 and v2:
    raise NotImplementedError(
        f"score_func='softmax' with index_topk={cfg.index_topk}: a DSA model is written as "
        "DeepSeek-V3.2, whose router is sigmoid-only; set score_func='sigmoid'.")
  if v2 and cfg.n_mtp_depth:
    raise NotImplementedError(
        f"n_mtp_depth={cfg.n_mtp_depth} with score_func='softmax': a softmax-routed model "
        "is written as DeepSeek-V2, which has no MTP layers; set n_mtp_depth=0 (or use "
        "score_func='sigmoid' for a V3 checkpoint).")
  if cfg.n_mtp_depth and not cfg.n_moe_layers:
    raise NotImplementedError(
        "n_mtp_depth > 0 with no MoE layer: our MTP block is then dense but "
        "transformers' MTP layers are always MoE; set n_mtp_depth=0.")
  rope, legacy = _rope_to_hf(cfg)
  arch, model_type = ((HF_V2_ARCHITECTURE, HF_V2_MODEL_TYPE) if v2 else
                       (HF_V32_ARCHITECTURE, HF_V32_MODEL_TYPE) if v32 else
                       (HF_ARCHITECTURE, HF_MODEL_TYPE))
  out = {
      "architectures": [arch], "model_type": model_type,
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
  if v32:     # V3.2 always interleaves; num_nextn_predict_layers stays (module doc)
    del out["rope_interleave"]
    out.update(index_n_heads=cfg.index_n_heads, index_head_dim=cfg.index_head_dim,
               index_topk=cfg.index_topk)
  return out


def _rope_to_hf(cfg: ModelConfig) -> tuple[dict[str, Any], dict[str, Any] | None]:
  """(rope_parameters, legacy rope_scaling or None) of `cfg`."""
  if not cfg.use_yarn:
    return {"rope_type": "default", "rope_theta": cfg.rope_theta}, None
  rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
          "original_max_position_embeddings": cfg.original_seq_len,
          "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow,
          "mscale": cfg.mscale, "mscale_all_dim": cfg.mscale}
  # Legacy form read by transformers 4 / vLLM (the published config.json).
  legacy = {k: v for k, v in rope.items() if k not in ("rope_type", "rope_theta")}
  legacy["type"] = "yarn"
  return rope, legacy
