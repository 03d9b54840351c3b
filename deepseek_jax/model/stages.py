"""The training forward in the pieces a pipeline stage runs (DESIGN.md §2, §4).

    x            = embed(cfg, params, tokens)                       stage 0
    x, aux_b     = blocks(cfg, params, router_bias, x, ...)         any slice of the layers
    logits, aux_h = head(cfg, params, router_bias, x, ...)          the last stage
    aux          = merge_aux(cfg, aux_b, aux_h)                     the model's aux

Training asks the head for hidden states instead (`hidden=True`): h, the
final normalised state [b, s, dim], and aux["mtp_hidden"] [D, b, s, dim],
the MTP modules' outputs, in place of logits [b, s, V] and
aux["mtp_logits"]; the loss applies the output head `head_kernel(cfg,
params)` chunk by chunk over the vocabulary (train/losses.py,
chunked_cross_entropy), so the float32 logits never exist whole.

`Transformer.__call__` in training mode is this composition over the whole
model: it calls `run_embed`, `run_blocks` and `run_head` with its own bound
submodules, and the pure functions above call the same three with
`module.apply` on parameter subtrees (the model's names: `params["embed"]`,
`params["dense_layers"]`, ...). So a pipeline (parallel/pipeline.py, wired by
train/step.py) computes the model's forward, not a copy of it.

A stage's block stacks may be padded (parallel/pipeline_layout.py: every rank
holds the same number of slots of each kind): `active` then says which
slots are real, and a padded one passes its input through with zero aux.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.block import Block
from deepseek_jax.model.layers import Einsum, Embed, RMSNorm
from deepseek_jax.model.attention import attention_mask
from deepseek_jax.model.mtp import MTPModule, shift_left
from deepseek_jax.parallel.rules import constrain

# The layer stacks, in forward order: (params key, MoE blocks?).
STACKS = (("dense_layers", False), ("moe_layers", True))


def checkpoint_policy(cfg: ModelConfig):
  """The jax.checkpoint policy of cfg.remat_policy ("full": None, save nothing;
  "dots_saveable": keep the matmul outputs); not for "none" (no remat)."""
  return (jax.checkpoint_policies.dots_with_no_batch_dims_saveable
          if cfg.remat_policy == "dots_saveable" else None)


def _remat(block_cls, cfg: ModelConfig):
  if cfg.remat_policy == "none":
    return block_cls
  return nn.remat(block_cls, policy=checkpoint_policy(cfg), prevent_cse=False)


def block_stack(cfg: ModelConfig, moe: bool, length: int, name: str | None = None,
                mode: str = "train", v2: tuple[int, int] = (0, 0), masked: bool = False,
                routed: bool = False):
  """`length` Blocks under nn.scan (params with a leading layer axis),
  rematerialised per cfg.remat_policy in training. Their inputs (positions,
  mask, valid) are broadcast to every layer; when decoding, each layer also
  gets its slice of the stacked cache (scanned along axis 0), and every mode
  but training returns the new tokens' cache entries stacked in
  aux["cache"]. v2: the blocks' (balance_devices, balance_max_devices).
  masked (training): called as (x, positions, mask, valid, None, active)
  with active bool [length], one flag per block (Block's `active`).
  routed (training, MoE blocks): called as (x, positions, mask, valid, None,
  active or None, routing) with routing [length, batch, seq, k], one slice
  per block (Block's `routing`: routing replay)."""
  extra = (0,) if mode == "decode" else (nn.broadcast, 0) if masked else ()
  if routed:
    extra = (nn.broadcast, 0 if masked else nn.broadcast, 0)
  scanned = nn.scan(
      _remat(Block, cfg) if mode == "train" else Block,
      variable_axes={"params": 0, "router_bias": 0},
      split_rngs={"params": True},
      in_axes=(nn.broadcast,) * 3 + extra,
      length=length)
  return scanned(cfg, moe, mode, *v2, name=name)


def output_head(cfg: ModelConfig, name: str | None = None) -> Einsum:
  """The output projection [dim, vocab], computed in float32 (untied models:
  with cfg.tie_word_embeddings the head is `tied_head` on the embedding)."""
  return Einsum(cfg.replace(dtype="float32"), (cfg.dim, cfg.vocab_size), "bsd,dv->bsv",
                name=name)


def tied_head(embed: Callable) -> Callable:
  """The output head of a model with tied embeddings: logits = h E^T in
  float32, E the [vocab, dim] table of `embed` (a bound Embed or its apply),
  so the embedding's gradient sums both uses."""
  def head(h):
    table = embed(None, return_table=True).astype(jnp.float32)
    return jnp.einsum("bsd,vd->bsv", h.astype(jnp.float32), table)
  return head


class HeadLayers(NamedTuple):
  """The last stage's layers, as callables (bound submodules or applies)."""
  norm: Callable            # final RMSNorm
  head: Callable            # output_head
  embed: Callable           # the shared embedding (MTP reads future tokens)
  mtp: Sequence[Callable]   # MTPModule k = 1..D


# ---------------------------------------------------------------------------
# The computations (callables in, arrays out)

def run_embed(embed: Callable, tokens):
  """Token embeddings, rows on the batch axes and the width whole (a no-op
  without a mesh; parallel/rules.py)."""
  return constrain(embed(tokens), ("batch", "seq", None))


def run_blocks(stacks: dict[str, Callable], x, positions, mask, valid, active=None,
               routing=None):
  """The blocks of `stacks` ({stack key: block_stack callable}, either key
  may be absent) in forward order. active: {stack key: bool [slots]} for
  masked stacks. routing [n_moe, b, s, k] (routing replay): passed to the
  MoE stack, built `routed`. Returns (x, aux): aux {"moe_layers": the MoE
  blocks' aux, one row per block: balance_loss [n], load [n, E], v2_balance
  {key: [n]}} when the MoE stack ran (a dense block's aux is zero), plus
  indexer_loss [n] in each stack's aux for a DSA model training its indexer
  (cfg.dsa_stage != "off"): then the dense stack's aux is kept too (its
  zero balance_loss and load beside its indexer_loss)."""
  aux = {}
  for name, moe in STACKS:
    if name in stacks:
      on = () if active is None else (None, active[name])
      if moe and routing is not None:
        on = (None, None if active is None else active[name], routing)
      x, stack_aux = stacks[name](x, positions, mask, valid, *on)
      if moe or "indexer_loss" in stack_aux:
        aux[name] = stack_aux
  return x, aux


def run_head(cfg: ModelConfig, layers: HeadLayers, x, targets, positions, mask, valid, *,
             hidden: bool = False):
  """Final norm, output head and, given targets, the D MTP modules.

  Returns (logits [b, s, V] f32, aux): balance_loss (the MTP blocks' summed,
  unscaled), and when MTP runs mtp_logits [D, b, s, V], mtp_expert_load
  [D, E] (MoE blocks), v2_balance {key: [D]} (when on) and, for a DSA model
  training its indexer, indexer_loss (the MTP blocks' summed). hidden: the head
  is not applied: (h [b, s, dim] the normalised final state, aux with
  mtp_hidden [D, b, s, dim], the MTP modules' outputs, for mtp_logits)."""
  h = layers.norm(x)
  out = h if hidden else constrain(layers.head(h), ("batch", "seq", "vocab"))
  aux = {"balance_loss": jnp.zeros((), jnp.float32)}
  if targets is None or not cfg.n_mtp_depth:
    return out, aux
  mtp_out, loads, v2 = [], [], []
  for k, module in enumerate(layers.mtp, start=1):
    emb = layers.embed(shift_left(targets, k - 1))              # Emb(t_{i+k})
    h, block_aux = module(h, emb, positions, mask, valid)
    aux["balance_loss"] = aux["balance_loss"] + block_aux["balance_loss"]
    if "indexer_loss" in block_aux:
      aux["indexer_loss"] = aux.get("indexer_loss", 0.0) + block_aux["indexer_loss"]
    loads.append(block_aux["load"])
    mtp_out.append(h if hidden else layers.head(h))
    if "v2_balance" in block_aux:
      v2.append(block_aux["v2_balance"])
  aux["mtp_hidden" if hidden else "mtp_logits"] = jnp.stack(mtp_out)
  if cfg.n_moe_layers:
    aux["mtp_expert_load"] = jnp.stack(loads)
  if v2:
    aux["v2_balance"] = jax.tree.map(lambda *v: jnp.stack(v), *v2)
  return out, aux


def merge_aux(cfg: ModelConfig, blocks_aux: dict, head_aux: dict | None = None) -> dict:
  """The model's aux (Transformer's module doc) from the blocks' and the
  head's: balance_loss summed over every MoE layer, expert_load [n_moe, E],
  v2_balance per layer (main MoE layers, then MTP blocks), and for a DSA
  model training its indexer indexer_loss, the layers' indexer KL losses
  summed over every block (dense, MoE, MTP). The pipeline merges its
  micro-batch sums the same way."""
  moe = blocks_aux.get("moe_layers")
  index = [a["indexer_loss"].sum() for a in blocks_aux.values() if "indexer_loss" in a]
  index += [head_aux["indexer_loss"]] if head_aux and "indexer_loss" in head_aux else []
  head_aux = head_aux or {"balance_loss": jnp.zeros((), jnp.float32)}
  aux = {k: v for k, v in head_aux.items() if k != "v2_balance"}
  aux["expert_load"] = (moe["load"] if moe is not None
                        else jnp.zeros((0, max(cfg.n_routed_experts, 1)), jnp.float32))
  if moe is not None:
    aux["balance_loss"] = moe["balance_loss"].sum() + head_aux["balance_loss"]
  v2 = [a["v2_balance"] for a in (moe, head_aux) if a is not None and "v2_balance" in a]
  if v2:
    aux["v2_balance"] = jax.tree.map(lambda *v: jnp.concatenate(v), *v2)
  if index:
    aux["indexer_loss"] = sum(index[1:], index[0])
  return aux


# ---------------------------------------------------------------------------
# The stage functions: pure, on parameter subtrees

def _bound(module: nn.Module, params: dict, router_bias: dict, key: str) -> Callable:
  variables = {"params": params[key]}
  if key in router_bias:
    variables["router_bias"] = router_bias[key]
  return functools.partial(module.apply, variables)


def _length(tree) -> int:
  return jax.tree.leaves(tree)[0].shape[0]


def embed(cfg: ModelConfig, params: dict, tokens):
  """Stage 0's input: run_embed with params["embed"]."""
  return run_embed(functools.partial(Embed(cfg).apply, {"params": params["embed"]}), tokens)


def blocks(cfg: ModelConfig, params: dict, router_bias: dict, x, segment_ids, positions, *,
           active: dict | None = None, v2: tuple[int, int] = (0, 0)):
  """run_blocks over the stacks in `params` ("dense_layers", "moe_layers";
  each [n, ...] with its router_bias), n taken from the arrays: the model's
  stacks or a pipeline stage's slots (then `active`, {key: bool [n]})."""
  stacks = {name: _bound(block_stack(cfg, moe, _length(params[name]), v2=v2 if moe else (0, 0),
                                     masked=active is not None), params, router_bias, name)
            for name, moe in STACKS if name in params}
  return run_blocks(stacks, x, positions, attention_mask(cfg, segment_ids), segment_ids != 0,
                    active)


def head(cfg: ModelConfig, params: dict, router_bias: dict, x, targets, segment_ids,
         positions, *, v2: tuple[int, int] = (0, 0), hidden: bool = False):
  """The last stage: run_head with params["norm"], ["head"], ["embed"] and
  ["mtp_{k}"] (+ their router biases); hidden: see run_head."""
  moe = cfg.n_moe_layers > 0
  embed_fn = _bound(Embed(cfg), params, router_bias, "embed")
  layers = HeadLayers(
      norm=_bound(RMSNorm(cfg), params, router_bias, "norm"),
      head=(tied_head(embed_fn) if cfg.tie_word_embeddings
            else _bound(output_head(cfg), params, router_bias, "head")),
      embed=embed_fn,
      mtp=[_bound(MTPModule(cfg, moe, "train", *v2), params, router_bias, f"mtp_{k}")
           for k in range(cfg.n_mtp_depth)])
  return run_head(cfg, layers, x, targets, positions, attention_mask(cfg, segment_ids),
                  segment_ids != 0, hidden=hidden)


def head_kernel(cfg: ModelConfig, params: dict):
  """The output head's kernel [dim, vocab] in float32, as output_head
  multiplies by it (published FP8 blocks dequantized, frozen): what the
  chunked loss applies to the hidden path's states. The head never runs FP8
  GEMMs (its Einsum has no fp8_kind), so this is the whole head. Tied
  embeddings: the embedding table, transposed."""
  if cfg.tie_word_embeddings:
    return Embed(cfg).apply({"params": params["embed"]}, None,
                            return_table=True).astype(jnp.float32).T
  return output_head(cfg).apply({"params": params["head"]}, None, return_kernel=True)
