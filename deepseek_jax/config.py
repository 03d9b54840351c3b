"""Model hyperparameters: one frozen dataclass with DeepSeek-V3's own field names.

Field names follow `ModelArgs` in DeepSeek-V3's `inference/model.py`, so a config
reads the same as the official code and maps 1:1 onto HF `config.json` files
(see `deepseek_jax.interop.hf_config`). `validate()` runs on construction: an
impossible combination fails here, naming the field and the fix, long before
anything is traced or compiled.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from typing import Any

_DTYPES = ("float32", "bfloat16", "float16")
_SCORE_FUNCS = ("sigmoid", "softmax", "sqrtsoftplus")
_ARCHS = ("v3", "v4")
V4_LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention",
                  "heavily_compressed_attention")
V4_MLP_LAYER_TYPES = ("hash_moe", "moe")
_MOE_IMPLS = ("auto", "blocked", "ragged", "dense")
_REMAT = ("none", "full", "dots_saveable")
_ATTENTIONS = ("mla", "gqa")
_ROPE_TYPES = ("default", "yarn", "llama3")
_DSA_STAGES = ("off", "warmup", "sparse")
FP8_LAYER_KINDS = ("attn", "mlp", "experts")


def check_field_names(cls, values: dict[str, Any]) -> None:
  """ValueError for a key of `values` that is not a field of dataclass `cls`,
  with the closest field name as a hint. Shared by every config's from_dict."""
  names = [f.name for f in dataclasses.fields(cls)]
  for key in values:
    if key not in names:
      hint = difflib.get_close_matches(key, names, n=1)
      raise ValueError(f"Unknown {cls.__name__} field {key!r}"
                       + (f"; did you mean {hint[0]!r}?" if hint else f"; fields: {names}"))


