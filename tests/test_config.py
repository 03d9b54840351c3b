"""ModelConfig: presets build, impossible combinations fail naming the field."""

import json

import pytest

from deepseek_jax import ModelConfig, get_preset
from deepseek_jax.config import PRESETS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid(name):
  cfg = get_preset(name)
  assert cfg == ModelConfig.from_dict(cfg.to_dict())


def test_v3_preset_matches_published_shape():
  c = get_preset("v3_671b")
  assert (c.vocab_size, c.dim, c.inter_dim, c.moe_inter_dim) == (129280, 7168, 18432, 2048)
  assert (c.n_layers, c.n_dense_layers, c.n_heads) == (61, 3, 128)
  assert (c.n_routed_experts, c.n_shared_experts, c.n_activated_experts) == (256, 1, 8)
  assert (c.n_expert_groups, c.n_limited_groups, c.route_scale) == (8, 4, 2.5)
  assert (c.q_lora_rank, c.kv_lora_rank) == (1536, 512)
  assert (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (128, 64, 128)
  assert c.n_mtp_depth == 1 and c.use_yarn


@pytest.mark.parametrize("changes,match", [
    (dict(n_heads=0), "n_heads=0 must be a positive integer"),
    (dict(n_dense_layers=5), "n_dense_layers=5 exceeds n_layers=3"),
    (dict(n_activated_experts=9), r"n_activated_experts=9 must be in \[1, n_routed_experts=8\]"),
    (dict(n_expert_groups=3), "n_expert_groups=3 must divide n_routed_experts=8"),
    (dict(n_limited_groups=5), r"n_limited_groups=5 must be in \[1, n_expert_groups=4\]"),
    (dict(n_expert_groups=8, n_limited_groups=1), "groups need >= 2 experts"),
    (dict(n_activated_experts=6, n_limited_groups=2), "could not find k experts"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim=7 must be even"),
    (dict(score_func="relu"), "score_func='relu'"),
    (dict(q_lora_rank=-1), "q_lora_rank=-1"),
    (dict(max_seq_len=512, rope_factor=0.5), "rope_factor=0.5 must be >= 1"),
    (dict(max_seq_len=512, beta_fast=1.0, beta_slow=2.0), "beta_fast > beta_slow"),
    (dict(dtype="float64"), "dtype='float64'"),
    (dict(moe_impl="magic"), "moe_impl='magic'"),
    (dict(route_scale=0.0), "route_scale=0.0 must be > 0"),
    (dict(n_routed_experts=0), "n_routed_experts=0"),
])
def test_impossible_configs_raise_naming_the_field(changes, match):
  with pytest.raises(ValueError, match=match):
    get_preset("tiny", **changes)


def test_dense_only_model_needs_no_experts():
  cfg = get_preset("tiny", n_dense_layers=3, n_routed_experts=0, n_activated_experts=0)
  assert cfg.n_moe_layers == 0


def test_unknown_field_suggests_the_closest_name():
  with pytest.raises(ValueError, match="did you mean 'n_heads'"):
    ModelConfig.from_dict({"n_head": 4})
  with pytest.raises(ValueError, match="Unknown preset"):
    get_preset("v4")


def test_from_json_with_preset_and_overrides(tmp_path):
  path = tmp_path / "m.json"
  path.write_text(json.dumps({"preset": "tiny", "dim": 96}))
  cfg = ModelConfig.from_json(str(path))
  assert cfg.dim == 96 and cfg.n_heads == get_preset("tiny").n_heads
  path.write_text("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    ModelConfig.from_json(str(path))


def test_every_shipped_launch_config_builds_its_configs():
  """Each launch/configs/*.py (and :arg stage) gives valid configs: a training
  config its ModelConfig / TrainConfig / MeshConfig, a GRPO config its
  GRPOConfig and MeshConfig, and its SFT stage's config file the same."""
  import glob
  import os
  from launch.config_flag import load_config
  from launch.configs import build_configs, build_mesh_config
  from deepseek_jax.parallel import MeshConfig
  from deepseek_jax.rl.trainer import GRPOConfig
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  paths = sorted(glob.glob(os.path.join(repo, "launch", "configs", "*.py")))
  paths = [p for p in paths if not p.endswith("__init__.py")]
  assert len(paths) >= 9
  grpo = 0
  for path in paths + [os.path.join(repo, "launch/configs/long_context.py") + ":2"]:
    config = load_config(path)
    if "group_size" in config:             # a launch.grpo config
      grpo += 1
      values = dict(config)
      sft, mesh = values.pop("sft_config"), values.pop("mesh")
      values.pop("init_from_hf")
      gcfg = GRPOConfig.from_dict(values)
      MeshConfig.from_dict(dict(mesh))
      model_cfg, train_cfg = build_configs(load_config(os.path.join(repo, sft)))
      assert set(gcfg.task_kinds) <= set(train_cfg.task_kinds), path
    elif path.endswith("finetune.py"):     # the model is the HF checkpoint's
      with pytest.raises(ValueError, match="init_from_hf=DIR"):
        build_configs(config)
      continue
    else:
      model_cfg, train_cfg = build_configs(config)
      build_mesh_config(config)
    assert model_cfg.n_layers >= 1 and train_cfg.steps >= 1
  assert grpo == 3            # grpo_demo, grpo_countdown, grpo_stage4
