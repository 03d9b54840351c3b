"""--config.init_from_hf of a DeepSeek-V3 checkpoint into a V3.2 model: the
checkpoint's weights, fresh lightning indexers (those of a random start with
the run's seed), on one device and on a mesh (train/hf_init.py)."""

import jax
import numpy as np
import pytest

from deepseek_jax import get_preset
from deepseek_jax.interop import save_hf_checkpoint
from deepseek_jax.interop.safetensors_io import flatten
from deepseek_jax.model import init_variables
from deepseek_jax.train.hf_init import finetune_configs, init_state_from_hf
from random_weights import random_variables
from test_finetune_hf import TRAIN

V3 = get_preset("tiny", vocab_size=128, n_mtp_depth=1)
DSA = {"index_topk": 4, "index_n_heads": 2, "index_head_dim": 16}


@pytest.fixture(scope="module")
def v3_ckpt(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("v3_hf"))
  variables = random_variables(V3, seed=7)
  save_hf_checkpoint(V3, variables, path)
  return path, flatten(variables)


@pytest.mark.parametrize("on_mesh", [False, True])
def test_v3_checkpoint_starts_a_v32_run_with_fresh_indexers(v3_ckpt, on_mesh):
  from deepseek_jax.parallel import MeshConfig, setup
  path, want = v3_ckpt
  model_cfg, train_cfg = finetune_configs(path, TRAIN, DSA)
  assert model_cfg.use_dsa and model_cfg == V3.replace(**DSA)
  mesh, rules = setup(MeshConfig(data=1, fsdp=2, expert=4)) if on_mesh else (None, None)
  state = init_state_from_hf(model_cfg, train_cfg, path, mesh, rules)
  fresh = flatten(init_variables(model_cfg, jax.random.key(train_cfg.seed)))
  got = flatten({"params": state.params, "router_bias": state.router_bias})
  assert set(got) == set(fresh)
  indexers = [k for k in got if "/indexer/" in k]
  assert indexers and set(got) - set(indexers) == set(want)
  for k, v in got.items():
    np.testing.assert_array_equal(np.asarray(v), np.asarray(fresh[k] if k in indexers
                                                            else want[k]), err_msg=k)
    if on_mesh:
      assert v.sharding.mesh.shape == mesh.shape, k


def test_other_shape_changes_stay_refused(v3_ckpt):
  path, _ = v3_ckpt
  with pytest.raises(ValueError, match="dim: 64 -> 32.*change parameter shapes"):
    finetune_configs(path, TRAIN, dict(DSA, dim=32))