def check_ints(obj, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()
               ) -> None:
  """ValueError naming the first field of `obj` that is not an int > 0
  (`positive`) or >= 0 (`non_negative`); bools are refused."""
  for names, low, what in ((positive, 1, "a positive"), (non_negative, 0, "a non-negative")):
    for name in names:
      v = getattr(obj, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise ValueError(f"{name}={v!r} must be {what} integer.")


def split_names(value) -> tuple[str, ...]:
  """("a", "b") from "a,b" (what a command line gives) or from ("a", "b")."""
  parts = (value,) if isinstance(value, str) else value
  return tuple(k.strip() for part in parts for k in str(part).split(",") if k.strip())


# Sizes the kernels pick and the planner (parallel/plan.py, a lower layer than
# model/ and train/) counts: one definition here.
VOCAB_CHUNK = 8192   # vocabulary columns per step of the chunked cross-entropy (train/losses.py)


def default_moe_block_size(n_rows: int, n_experts: int) -> int:
  """Rows per block of the blocked expert kernel (model/moe.py): a power of
  two near (rows per expert)/8, within [8, 128]: small enough that padding
  (< one block per expert) stays cheap, big enough for efficient GEMMs."""
  target = max(n_rows // max(n_experts, 1) // 8, 1)
  return int(min(128, max(8, 2 ** int(math.log2(target)))))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """DeepSeek-V3-family model shape, or a dense Llama-style decoder.

  Attributes (official names; HF `config.json` names in brackets):
    vocab_size: tokenizer size [vocab_size].
    dim: model width [hidden_size].
    inter_dim: hidden width of the dense SwiGLU MLP layers [intermediate_size].
    moe_inter_dim: hidden width of each routed/shared expert [moe_intermediate_size].
    n_layers: transformer blocks, dense then MoE [num_hidden_layers].
    n_dense_layers: the first `n_dense_layers` blocks use a dense MLP
      [first_k_dense_replace].
    n_heads: attention heads [num_attention_heads].
    n_routed_experts: routed experts per MoE layer [n_routed_experts].
    n_shared_experts: always-on experts, fused into one FFN of width
      n_shared_experts * moe_inter_dim [n_shared_experts].
    n_activated_experts: top-k routed experts per token [num_experts_per_tok].
    n_expert_groups: experts are split into this many groups [n_group].
    n_limited_groups: each token may only pick experts from this many groups
      (device-limited routing) [topk_group].
    score_func: "sigmoid" (V3: gates normalised over the chosen experts) or
      "softmax" (V2: gates are the raw softmax probabilities).
    route_scale: gates are multiplied by this [routed_scaling_factor].
    q_lora_rank: rank of the query compression; 0 or None = direct W_q
      projection (V2-Lite) [q_lora_rank].
    kv_lora_rank: rank of the joint KV compression c_kv [kv_lora_rank].
    qk_nope_head_dim / qk_rope_head_dim / v_head_dim: per-head dims of the
      non-rotary query/key part, the (shared) rotary part, and the values.
    original_seq_len: context the RoPE frequencies were trained for
      [rope_scaling.original_max_position_embeddings].
    rope_theta: RoPE base.
    rope_factor / beta_fast / beta_slow / mscale: YaRN context extension; only
      active when max_seq_len > original_seq_len (as in the official code).
    max_seq_len: longest sequence the model accepts [max_position_embeddings].
    n_mtp_depth: number of sequential Multi-Token-Prediction modules D
      [num_nextn_predict_layers].
    rms_norm_eps: RMSNorm epsilon.
    init_std: normal init std for weights (V3 used 0.006).
    dtype: activation/compute dtype; param_dtype: parameter storage dtype.
      On CPU keep float32 (XLA:CPU runs bf16 matmuls slower than f32).
    moe_impl: grouped-matmul kernel for dropless MoE: "blocked" (sorted rows
      padded per expert to `moe_block_size`, a grouped matmul over the used
      blocks, model/grouped_matmul.py: the CPU kernel and the portable
      default), "ragged" (`jax.lax.ragged_dot`: TPU's grouped kernel; a dense
      masked dot on XLA:CPU), "dense" (every expert on every token, masked:
      an exact but E/k-times costlier reference), or "auto" (blocked except
      on TPU; dense for a handful of decode tokens).
    moe_block_size: row block for the "blocked" kernel (0 = choose from shape).
    moe_ep_capacity: expert-parallel exchange (parallel/expert.py): room per
      destination device, as a multiple of the even share (a device's routed
      rows / EP degree). A step whose busiest device pair needs more sends
      the rest in extra rounds of the same size, so routing is dropless and
      exact whatever the value; 0 = one round with room for every row. Not a
      model property: a speed/memory knob (traffic scales with it).
    fp8: run the linear layers named in `fp8_layers` through FP8 GEMMs
      (deepseek_jax.fp8.fp8_dot, DeepSeek-V3's recipe: 1x128 activation
      tiles, 128x128 weight blocks, FP8 fprop/dgrad/wgrad; emulated exactly
      off Hopper). The embedding, output head, MoE gate, norms, the
      attention core and the MTP projection stay in `dtype`, as in V3.
    fp8_layers: comma-separated subset of "attn" (MLA's projections), "mlp"
      (dense MLPs and shared experts), "experts" (routed experts).
    remat_policy: activation checkpointing of each block: "none", "full"
      (recompute everything in the backward pass) or "dots_saveable".
    attn_block_size: training / prefill attention over sequences longer than
      this runs blockwise in [block, block] tiles (model/attention.py:
      temporaries linear in the sequence); shorter ones, or all when 0, run
      the naive [seq, seq] form. A speed/memory knob, not a model property.
    attention: "mla" (Multi-head Latent Attention, model/mla.py: the
      DeepSeek-V2/V3 family) or "gqa" (grouped-query attention,
      model/gqa.py: DeepSeek LLM, Llama, Qwen2). The MLA fields (q_lora_rank,
      kv_lora_rank, qk_*_head_dim, v_head_dim) are unused under "gqa", and
      the GQA ones (n_kv_heads, head_dim, attention_bias) under "mla". A
      dense decoder is attention="gqa", n_dense_layers=n_layers (every block
      the SwiGLU MLP of width inter_dim), n_mtp_depth=0. GQA blocks may also
      carry MoE FFNs (the FFN does not depend on the attention).
    n_kv_heads: GQA key/value heads, dividing n_heads; 0 = n_heads (plain
      multi-head attention) [num_key_value_heads].
    head_dim: GQA per-head width of q, k and v; 0 = dim // n_heads [head_dim].
    attention_bias: GQA q/k/v projections carry biases (Qwen2); the output
      projection never does [attention_bias; Qwen2 always].
    tie_word_embeddings: the output head is the embedding matrix, transposed
      (no `head` parameter) [tie_word_embeddings].
    rope_type: RoPE frequency scaling [rope_scaling.rope_type]: "yarn"
      (DeepSeek's YaRN with rope_factor, beta_fast, beta_slow, mscale; active
      only when max_seq_len > original_seq_len, as in the official code),
      "default" (plain RoPE) or "llama3" (Llama 3.1's band-wise scaling:
      wavelengths above original_seq_len / llama3_low_freq_factor divided
      by rope_factor, below original_seq_len / llama3_high_freq_factor kept,
      a smooth ramp between; always on). RoPE rotates interleaved channel
      pairs under "mla" (DeepSeek's layout) and the two halves of the head
      (Llama's rotate_half) under "gqa".
    llama3_low_freq_factor / llama3_high_freq_factor: the "llama3" bands
      [rope_scaling.low_freq_factor / high_freq_factor].
    index_topk: DeepSeek Sparse Attention (V3.2, model/dsa.py): each query
      attends only to the `index_topk` earlier tokens its lightning indexer
      scores highest [index_topk]; 0 or None = dense MLA (V3), and no
      indexer parameters exist. Needs attention="mla" with a query LoRA.
    index_n_heads / index_head_dim: the indexer's query heads and their
      width (one shared key of index_head_dim; its first qk_rope_head_dim
      channels carry RoPE) [index_n_heads / index_head_dim].
    dsa_stage: how a DSA model trains its indexer (the V3.2 report's
      continued pre-training; not a model property, the trainer sets it):
      "off" (no indexer loss;
      the indexer gets no gradient), "warmup" (dense attention, the
      indexer's KL to the heads' summed attention over all earlier tokens
      in each block's aux), "sparse" (sparse attention, that KL over the
      selected tokens). In both loss stages the indexer's inputs are
      detached, so the KL trains only the indexer.
  """

  vocab_size: int = 102400
  dim: int = 2048
  inter_dim: int = 10944
  moe_inter_dim: int = 1408
  n_layers: int = 27
  n_dense_layers: int = 1
  n_heads: int = 16
  n_routed_experts: int = 64
  n_shared_experts: int = 2
  n_activated_experts: int = 6
  n_expert_groups: int = 1
  n_limited_groups: int = 1
  score_func: str = "softmax"
  route_scale: float = 1.0
  q_lora_rank: int | None = 0
  kv_lora_rank: int = 512
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = 64
  v_head_dim: int = 128
  original_seq_len: int = 4096
  rope_theta: float = 10000.0
  rope_factor: float = 40.0
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float = 1.0
  max_seq_len: int = 4096
  n_mtp_depth: int = 0
  rms_norm_eps: float = 1e-6
  init_std: float = 0.006
  dtype: str = "float32"
  param_dtype: str = "float32"
  moe_impl: str = "auto"
  moe_block_size: int = 0
  moe_ep_capacity: float = 2.0
  fp8: bool = False
  fp8_layers: str = "attn,mlp,experts"
  remat_policy: str = "none"
  attn_block_size: int = 256
  attention: str = "mla"
  n_kv_heads: int = 0
  head_dim: int = 0
  attention_bias: bool = False
  tie_word_embeddings: bool = False
  rope_type: str = "yarn"
  llama3_low_freq_factor: float = 1.0
  llama3_high_freq_factor: float = 4.0
  index_n_heads: int = 0
  index_head_dim: int = 0
  index_topk: int | None = 0
  dsa_stage: str = "off"
  arch: str = "v3"
  hc_mult: int = 4
  hc_sinkhorn_iters: int = 20
  hc_eps: float = 1e-6
  o_groups: int = 8
  o_lora_rank: int = 1024
  partial_rotary_factor: float = 0.125
  compress_rope_theta: float = 160000.0
  sliding_window: int = 128
  compress_rate_csa: int = 4
  compress_rate_hca: int = 128
  layer_types: tuple[str, ...] = ()
  mlp_layer_types: tuple[str, ...] = ()
  swiglu_limit: float = 0.0

  def __post_init__(self):
    for name in ("layer_types", "mlp_layer_types"):     # lists from JSON: hashable tuples
      if isinstance(getattr(self, name), list):
        object.__setattr__(self, name, tuple(getattr(self, name)))
    self.validate()

  # ---- derived quantities -------------------------------------------------
  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def use_q_lora(self) -> bool:
    return bool(self.q_lora_rank)

  @property
  def n_moe_layers(self) -> int:
    return self.n_layers - self.n_dense_layers

  @property
  def use_yarn(self) -> bool:
    """YaRN is applied only past the original context (official model.py)."""
    return self.rope_type == "yarn" and self.max_seq_len > self.original_seq_len

  @property
  def use_dsa(self) -> bool:
    """DeepSeek Sparse Attention on (index_topk > 0): MLA has an indexer."""
    return bool(self.index_topk)

  @property
  def is_v4(self) -> bool:
    return self.arch == "v4"

  @property
  def v4_rope_dim(self) -> int:
    """V4: channels RoPE rotates at the end of each head (and indexer head)."""
    return int(self.head_dim * self.partial_rotary_factor)

  @property
  def is_gqa(self) -> bool:
    return self.attention == "gqa"

  @property
  def kv_heads(self) -> int:
    """GQA key/value heads (n_kv_heads, or n_heads when 0)."""
    return self.n_kv_heads or self.n_heads

  @property
  def gqa_head_dim(self) -> int:
    """GQA per-head width (head_dim, or dim // n_heads when 0)."""
    return self.head_dim or self.dim // self.n_heads

  @property
  def rope_dim(self) -> int:
    """Channels RoPE rotates per head: MLA's rotary part, GQA's whole head."""
    return self.gqa_head_dim if self.is_gqa else self.qk_rope_head_dim

  @property
  def softmax_scale(self) -> float:
    """(d_nope + d_rope)^-0.5 (MLA) or head_dim^-0.5 (GQA), times mscale^2
    under YaRN (V3 inference code; HF's YaRN attention factor squared)."""
    scale = (self.gqa_head_dim if self.is_gqa else self.qk_head_dim) ** -0.5
    if self.use_yarn and self.rope_factor > 1.0:
      m = 0.1 * self.mscale * math.log(self.rope_factor) + 1.0
      scale *= m * m
    return scale

  # ---- validation ---------------------------------------------------------
  def validate(self) -> None:
    """Raises ValueError naming the field and the fix for impossible configs."""
    check_ints(self, positive=("vocab_size", "dim", "inter_dim", "n_layers", "n_heads",
                               "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                               "v_head_dim", "original_seq_len", "max_seq_len"),
               non_negative=("n_dense_layers", "n_shared_experts", "n_mtp_depth",
                             "moe_block_size", "n_routed_experts", "n_activated_experts",
                             "moe_inter_dim", "n_expert_groups", "n_limited_groups",
                             "attn_block_size"))
    if self.q_lora_rank is not None and (
        not isinstance(self.q_lora_rank, int) or self.q_lora_rank < 0):
      raise ValueError(
          f"q_lora_rank={self.q_lora_rank!r} must be a non-negative integer "
          "(0 or None for a direct query projection).")
    if self.n_dense_layers > self.n_layers:
      raise ValueError(
          f"n_dense_layers={self.n_dense_layers} exceeds n_layers={self.n_layers}; "
          "set n_dense_layers <= n_layers.")
    if self.qk_rope_head_dim % 2:
      raise ValueError(
          f"qk_rope_head_dim={self.qk_rope_head_dim} must be even: RoPE rotates "
          "pairs of channels.")
    if self.arch not in _ARCHS:
      raise ValueError(f"arch={self.arch!r} must be one of {_ARCHS}.")
    if not self.swiglu_limit >= 0:
      raise ValueError(f"swiglu_limit={self.swiglu_limit} must be >= 0 (0 = no clamp).")
    if self.is_v4:
      self._validate_v4()
    else:
      self._validate_attention()
      self._validate_dsa()
    if self.n_moe_layers > 0:
      self._validate_moe()
    if self.score_func not in _SCORE_FUNCS:
      raise ValueError(f"score_func={self.score_func!r} must be one of {_SCORE_FUNCS}.")
    if not self.route_scale > 0:
      raise ValueError(f"route_scale={self.route_scale} must be > 0.")
    if not self.rope_theta > 0:
      raise ValueError(f"rope_theta={self.rope_theta} must be > 0.")
    if self.use_yarn:
      if not self.rope_factor >= 1.0:
        raise ValueError(
            f"rope_factor={self.rope_factor} must be >= 1 when max_seq_len="
            f"{self.max_seq_len} > original_seq_len={self.original_seq_len} (YaRN).")
      if not self.beta_fast > self.beta_slow > 0:
        raise ValueError(
            f"beta_fast={self.beta_fast}, beta_slow={self.beta_slow}: YaRN needs "
            "beta_fast > beta_slow > 0.")
    if not self.rms_norm_eps > 0:
      raise ValueError(f"rms_norm_eps={self.rms_norm_eps} must be > 0.")
    if not self.init_std > 0:
      raise ValueError(f"init_std={self.init_std} must be > 0.")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ValueError(f"{name}={getattr(self, name)!r} must be one of {_DTYPES}.")
    if not (self.moe_ep_capacity == 0 or self.moe_ep_capacity >= 1):
      raise ValueError(f"moe_ep_capacity={self.moe_ep_capacity} must be 0 (room for every "
                       "row) or >= 1 (a multiple of the even share per destination).")
    kinds = [k.strip() for k in self.fp8_layers.split(",") if k.strip()]
    if not isinstance(self.fp8, bool) or any(k not in FP8_LAYER_KINDS for k in kinds):
      raise ValueError(f"fp8={self.fp8!r}, fp8_layers={self.fp8_layers!r}: fp8 is a bool and "
                       f"fp8_layers a comma-separated subset of {FP8_LAYER_KINDS}.")
    if self.fp8 and "experts" in kinds and self.moe_impl == "ragged":
      raise ValueError("moe_impl='ragged' has no FP8 path (jax.lax.ragged_dot takes no "
                       "block scales); use moe_impl='blocked' or 'auto' with fp8=True, or "
                       "drop 'experts' from fp8_layers.")
    if self.moe_impl not in _MOE_IMPLS:
      raise ValueError(f"moe_impl={self.moe_impl!r} must be one of {_MOE_IMPLS}.")
    if self.remat_policy not in _REMAT:
      raise ValueError(f"remat_policy={self.remat_policy!r} must be one of {_REMAT}.")

  def _validate_attention(self) -> None:
    """The attention / RoPE-scaling fields (ModelConfig doc)."""
    if self.attention not in _ATTENTIONS:
      raise ValueError(f"attention={self.attention!r} must be one of {_ATTENTIONS}.")
    if self.rope_type not in _ROPE_TYPES:
      raise ValueError(f"rope_type={self.rope_type!r} must be one of {_ROPE_TYPES}.")
    check_ints(self, non_negative=("n_kv_heads", "head_dim"))
    for name in ("attention_bias", "tie_word_embeddings"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name}={getattr(self, name)!r} must be a bool.")
    if self.rope_type == "llama3":
      if not self.rope_factor >= 1.0:
        raise ValueError(f"rope_factor={self.rope_factor} must be >= 1 with rope_type="
                         "'llama3' (its rope_scaling.factor).")
      if not self.llama3_high_freq_factor > self.llama3_low_freq_factor > 0:
        raise ValueError(
            f"llama3_low_freq_factor={self.llama3_low_freq_factor}, llama3_high_freq_factor="
            f"{self.llama3_high_freq_factor}: rope_type='llama3' needs high > low > 0.")
    if not self.is_gqa:
      if self.attention_bias:
        raise ValueError("attention_bias=True needs attention='gqa' (MLA's projections "
                         "have no biases); set attention='gqa' or attention_bias=False.")
      return
    if self.n_heads % self.kv_heads:
      raise ValueError(
          f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}: "
          "each key/value head serves n_heads / n_kv_heads query heads; pick n_kv_heads "
          "dividing n_heads (0 = n_heads).")
    if not self.head_dim and self.dim % self.n_heads:
      raise ValueError(f"dim={self.dim} is not a multiple of n_heads={self.n_heads}; set "
                       "head_dim explicitly.")
    if self.gqa_head_dim % 2:
      raise ValueError(f"head_dim={self.gqa_head_dim} must be even: RoPE rotates the two "
                       "halves of each head.")

  def _validate_dsa(self) -> None:
    """The DeepSeek Sparse Attention fields (ModelConfig doc)."""
    if self.index_topk is not None and (not isinstance(self.index_topk, int)
                                        or isinstance(self.index_topk, bool)
                                        or self.index_topk < 0):
      raise ValueError(f"index_topk={self.index_topk!r} must be a non-negative integer "
                       "(0 or None = dense attention).")
    check_ints(self, non_negative=("index_n_heads", "index_head_dim"))
    if self.dsa_stage not in _DSA_STAGES:
      raise ValueError(f"dsa_stage={self.dsa_stage!r} must be one of {_DSA_STAGES}.")
    if not self.use_dsa:
      if self.dsa_stage != "off":
        raise ValueError(f"dsa_stage={self.dsa_stage!r} trains a DSA indexer; set "
                         "index_topk > 0 or dsa_stage='off'.")
      return
    if self.is_gqa:
      raise ValueError(f"index_topk={self.index_topk} (DeepSeek Sparse Attention) needs "
                       "attention='mla'; set index_topk=0 for attention='gqa'.")
    if not self.use_q_lora:
      raise ValueError(f"index_topk={self.index_topk}: the DSA indexer projects MLA's query "
                       "latent; set q_lora_rank > 0 or index_topk=0.")
    if self.index_topk > self.max_seq_len:
      raise ValueError(f"index_topk={self.index_topk} exceeds max_seq_len={self.max_seq_len}; "
                       "lower index_topk (or 0 for dense attention).")
    if self.index_n_heads < 1:
      raise ValueError(f"index_n_heads={self.index_n_heads} must be >= 1 with index_topk="
                       f"{self.index_topk}.")
    if self.index_head_dim < self.qk_rope_head_dim:
      raise ValueError(f"index_head_dim={self.index_head_dim} must be >= qk_rope_head_dim="
                       f"{self.qk_rope_head_dim}: the indexer's first qk_rope_head_dim "
                       "channels carry RoPE.")

  def _validate_v4(self) -> None:
    """The DeepSeek-V4 fields (ModelConfig doc: arch="v4")."""
    check_ints(self, positive=("hc_mult", "hc_sinkhorn_iters", "o_groups", "o_lora_rank",
                               "sliding_window", "compress_rate_csa", "compress_rate_hca",
                               "head_dim", "q_lora_rank"),
               non_negative=("index_n_heads", "index_head_dim"))
    for name, types, allowed in (("layer_types", self.layer_types, V4_LAYER_TYPES),
                                 ("mlp_layer_types", self.mlp_layer_types,
                                  V4_MLP_LAYER_TYPES)):
      if not isinstance(types, tuple) or len(types) != self.n_layers:
        raise ValueError(f"{name} must be a tuple of n_layers={self.n_layers} entries; got "
                         f"{types!r}.")
      bad = [t for t in types if t not in allowed]
      if bad:
        raise ValueError(f"{name} entry {bad[0]!r} is not a V4 layer type; use one of "
                         f"{allowed}.")
    if self.n_dense_layers or self.n_expert_groups != 1:
      raise ValueError(f"n_dense_layers={self.n_dense_layers}, n_expert_groups="
                       f"{self.n_expert_groups}: a V4 model has MoE in every layer and one "
                       "expert group; set n_dense_layers=0, n_expert_groups=1.")
    if self.n_shared_experts != 1:
      raise ValueError(f"n_shared_experts={self.n_shared_experts}: V4 has one shared expert "
                       "of width moe_inter_dim; set n_shared_experts=1.")
    if self.tie_word_embeddings or self.attention_bias:
      raise ValueError("tie_word_embeddings / attention_bias are not V4 options; set both "
                       "False.")
    if self.dsa_stage != "off":
      raise ValueError(f"dsa_stage={self.dsa_stage!r}: V4's indexer has no training loss "
                       "here yet; set dsa_stage='off'.")
    if not self.hc_eps > 0:
      raise ValueError(f"hc_eps={self.hc_eps} must be > 0.")
    rd = self.v4_rope_dim
    if rd < 2 or rd % 2 or rd > self.head_dim:
      raise ValueError(f"partial_rotary_factor={self.partial_rotary_factor} gives "
                       f"{rd} rotary channels of head_dim={self.head_dim}; it must be an even "
                       "number in [2, head_dim].")
    if (self.n_heads * self.head_dim) % self.o_groups:
      raise ValueError(f"o_groups={self.o_groups} must divide n_heads * head_dim = "
                       f"{self.n_heads * self.head_dim}.")
    if self.rope_type not in ("default", "yarn"):
      raise ValueError(f"rope_type={self.rope_type!r}: V4 supports 'default' or 'yarn' (on "
                       "the compressed layers).")
    if not (self.rope_theta > 0 and self.compress_rope_theta > 0):
      raise ValueError("rope_theta and compress_rope_theta must be > 0.")
    if "compressed_sparse_attention" in self.layer_types:
      if not self.index_topk or self.index_n_heads < 1 or self.index_head_dim < rd:
        raise ValueError(
            f"layer_types has compressed_sparse_attention: it needs index_topk > 0, "
            f"index_n_heads >= 1 and index_head_dim >= the {rd} rotary channels; got "
            f"index_topk={self.index_topk}, index_n_heads={self.index_n_heads}, "
            f"index_head_dim={self.index_head_dim}.")
      if self.index_topk > self.max_seq_len:
        raise ValueError(f"index_topk={self.index_topk} exceeds max_seq_len="
                         f"{self.max_seq_len}; lower index_topk.")

  def _validate_moe(self) -> None:
    e, k = self.n_routed_experts, self.n_activated_experts
    g, lg = self.n_expert_groups, self.n_limited_groups
    where = f"(n_layers - n_dense_layers = {self.n_moe_layers} MoE layers)"
    if e < 1 or self.moe_inter_dim < 1:
      raise ValueError(
          f"n_routed_experts={e}, moe_inter_dim={self.moe_inter_dim} must be >= 1 "
          f"{where}; or set n_dense_layers=n_layers for a dense model.")
    if not 1 <= k <= e:
      raise ValueError(
          f"n_activated_experts={k} must be in [1, n_routed_experts={e}].")
    if g < 1 or e % g:
      raise ValueError(
          f"n_expert_groups={g} must divide n_routed_experts={e}.")
    if not 1 <= lg <= g:
      raise ValueError(
          f"n_limited_groups={lg} must be in [1, n_expert_groups={g}].")
    if g > 1 and e // g < 2 and self.score_func == "sigmoid":
      raise ValueError(
          f"n_routed_experts/n_expert_groups={e // g}: sigmoid routing scores a group "
          "by its top-2 experts, so groups need >= 2 experts; use fewer groups.")
    if lg * (e // g) < k:
      raise ValueError(
          f"n_limited_groups={lg} groups x {e // g} experts/group < "
          f"n_activated_experts={k}: a token could not find k experts; raise "
          "n_limited_groups or lower n_activated_experts.")

  # ---- conversion ---------------------------------------------------------
  def replace(self, **changes: Any) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def fp8_for(self, kind: str) -> bool:
    """Whether layers of `kind` ("attn", "mlp", "experts") run in FP8."""
    return self.fp8 and kind in [k.strip() for k in self.fp8_layers.split(",")]

  def to_dict(self) -> dict[str, Any]:
    """The fields as JSON holds them (layer_types / mlp_layer_types as lists)."""
    out = dataclasses.asdict(self)
    for name in ("layer_types", "mlp_layer_types"):
      out[name] = list(out[name])
    return out

  @classmethod
  def from_dict(cls, values: dict[str, Any], base: "ModelConfig | None" = None
                ) -> "ModelConfig":
    """Builds a config from field values (unknown names raise, with a hint)."""
    check_field_names(cls, values)
    base = base if base is not None else cls()
    return dataclasses.replace(base, **values)

  @classmethod
  def from_json(cls, path: str) -> "ModelConfig":
    with open(path) as f:
      try:
        values = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}).") from None
    if not isinstance(values, dict):
      raise ValueError(f"{path}: expected a JSON object of ModelConfig fields, got "
                       f"{type(values).__name__}.")
    preset = values.pop("preset", None)
    try:
      return cls.from_dict(values, base=get_preset(preset) if preset else None)
    except (ValueError, NotImplementedError) as e:   # a field: name the file too
      kind = NotImplementedError if isinstance(e, NotImplementedError) else ValueError
      raise kind(f"{path}: {e}") from None


# --------------------------------------------------------------------------
# Presets. "tiny" is for tests, "small" for the CPU demo; the two big ones are
# the published shapes (checked with jax.eval_shape only).
# --------------------------------------------------------------------------
def _tiny() -> ModelConfig:
  return ModelConfig(
      vocab_size=256, dim=64, inter_dim=128, moe_inter_dim=32, n_layers=3,
      n_dense_layers=1, n_heads=4, n_routed_experts=8, n_shared_experts=1,
      n_activated_experts=2, n_expert_groups=4, n_limited_groups=2,
      score_func="sigmoid", route_scale=2.5, q_lora_rank=32, kv_lora_rank=32,
      qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
      original_seq_len=128, max_seq_len=128, n_mtp_depth=1, init_std=0.02)


def _small() -> ModelConfig:
  return ModelConfig(
      vocab_size=128, dim=128, inter_dim=384, moe_inter_dim=64, n_layers=4,
      n_dense_layers=1, n_heads=4, n_routed_experts=8, n_shared_experts=1,
      n_activated_experts=2, n_expert_groups=2, n_limited_groups=1,
      score_func="sigmoid", route_scale=2.5, q_lora_rank=64, kv_lora_rank=32,
      qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
      original_seq_len=256, max_seq_len=256, n_mtp_depth=1, init_std=0.02)


def _v2_lite_16b() -> ModelConfig:
  # DeepSeek-V2-Lite (and Coder-V2-Lite): the published config.json field by
  # field: 15.7B total / 2.4B active, softmax routing over all 64 experts
  # (topk_method greedy), no q LoRA, YaRN x40 from 4K (mscale 0.707).
  return ModelConfig(
      vocab_size=102400, dim=2048, inter_dim=10944, moe_inter_dim=1408,
      n_layers=27, n_dense_layers=1, n_heads=16, n_routed_experts=64,
      n_shared_experts=2, n_activated_experts=6, n_expert_groups=1,
      n_limited_groups=1, score_func="softmax", route_scale=1.0, q_lora_rank=0,
      kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
      v_head_dim=128, original_seq_len=4096, rope_theta=10000.0, rope_factor=40.0,
      beta_fast=32.0, beta_slow=1.0, mscale=0.707, max_seq_len=163840, n_mtp_depth=0,
      rms_norm_eps=1e-6, init_std=0.02, dtype="bfloat16", param_dtype="float32",
      remat_policy="full")


def _v2_236b() -> ModelConfig:
  # DeepSeek-V2 (and V2-Chat / V2.5): 236B total / 21B active, 160 experts in
  # 8 device groups of which each token may use 3 (topk_method
  # group_limited_greedy), gates scaled by 16.
  return _v2_lite_16b().replace(
      dim=5120, inter_dim=12288, moe_inter_dim=1536, n_layers=60, n_heads=128,
      n_routed_experts=160, n_expert_groups=8, n_limited_groups=3, route_scale=16.0,
      q_lora_rank=1536)


def _v3_671b() -> ModelConfig:
  return ModelConfig(
      vocab_size=129280, dim=7168, inter_dim=18432, moe_inter_dim=2048,
      n_layers=61, n_dense_layers=3, n_heads=128, n_routed_experts=256,
      n_shared_experts=1, n_activated_experts=8, n_expert_groups=8,
      n_limited_groups=4, score_func="sigmoid", route_scale=2.5,
      q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
      qk_rope_head_dim=64, v_head_dim=128, original_seq_len=4096,
      rope_theta=10000.0, rope_factor=40.0, beta_fast=32.0, beta_slow=1.0,
      mscale=1.0, max_seq_len=4096 * 4, n_mtp_depth=1, dtype="bfloat16",
      param_dtype="float32", remat_policy="full")


def _v32_671b() -> ModelConfig:
  # DeepSeek-V3.2 (-Exp): V3's shape plus DeepSeek Sparse Attention's lightning
  # indexer (64 heads x 128, top-2048), published max_position_embeddings.
  return _v3_671b().replace(index_n_heads=64, index_head_dim=128, index_topk=2048,
                            max_seq_len=163840)


def _tiny_v32() -> ModelConfig:
  # Tests: tiny plus an indexer whose top-k (8) is shorter than test sequences.
  return _tiny().replace(index_n_heads=4, index_head_dim=16, index_topk=8)


def _v4_flash_284b() -> ModelConfig:
  # DeepSeek-V4-Flash (284B total / 13B active, 1M context): transformers'
  # DeepseekV4Config defaults, which document this checkpoint: 43 layers, 2
  # HCA then CSA / HCA alternating, the first 3 MoE layers hash-routed,
  # compressed layers on YaRN x16 (compress_rope_theta 160000).
  n = 43
  types = ("heavily_compressed_attention",) * 2 + tuple(
      "compressed_sparse_attention" if i % 2 else "heavily_compressed_attention"
      for i in range(n - 2))
  return ModelConfig(
      arch="v4", vocab_size=129280, dim=4096, inter_dim=2048, moe_inter_dim=2048, n_layers=n,
      n_dense_layers=0, n_heads=64, head_dim=512, n_kv_heads=1, q_lora_rank=1024,
      n_routed_experts=256, n_shared_experts=1, n_activated_experts=6, n_expert_groups=1,
      n_limited_groups=1, score_func="sqrtsoftplus", route_scale=1.5,
      rope_theta=10000.0, compress_rope_theta=160000.0, rope_type="yarn", rope_factor=16.0,
      original_seq_len=65536, beta_fast=32.0, beta_slow=1.0, max_seq_len=1048576,
      partial_rotary_factor=64 / 512, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6,
      o_groups=8, o_lora_rank=1024, sliding_window=128, compress_rate_csa=4,
      compress_rate_hca=128, layer_types=types,
      mlp_layer_types=("hash_moe",) * 3 + ("moe",) * (n - 3), swiglu_limit=10.0,
      index_n_heads=64, index_head_dim=128, index_topk=512, n_mtp_depth=1,
      rms_norm_eps=1e-6, init_std=0.02, dtype="bfloat16", param_dtype="float32",
      remat_policy="full")


def _tiny_v4() -> ModelConfig:
  # Tests: every V4 layer type and both MLP types; sequences of 32 pass the
  # sliding window (8) and the compression blocks (CSA 4, HCA 8), and the
  # indexer keeps 3 of up to 8 compressed entries.
  return ModelConfig(
      arch="v4", vocab_size=256, dim=64, inter_dim=32, moe_inter_dim=32, n_layers=4,
      n_dense_layers=0, n_heads=4, head_dim=32, n_kv_heads=1, q_lora_rank=32,
      n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, n_expert_groups=1,
      n_limited_groups=1, score_func="sqrtsoftplus", route_scale=1.5, rope_theta=10000.0,
      compress_rope_theta=160000.0, rope_type="default", original_seq_len=128,
      max_seq_len=128, partial_rotary_factor=0.25, hc_mult=3, hc_sinkhorn_iters=20,
      o_groups=2, o_lora_rank=16, sliding_window=8, compress_rate_csa=4, compress_rate_hca=8,
      layer_types=("sliding_attention", "compressed_sparse_attention",
                   "heavily_compressed_attention", "compressed_sparse_attention"),
      mlp_layer_types=("hash_moe", "hash_moe", "moe", "moe"), swiglu_limit=10.0,
      index_n_heads=8, index_head_dim=16, index_topk=3, n_mtp_depth=1, init_std=0.02)


# Dense decoders (attention="gqa"): DeepSeek LLM and R1's distilled students,
# their published config.json values (HF names in the ModelConfig doc).
def _dense(**fields: Any) -> ModelConfig:
  """A dense GQA decoder: every block the SwiGLU MLP, no MoE, no MTP."""
  base = dict(attention="gqa", n_dense_layers=fields["n_layers"], n_mtp_depth=0,
              n_routed_experts=0, n_shared_experts=0, n_activated_experts=0,
              moe_inter_dim=0, rope_type="default", rms_norm_eps=1e-6, init_std=0.02,
              dtype="bfloat16", param_dtype="float32", remat_policy="full")
  return ModelConfig(**(base | fields))


def _deepseek_llm_7b() -> ModelConfig:
  # deepseek-llm-7b-base: Llama architecture, multi-head attention (kv = heads).
  return _dense(vocab_size=102400, dim=4096, inter_dim=11008, n_layers=30, n_heads=32,
                n_kv_heads=32, rope_theta=10000.0, original_seq_len=4096, max_seq_len=4096)


def _deepseek_llm_67b() -> ModelConfig:
  # deepseek-llm-67b-base: 95 layers, grouped-query attention with 8 kv heads.
  return _dense(vocab_size=102400, dim=8192, inter_dim=22016, n_layers=95, n_heads=64,
                n_kv_heads=8, rope_theta=10000.0, original_seq_len=4096, max_seq_len=4096)


def _r1_distill_qwen_1_5b() -> ModelConfig:
  # DeepSeek-R1-Distill-Qwen-1.5B (Qwen2.5-Math-1.5B student): q/k/v biases,
  # untied head (1.78B with it).
  return _dense(vocab_size=151936, dim=1536, inter_dim=8960, n_layers=28, n_heads=12,
                n_kv_heads=2, attention_bias=True, rope_theta=10000.0,
                original_seq_len=131072, max_seq_len=131072)


def _r1_distill_qwen_7b() -> ModelConfig:
  # DeepSeek-R1-Distill-Qwen-7B (Qwen2.5-Math-7B student).
  return _dense(vocab_size=152064, dim=3584, inter_dim=18944, n_layers=28, n_heads=28,
                n_kv_heads=4, attention_bias=True, rope_theta=10000.0,
                original_seq_len=131072, max_seq_len=131072)


def _r1_distill_llama_8b() -> ModelConfig:
  # DeepSeek-R1-Distill-Llama-8B (Llama-3.1-8B student): Llama-3 RoPE scaling
  # x8 from 8K, rope_theta 500000, rms_norm_eps 1e-5.
  return _dense(vocab_size=128256, dim=4096, inter_dim=14336, n_layers=32, n_heads=32,
                n_kv_heads=8, rope_theta=500000.0, rope_type="llama3", rope_factor=8.0,
                llama3_low_freq_factor=1.0, llama3_high_freq_factor=4.0,
                original_seq_len=8192, max_seq_len=131072, rms_norm_eps=1e-5)


def _tiny_llama() -> ModelConfig:
  # Tests: GQA (4 query heads on 2 kv heads), Llama-3 scaling whose three
  # bands all hold some of the 8 frequencies, untied head.
  return _dense(vocab_size=256, dim=64, inter_dim=128, n_layers=2, n_heads=4, n_kv_heads=2,
                rope_type="llama3", rope_factor=8.0, original_seq_len=32, max_seq_len=128,
                rms_norm_eps=1e-5, dtype="float32", remat_policy="none")


def _tiny_qwen2() -> ModelConfig:
  # Tests: q/k/v biases, tied embeddings, head_dim set apart from dim / n_heads.
  return _dense(vocab_size=256, dim=64, inter_dim=128, n_layers=2, n_heads=4, n_kv_heads=2,
                head_dim=24, attention_bias=True, tie_word_embeddings=True,
                rope_theta=1000000.0, original_seq_len=128, max_seq_len=128,
                dtype="float32", remat_policy="none")


PRESETS = {
    "tiny": _tiny,
    "small": _small,
    "v2_lite_16b": _v2_lite_16b,
    "v2_236b": _v2_236b,
    "v3_671b": _v3_671b,
    "v32_671b": _v32_671b,
    "deepseek_llm_7b": _deepseek_llm_7b,
    "deepseek_llm_67b": _deepseek_llm_67b,
    "r1_distill_qwen_1_5b": _r1_distill_qwen_1_5b,
    "r1_distill_qwen_7b": _r1_distill_qwen_7b,
    "r1_distill_llama_8b": _r1_distill_llama_8b,
    "tiny_llama": _tiny_llama,
    "tiny_qwen2": _tiny_qwen2,
    "tiny_v32": _tiny_v32,
    "v4_flash_284b": _v4_flash_284b,
    "tiny_v4": _tiny_v4,
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
  """Returns a named preset, optionally with some fields replaced."""
  if name not in PRESETS:
    raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
  cfg = PRESETS[name]()
  return cfg.from_dict(overrides, base=cfg) if overrides else cfg
