"""A training run's checkpoint, exported to HF, runs identically in transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import get_preset
from deepseek_jax.model import Transformer
from deepseek_jax.train import checkpoint, step
from deepseek_jax.train.export import load_trained_variables
from deepseek_jax.train.config import TrainConfig
from launch.convert import convert

# Marked `torch`: tests/conftest.py stops the run with a clear message if these
# are selected without torch installed (deselect with -m "not torch").
pytestmark = pytest.mark.torch
try:
  import torch
  import transformers
except ImportError:
  torch = transformers = None


def test_workdir_checkpoint_exports_to_hf_with_identical_logits(tmp_path):
  cfg = get_preset("tiny", n_mtp_depth=0)
  train_cfg = TrainConfig(steps=4, batch_size=2, seq_len=32, warmup_steps=1,
                          fast_compile=True)
  state = step.init_train_state(cfg, train_cfg, jax.random.key(3))
  # A router bias far from zero, as after training, so routing depends on it.
  state = state.replace(router_bias=jax.tree.map(
      lambda b: b + jnp.linspace(-0.5, 0.5, b.size).reshape(b.shape), state.router_bias))
  workdir = str(tmp_path / "run")
  ckpts, _ = checkpoint.open_checkpoints(workdir, cfg, train_cfg.to_dict(), every=1, keep=2)
  ckpts.save(4, state, {"step": 4, "seed": 0}, force=True)
  ckpts.close()

  got_cfg, variables, saved_step = load_trained_variables(workdir)
  assert got_cfg == cfg and saved_step == 4
  for a, b in zip(jax.tree_util.tree_leaves(variables),
                  jax.tree_util.tree_leaves({"params": state.params,
                                             "router_bias": state.router_bias})):
    np.testing.assert_array_equal(a, b)

  convert(from_workdir=workdir, to_hf=str(tmp_path / "hf"))
  hf = transformers.DeepseekV3ForCausalLM.from_pretrained(
      str(tmp_path / "hf"), attn_implementation="eager").eval()
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24))
  with torch.no_grad():
    want = hf(torch.tensor(tokens)).logits.numpy()
  got = jax.jit(Transformer(cfg).apply)(variables, jnp.asarray(tokens, jnp.int32))
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_export_errors_name_the_problem(tmp_path):
  with pytest.raises(FileNotFoundError, match="pass the --workdir of a training run"):
    load_trained_variables(str(tmp_path / "nothing"))
