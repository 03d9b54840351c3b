"""Logit parity with transformers' DeepseekV3ForCausalLM (the oracle).

Tiny random HF models are built offline, every weight randomised (router
bias included), saved with `save_pretrained` and read with
`load_hf_checkpoint`; our logits must match HF's within 1e-4. The reverse
direction writes our random variables with `save_hf_checkpoint` and loads
them with `from_pretrained`; MTP is checked against transformers' own
`MtpModel`, which reads the published MTP key layout by its own mapping.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import get_preset
from deepseek_jax.interop import load_hf_checkpoint, save_hf_checkpoint
from deepseek_jax.model import Transformer
from deepseek_jax.model.rope import rope_frequencies
from random_weights import random_variables, randomize_torch_model

# Marked `torch`: tests/conftest.py stops the run with a clear message if these
# are selected without torch installed (deselect with -m "not torch").
pytestmark = pytest.mark.torch
try:
  import torch
  import transformers
except ImportError:
  torch = transformers = None

TOL = 1e-4
BASE = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
    n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4,
    topk_group=2, first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16,
    qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=64,
    routed_scaling_factor=2.5, num_nextn_predict_layers=0,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def _hf_model(seed: int = 0, **overrides):
  """A tiny DeepseekV3ForCausalLM with every weight and the router bias random."""
  torch.manual_seed(seed)
  config = transformers.DeepseekV3Config(**{**BASE, **overrides}, attn_implementation="eager")
  model = transformers.DeepseekV3ForCausalLM(config).eval()
  randomize_torch_model(model)
  with torch.no_grad():
    for name, b in model.named_buffers():
      if name.endswith("e_score_correction_bias"):
        b.copy_(0.5 * torch.rand_like(b))
  return model


def _our_logits(cfg, variables, tokens):
  return np.asarray(jax.jit(lambda v, t: Transformer(cfg).apply(v, t))(variables, tokens))


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def _tokens(cfg, seq: int, batch: int = 2, seed: int = 0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq)),
                     jnp.int32)


def _check_hf_to_ours(tmp_path, model, seq: int = 24, label: str = ""):
  model.save_pretrained(tmp_path)
  cfg, variables = load_hf_checkpoint(str(tmp_path))
  tokens = _tokens(cfg, seq)
  ours, ref = _our_logits(cfg, variables, tokens), _hf_logits(model, tokens)
  err = float(np.abs(ours - ref).max())
  print(f"\n[parity] {label}: max|ours - hf| = {err:.3g} (max|logit| {np.abs(ref).max():.3g})")
  assert err < TOL
  return cfg, variables


def test_group_limited_routing_with_bias_matches_hf(tmp_path):
  model = _hf_model(seed=1)
  cfg, _ = _check_hf_to_ours(tmp_path, model, label="(a) n_group=4 topk_group=2, bias")
  assert (cfg.n_expert_groups, cfg.n_limited_groups) == (4, 2)

  # Not vacuous: on the test's own hidden states the bias changes which experts
  # are chosen, and the group limit excludes some otherwise-best experts.
  gate = model.model.layers[1].mlp.gate
  seen = []
  handle = gate.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
  _hf_logits(model, _tokens(cfg, 24))
  handle.remove()
  with torch.no_grad():
    h = seen[0].reshape(-1, cfg.dim)
    _, _, with_bias = gate(h)
    bias = gate.e_score_correction_bias.clone()
    gate.e_score_correction_bias.zero_()
    _, _, without_bias = gate(h)
    gate.e_score_correction_bias.copy_(bias)
    scores = torch.sigmoid(h.float() @ gate.weight.float().T) + bias
    ungrouped = scores.topk(cfg.n_activated_experts, dim=-1).indices
  chosen = with_bias.sort(-1).values
  assert (chosen != without_bias.sort(-1).values).any(-1).float().mean() > 0.2
  assert (chosen != ungrouped.sort(-1).values).any(-1).any()


def test_direct_query_projection_matches_hf(tmp_path):
  model = _hf_model(seed=2, q_lora_rank=None, num_nextn_predict_layers=1)
  # save_pretrained drops MTP weights although the config keeps
  # num_nextn_predict_layers=1: the loader warns and loads the main model.
  with pytest.warns(UserWarning, match="no MTP weights"):
    cfg, variables = _check_hf_to_ours(tmp_path, model, label="(b) q_lora_rank=None")
  assert cfg.q_lora_rank == 0 and cfg.n_mtp_depth == 0
  assert "wq" in variables["params"]["moe_layers"]["attn"]


def test_yarn_beyond_original_context_matches_hf(tmp_path):
  model = _hf_model(
      seed=3, qk_rope_head_dim=16, max_position_embeddings=128,
      rope_parameters={"rope_type": "yarn", "rope_theta": 50.0, "factor": 4.0,
                       "original_max_position_embeddings": 32, "beta_fast": 32.0,
                       "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707})
  cfg, _ = _check_hf_to_ours(tmp_path, model, seq=48, label="(c) YaRN, seq 48 > 32")
  assert cfg.use_yarn and 48 > cfg.original_seq_len
  plain = rope_frequencies(cfg.replace(max_seq_len=cfg.original_seq_len))
  assert not np.allclose(rope_frequencies(cfg), plain)   # YaRN really rescales
  assert cfg.softmax_scale != cfg.qk_head_dim ** -0.5     # and mscale != 1


@pytest.mark.parametrize("n_dense", [0, 2])
def test_dense_moe_layer_mix_matches_hf(tmp_path, n_dense):
  model = _hf_model(seed=4 + n_dense, first_k_dense_replace=n_dense)
  cfg, _ = _check_hf_to_ours(tmp_path, model, label=f"(d) first_k_dense_replace={n_dense}")
  assert (cfg.n_dense_layers, cfg.n_moe_layers) == (n_dense, 3 - n_dense)


def test_fused_expert_layout_matches_hf(tmp_path):
  """transformers' in-memory layout (experts.gate_up_proj [E, 2I, D]) also loads."""
  from safetensors.torch import save_file
  model = _hf_model(seed=7)
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  assert "model.layers.1.mlp.experts.gate_up_proj" in state
  save_file(state, os.path.join(tmp_path, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(tmp_path, "config.json"), "w") as f:
    json.dump(model.config.to_dict(), f)
  cfg, variables = load_hf_checkpoint(str(tmp_path))
  tokens = _tokens(cfg, 24)
  err = float(np.abs(_our_logits(cfg, variables, tokens) - _hf_logits(model, tokens)).max())
  print(f"\n[parity] (e) fused expert layout: max|ours - hf| = {err:.3g}")
  assert err < TOL


def test_our_checkpoint_loads_in_hf_with_same_logits_and_mtp(tmp_path, monkeypatch):
  from transformers.modeling_layers import MtpModel
  cfg = get_preset("tiny", vocab_size=160, n_mtp_depth=1)
  variables = random_variables(cfg, seed=11)
  save_hf_checkpoint(cfg, variables, str(tmp_path), max_shard_bytes=100_000)
  assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 1

  # transformers finds MTP weights by the published model's layer index (61);
  # point it at this model's, then let MtpModel map `model.layers.N.*` itself.
  monkeypatch.setattr(transformers.DeepseekV3ForCausalLM, "_keys_to_ignore_on_load_unexpected",
                      [rf"model\.layers\.{cfg.n_layers}\..*"])
  model, info = transformers.DeepseekV3ForCausalLM.from_pretrained(
      str(tmp_path), attn_implementation="eager", output_loading_info=True)
  model.eval()
  assert not any(info.values()), info     # nothing missing, unexpected or mis-shaped

  tokens, targets = _tokens(cfg, 20, seed=1), _tokens(cfg, 20, seed=2)
  logits, aux = jax.jit(lambda v, t, y: Transformer(cfg).apply(
      v, t, targets=y, return_aux=True))(variables, tokens, targets)
  err = float(np.abs(np.asarray(logits) - _hf_logits(model, tokens)).max())
  print(f"\n[parity] ours -> save_hf_checkpoint -> from_pretrained: max diff {err:.3g}")
  assert err < TOL

  mtp = MtpModel.from_pretrained(model).eval()
  with torch.no_grad():
    ids = torch.tensor(np.asarray(tokens), dtype=torch.long)
    h = model.model(ids).last_hidden_state                  # main final-norm output
    positions = torch.arange(ids.shape[1])[None].expand_as(ids)
    h_mtp = mtp.forward_layer(0, h, positions, None,
                              input_ids=torch.tensor(np.asarray(targets), dtype=torch.long))
    ref = mtp._project_to_logits(h_mtp).numpy()
  err = float(np.abs(np.asarray(aux["mtp_logits"][0]) - ref).max())
  print(f"[parity] MTP depth 1 vs transformers MtpModel: max diff {err:.3g}")
  assert err < TOL


def test_greedy_generation_matches_transformers_generate(tmp_path):
  """Our batched greedy `generate` (prompts of different lengths, latent
  cache) against transformers' `generate` (greedy, its own KV cache) run on
  each prompt, token for token."""
  from deepseek_jax.infer import generate
  model = _hf_model(seed=4)
  model.save_pretrained(tmp_path)
  cfg, variables = load_hf_checkpoint(str(tmp_path))
  prompts = [[5, 9, 17, 3, 44, 2, 8], [60, 1], [7, 7, 100, 12]]
  gen = generate(cfg, variables, prompts, max_new_tokens=12)
  for i, p in enumerate(prompts):
    with torch.no_grad():
      out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                           max_new_tokens=12, min_new_tokens=12, do_sample=False,
                           pad_token_id=0)
    assert out[0, len(p):].tolist() == gen.tokens[i].tolist(), i


