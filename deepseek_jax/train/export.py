"""Model variables out of a training run's checkpoints (for conversion/serving).

    cfg, variables, step = load_trained_variables("runs/demo")
    deepseek_jax.interop.save_hf_checkpoint(cfg, variables, "runs/demo_hf")

Reads the model and train configs saved with the checkpoint (so no flags are
needed), restores the TrainState of the requested (default: latest) step and
returns `{"params", "router_bias"}` as `Transformer.apply` expects them.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import jax

from deepseek_jax.config import ModelConfig
from deepseek_jax.parallel.pipeline_layout import layout_from_sizes, unstage_tree
from deepseek_jax.train.checkpoint import CHECKPOINT_DIR, Checkpoints
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.step import abstract_train_state


def load_trained_variables(workdir: str, step: int | None = None
                           ) -> tuple[ModelConfig, dict[str, Any], int]:
  """(model config, variables, step) of a checkpoint in `workdir/checkpoints`."""
  model_cfg, _, variables, step = load_trained_run(workdir, step)
  return model_cfg, variables, step


def require_run(workdir: str, field: str) -> None:
  """FileNotFoundError naming `field` unless `workdir` holds a run's
  checkpoints (for flags that point at an earlier run: init_from)."""
  if not os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR)):
    raise FileNotFoundError(f"{field}={workdir!r} holds no {CHECKPOINT_DIR}/: give the "
                            "workdir of a trained run.")


def load_model_dir(path: str, field: str) -> tuple[ModelConfig, dict[str, Any],
                                                   TrainConfig | None]:
  """(cfg, variables, the run's TrainConfig or None) of a model directory:
  a training run's workdir (its latest checkpoint: `load_trained_run`) or an
  HF checkpoint directory (config.json + safetensors: interop's
  load_hf_checkpoint, TrainConfig None); ValueError naming `field` otherwise.
  Teachers (distillation) and judges (GRPO) are read through it."""
  if os.path.isdir(os.path.join(path, "checkpoints")):
    cfg, train_cfg, variables, _ = load_trained_run(path)
    return cfg, variables, train_cfg
  if os.path.isfile(os.path.join(path, "config.json")):
    from deepseek_jax.interop import load_hf_checkpoint
    cfg, variables = load_hf_checkpoint(path)[:2]
    return cfg, variables, None
  raise ValueError(f"{field}: {path!r} is neither a training run directory (with "
                   "checkpoints/) nor an HF checkpoint directory (with config.json).")


def load_trained_run(workdir: str, step: int | None = None
                     ) -> tuple[ModelConfig, TrainConfig, dict[str, Any], int]:
  """(model config, train config, variables, step): `load_trained_variables`
  plus the run's TrainConfig (its tokenizer and prompt template)."""
  ckpts = Checkpoints.existing(workdir)
  try:
    step = ckpts.latest_step() if step is None else step
    meta = ckpts.saved_meta(step)        # ValueError naming the saved steps
    model_cfg = ModelConfig.from_dict(meta["model_config"])
    # A GRPO run keeps its own config beside the TrainConfig (rl/trainer.py).
    train_cfg = TrainConfig.from_saved(meta["train_config"])
    if train_cfg.objective == "reward_model":      # params carry a value head
      raise ValueError(f"{workdir!r} is a reward-model run (objective='reward_model'): its "
                       "checkpoint scores (prompt, response) pairs and generates nothing; "
                       "load it with deepseek_jax.rl.preference_trainer.load_reward_model("
                       "workdir), or use as a policy the run it started from (init_from).")
    # A pipeline run's state is in its stage layout: back to the model's.
    layout = layout_from_sizes(model_cfg, meta.get("pipeline_stages"))
    state, _ = ckpts.restore(abstract_train_state(model_cfg, train_cfg, layout=layout), step)
  finally:
    ckpts.close()
  variables = {"params": state.params, "router_bias": state.router_bias}
  if layout is not None:
    variables = jax.jit(partial(unstage_tree, layout))(variables)
  return model_cfg, train_cfg, variables, int(step)
