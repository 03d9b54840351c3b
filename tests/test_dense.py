"""Dense decoders (attention="gqa"): DeepSeek LLM and R1's Qwen2 / Llama students.

Oracles: transformers' LlamaForCausalLM (GQA, Llama-3 RoPE scaling, untied
head) and Qwen2ForCausalLM (q/k/v biases, tied head) at tiny random sizes,
our variables built from their state_dict here; the naive training forward
(argmax continuation) for the cached decode; the published parameter counts
of the presets.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import get_preset
from deepseek_jax.config import ModelConfig
from deepseek_jax.infer import cache as cache_lib
from deepseek_jax.infer import generate
from deepseek_jax.model import Transformer, abstract_variables, count_params, init_variables
from deepseek_jax.model.rope import rope_frequencies

try:
  import torch
  import transformers
except ImportError:
  torch = transformers = None

TOL = 1e-4


# ---------------------------------------------------------------------------
# Parity with transformers

def _hf_config(cfg: ModelConfig):
  """The transformers config of a tiny_llama / tiny_qwen2-like cfg."""
  rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_type == "llama3":
    rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
            "low_freq_factor": cfg.llama3_low_freq_factor,
            "high_freq_factor": cfg.llama3_high_freq_factor,
            "original_max_position_embeddings": cfg.original_seq_len}
  common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim,
                intermediate_size=cfg.inter_dim, num_hidden_layers=cfg.n_layers,
                num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
                head_dim=cfg.gqa_head_dim, max_position_embeddings=cfg.max_seq_len,
                rms_norm_eps=cfg.rms_norm_eps, rope_parameters=rope,
                tie_word_embeddings=cfg.tie_word_embeddings, attn_implementation="eager")
  if cfg.attention_bias:        # Qwen2: q/k/v biases always, o never
    return transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**common)
  return transformers.LlamaForCausalLM, transformers.LlamaConfig(
      attention_bias=False, mlp_bias=False, **common)


def _variables_from_hf(cfg: ModelConfig, state: dict) -> dict:
  """Our variables from an HF Llama / Qwen2 state_dict (torch [out, in]
  Linear weights; per-layer entries stacked on the scan axis)."""
  sd = {k: v.detach().double().numpy() for k, v in state.items()}
  h, kv, d = cfg.n_heads, cfg.kv_heads, cfg.gqa_head_dim

  def layers(fn):
    return jnp.asarray(np.stack([fn(f"model.layers.{i}.") for i in range(cfg.n_layers)]),
                       jnp.float32)

  attn = {"wq": {"kernel": layers(lambda p: sd[p + "self_attn.q_proj.weight"].T
                                  .reshape(cfg.dim, h, d))},
          "wk": {"kernel": layers(lambda p: sd[p + "self_attn.k_proj.weight"].T
                                  .reshape(cfg.dim, kv, d))},
          "wv": {"kernel": layers(lambda p: sd[p + "self_attn.v_proj.weight"].T
                                  .reshape(cfg.dim, kv, d))},
          "wo": {"kernel": layers(lambda p: sd[p + "self_attn.o_proj.weight"].T
                                  .reshape(h, d, cfg.dim))}}
  if cfg.attention_bias:
    for name, proj, n in (("wq", "q_proj", h), ("wk", "k_proj", kv), ("wv", "v_proj", kv)):
      attn[name]["bias"] = layers(lambda p, proj=proj, n=n: sd[p + f"self_attn.{proj}.bias"]
                                  .reshape(n, d))
  params = {
      "embed": {"embedding": jnp.asarray(sd["model.embed_tokens.weight"], jnp.float32)},
      "norm": {"scale": jnp.asarray(sd["model.norm.weight"], jnp.float32)},
      "dense_layers": {
          "attn": attn,
          "attn_norm": {"scale": layers(lambda p: sd[p + "input_layernorm.weight"])},
          "ffn_norm": {"scale": layers(lambda p: sd[p + "post_attention_layernorm.weight"])},
          "ffn": {"w1": {"kernel": layers(lambda p: sd[p + "mlp.gate_proj.weight"].T)},
                  "w3": {"kernel": layers(lambda p: sd[p + "mlp.up_proj.weight"].T)},
                  "w2": {"kernel": layers(lambda p: sd[p + "mlp.down_proj.weight"].T)}}}}
  if not cfg.tie_word_embeddings:
    params["head"] = {"kernel": jnp.asarray(sd["lm_head.weight"].T, jnp.float32)}
  return {"params": params}


def _random_hf_model(cfg: ModelConfig, seed: int):
  torch.manual_seed(seed)
  cls, hf_cfg = _hf_config(cfg)
  model = cls(hf_cfg).eval()
  with torch.no_grad():          # every weight random, norms and biases included
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.1 * torch.randn_like(p))
  return model


@pytest.mark.torch
@pytest.mark.parametrize("preset,changes", [
    ("tiny_llama", {}), ("tiny_qwen2", {}),
    ("tiny_llama", {"attn_block_size": 16}),          # the blockwise softmax
])
def test_logits_match_transformers(preset, changes):
  """Random tiny Llama (GQA, Llama-3 RoPE scaling, untied) and Qwen2 (q/k/v
  bias, tied, head_dim != dim / heads): our logits within 1e-4 of HF's over
  a sequence past original_seq_len, and with packed documents (segment ids
  against HF run on each document alone)."""
  if torch is None:
    pytest.skip("needs torch + transformers")
  cfg = get_preset(preset, **changes)
  hf = _random_hf_model(cfg, seed=0)
  assert hf.model.layers[0].self_attn.k_proj.weight.shape == (cfg.kv_heads * cfg.gqa_head_dim,
                                                               cfg.dim)
  variables = _variables_from_hf(cfg, hf.state_dict())
  assert ("head" in variables["params"]) != cfg.tie_word_embeddings
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 48)).astype(np.int32)
  with torch.no_grad():
    want = hf(torch.as_tensor(tokens, dtype=torch.long)).logits.double().numpy()
  got = np.asarray(Transformer(cfg).apply(variables, tokens))
  assert np.abs(want).max() > 1.0     # weights large enough for a non-trivial check
  np.testing.assert_allclose(got, want, rtol=0, atol=TOL * np.abs(want).max())
  # Two packed documents in one row, positions restarting: each equals HF alone.
  seg = np.concatenate([np.ones((1, 20)), 2 * np.ones((1, 28))], 1).astype(np.int32)
  pos = np.concatenate([np.arange(20), np.arange(28)])[None].astype(np.int32)
  packed = np.asarray(Transformer(cfg).apply(variables, tokens[:1], segment_ids=seg,
                                             positions=pos))
  with torch.no_grad():
    second = hf(torch.as_tensor(tokens[:1, 20:], dtype=torch.long)).logits.double().numpy()
  np.testing.assert_allclose(packed[:, :20], want[:1, :20], rtol=0,
                             atol=TOL * np.abs(want).max())
  np.testing.assert_allclose(packed[:, 20:], second, rtol=0, atol=TOL * np.abs(second).max())


@pytest.mark.torch
@pytest.mark.parametrize("preset", ["tiny_llama", "tiny_qwen2"])
def test_greedy_generation_equals_transformers(preset):
  """Our generate (cached decode) and HF's greedy generate continue random
  prompts with the same tokens."""
  if torch is None:
    pytest.skip("needs torch + transformers")
  cfg = get_preset(preset)
  hf = _random_hf_model(cfg, seed=1)
  variables = _variables_from_hf(cfg, hf.state_dict())
  prompts = np.random.default_rng(1).integers(1, cfg.vocab_size, (2, 7)).tolist()
  ours = generate(cfg, variables, prompts, max_new_tokens=10)
  with torch.no_grad():
    want = hf.generate(torch.as_tensor(prompts, dtype=torch.long), max_new_tokens=10,
                       min_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
  np.testing.assert_array_equal(ours.tokens, want[:, 7:].numpy())


@pytest.mark.torch
def test_llama3_frequencies_match_transformers():
  """The Llama-3 scaled inverse frequencies equal HF's rope init function,
  and the three bands (kept, interpolated, stretched) are all present."""
  if torch is None:
    pytest.skip("needs torch + transformers")
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  cfg = get_preset("tiny_llama")
  inv, _ = ROPE_INIT_FUNCTIONS["llama3"](_hf_config(cfg)[1], "cpu")
  ours = rope_frequencies(cfg)
  np.testing.assert_allclose(ours, inv.numpy(), rtol=1e-6)
  plain = rope_frequencies(cfg.replace(rope_type="default"))
  ratio = plain / ours
  assert np.isclose(ratio, 1).any() and np.isclose(ratio, cfg.rope_factor).any()
  assert ((ratio > 1.01) & (ratio < cfg.rope_factor - 0.01)).any()


# ---------------------------------------------------------------------------
# Cached decode, generation, training

PROMPTS = [[1, 5, 9, 20, 7], [3, 4], [8, 8, 8, 9, 10, 11, 12, 13, 14]]


def _naive_logits(cfg, variables, seq, fn):
  buf = np.zeros((1, 40), np.int32)
  buf[0, :len(seq)] = seq
  return np.asarray(fn(variables, buf)[0, :len(seq)])


@pytest.mark.parametrize("preset,changes", [
    ("tiny_llama", {}),
    ("tiny_qwen2", {}),
    ("tiny_llama", {"n_kv_heads": 1, "attn_block_size": 8}),    # MQA, blockwise prefill
])
def test_greedy_generate_is_the_naive_argmax_continuation(preset, changes):
  """generate (prefill, then decode from the per-kv-head cache) picks the
  argmax of the training forward over the sequence so far, every step."""
  cfg = get_preset(preset, **changes)
  variables = init_variables(cfg, jax.random.key(1))
  if cfg.attention_bias:         # biases start at zero: make them matter
    leaves, tree = jax.tree.flatten_with_path(variables)
    key = jax.random.key(2)
    variables = jax.tree.unflatten(tree, [
        0.1 * jax.random.normal(jax.random.fold_in(key, i), x.shape)
        if "bias" in jax.tree_util.keystr(p) else x for i, (p, x) in enumerate(leaves)])
  cache = cache_lib.init_cache(cfg, 2, 10)
  assert cache["dense_layers"]["k"].shape == (cfg.n_layers, 2, 10, cfg.kv_heads,
                                              cfg.gqa_head_dim)
  gen = generate(cfg, variables, PROMPTS, max_new_tokens=8)
  fn = jax.jit(Transformer(cfg).apply)
  for i, p in enumerate(PROMPTS):
    seq = list(p)
    for j in range(8):
      logits = _naive_logits(cfg, variables, seq, fn)[-1]
      nxt = int(np.argmax(logits))
      assert gen.tokens[i, j] == nxt, (i, j)
      logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
      np.testing.assert_allclose(gen.logprobs[i, j], logp[nxt], rtol=1e-5, atol=1e-5)
      seq.append(nxt)


@pytest.mark.parametrize("preset", ["tiny_llama", "tiny_qwen2"])
def test_dense_train_step_runs_and_lowers_the_loss(preset):
  """make_train_step on a dense model (tied head: the chunked loss reads the
  embedding): finite loss that falls on a repeated batch."""
  from deepseek_jax.train.config import TrainConfig
  from deepseek_jax.train.step import init_train_state, make_train_step
  cfg = get_preset(preset)
  tcfg = TrainConfig(steps=6, batch_size=4, seq_len=16, warmup_steps=1, lr=3e-3,
                     fast_compile=True)
  state = init_train_state(cfg, tcfg, jax.random.key(0))
  assert ("head" in state.params) != cfg.tie_word_embeddings
  step = make_train_step(cfg, tcfg)
  batch = _batch(cfg.vocab_size)
  losses = []
  for _ in range(tcfg.steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["ce"]))
  assert np.isfinite(losses).all() and losses[-1] < losses[0], losses


def _batch(vocab, b=4, s=16, seed=0):
  ids = np.random.default_rng(seed).integers(0, vocab, (b, s + 1)).astype(np.int32)
  return {"tokens": ids[:, :s], "targets": ids[:, 1:],
          "segment_ids": np.ones((b, s), np.int32),
          "positions": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy(),
          "loss_mask": np.ones((b, s), np.float32)}


def test_sharded_dense_train_step_matches_one_device():
  """tiny_qwen2 (q/k/v biases, tied head) on data 2 x fsdp 2 x tensor 2
  (fsdp_tp: heads and kv heads over tensor) equals one device within 1e-5."""
  from deepseek_jax.parallel import MeshConfig, setup
  from deepseek_jax.train.config import TrainConfig
  from deepseek_jax.train.step import init_train_state, make_train_step
  cfg = get_preset("tiny_qwen2")
  tcfg = TrainConfig(steps=1, batch_size=8, seq_len=16, warmup_steps=0, lr=1e-2, eps=1e-4,
                     fast_compile=True)
  batch = _batch(cfg.vocab_size, 8)
  ref, ref_m = jax.device_get(make_train_step(cfg, tcfg)(
      init_train_state(cfg, tcfg, jax.random.key(0)), batch))
  mesh, rules = setup(MeshConfig(data=2, fsdp=2, tensor=2, rules="fsdp_tp"))
  state = init_train_state(cfg, tcfg, jax.random.key(0), mesh, rules)
  attn = state.params["dense_layers"]["attn"]
  assert attn["wk"]["kernel"].sharding.spec[2] == "tensor"         # [layers, embed, kv, d]
  assert attn["wq"]["bias"].sharding.spec[1] == "tensor"
  new, m = jax.device_get(make_train_step(cfg, tcfg, mesh, rules)(state, batch))
  for key in ("loss", "ce", "grad_norm"):
    assert abs(float(m[key]) - float(ref_m[key])) < 1e-5, key
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(ref.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny_llama", "tiny_qwen2"])
def test_pipelined_dense_grad_equals_the_unpipelined_model(preset):
  """1F1B over pipe 4 x data 2: loss and every gradient (the tied embedding's
  summed over its first- and last-stage uses) as on one device."""
  from deepseek_jax.parallel import MeshConfig, activate, setup
  from deepseek_jax.train.config import TrainConfig
  from deepseek_jax.train.step import FAST_COMPILE, pipelined_pretraining_grad, pretraining_loss
  cfg = get_preset(preset, n_layers=4, n_dense_layers=4)
  tcfg = TrainConfig()
  v = init_variables(cfg, jax.random.key(0))
  batch = {k: jnp.asarray(x) for k, x in _batch(cfg.vocab_size, 8).items()}
  (loss, _), grads = jax.jit(jax.value_and_grad(pretraining_loss(cfg, tcfg), has_aux=True),
                             compiler_options=FAST_COMPILE)(v["params"], {}, batch)
  mesh, rules = setup(MeshConfig(pipe=4, data=2))
  fn = pipelined_pretraining_grad(cfg, tcfg, mesh, rules, schedule="1f1b", n_microbatches=4)
  with activate(mesh, rules):
    (p_loss, _), p_grads = jax.jit(fn, compiler_options=FAST_COMPILE)(v["params"], {}, batch)
  assert abs(float(loss) - float(p_loss)) <= 1e-5
  assert jax.tree.structure(grads) == jax.tree.structure(p_grads)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(p_grads)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------
# Presets and validation

# Published sizes: DeepSeek LLM 7B / 67B (the report's 6.9B / 67B), and the
# HF model cards of R1-Distill-Qwen-1.5B (1.78B: its head is untied),
# -Qwen-7B (7.62B) and -Llama-8B (8.03B).
PUBLISHED = {"deepseek_llm_7b": 6_910_365_696, "deepseek_llm_67b": 67_425_001_472,
             "r1_distill_qwen_1_5b": 1_777_088_000, "r1_distill_qwen_7b": 7_615_616_512,
             "r1_distill_llama_8b": 8_030_261_248}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts(name):
  cfg = get_preset(name)
  assert cfg.is_gqa and cfg.n_dense_layers == cfg.n_layers and cfg.n_moe_layers == 0
  variables = abstract_variables(cfg)
  assert set(variables) == {"params"}
  n = count_params(variables["params"])
  assert n == PUBLISHED[name]
  # An independent count from the shapes alone.
  d, hd, kv = cfg.dim, cfg.gqa_head_dim, cfg.kv_heads
  attn = d * hd * (2 * cfg.n_heads + 2 * kv) + cfg.attention_bias * hd * (cfg.n_heads + 2 * kv)
  per_layer = attn + 3 * d * cfg.inter_dim + 2 * d
  heads = 1 if cfg.tie_word_embeddings else 2
  assert n == cfg.n_layers * per_layer + heads * cfg.vocab_size * d + d


@pytest.mark.parametrize("changes,match", [
    ({"n_kv_heads": 3}, "n_heads=4 must be a multiple of n_kv_heads=3"),
    ({"head_dim": 15}, "head_dim=15 must be even"),
    ({"n_heads": 5, "n_kv_heads": 5}, "set head_dim explicitly"),
    ({"attention": "mla", "attention_bias": True}, "attention_bias=True needs attention='gqa'"),
    ({"attention": "swa"}, "attention='swa' must be one of"),
    ({"rope_type": "ntk"}, "rope_type='ntk' must be one of"),
    ({"llama3_low_freq_factor": 4.0}, "needs high > low > 0"),
])
def test_validation_names_the_field(changes, match):
  with pytest.raises(ValueError, match=match):
    get_preset("tiny_llama", **changes)


def test_gqa_with_moe_layers_runs():
  """GQA blocks with MoE FFNs and an MTP module (allowed: the FFN does not
  depend on the attention): forward and prefill/decode agree."""
  cfg = get_preset("tiny", attention="gqa", n_kv_heads=2, head_dim=16)
  variables = init_variables(cfg, jax.random.key(0))
  assert "wk" in variables["params"]["moe_layers"]["attn"]
  tokens = np.array([[3, 1, 4, 1, 5, 9, 2, 6]], np.int32)
  full = np.asarray(Transformer(cfg).apply(variables, tokens))
  model = Transformer(cfg)
  logits, _, entries = model.apply(variables, tokens[:, :5], mode="prefill")
  cache = cache_lib.write(cache_lib.init_cache(cfg, 1, 8), entries, jnp.zeros((1,), jnp.int32))
  for t in range(5, 8):
    logits, _, entries = model.apply(variables, tokens[:, t:t + 1],
                                     positions=np.array([[t]], np.int32), mode="decode",
                                     cache=cache)
    cache = cache_lib.write(cache, entries, jnp.array([t], jnp.int32))
    np.testing.assert_allclose(np.asarray(logits[:, 0]), full[:, t], rtol=1e-5, atol=1e-5)


def test_dense_flops_and_tied_head_scoring():
  """train/flops.py's GQA formula against a count from the parameter shapes
  (every matmul weight once, 2 FLOPs per multiply-add, + the causal core);
  infer.token_logprobs (the chunked head GRPO scores with) on a tied model
  against log_softmax of its full logits."""
  from deepseek_jax.infer import token_logprobs
  from deepseek_jax.train import flops
  for name in ("tiny_llama", "tiny_qwen2"):
    cfg = get_preset(name)
    shapes = jax.tree_util.tree_flatten_with_path(abstract_variables(cfg)["params"])[0]
    matmul = sum(int(np.prod(x.shape)) for path, x in shapes
                 if "kernel" in jax.tree_util.keystr(path)
                 and "embed" not in jax.tree_util.keystr(path))
    head = 0 if "head" in abstract_variables(cfg)["params"] else cfg.dim * cfg.vocab_size
    S = 16
    core = cfg.n_layers * 2 * cfg.n_heads * 2 * cfg.gqa_head_dim * (S + 1) / 2
    assert flops.forward_flops_per_token(cfg, S) == 2 * (matmul + head) + core, name
  cfg = get_preset("tiny_qwen2")
  assert cfg.tie_word_embeddings
  variables = init_variables(cfg, jax.random.key(1))
  tokens, targets = (jnp.asarray(np.random.default_rng(s).integers(0, cfg.vocab_size, (2, 10)),
                                 jnp.int32) for s in (0, 1))
  logits = Transformer(cfg).apply(variables, tokens)
  want = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(token_logprobs(cfg, variables, tokens, targets, chunk=4), want,
                             rtol=1e-5, atol=1e-5)
