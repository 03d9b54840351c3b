"""Experiment configs: Python files whose `get_config()` returns a ConfigDict.

A config has three parts, all overridable from the command line:
  config.preset      a ModelConfig preset name ("tiny", "small", ...); unused
                     with config.init_from_hf (the checkpoint is the model)
  config.model.<f>   ModelConfig fields replacing the preset's (None = keep
                     the preset's value; every field exists as a typed
                     placeholder so `--config.model.n_layers=6` works)
  config.mesh.<f>    MeshConfig: axis sizes data/fsdp/tensor/expert/pipe
                     (-1 = the remaining devices) and the rule set `rules`
  config.<f>         TrainConfig fields (steps, batch_size, lr, ...)
`launch/train.py` turns it into (ModelConfig, TrainConfig) with `build_configs`
and the MeshConfig with `build_mesh_config`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ml_collections import ConfigDict, config_dict

from deepseek_jax.config import ModelConfig, get_preset
from deepseek_jax.parallel import MeshConfig
from deepseek_jax.train.hf_init import finetune_configs
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.loop import check_compatible

_NON_TRAIN_KEYS = ("preset", "model", "mesh")


def _placeholder_for(default: Any, explicit: Any = None):
  kind = type(default) if default is not None else float
  ref = config_dict.placeholder(kind)
  if explicit is not None:
    ref.set(explicit)
  return ref


def base_config(preset: str, **model_overrides: Any) -> ConfigDict:
  """A config with TrainConfig defaults and the given preset / model overrides."""
  config = ConfigDict()
  config.preset = preset
  defaults = ModelConfig()
  unknown = set(model_overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
  if unknown:
    raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}")
  config.model = ConfigDict({
      f.name: _placeholder_for(getattr(defaults, f.name), model_overrides.get(f.name))
      for f in dataclasses.fields(ModelConfig)})
  config.mesh = ConfigDict(MeshConfig().to_dict())
  train = TrainConfig()
  for f in dataclasses.fields(TrainConfig):
    value = getattr(train, f.name)
    config[f.name] = value if value is not None else _placeholder_for(None)
  return config


def build_configs(config: ConfigDict, preset: str | None = None
                  ) -> tuple[ModelConfig, TrainConfig]:
  """(ModelConfig, TrainConfig) from a config; `preset` replaces config.preset.

  With `init_from_hf=DIR` the model is the checkpoint's (its config.json; the
  config's model fields may only change what keeps every parameter shape) and
  the tokenizer defaults to DIR/tokenizer.json (train.hf_init).

  Raises ValueError naming the offending field (before anything compiles).
  """
  overrides = {k: v for k, v in config.model.items() if v is not None}
  train_values = {k: v for k, v in config.items() if k not in _NON_TRAIN_KEYS}
  if train_values.get("init_from_hf"):
    # The checkpoint's config.json is the model (config.preset is not used).
    if preset:
      raise ValueError(f"--preset={preset} and init_from_hf={train_values['init_from_hf']!r} "
                       "both name the model; drop --preset (the checkpoint's config.json "
                       "is the model).")
    model_cfg, train_cfg = finetune_configs(train_values["init_from_hf"], train_values,
                                            overrides)
    check_compatible(model_cfg, train_cfg)
    return model_cfg, train_cfg
  if not (preset or config.preset):
    raise ValueError("no model: config.preset is empty; set --config.init_from_hf=DIR (an HF "
                     "checkpoint to fine-tune) or --preset=NAME.")
  model_cfg = get_preset(preset or config.preset, **overrides)
  train_cfg = TrainConfig.from_dict(train_values)
  check_compatible(model_cfg, train_cfg)
  return model_cfg, train_cfg


def build_mesh_config(config: ConfigDict) -> MeshConfig:
  """MeshConfig from `config.mesh` (ValueError naming a bad axis or rule set)."""
  return MeshConfig.from_dict(dict(config.mesh))
