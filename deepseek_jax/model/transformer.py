"""The DeepSeek-V3 transformer: embedding, dense blocks, MoE blocks, head, MTP.
With cfg.arch = "v4" the same module is DeepSeek-V4 (model/v4.py: hyper-
connections, sliding / compressed attention, hash-routed MoE; training forward).
With cfg.attention = "gqa" and every block dense, the same module is a dense
Llama-style decoder (DeepSeek LLM, R1's Qwen2 / Llama students: model/gqa.py);
with cfg.tie_word_embeddings the head is the embedding, transposed (no `head`).

    logits = Transformer(cfg).apply(variables, tokens)            # [b, s, vocab] f32
    logits, aux = Transformer(cfg).apply(variables, tokens, targets=targets,
                                         segment_ids=seg, positions=pos,
                                         return_aux=True)

`variables` holds two collections: `params` (trained) and `router_bias` (the
aux-loss-free balancing bias of each MoE layer, moved by the trainer, never
by the optimizer). `aux` carries what training needs beyond the logits:
  mtp_logits    [D, b, s, vocab] f32   (only when `targets` is given and D > 0)
                (return_hidden=True: the final state h [b, s, dim] in place of
                the logits and mtp_hidden [D, b, s, dim] in place of these; the
                training loss applies the head chunk by chunk, train/losses.py)
  balance_loss  scalar: sum over MoE layers (MTP blocks included) of the
                sequence-wise balance loss, unscaled by alpha
  expert_load   [n_moe_layers, E] tokens routed to each expert in each main
                MoE layer (padding excluded): input to the bias update
  mtp_expert_load [D, E] the same for the MTP blocks (when MTP runs and
                the blocks are MoE)
  v2_balance    only when built with balance_devices > 0 (training):
                {"expert", "device", "comm"} DeepSeek-V2's balance losses
                (moe.v2_balance_losses), unscaled, per MoE layer [L]: the
                main MoE layers, then the MTP blocks' (when MTP runs)
`Transformer(cfg, balance_devices=D, balance_max_devices=M)`: D devices,
M = devices a token may reach (static; the trainer sets them from
TrainConfig); the default 0 computes no V2 loss.
Routing replay (R3: the experts the sampler chose, so that a router flip
between rollout and training cannot change the tokens' computation):
`routing=R` [b, s, n_moe_layers, k] int32 in training mode makes every token
whose k entries are >= 0 use those experts in that main MoE layer, their
gates recomputed from the current router (moe.route), differentiable; a
token with entries < 0 (prompt, padding: no recorded choice) routes
normally. The MTP blocks always route normally. The inference modes
"prefill" / "decode" with return_routing=True also return each token's
chosen experts, the same [b, s, n_moe_layers, k] layout (infer/decode.py).
Blocks of each kind are stacked with `nn.scan` (params get a leading layer
axis: `dense_layers` [n_dense, ...], `moe_layers` [n_moe, ...]) and wrapped
in `nn.remat` according to `cfg.remat_policy`. The training forward is the
composition of model/stages.py's pieces (embedding, block stacks, head +
MTP), the ones a pipeline stage runs on its own parameters.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.layers import Embed, RMSNorm
from deepseek_jax.model.attention import attention_mask
from deepseek_jax.model.mla import decode_bias
from deepseek_jax.model.mtp import MTPModule
from deepseek_jax.model.v4 import v4_forward, v4_infer
from deepseek_jax.model.stages import (HeadLayers, block_stack, merge_aux, output_head,
                                       run_blocks, run_embed, run_head, tied_head)


def check_routing(cfg: ModelConfig, tokens, routing) -> None:
  """routing must be int [b, s, n_moe_layers, k] (tokens [b, s]); when
  concrete, its entries < n_routed_experts and a token's k experts (entries
  >= 0) distinct."""
  want = tuple(tokens.shape) + (cfg.n_moe_layers, cfg.n_activated_experts)
  if tuple(routing.shape) != want:
    raise ValueError(f"routing shape {tuple(routing.shape)} must be [batch, seq, "
                     f"n_moe_layers, n_activated_experts] = {want}.")
  if not jnp.issubdtype(routing.dtype, jnp.integer):
    raise ValueError(f"routing must hold integer expert ids; got dtype {routing.dtype}.")
  if not isinstance(routing, jax.core.Tracer):
    r = np.asarray(routing)
    if r.size and r.max() >= cfg.n_routed_experts:
      where = tuple(int(i) for i in np.argwhere(r == r.max())[0])
      raise ValueError(f"routing holds expert {int(r.max())} at [batch, pos, layer, j]="
                       f"{where}, outside [0, n_routed_experts={cfg.n_routed_experts}).")
    srt = np.sort(r, axis=-1)
    dup = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
    if dup.any():
      where = tuple(int(i) for i in np.argwhere(dup.any(-1))[0])
      raise ValueError(f"routing repeats an expert for one token at [batch, pos, layer]="
                       f"{where}: {r[where].tolist()}.")


def check_inputs(cfg: ModelConfig, tokens, segment_ids=None, positions=None) -> None:
  """Shape checks always; value checks when the arrays are concrete (not traced).

  Called at the top of `Transformer.__call__`, i.e. while tracing and before
  XLA compiles anything. A jitted train step sees tracers, so the data
  pipeline validates values on the host (`data.pipeline.validate_batch`).
  """
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [batch, seq]; got shape {tokens.shape}.")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens must be integer ids; got dtype {tokens.dtype}.")
  seq = tokens.shape[1]
  if seq > cfg.max_seq_len:
    raise ValueError(
        f"sequence length {seq} exceeds max_seq_len={cfg.max_seq_len}; shorten "
        "the input or raise ModelConfig.max_seq_len.")
  for name, arr in (("segment_ids", segment_ids), ("positions", positions)):
    if arr is not None and tuple(arr.shape) != tuple(tokens.shape):
      raise ValueError(f"{name} shape {arr.shape} must equal tokens shape {tokens.shape}.")
  if not isinstance(tokens, jax.core.Tracer):
    t = np.asarray(tokens)
    if t.size and (t.min() < 0 or t.max() >= cfg.vocab_size):
      bad = int(t.min()) if t.min() < 0 else int(t.max())
      where = tuple(int(i) for i in np.argwhere(t == bad)[0])
      raise ValueError(
          f"token id {bad} at [batch, pos]={where} is outside [0, vocab_size="
          f"{cfg.vocab_size}); check the tokenizer matches the model config.")
  if positions is not None and not isinstance(positions, jax.core.Tracer):
    p = np.asarray(positions)
    if p.size and (p.min() < 0 or p.max() >= cfg.max_seq_len):
      raise ValueError(
          f"positions must lie in [0, max_seq_len={cfg.max_seq_len}); got "
          f"range [{p.min()}, {p.max()}].")


MODES = ("train", "prefill", "decode", "mtp_prefill", "mtp_decode")


class Transformer(nn.Module):
  cfg: ModelConfig
  balance_devices: int = 0        # DeepSeek-V2 balance losses (module doc); 0 = off
  balance_max_devices: int = 0

  @nn.compact
  def __call__(self, tokens, *, segment_ids=None, positions=None, targets=None,
               return_aux: bool = False, mode: str = "train", cache=None,
               mtp_hidden=None, logits_index=None, return_hidden: bool = False,
               routing=None, return_routing: bool = False):
    """tokens: int [batch, seq]. segment_ids: int [batch, seq], 0 = padding,
    attention stays within a segment (default: one document per row).
    positions: RoPE positions (default arange). targets: next tokens
    [batch, seq], needed only for MTP (teacher-forced future tokens).

    Inference modes (deepseek_jax/infer drives them; a row's cache column is
    its token position, prompts right-padded) return (logits, h, entries):
    h the normalised final hidden state [b, seq, dim] (what MTP reads) and
    entries the new tokens' cache entries {stack: {"c_kv", "k_rope"}} (DSA:
    also "k_index"; GQA: {"k", "v"}, per kv head; infer/cache.py):
      prefill      the naive forward over padded prompts (segment_ids);
      decode       absorbed MLA over `cache` for tokens at `positions`;
      mtp_prefill, mtp_decode   MTP module 1 alone on (mtp_hidden = h^0 at
                   each position, tokens = the next token there), for drafting.
    DeepSeek-V4 (model/v4.py v4_infer): prefill and decode only, and
    entries are per layer {f"layers_{i}": ...}: after prefill every prompt
    token's key and compressor projections, after decode the whole updated
    cache (rings for the sliding window and the windows in progress, the
    compressed entries; infer/cache.py).
    logits_index [b] (prefill modes): logits only at that position per row
    ([b, 1, vocab]). return_hidden (training mode): the normalised final
    hidden state [b, s, dim] in place of the logits, and with return_aux and
    targets aux["mtp_hidden"] [D, b, s, dim] (the MTP modules' outputs) in
    place of aux["mtp_logits"]: the head is applied chunk by chunk elsewhere
    (train.losses.chunked_cross_entropy with stages.head_kernel;
    infer.scoring). The default returns logits, as always.
    routing (training mode): experts to replay, int [b, s, n_moe_layers, k],
    entries < 0 = route normally (module doc); None (default): normal
    routing, the same computation as without the argument.
    return_routing ("prefill" / "decode"): (logits, h, entries, experts)
    with experts int32 [b, seq, n_moe_layers, k] each token's chosen experts
    in each main MoE layer (the MTP block's not included).
    """
    cfg = self.cfg
    if mode not in MODES:
      raise ValueError(f"mode={mode!r} must be one of {MODES}.")
    check_inputs(cfg, tokens, segment_ids, positions)
    if targets is not None:
      check_inputs(cfg, targets)
    if routing is not None:
      if mode != "train":
        raise ValueError(f"routing= replays experts in the training forward; mode={mode!r}.")
      check_routing(cfg, tokens, routing)
    if return_routing and mode not in ("prefill", "decode"):
      raise ValueError(f"return_routing=True needs mode 'prefill' or 'decode'; got {mode!r}.")
    b, s = tokens.shape
    if segment_ids is None:
      segment_ids = jnp.ones((b, s), jnp.int32)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    valid = segment_ids != 0

    embed = Embed(cfg, name="embed")
    head = tied_head(embed) if cfg.tie_word_embeddings else output_head(cfg, name="head")
    final_norm = RMSNorm(cfg, name="norm")
    if cfg.is_v4:                                        # DeepSeek-V4: model/v4.py
      if mode.startswith("mtp"):
        raise NotImplementedError(f"DeepSeek-V4 (arch='v4') has no mode={mode!r} (MTP "
                                  "drafting) yet: its modes are train, prefill and decode.")
      if routing is not None or return_routing or self.balance_devices:
        raise NotImplementedError("DeepSeek-V4 (arch='v4') has no routing replay (routing=, "
                                  "return_routing=) or V2 balance losses yet.")
      if mode != "train":
        if mode == "decode" and (cache is None or s != 1):
          raise ValueError(f"DeepSeek-V4 mode='decode' takes one token per row ([batch, 1]; "
                           f"got {s}) and cache= (infer/cache.py init_cache / fill_v4).")
        return v4_infer(cfg, embed, head, final_norm, tokens, positions, segment_ids,
                        cache if mode == "decode" else None, logits_index)
      out, aux = v4_forward(cfg, embed, head, final_norm, tokens, positions, segment_ids,
                            targets if return_aux else None, return_hidden)
      return (out, aux) if return_aux else out
    if mode != "train":
      return self._infer(mode, tokens, positions, segment_ids, valid, cache, mtp_hidden,
                         logits_index, embed, head, final_norm, return_routing)
    # The composition of model/stages.py's pieces, on this module's submodules.
    mask = attention_mask(cfg, segment_ids)              # ids (+ [b, 1, s, s] bias)
    v2 = (self.balance_devices, self.balance_max_devices)
    routed = routing is not None and cfg.n_moe_layers > 0
    stacks = {name: block_stack(cfg, moe, length, name, v2=v2 if moe else (0, 0),
                                routed=routed and moe)
              for name, moe, length in (("dense_layers", False, cfg.n_dense_layers),
                                        ("moe_layers", True, cfg.n_moe_layers)) if length}
    layer_routing = jnp.moveaxis(routing, 2, 0) if routed else None   # [n_moe, b, s, k]
    x, blocks_aux = run_blocks(stacks, run_embed(embed, tokens), positions, mask, valid,
                               routing=layer_routing)
    mtp = [MTPModule(cfg, cfg.n_moe_layers > 0, "train", *v2, name=f"mtp_{k}")
           for k in range(cfg.n_mtp_depth)]
    out, head_aux = run_head(cfg, HeadLayers(final_norm, head, embed, mtp), x,
                             targets if return_aux else None, positions, mask, valid,
                             hidden=return_hidden)
    if not return_aux:
      return out
    return out, merge_aux(cfg, blocks_aux, head_aux)

  def _infer(self, mode, tokens, positions, segment_ids, valid, cache, mtp_hidden,
             logits_index, embed, head, final_norm, return_routing=False):
    cfg = self.cfg
    decode = mode.endswith("decode")
    if decode:
      cache_len = jax.tree.leaves(cache)[0].shape[-3 if cfg.is_gqa else -2]   # T
      mask = decode_bias(positions, cache_len)                # [b, 1, t, T]
    else:
      mask = attention_mask(cfg, segment_ids)                 # ids (+ [b, 1, s, s] bias)
    block_mode = "decode" if decode else "prefill"
    entries, chosen = {}, None
    if mode.startswith("mtp"):
      if not cfg.n_mtp_depth:
        raise ValueError("MTP drafting needs a model with n_mtp_depth >= 1.")
      h, aux = MTPModule(cfg, cfg.n_moe_layers > 0, block_mode, name="mtp_0")(
          mtp_hidden, embed(tokens), positions, mask, valid,
          cache["mtp_0"] if decode else None)
      entries["mtp_0"] = aux["cache"]
    else:
      x = embed(tokens)
      for name, moe, length in (("dense_layers", False, cfg.n_dense_layers),
                                ("moe_layers", True, cfg.n_moe_layers)):
        if length:
          args = (cache[name],) if decode else ()
          x, aux = block_stack(cfg, moe, length, name, block_mode)(x, positions, mask, valid,
                                                                  *args)
          entries[name] = aux["cache"]
          if moe:
            chosen = jnp.moveaxis(aux["experts"], 0, 2)           # [b, t, n_moe, k]
      h = final_norm(x)
    if logits_index is not None:
      h_out = jnp.take_along_axis(h, logits_index[:, None, None], axis=1)
    else:
      h_out = h
    if return_routing:
      if chosen is None:                                          # no MoE layers
        chosen = jnp.zeros(tokens.shape + (0, cfg.n_activated_experts), jnp.int32)
      return head(h_out), h, entries, chosen
    return head(h_out), h, entries


def _init(cfg: ModelConfig, rng: jax.Array):
  tokens = jnp.zeros((1, min(8, cfg.max_seq_len)), jnp.int32)
  return Transformer(cfg).init(rng, tokens, targets=tokens, return_aux=True)


def init_variables(cfg: ModelConfig, rng: jax.Array):
  """Initialises all variables (MTP modules included), compiled in one jit."""
  return jax.jit(_init, static_argnums=0)(cfg, rng)


def abstract_variables(cfg: ModelConfig):
  """Shapes/dtypes of all variables without allocating them (jax.eval_shape)."""
  return jax.eval_shape(functools.partial(_init, cfg), jax.random.key(0))


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def count_active_params(cfg: ModelConfig, params, *, embedding: bool = True) -> int:
  """Parameters one token uses: all but the routed experts it does not visit.

  Routed expert weights are the `ffn/w1|w2|w3` leaves with an expert axis
  (dense MLPs and shared experts keep theirs under `.../kernel`); a token
  uses n_activated_experts / n_routed_experts of them. embedding=False
  leaves out the input embedding (a lookup, not a matmul): the convention of
  DeepSeek's "active parameters" (V3 37B, V2 21B, V2-Lite 2.4B).
  """
  total = routed = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    keys = [getattr(k, "key", str(k)) for k in path]
    n = int(np.prod(leaf.shape))
    if not embedding and keys[-2:] == ["embed", "embedding"]:
      continue
    total += n
    if len(keys) >= 2 and keys[-2] == "ffn" and keys[-1] in ("w1", "w2", "w3"):
      routed += n
  if not routed:
    return total
  return total - routed + routed * cfg.n_activated_experts // cfg.n_routed_experts
