"""Hugging Face `config.json` <-> ModelConfig for the dense decoders: Llama and Qwen2.

DeepSeek LLM 7B / 67B are `LlamaForCausalLM` checkpoints, DeepSeek-R1's
distilled students `Qwen2ForCausalLM` (Qwen2.5) and `LlamaForCausalLM`
(Llama-3.1 / 3.3). Both map onto attention="gqa" (model/gqa.py) with every
block dense (n_dense_layers = n_layers, no MoE, no MTP):

  hidden_size, intermediate_size          dim, inter_dim
  num_attention_heads, num_key_value_heads n_heads, n_kv_heads
  head_dim (default hidden / heads)       head_dim (0 when it is the default)
  q/k/v biases (Qwen2 always, Llama never) attention_bias
  tie_word_embeddings                     tie_word_embeddings
  rope_theta, rope_scaling / rope_parameters:
    default                               rope_type "default"
    llama3 (factor, low/high_freq_factor, original_max_position_embeddings)
                                          rope_type "llama3", rope_factor, llama3_*
    yarn (factor, beta_fast/slow, original_max_position_embeddings,
          attention_factor or mscale/mscale_all_dim)
                                          rope_type "yarn", rope_factor, beta_*, mscale
  max_position_embeddings, rms_norm_eps, vocab_size, initializer_range

YaRN: transformers scales cos / sin by the attention factor a, i.e. every
q.k logit by a^2 (the whole head is rotated); ours multiplies the softmax
scale by (0.1 mscale ln(factor) + 1)^2, so mscale = (a - 1) / (0.1 ln factor)
holds the same model. transformers applies YaRN at any length, ours past
original_seq_len only, so a checkpoint whose max_position_embeddings does not
exceed original_max_position_embeddings (Qwen2.5's recommended long-context
config.json) loads with max_seq_len = original * factor: the same function
at every length.

What neither model nor key map holds is refused by name (NotImplementedError):
Llama's attention_bias (it biases o_proj too) and mlp_bias, Qwen2's sliding
windows, activations other than SiLU, partial rotary, other RoPE types.
Keys a config.json omits take transformers' defaults (LlamaConfig /
Qwen2Config).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from deepseek_jax.config import ModelConfig

LLAMA_ARCHITECTURE, LLAMA_MODEL_TYPE = "LlamaForCausalLM", "llama"
QWEN2_ARCHITECTURE, QWEN2_MODEL_TYPE = "Qwen2ForCausalLM", "qwen2"
DENSE_FAMILIES = {LLAMA_MODEL_TYPE: LLAMA_ARCHITECTURE, QWEN2_MODEL_TYPE: QWEN2_ARCHITECTURE}
ROPE_TYPES = ("default", "llama3", "yarn")

# transformers' LlamaConfig / Qwen2Config values for keys a config.json omits
# (num_key_value_heads None = num_attention_heads).
_DEFAULTS = {
    LLAMA_MODEL_TYPE: {"num_key_value_heads": None, "max_position_embeddings": 2048,
                       "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "initializer_range": 0.02},
    QWEN2_MODEL_TYPE: {"num_key_value_heads": 32, "max_position_embeddings": 32768,
                       "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "initializer_range": 0.02},
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads")


# ---------------------------------------------------------------------------
# config.json -> ModelConfig
# ---------------------------------------------------------------------------
def dense_config_from_hf(hf: Mapping[str, Any], model_type: str,
                         **overrides: Any) -> ModelConfig:
  """ModelConfig (attention="gqa", all blocks dense) of a Llama or Qwen2
  config.json dict; `overrides` set fields HF configs do not carry (dtype,
  remat_policy, ...). NotImplementedError names a feature we cannot hold."""
  defaults = _DEFAULTS[model_type]
  missing = [k for k in _REQUIRED if hf.get(k) is None]
  if missing:
    raise ValueError(f"config.json lacks {missing}; it does not describe a "
                     f"{DENSE_FAMILIES[model_type]} model.")

  def get(name):
    value = hf.get(name)
    return defaults[name] if value is None else value

  _refuse_dense(hf, model_type)
  dim, heads, layers = hf["hidden_size"], hf["num_attention_heads"], hf["num_hidden_layers"]
  head_dim = hf.get("head_dim") or 0
  if head_dim and dim % heads == 0 and head_dim == dim // heads:
    head_dim = 0                      # the default: keep presets' head_dim=0
  max_pos = int(get("max_position_embeddings"))
  fields = dict(
      attention="gqa", vocab_size=hf["vocab_size"], dim=dim, inter_dim=hf["intermediate_size"],
      n_layers=layers, n_dense_layers=layers, n_heads=heads,
      n_kv_heads=get("num_key_value_heads") or heads, head_dim=head_dim,
      attention_bias=model_type == QWEN2_MODEL_TYPE,
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      n_mtp_depth=0, n_routed_experts=0, n_shared_experts=0, n_activated_experts=0,
      moe_inter_dim=0, rms_norm_eps=float(get("rms_norm_eps")),
      init_std=float(get("initializer_range")))
  fields.update(_dense_rope_from_hf(hf, max_pos, get("rope_theta")))
  fields.update(overrides)
  return ModelConfig.from_dict(fields)


def _refuse_dense(hf: Mapping[str, Any], model_type: str) -> None:
  """NotImplementedError naming a config.json feature the GQA model lacks."""
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise NotImplementedError(f"hidden_act={act!r} is not supported: the MLP is SwiGLU "
                              "(hidden_act 'silu').")
  if model_type == LLAMA_MODEL_TYPE:
    if hf.get("attention_bias"):
      raise NotImplementedError(
          "attention_bias=true in a Llama config: Llama then biases o_proj too, and "
          "deepseek_jax's attention has q/k/v biases only (Qwen2's layout).")
    if hf.get("mlp_bias"):
      raise NotImplementedError("mlp_bias=true is not supported: the SwiGLU MLP has no "
                                "biases.")
  else:
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    first = hf.get("max_window_layers")
    n_layers, first = hf["num_hidden_layers"], 28 if first is None else first
    sliding = window is not None and any(i >= first for i in range(n_layers))
    if sliding or "sliding_attention" in (hf.get("layer_types") or ()):
      raise NotImplementedError(
          f"use_sliding_window=true (sliding_window={hf.get('sliding_window')}, "
          f"max_window_layers={first}, layer_types): sliding-window attention is not "
          "supported; only full attention (use_sliding_window=false).")


def _rope_dict(hf: Mapping[str, Any]) -> dict[str, Any]:
  """The one RoPE dict of a config.json: legacy `rope_scaling` first (as
  transformers), else `rope_parameters` (nested per layer type: all equal)."""
  rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
  if rope and all(isinstance(v, Mapping) or v is None for v in rope.values()):
    nested = [dict(v) for v in rope.values() if v is not None]
    if any(n != nested[0] for n in nested):
      raise NotImplementedError(f"rope_parameters differ by layer type ({sorted(rope)}): "
                                "one RoPE for every layer is supported.")
    rope = nested[0] if nested else {}
  return dict(rope)


def _dense_rope_from_hf(hf: Mapping[str, Any], max_pos: int, theta) -> dict[str, Any]:
  """ModelConfig RoPE fields of a Llama / Qwen2 config.json (module doc)."""
  rope = _rope_dict(hf)
  theta = float(rope.get("rope_theta", hf.get("rope_theta") or theta))
  kind = rope.get("rope_type", rope.get("type")) or "default"
  partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if partial not in (None, 1, 1.0):
    raise NotImplementedError(f"partial_rotary_factor={partial}: RoPE rotates the whole head.")
  if kind not in ROPE_TYPES:
    raise NotImplementedError(f"rope type {kind!r} is not supported; supported are "
                              f"{ROPE_TYPES}.")
  if kind == "default":
    return {"rope_type": "default", "rope_theta": theta, "original_seq_len": max_pos,
            "max_seq_len": max_pos}
  orig = int(rope.get("original_max_position_embeddings") or max_pos)
  factor = float(rope.get("factor") or max_pos / orig)
  if kind == "llama3":
    return {"rope_type": "llama3", "rope_theta": theta, "rope_factor": factor,
            "llama3_low_freq_factor": float(rope.get("low_freq_factor", 1.0)),
            "llama3_high_freq_factor": float(rope.get("high_freq_factor", 4.0)),
            "original_seq_len": orig, "max_seq_len": max_pos}
  if rope.get("truncate", True) is False:
    raise NotImplementedError("yarn 'truncate': false (un-rounded correction range) is not "
                              "implemented; deepseek_jax rounds the range (truncate: true).")
  if not factor > 1:
    raise NotImplementedError(f"yarn factor={factor}: deepseek_jax's YaRN needs factor > 1.")
  attention_factor = rope.get("attention_factor")
  mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
  if attention_factor is None and not (mscale and mscale_all):
    ours = 1.0                        # transformers' default factor: 0.1 ln(factor) + 1
  else:
    if attention_factor is None:
      attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
    # rounded so that a written attention factor reads back as the same mscale
    ours = round((float(attention_factor) - 1.0) / (0.1 * math.log(factor)), 12)
  return {"rope_type": "yarn", "rope_theta": theta, "rope_factor": factor,
          "original_seq_len": orig, "max_seq_len": max(max_pos, math.ceil(orig * factor)),
          "beta_fast": float(rope.get("beta_fast") or 32.0),
          "beta_slow": float(rope.get("beta_slow") or 1.0),
          "mscale": ours}


def _yarn_mscale(factor: float, mscale: float) -> float:
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


# ---------------------------------------------------------------------------
# ModelConfig -> config.json
# ---------------------------------------------------------------------------
def dense_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """The config.json of a dense GQA model: Qwen2ForCausalLM when it has q/k/v
  biases, LlamaForCausalLM otherwise; NotImplementedError naming what no
  such checkpoint holds (MoE layers, MTP)."""
  if cfg.n_moe_layers or cfg.n_mtp_depth:
    raise NotImplementedError(
        f"attention='gqa' with n_moe_layers={cfg.n_moe_layers}, n_mtp_depth="
        f"{cfg.n_mtp_depth}: HF export writes dense Llama / Qwen2 checkpoints only "
        "(n_dense_layers = n_layers, n_mtp_depth = 0).")
  if cfg.rope_type == "yarn" and cfg.use_yarn and cfg.rope_factor <= 1:
    raise NotImplementedError(f"rope_factor={cfg.rope_factor}: an active YaRN with factor "
                              "<= 1 has no transformers equivalent; use rope_type='default'.")
  qwen = cfg.attention_bias
  if not qwen and cfg.dim % cfg.n_heads:
    raise NotImplementedError(
        f"dim={cfg.dim} is not a multiple of n_heads={cfg.n_heads}: transformers' "
        "LlamaConfig refuses that (with head_dim set or not); only Qwen2 (attention_bias"
        "=True) allows it.")
  rope, legacy = _dense_rope_to_hf(cfg)
  model_type = QWEN2_MODEL_TYPE if qwen else LLAMA_MODEL_TYPE
  out = {
      "architectures": [DENSE_FAMILIES[model_type]], "model_type": model_type,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.inter_dim,
      "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.gqa_head_dim,
      "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.rms_norm_eps,
      "rope_theta": cfg.rope_theta, "rope_parameters": rope, "rope_scaling": legacy,
      "tie_word_embeddings": cfg.tie_word_embeddings, "hidden_act": "silu",
      "initializer_range": cfg.init_std, "dtype": cfg.param_dtype,
  }
  if qwen:
    out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
  else:
    out.update(attention_bias=False, mlp_bias=False)
  return out


def _dense_rope_to_hf(cfg: ModelConfig) -> tuple[dict[str, Any], dict[str, Any] | None]:
  """(rope_parameters, legacy rope_scaling or None) of a GQA cfg."""
  if cfg.rope_type == "llama3":
    rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
            "low_freq_factor": cfg.llama3_low_freq_factor,
            "high_freq_factor": cfg.llama3_high_freq_factor,
            "original_max_position_embeddings": cfg.original_seq_len}
  elif cfg.use_yarn:
    rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
            "original_max_position_embeddings": cfg.original_seq_len,
            "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow,
            "attention_factor": _yarn_mscale(cfg.rope_factor, cfg.mscale)}
  else:                      # "default", or a YaRN that never switches on
    return {"rope_type": "default", "rope_theta": cfg.rope_theta}, None
  return rope, {k: v for k, v in rope.items() if k != "rope_theta"}
