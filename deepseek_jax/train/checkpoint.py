"""Checkpoints in `workdir/checkpoints`: save every N steps, keep K, resume.

Each checkpoint step directory holds two items (orbax `CheckpointManager`):
  state   the TrainState pytree (step, params, opt_state, router_bias)
  meta    JSON: the data iterator's state, the model config and the train
          config the run was started with; for a pipeline's train state
          also `pipeline_stages`, the blocks per stage of its stage layout
          (resuming on another pipe count converts it: train/start.py).
Starting a run in a workdir that already holds checkpoints resumes from the
latest one, but only if the saved model config equals the requested one: a
different model cannot load those arrays, so `open_checkpoints` refuses
before anything is built, naming every field that differs. Train-config
differences (more steps, another learning rate) and implementation fields of
the model config (IMPLEMENTATION_FIELDS: kernels, remat, EP buffers) are
allowed and reported; a model-config field the saved run predates counts as
its default.

Saving is asynchronous (orbax): `save` blocks only while the arrays are
copied to host memory, then the files are written by a background thread
while training goes on; the next save (or close) waits for the previous one.
The donated train state is safe: a buffer that the host copy still
references is not donated. Each save is written to a temporary directory
and renamed when complete, so a process killed at any moment (even -9,
mid-write) leaves only whole checkpoints behind; the temporary directory of
an interrupted save is never picked for resume and is deleted on the next
open. Retention: the `keep` most recent, plus every step that is a multiple
of `keep_every` (> 0) for long runs.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from deepseek_jax.config import ModelConfig

CHECKPOINT_DIR = "checkpoints"
# Inside CHECKPOINT_DIR: where orbax renames checkpoints it drops (keep_ckpts)
# before they are deleted; never a step.
TRASH_DIR = ".deleted"
META_KEYS = ("data", "model_config", "train_config")   # what `save` writes in meta
# ModelConfig fields that change how, not what, the model computes.
IMPLEMENTATION_FIELDS = ("moe_impl", "moe_block_size", "moe_ep_capacity", "remat_policy",
                         "fp8", "fp8_layers", "attn_block_size")


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


def _state_handler() -> ocp.PyTreeCheckpointHandler:
  """The train state's handler: orbax's pytree handler (the format its
  StandardCheckpointHandler writes) without replica-parallel saving. On CPU
  orbax splits every replicated array into one slice per replica, each a
  separately compiled and dispatched slice op: on an 8-device mesh ~300 tiny
  compilations (seconds) on a process's first save. Without it the holder of
  replica 0 writes each shard, as orbax already does on GPU."""
  handlers = ocp.type_handlers
  registry = handlers.create_type_handler_registry(
      (int, handlers.ScalarHandler()), (float, handlers.ScalarHandler()),
      (np.number, handlers.ScalarHandler()), (np.ndarray, handlers.NumpyHandler()),
      (jax.Array, handlers.ArrayHandler(use_replica_parallel=False)))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


class Checkpoints:
  """A run's checkpoints. Use `open_checkpoints`; close() when done."""

  def __init__(self, workdir: str, model_cfg: ModelConfig | None = None,
               train_cfg_dict: dict[str, Any] | None = None, *, every: int = 1, keep: int = 1,
               keep_every: int = 0, async_save: bool = True, read_only: bool = False):
    if every < 1:
      raise ValueError(f"ckpt_every={every} must be >= 1.")
    if keep < 1:
      raise ValueError(f"keep_ckpts={keep} must be >= 1.")
    if keep_every < 0 or (keep_every and keep_every % every):
      raise ValueError(f"keep_every={keep_every} must be 0 (off) or a multiple of "
                       f"ckpt_every={every} (only saved steps can be kept).")
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    self.model_cfg = model_cfg
    self.every = every
    self.train_cfg_dict = train_cfg_dict or {}
    keep_policy = ocp.checkpoint_managers.LatestN(keep)
    if keep_every:
      keep_policy = ocp.checkpoint_managers.AnyPreservationPolicy(
          [keep_policy, ocp.checkpoint_managers.EveryNSteps(keep_every)])
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(every),
        preservation_policy=keep_policy,
        enable_async_checkpointing=async_save,
        # A reader leaves the directory alone (a writer may be running).
        cleanup_tmp_directories=not read_only,
        # Old checkpoints leave by an atomic rename into TRASH_DIR, emptied
        # here once no write is in flight: orbax's plain removal (a
        # recursive delete) killed half-way left a step directory without
        # its "meta" item that every reader then lists as saved.
        todelete_subdir=TRASH_DIR,
        create=not read_only)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": _state_handler(), "meta": ocp.JsonCheckpointHandler()})
    self._last_saved: int | None = None
    self._read_only = read_only
    self._empty_trash()
    # Blocks per pipeline stage when the saved state is in a pipeline's stage
    # layout (parallel/pipeline_layout.py stage_tree), written to meta as
    # "pipeline_stages"; None: the model's own layout.
    self.pipeline_stages: list[int] | None = None

  @classmethod
  def existing(cls, workdir: str) -> "Checkpoints":
    """The checkpoints of a finished or running run, for reading (export,
    init_from, GRPO's source run): FileNotFoundError when there are none."""
    directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    if not os.path.isdir(directory):
      raise FileNotFoundError(
          f"{directory} does not exist: pass the --workdir of a training run "
          "(launch.train writes its checkpoints there).")
    ckpts = cls(workdir, async_save=False, read_only=True)
    if ckpts.latest_step() is None:
      ckpts.close()
      raise FileNotFoundError(f"no checkpoints in {directory}.")
    return ckpts

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def _resolve(self, step: int | None) -> int | None:
    """`step`, or the latest when None (None if there is none), after the
    write in flight is committed; ValueError if that step is not saved."""
    self.wait()
    if step is None:
      return self.latest_step()
    if step not in self.manager.all_steps():
      raise ValueError(f"step {step} is not saved in {self.directory}; saved steps: "
                       f"{self.all_steps()}.")
    return step

  def saved_meta(self, step: int | None = None) -> dict[str, Any] | None:
    step = self._resolve(step)
    if step is None:
      return None
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))
      return self._checked_meta(restored["meta"])
    except Exception as e:   # orbax / tensorstore raise many types, bare Exception too
      raise self._unreadable(step, e) from e

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

  def restore(self, abstract_state: Any, step: int | None = None
              ) -> tuple[Any, dict[str, Any]] | None:
    """(state, data iterator state) of checkpoint `step` (default: the
    latest), or None if there is none.

    abstract_state: a pytree of jax.ShapeDtypeStruct like the state to load
    (e.g. `step.abstract_train_state(...)`), shardings included for a mesh.
    """
    step = self._resolve(step)
    if step is None:
      return None
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
              abstract_state,
              restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)),
          meta=ocp.args.JsonRestore()))
      return restored["state"], dict(self._checked_meta(restored["meta"])["data"])
    except Exception as e:   # orbax / tensorstore raise many types, bare Exception too
      raise self._unreadable(step, e) from e

  @staticmethod
  def _checked_meta(meta: Any) -> dict[str, Any]:
    if not (isinstance(meta, dict) and all(k in meta for k in META_KEYS)):
      raise ValueError(f"its meta is not a dict of {META_KEYS}")
    return dict(meta)

  def _unreadable(self, step: int, error: Exception) -> ValueError:
    """The error for a checkpoint step that cannot be read: one line naming
    the step directory, the cause's first line and the fix."""
    cause = (str(error).strip().splitlines() or [""])[0]
    cause = cause.split(" See full TensorStore details")[0][:200]
    return ValueError(
        f"checkpoint {os.path.join(self.directory, str(step))} is unreadable "
        f"({type(error).__name__}: {cause}); it is corrupt or incomplete: delete that step "
        f"directory to use an earlier checkpoint (saved steps: {self.all_steps()}), or use "
        "a new workdir.")

  def save(self, step: int, state: Any, data_state: dict[str, Any], *,
           force: bool = False) -> bool:
    """Saves when `step` is a multiple of `every` (or force=True).

    A step that is already saved (or being saved) is skipped. Returns
    whether it started a save; the write finishes in the background
    (`wait` or `close` to wait for it).
    """
    if self.saved(step):
      return False
    meta = {"data": data_state, "model_config": self.model_cfg.to_dict(),
            "train_config": self.train_cfg_dict}
    if self.pipeline_stages:
      meta["pipeline_stages"] = list(self.pipeline_stages)
    saved = bool(self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)), force=force))
    if saved:
      self._last_saved = step
    return saved

  def saved(self, step: int) -> bool:
    """Whether `step` is saved (or being saved)."""
    return step == self._last_saved or step in self.manager.all_steps()

  def due(self, step: int) -> bool:
    """Whether `save(step)` (without force) would write a checkpoint."""
    return step % self.every == 0 and step != self._last_saved

  def wait(self) -> None:
    """Blocks until the background write of the last save is committed."""
    self.manager.wait_until_finished()
    self._empty_trash()

  def _empty_trash(self) -> None:
    """Deletes the checkpoints orbax renamed into TRASH_DIR (a writer on
    process 0 only, with no save in flight: a kill half-way leaves the rest
    for the next call, never a partial step directory)."""
    if self._read_only or jax.process_index() != 0:
      return
    shutil.rmtree(os.path.join(self.directory, TRASH_DIR), ignore_errors=True)

  def reached_preemption(self, step: int) -> bool:
    """Multi-process runs: True on every process at the same step once any
    of them got SIGTERM (JAX's preemption service, live after
    jax.distributed.initialize, catches the signal and agrees on the step)."""
    return bool(self.manager.reached_preemption(step))

  def close(self) -> None:
    self.manager.wait_until_finished()
    self._empty_trash()
    # orbax's close() does not wait for the background removal of interrupted
    # saves' temporary directories it starts on open; a process exiting while it
    # runs (a run refused right after opening) logs a traceback on stderr.
    await_cleanup = getattr(self.manager, "_maybe_await_cleanup_tmp_directory", None)
    if await_cleanup is not None:
      try:
        await_cleanup()
      except Exception:  # noqa: BLE001  (retried on the next open; not worth failing for)
        pass
    self.manager.close()


def open_checkpoints(workdir: str, model_cfg: ModelConfig, train_cfg_dict: dict[str, Any],
                     *, every: int, keep: int, keep_every: int = 0,
                     async_save: bool = True) -> tuple[Checkpoints, list[str]]:
  """Opens (creating) `workdir/checkpoints` and checks the saved model config.

  Returns (checkpoints, train-config differences to report). Raises
  ValueError, naming the fields, when the saved model config differs.
  """
  ckpts = Checkpoints(workdir, model_cfg, train_cfg_dict, every=every, keep=keep,
                      keep_every=keep_every, async_save=async_save)
  try:
    train_diff = ckpts.check_model_config()
  except Exception:
    ckpts.close()
    raise
  return ckpts, train_diff


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStruct pytree of `tree` (for `Checkpoints.restore`)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
