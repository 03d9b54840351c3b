"""HF interop of the dense decoders: Llama and Qwen2 checkpoints <-> attention="gqa".

Oracles: transformers' LlamaForCausalLM (GQA, Llama-3 RoPE scaling, untied)
and Qwen2ForCausalLM (q/k/v biases, tied head, head_dim apart from dim /
heads; and YaRN) saved with `save_pretrained` and loaded with
`from_pretrained`; the published config.json files of DeepSeek LLM and the
R1 distilled students against the presets; exact equality after a round
trip through our writer and reader.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy

from deepseek_jax import get_preset
from deepseek_jax.interop import (config_from_hf, config_to_hf, load_hf_checkpoint,
                                  load_jax_variables, save_hf_checkpoint)
from deepseek_jax.interop.safetensors_io import flatten
from deepseek_jax.model import Transformer
from launch import convert
from random_weights import random_variables, randomize_torch_model

try:
  import torch
  import transformers
except ImportError:
  torch = transformers = None

needs_torch = pytest.mark.skipif(torch is None, reason="needs torch + transformers")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4
TOKENS = np.random.default_rng(0).integers(0, 256, (2, 48)).astype(np.int32)

# The shapes of the tiny_llama / tiny_qwen2 presets, as transformers configs.
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2)
HF_CONFIGS = {
    "llama": ("LlamaConfig", dict(
        COMMON, max_position_embeddings=128, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32})),
    "qwen2": ("Qwen2Config", dict(
        COMMON, head_dim=24, max_position_embeddings=128, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # Qwen2.5's long-context recipe: YaRN x4 on max_position_embeddings = the original.
    "qwen2_yarn": ("Qwen2Config", dict(
        COMMON, max_position_embeddings=32, tie_word_embeddings=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 32})),
}
MODELS = {"LlamaConfig": "LlamaForCausalLM", "Qwen2Config": "Qwen2ForCausalLM"}


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.double().numpy()


def _close(got, want):
  np.testing.assert_allclose(got, want, rtol=0, atol=TOL * np.abs(want).max())


def _tensors(directory):
  out = {}
  for name in sorted(os.listdir(directory)):
    if name.endswith(".safetensors"):
      out.update(safetensors.numpy.load_file(os.path.join(directory, name)))
  return out


@pytest.fixture(scope="module")
def hf_ckpts(tmp_path_factory):
  """{name: (transformers model, its save_pretrained directory)}, random weights."""
  if torch is None:
    pytest.skip("needs torch + transformers")
  out = {}
  for i, (name, (config_cls, values)) in enumerate(HF_CONFIGS.items()):
    torch.manual_seed(i)
    config = getattr(transformers, config_cls)(attn_implementation="eager", **values)
    model = getattr(transformers, MODELS[config_cls])(config).eval()
    randomize_torch_model(model)
    path = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(path)
    out[name] = (model, path)
  return out


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
  """{preset: (cfg, random variables, our HF export directory)}."""
  out = {}
  for i, preset in enumerate(("tiny_llama", "tiny_qwen2")):
    cfg = get_preset(preset)
    variables = random_variables(cfg, seed=10 + i)
    path = str(tmp_path_factory.mktemp(f"export_{preset}"))
    save_hf_checkpoint(cfg, variables, path, max_shard_bytes=60_000)
    out[preset] = (cfg, variables, path)
  return out


# ---------------------------------------------------------------------------
# transformers -> ours, ours -> transformers

@needs_torch
@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_transformers_checkpoints_load_with_their_logits(hf_ckpts, name):
  """A save_pretrained directory loads as the matching preset, and our logits
  over 48 tokens (past the Llama-3 / YaRN original context of 32) are
  transformers' within 1e-4 of their scale."""
  model, path = hf_ckpts[name]
  cfg, variables = load_hf_checkpoint(path)
  if name != "qwen2_yarn":
    assert cfg == get_preset(f"tiny_{name}")
  else:   # YaRN on in ours from the original context: max_seq_len = 32 * 4
    assert (cfg.rope_type, cfg.rope_factor, cfg.original_seq_len, cfg.max_seq_len,
            cfg.mscale) == ("yarn", 4.0, 32, 128, 1.0)
    assert cfg.use_yarn and cfg.softmax_scale != cfg.gqa_head_dim ** -0.5
  assert ("head" in variables["params"]) != cfg.tie_word_embeddings
  want = _hf_logits(model, TOKENS)
  assert np.abs(want).max() > 1.0
  _close(np.asarray(Transformer(cfg).apply(variables, TOKENS)), want)


