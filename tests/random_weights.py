"""Random weights shared by the HF interop / fine-tuning tests.

Norm scales near 1, every other weight N(0, 0.1), router biases U(0, 0.5):
far from an init that would hide a missing norm, transpose or bias.
"""

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.model import abstract_variables


def random_variables(cfg, seed: int):
  """Our variables tree for `cfg`, drawn as above (float32)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "router_bias" in name:
      x = rng.uniform(0.0, 0.5, leaf.shape)
    elif "norm" in name:
      x = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
    else:
      x = 0.1 * rng.standard_normal(leaf.shape)
    return jnp.asarray(x, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract_variables(cfg))


def randomize_torch_model(model) -> None:
  """The same distribution for a transformers model's parameters, in place."""
  import torch
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.normal_(0.0, 0.1)


def random_hf_v4(hf_config: dict, seed: int = 0):
  """transformers' DeepseekV4ForCausalLM(DeepseekV4Config(**hf_config)) in
  eval mode with random weights (`randomize_torch_model`), random top-k
  router biases U(0, 0.5) and random hash tables (each token's
  num_experts_per_tok distinct experts)."""
  import torch
  import transformers
  torch.manual_seed(seed)
  model = transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(**hf_config)).eval()
  randomize_torch_model(model)
  n_exp, k = hf_config["n_routed_experts"], hf_config["num_experts_per_tok"]
  with torch.no_grad():
    for name, b in model.named_buffers():
      if name.endswith("e_score_correction_bias"):
        b.copy_(0.5 * torch.rand_like(b))
      elif name.endswith("tid2eid"):
        b.copy_(torch.stack([torch.randperm(n_exp)[:k] for _ in range(b.shape[0])]))
  return model
