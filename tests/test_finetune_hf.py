"""Fine-tuning from a published HF checkpoint (TrainConfig.init_from_hf).

Oracles: the checkpoint's own tensors (a first update at learning rate 0
leaves them exactly), transformers' DeepseekV2ForCausalLM's loss on the same
packed batch (each document run on its own, as our segment masking does),
and the error table of what may and may not change.
"""

import json
import os
import shutil

import numpy as np
import pytest

from deepseek_jax import get_preset
from deepseek_jax.data.tokenizer import ASSET_PATH
from deepseek_jax.interop import load_hf_checkpoint, save_hf_checkpoint
from deepseek_jax.interop.safetensors_io import flatten
from deepseek_jax.train import export
from deepseek_jax.train.hf_init import finetune_configs, finetune_model_config
from deepseek_jax.train.loop import train
from random_weights import random_variables, randomize_torch_model

# A V3-shaped model with MTP and a random router bias: everything the loader maps.
V3 = get_preset("tiny", vocab_size=128, n_mtp_depth=1)
TRAIN = dict(steps=1, batch_size=4, seq_len=64, n_train_problems=64, n_eval_problems=4,
             max_digits=1, warmup_steps=1, lr=1e-3, bias_update_speed=0.0,
             balance_weight=0.0, log_every=1, ckpt_every=1, eval_every=0, eval_batch_size=4,
             max_new_tokens=4, fast_compile=True)


@pytest.fixture(scope="module")
def v3_ckpt(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("v3_hf"))
  variables = random_variables(V3, seed=5)
  save_hf_checkpoint(V3, variables, path, max_shard_bytes=50_000)
  return path, variables


def test_model_config_comes_from_the_checkpoint_and_overrides_must_keep_shapes(v3_ckpt):
  path, _ = v3_ckpt
  assert finetune_model_config(path) == V3
  kept = finetune_model_config(path, {"max_seq_len": 256, "original_seq_len": 128,
                                      "rope_factor": 2.0, "n_mtp_depth": 0,
                                      "dtype": "bfloat16", "moe_impl": "dense"})
  assert (kept.max_seq_len, kept.n_mtp_depth, kept.dim) == (256, 0, V3.dim)
  for field, value in (("dim", 32), ("n_routed_experts", 16), ("n_mtp_depth", 2),
                       ("q_lora_rank", 0), ("vocab_size", 256)):
    with pytest.raises(ValueError, match=f"{field}: .* -> {value}.*change parameter shapes"):
      finetune_model_config(path, {field: value})
  with pytest.raises(ValueError, match="n_heads"):     # impossible values: ModelConfig's
    finetune_model_config(path, {"n_heads": 0})        # own validation, naming the field


def test_missing_or_incomplete_checkpoints_fail_before_compiling(v3_ckpt, tmp_path):
  path, _ = v3_ckpt
  with pytest.raises(FileNotFoundError, match="not a directory"):
    finetune_model_config(str(tmp_path / "nope"))
  broken = str(tmp_path / "broken")
  shutil.copytree(path, broken)
  shards = sorted(f for f in os.listdir(broken) if f.endswith(".safetensors"))
  os.remove(os.path.join(broken, shards[-1]))
  with pytest.raises(FileNotFoundError, match="missing from"):
    finetune_model_config(broken)
  with open(os.path.join(broken, "config.json"), "w") as f:
    json.dump({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]}, f)
  with pytest.raises(ValueError, match="unknown architecture"):
    finetune_model_config(broken)


def test_tokenizer_defaults_to_the_checkpoints(v3_ckpt, tmp_path):
  path, _ = v3_ckpt
  with_tok = str(tmp_path / "with_tokenizer")
  shutil.copytree(path, with_tok)
  shutil.copy(ASSET_PATH, os.path.join(with_tok, "tokenizer.json"))
  _, train_cfg = finetune_configs(with_tok, TRAIN)
  assert train_cfg.tokenizer_path == os.path.join(with_tok, "tokenizer.json")
  assert train_cfg.init_from_hf == with_tok
  _, train_cfg = finetune_configs(with_tok, dict(TRAIN, tokenizer_path=ASSET_PATH))
  assert train_cfg.tokenizer_path == ASSET_PATH          # an explicit one wins
  _, train_cfg = finetune_configs(path, TRAIN)
  assert train_cfg.tokenizer_path == ""                  # none there: the default