@needs_torch
@pytest.mark.parametrize("preset,arch", [("tiny_llama", "LlamaForCausalLM"),
                                         ("tiny_qwen2", "Qwen2ForCausalLM")])
def test_our_exports_load_in_transformers_with_our_logits(ours, preset, arch):
  cfg, variables, path = ours[preset]
  with open(os.path.join(path, "config.json")) as f:
    written = json.load(f)
  assert written["architectures"] == [arch]
  assert written["tie_word_embeddings"] == cfg.tie_word_embeddings
  keys = set(_tensors(path))
  assert ("lm_head.weight" in keys) != cfg.tie_word_embeddings   # tied: transformers ties
  assert ("model.layers.1.self_attn.k_proj.bias" in keys) == cfg.attention_bias
  model = transformers.AutoModelForCausalLM.from_pretrained(
      path, attn_implementation="eager").eval()
  assert type(model).__name__ == arch
  assert model.model.layers[0].self_attn.k_proj.weight.shape == (
      cfg.kv_heads * cfg.gqa_head_dim, cfg.dim)
  _close(np.asarray(Transformer(cfg).apply(variables, TOKENS)), _hf_logits(model, TOKENS))


@needs_torch
@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_round_trips_are_exact(hf_ckpts, ours, name):
  """ours -> HF -> ours gives the same config and arrays; HF -> ours -> HF
  gives transformers' own tensors, key for key, bit for bit."""
  cfg, variables, path = ours[f"tiny_{name}"]
  back_cfg, back = load_hf_checkpoint(path)
  assert back_cfg == cfg
  want = flatten(variables)
  assert sorted(flatten(back)) == sorted(want)
  for k, v in flatten(back).items():
    np.testing.assert_array_equal(np.asarray(v), np.asarray(want[k]), err_msg=k)

  _, hf_path = hf_ckpts[name]
  cfg, loaded = load_hf_checkpoint(hf_path)
  out = os.path.join(os.path.dirname(path), f"again_{name}")
  save_hf_checkpoint(cfg, loaded, out)
  original, rewritten = _tensors(hf_path), _tensors(out)
  assert sorted(rewritten) == sorted(original)
  for k, v in original.items():
    np.testing.assert_array_equal(rewritten[k], v, err_msg=k)


# ---------------------------------------------------------------------------
# config.json mapping

