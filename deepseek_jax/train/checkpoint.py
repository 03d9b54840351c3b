"""Checkpoints in `workdir/checkpoints`: save every N steps, keep K, resume.

Each checkpoint step directory holds two items (orbax `CheckpointManager`):
  state   the TrainState pytree (step, params, opt_state, router_bias)
  meta    JSON: the data iterator's state, the model config and the train
          config the run was started with.
Starting a run in a workdir that already holds checkpoints resumes from the
latest one, but only if the saved model config equals the requested one: a
different model cannot load those arrays, so `open_checkpoints` refuses
before anything is built, naming every field that differs. Train-config
differences (more steps, another learning rate) and implementation fields of
the model config (IMPLEMENTATION_FIELDS: kernels, remat, EP buffers) are
allowed and reported; a model-config field the saved run predates counts as
its default.

Saving is synchronous: the train step donates its input state, so the
arrays must be written before the next step may reuse their buffers.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from deepseek_jax.config import ModelConfig

CHECKPOINT_DIR = "checkpoints"
# ModelConfig fields that change how, not what, the model computes.
IMPLEMENTATION_FIELDS = ("moe_impl", "moe_block_size", "moe_ep_capacity", "remat_policy",
                         "fp8", "fp8_layers")


def config_diff(saved: dict[str, Any], requested: dict[str, Any]) -> list[str]:
  """'field: saved X, requested Y' for every differing (or missing) field."""
  out = []
  for key in sorted(set(saved) | set(requested)):
    a, b = saved.get(key, "<absent>"), requested.get(key, "<absent>")
    if _normalise(a) != _normalise(b):
      out.append(f"{key}: saved {a!r}, requested {b!r}")
  return out


def _normalise(v):
  # JSON turns tuples into lists; compare the JSON form.
  return json.loads(json.dumps(v))


class Checkpoints:
  """A run's checkpoints. Use `open_checkpoints`; close() when done."""

  def __init__(self, workdir: str, model_cfg: ModelConfig, train_cfg_dict: dict[str, Any],
               *, every: int, keep: int):
    if every < 1:
      raise ValueError(f"ckpt_every={every} must be >= 1.")
    if keep < 1:
      raise ValueError(f"keep_ckpts={keep} must be >= 1.")
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    self.model_cfg = model_cfg
    self.train_cfg_dict = train_cfg_dict
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(every),
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=False,
        create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def saved_meta(self, step: int | None = None) -> dict[str, Any] | None:
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])

  def check_model_config(self) -> list[str]:
    """Raises ValueError if the latest checkpoint has another model config.

    Returns the list of train-config differences (allowed) for reporting.
    """
    meta = self.saved_meta()
    if meta is None:
      return []
    # A field added to ModelConfig after the run was saved counts as its
    # default (new fields default to the old behaviour).
    saved = {**ModelConfig().to_dict(), **meta["model_config"]}
    requested = self.model_cfg.to_dict()
    # How the same arrays are computed (kernels, remat, EP buffers) may change
    # between calls of one run: reported like train-config changes.
    knobs = [f"model.{d}" for d in config_diff(
        {k: saved[k] for k in IMPLEMENTATION_FIELDS},
        {k: requested[k] for k in IMPLEMENTATION_FIELDS})]
    diff = config_diff({k: v for k, v in saved.items() if k not in IMPLEMENTATION_FIELDS},
                       {k: v for k, v in requested.items() if k not in IMPLEMENTATION_FIELDS})
    if diff:
      raise ValueError(
          f"workdir checkpoints in {self.directory} (step {self.latest_step()}) were "
          f"trained with a different model config; differing fields: "
          + "; ".join(diff)
          + ". Use a new workdir, or request the saved model config.")
    return knobs + config_diff(meta.get("train_config", {}), self.train_cfg_dict)

  def restore(self, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
    """(state, data iterator state) of the latest checkpoint, or None if none.

    abstract_state: a pytree of jax.ShapeDtypeStruct like the state to load
    (e.g. `step.abstract_train_state(...)`).
    """
    step = self.latest_step()
    if step is None:
      return None
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"]["data"])

  def save(self, step: int, state: Any, data_state: dict[str, Any], *,
           force: bool = False) -> bool:
    """Saves when `step` is a multiple of `every` (or force=True).

    A step that is already saved is skipped. Returns whether it saved.
    """
    if step in self.manager.all_steps():
      return False
    meta = {"data": data_state, "model_config": self.model_cfg.to_dict(),
            "train_config": self.train_cfg_dict}
    saved = self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)
    self.manager.wait_until_finished()
    return bool(saved)

  def reached_preemption(self, step: int) -> bool:
    """Multi-process runs: True on every process at the same step once any
    of them got SIGTERM (JAX's preemption service, live after
    jax.distributed.initialize, catches the signal and agrees on the step)."""
    return bool(self.manager.reached_preemption(step))

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def open_checkpoints(workdir: str, model_cfg: ModelConfig, train_cfg_dict: dict[str, Any],
                     *, every: int, keep: int) -> tuple[Checkpoints, list[str]]:
  """Opens (creating) `workdir/checkpoints` and checks the saved model config.

  Returns (checkpoints, train-config differences to report). Raises
  ValueError, naming the fields, when the saved model config differs.
  """
  ckpts = Checkpoints(workdir, model_cfg, train_cfg_dict, every=every, keep=keep)
  try:
    train_diff = ckpts.check_model_config()
  except Exception:
    ckpts.close()
    raise
  return ckpts, train_diff


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStruct pytree of `tree` (for `Checkpoints.restore`)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