# ---------------------------------------------------------------------------
# DeepSeek-V2 (transformers' DeepseekV2ForCausalLM): no router bias, no MTP,
# softmax gates times routed_scaling_factor, greedy or group-limited routing.
# ---------------------------------------------------------------------------
V2_BASE = {k: v for k, v in BASE.items() if k != "num_nextn_predict_layers"}
V2_BASE.update(routed_scaling_factor=1.5, topk_method="greedy", norm_topk_prob=False,
               n_group=1, topk_group=1)


def _hf_v2_model(seed: int = 0, **overrides):
  torch.manual_seed(seed)
  config = transformers.DeepseekV2Config(**{**V2_BASE, **overrides},
                                         attn_implementation="eager")
  model = transformers.DeepseekV2ForCausalLM(config).eval()
  randomize_torch_model(model)
  return model


V2_YARN = {"rope_type": "yarn", "rope_theta": 50.0, "factor": 4.0,
           "original_max_position_embeddings": 32, "beta_fast": 32.0, "beta_slow": 1.0,
           "mscale": 0.707, "mscale_all_dim": 0.707}


@pytest.mark.parametrize("label,overrides,seq", [
    ("greedy, no q LoRA, YaRN past 32", dict(q_lora_rank=None, qk_rope_head_dim=16,
                                             max_position_embeddings=128,
                                             rope_parameters=V2_YARN), 48),
    # With group-max scores the limit binds only when topk_group < top-k.
    ("group_limited_greedy, q LoRA", dict(topk_method="group_limited_greedy", n_group=4,
                                          topk_group=1), 24),
])
def test_v2_checkpoint_matches_hf(tmp_path, label, overrides, seq):
  model = _hf_v2_model(seed=21, **overrides)
  cfg, variables = _check_hf_to_ours(tmp_path, model, seq=seq, label=f"(v2) {label}")
  assert cfg.score_func == "softmax" and cfg.n_mtp_depth == 0
  assert cfg.route_scale == 1.5 and cfg.use_q_lora == ("q_lora_rank" not in overrides)
  assert all(not np.any(np.asarray(b)) for b in jax.tree.leaves(variables["router_bias"]))
  if cfg.use_yarn:
    assert seq > cfg.original_seq_len and cfg.mscale == 0.707
    assert cfg.softmax_scale != cfg.qk_head_dim ** -0.5
  else:   # the group limit changes the choice on these inputs (not vacuous)
    assert (cfg.n_expert_groups, cfg.n_limited_groups) == (4, 1)
    gate = model.model.layers[1].mlp.gate
    seen = []
    handle = gate.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    _hf_logits(model, _tokens(cfg, seq))
    handle.remove()
    with torch.no_grad():
      h = seen[0].reshape(-1, cfg.dim)
      chosen = gate(h)[2].sort(-1).values
      ungrouped = (h.float() @ gate.weight.float().T).topk(2, dim=-1).indices.sort(-1).values
    assert (chosen != ungrouped).any(-1).any()


def test_our_v2_variables_load_in_hf_with_same_logits(tmp_path):
  cfg = get_preset("tiny", vocab_size=160, score_func="softmax", route_scale=2.0,
                   n_mtp_depth=0, q_lora_rank=0)
  variables = random_variables(cfg, seed=12)
  variables["router_bias"] = jax.tree.map(jnp.zeros_like, variables["router_bias"])
  save_hf_checkpoint(cfg, variables, str(tmp_path))
  with open(os.path.join(tmp_path, "config.json")) as f:
    assert json.load(f)["architectures"] == ["DeepseekV2ForCausalLM"]
  model, info = transformers.DeepseekV2ForCausalLM.from_pretrained(
      str(tmp_path), attn_implementation="eager", output_loading_info=True)
  assert not any(info.values()), info
  tokens = _tokens(cfg, 20, seed=3)
  err = float(np.abs(_our_logits(cfg, variables, tokens) - _hf_logits(model.eval(), tokens)).max())
  print(f"\n[parity] V2: ours -> save_hf_checkpoint -> DeepseekV2 from_pretrained: {err:.3g}")
  assert err < TOL