# The published config.json files (as on the Hub; keys we ignore included).
PUBLISHED = {
    "deepseek_llm_7b": {
        "architectures": ["LlamaForCausalLM"], "bos_token_id": 100000,
        "eos_token_id": 100001, "hidden_act": "silu", "hidden_size": 4096,
        "initializer_range": 0.02, "intermediate_size": 11008,
        "max_position_embeddings": 4096, "model_type": "llama", "num_attention_heads": 32,
        "num_hidden_layers": 30, "num_key_value_heads": 32, "pretraining_tp": 1,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 102400},
    "r1_distill_qwen_1_5b": {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu",
        "hidden_size": 1536, "initializer_range": 0.02, "intermediate_size": 8960,
        "max_position_embeddings": 131072, "max_window_layers": 21, "model_type": "qwen2",
        "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06, "rope_theta": 10000, "sliding_window": 4096,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "use_mrope": False, "use_sliding_window": False, "vocab_size": 151936},
    "r1_distill_llama_8b": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": 128001,
        "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
        "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
        "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "use_cache": True, "vocab_size": 128256},
}
PUBLISHED["deepseek_llm_67b"] = {**PUBLISHED["deepseek_llm_7b"], "hidden_size": 8192,
                                 "intermediate_size": 22016, "num_attention_heads": 64,
                                 "num_hidden_layers": 95, "num_key_value_heads": 8}
PUBLISHED["r1_distill_qwen_7b"] = {**PUBLISHED["r1_distill_qwen_1_5b"], "hidden_size": 3584,
                                   "intermediate_size": 18944, "num_attention_heads": 28,
                                   "num_key_value_heads": 4, "max_window_layers": 28,
                                   "vocab_size": 152064}
RUNTIME = {"dtype": "bfloat16", "param_dtype": "float32", "remat_policy": "full"}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_published_configs_are_the_presets_and_round_trip(preset):
  cfg = config_from_hf(PUBLISHED[preset], **RUNTIME)
  assert cfg == get_preset(preset)
  assert config_from_hf(config_to_hf(cfg), **RUNTIME) == cfg
  if transformers is not None:     # as transformers re-saves our config.json
    hf = config_to_hf(cfg)
    again = transformers.AutoConfig.for_model(**hf).to_dict()
    assert config_from_hf(again, **RUNTIME) == cfg


@pytest.mark.parametrize("model_type,change,match", [
    ("llama", {"mlp_bias": True}, "mlp_bias=true"),
    ("llama", {"attention_bias": True}, "attention_bias=true .* o_proj"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope type 'linear'"),
    ("llama", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope type 'dynamic'"),
    ("llama", {"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0]}},
     "rope type 'longrope'"),
    ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "truncate": False}},
     "yarn 'truncate': false"),
    ("llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ("qwen2", {"use_sliding_window": True, "max_window_layers": 0}, "use_sliding_window=true"),
    ("qwen2", {"layer_types": ["sliding_attention"] * 28}, "use_sliding_window"),
])
def test_what_we_cannot_hold_is_refused_naming_the_field(model_type, change, match):
  base = PUBLISHED["r1_distill_qwen_1_5b" if model_type == "qwen2" else "r1_distill_llama_8b"]
  with pytest.raises(NotImplementedError, match=match):
    config_from_hf({**base, **change})
  # Published Qwen2 configs carry an inactive window (use_sliding_window false): fine.
  config_from_hf(PUBLISHED["r1_distill_qwen_7b"])


def test_export_refuses_models_no_dense_checkpoint_holds(tmp_path):
  moe = get_preset("tiny", attention="gqa", n_kv_heads=2, head_dim=16)
  with pytest.raises(NotImplementedError, match="n_moe_layers=.*dense Llama / Qwen2"):
    save_hf_checkpoint(moe, random_variables(moe, 0), str(tmp_path / "moe"))
  odd = get_preset("tiny_llama", n_heads=6, n_kv_heads=2, head_dim=16)   # 64 % 6 != 0
  with pytest.raises(NotImplementedError, match="dim=64 is not a multiple of n_heads=6"):
    config_to_hf(odd)
  assert not os.path.exists(tmp_path / "moe" / "config.json")
  qwen_odd = get_preset("tiny_qwen2", n_heads=6, n_kv_heads=2)          # Qwen2 allows it
  assert config_to_hf(qwen_odd)["architectures"] == ["Qwen2ForCausalLM"]


@needs_torch
def test_untied_checkpoint_without_lm_head_fails_naming_it(hf_ckpts, tmp_path):
  """A Llama directory whose config unties the head but holds no lm_head
  (e.g. a tied checkpoint with the flag flipped) is refused from its headers."""
  _, path = hf_ckpts["qwen2"]
  broken = tmp_path / "untied"
  broken.mkdir()
  for name in os.listdir(path):
    data = open(os.path.join(path, name), "rb").read()
    if name == "config.json":
      data = json.dumps({**json.loads(data), "tie_word_embeddings": False}).encode()
    (broken / name).write_bytes(data)
  with pytest.raises(ValueError, match=r"1 missing tensors: lm_head\.weight.*tie_word_"):
    load_hf_checkpoint(str(broken))


# ---------------------------------------------------------------------------
# launch.convert and init_from_hf

@needs_torch
def test_convert_cli_both_ways(hf_ckpts, tmp_path):
  """launch.convert: transformers' Qwen2 directory -> ours (a subprocess) ->
  HF (in process) gives back transformers' tensors exactly."""
  _, hf_path = hf_ckpts["qwen2"]
  jax_dir, hf_out = str(tmp_path / "jax"), str(tmp_path / "hf")
  result = subprocess.run(
      [sys.executable, "-m", "launch.convert", f"--from_hf={hf_path}", f"--to_jax={jax_dir}"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  cfg, _ = load_jax_variables(jax_dir)
  assert cfg == get_preset("tiny_qwen2")
  convert.convert(from_jax=jax_dir, to_hf=hf_out)
  original, rewritten = _tensors(hf_path), _tensors(hf_out)
  assert sorted(rewritten) == sorted(original)
  for k, v in original.items():
    np.testing.assert_array_equal(rewritten[k], v, err_msg=k)


@needs_torch
def test_init_from_hf_fine_tunes_a_dense_checkpoint(tmp_path):
  """`launch.train --config=finetune.py --config.init_from_hf=DIR` on a tiny
  transformers Llama: one step (lr 0: warmup) runs, and the run's
  checkpoint holds transformers' weights unchanged."""
  from deepseek_jax.train import export
  torch.manual_seed(3)
  config = transformers.LlamaConfig(**dict(HF_CONFIGS["llama"][1], vocab_size=128))
  model = transformers.LlamaForCausalLM(config)
  randomize_torch_model(model)
  hf_dir, workdir = str(tmp_path / "hf"), str(tmp_path / "run")
  model.save_pretrained(hf_dir)
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  result = subprocess.run(
      [sys.executable, "-m", "launch.train", "--config=launch/configs/finetune.py",
       f"--workdir={workdir}", f"--config.init_from_hf={hf_dir}", "--config.steps=1",
       "--config.warmup_steps=1",
       "--config.batch_size=2", "--config.seq_len=64", "--config.n_train_problems=16",
       "--config.n_eval_problems=2", "--config.max_digits=1", "--config.ckpt_every=1",
       "--config.log_every=1", "--config.fast_compile=True"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "initialised from" in result.stdout + result.stderr
  cfg, _, trained, step = export.load_trained_run(workdir)
  assert step == 1 and cfg.is_gqa and cfg.rope_type == "llama3"
  _, loaded = load_hf_checkpoint(hf_dir)
  for k, v in flatten(loaded).items():
    np.testing.assert_array_equal(np.asarray(flatten(trained)[k]), np.asarray(v), err_msg=k)


def test_loading_onto_a_mesh_places_heads_and_kv_heads_over_tensor(ours):
  """fsdp 2 x tensor 2 (rule set fsdp_tp): every leaf, the q/k/v biases
  included, in its sharding, each device's shard that slice of the host
  load (the oracle)."""
  from deepseek_jax.model import abstract_variables
  from deepseek_jax.parallel import MeshConfig, setup, tree_shardings
  cfg, _, path = ours["tiny_qwen2"]
  _, host = load_hf_checkpoint(path)
  mesh, rules = setup(MeshConfig(data=2, fsdp=2, tensor=2, rules="fsdp_tp"))
  _, placed = load_hf_checkpoint(path, mesh=mesh, rules="fsdp_tp")
  want = flatten(tree_shardings(abstract_variables(cfg), mesh, rules))
  flat_host = flatten(host)
  for name, arr in flatten(placed).items():
    assert arr.sharding == want[name], name
    for shard in arr.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data),
                                    np.asarray(flat_host[name])[shard.index], err_msg=name)
  bias = flatten(placed)["params/dense_layers/attn/wk/bias"]       # [layers, kv, hd]
  assert bias.addressable_shards[0].data.shape[1] == cfg.kv_heads // 2