@pytest.mark.slow   # 20-60 s on 2 cores: CI's slow step keeps the default suite under 15 min
def test_first_update_at_lr_zero_keeps_the_checkpoint_and_a_rerun_resumes(v3_ckpt, tmp_path):
  """Step 1 of a warmup (lr 0) with no bias update: the run's checkpoint holds
  exactly the published parameters and router biases; the loss is our
  model's on the checkpoint weights. A rerun resumes its own run."""
  path, variables = v3_ckpt
  model_cfg, train_cfg = finetune_configs(path, dict(TRAIN, steps=2))
  lines = []
  out = train(model_cfg, train_cfg, str(tmp_path / "run"), stop_after=1, log=lines.append)
  assert any(f"initialised from {path}" in line for line in lines), lines
  _, _, trained, step = export.load_trained_run(str(tmp_path / "run"))
  assert step == 1
  flat_ckpt, flat_run = flatten(variables), flatten(trained)
  assert sorted(flat_run) == sorted(flat_ckpt)
  for k, v in flat_ckpt.items():
    np.testing.assert_array_equal(np.asarray(flat_run[k]), np.asarray(v), err_msg=k)
  assert out["history"][0]["lr"] == 0.0

  lines.clear()
  train(model_cfg, train_cfg, str(tmp_path / "run"), log=lines.append)
  assert any("resuming" in line for line in lines), lines
  assert any("ignoring init_from_hf" in line for line in lines), lines


@pytest.mark.torch
def test_first_loss_equals_transformers_loss_on_the_same_batch(tmp_path):
  """A DeepseekV2 checkpoint made by transformers: our step-1 loss equals its
  cross-entropy on the same packed batch, each document run separately."""
  import torch
  import transformers
  from deepseek_jax.train.loop import build_data
  torch.manual_seed(0)
  config = transformers.DeepseekV2Config(
      vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
      n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
      q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
      v_head_dim=8, max_position_embeddings=128, routed_scaling_factor=1.0,
      topk_method="greedy", norm_topk_prob=False, attn_implementation="eager")
  model = transformers.DeepseekV2ForCausalLM(config).eval()
  randomize_torch_model(model)
  model.save_pretrained(tmp_path / "hf")
  model_cfg, train_cfg = finetune_configs(str(tmp_path / "hf"), TRAIN)
  assert model_cfg.score_func == "softmax"
  out = train(model_cfg, train_cfg, str(tmp_path / "run"), log=lambda line: None)

  batch = build_data(model_cfg, train_cfg).iterator.batch_at(0)
  total, weight = 0.0, 0.0
  for row in range(batch["tokens"].shape[0]):
    seg = batch["segment_ids"][row]
    for s in set(seg[seg > 0].tolist()):
      idx = np.flatnonzero(seg == s)
      with torch.no_grad():
        logits = model(torch.tensor(batch["tokens"][row, idx][None], dtype=torch.long)
                       ).logits[0].double().numpy()
      logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                             keepdims=True)) - logits.max(-1, keepdims=True)
      nll = -logp[np.arange(len(idx)), batch["targets"][row, idx]]
      total += float((nll * batch["loss_mask"][row, idx]).sum())
      weight += float(batch["loss_mask"][row, idx].sum())
  assert out["history"][0]["loss"] == pytest.approx(total / weight, rel=1e-5)
  # and the run's parameters are still transformers' (lr 0 at step 1)
  _, loaded = load_hf_checkpoint(str(tmp_path / "hf"))
  _, _, trained, _ = export.load_trained_run(str(tmp_path / "run"))
  for k, v in flatten(loaded).items():
    np.testing.assert_array_equal(np.asarray(flatten(trained)[k]), np.asarray(v))


@pytest.mark.slow
def test_init_from_hf_on_a_mesh_streams_shards_and_matches_one_device(v3_ckpt, tmp_path):
  """Experts over 4 devices, FSDP over 2: each device's shard is built from
  the checkpoint; the lr-0 first step keeps the weights, and its loss is the
  single-device run's."""
  from deepseek_jax.parallel import MeshConfig
  path, variables = v3_ckpt
  model_cfg, train_cfg = finetune_configs(path, dict(TRAIN, batch_size=8))
  single = train(model_cfg, train_cfg, str(tmp_path / "one"), log=lambda line: None)
  meshed = train(model_cfg, train_cfg, str(tmp_path / "mesh"), log=lambda line: None,
                 mesh_cfg=MeshConfig(data=1, fsdp=2, expert=4))
  assert meshed["history"][0]["loss"] == pytest.approx(single["history"][0]["loss"], rel=1e-5)
  _, _, trained, _ = export.load_trained_run(str(tmp_path / "mesh"))
  for k, v in flatten(variables).items():
    np.testing.assert_array_equal(np.asarray(flatten(trained)[k]), np.asarray(v))
