"""Pre-train a DeepSeek-V3-style model on one device, a mesh, or several hosts.

  python -m launch.train --config=launch/configs/default.py --workdir=/tmp/demo
  python -m launch.train --config=launch/configs/tiny.py --workdir=/tmp/tiny \
      --config.steps=20 --config.model.n_layers=4 --preset=tiny
  # on 8 devices: experts over 4 of them, FSDP over 2 (rule set ep_fsdp)
  python -m launch.train --config=launch/configs/tiny.py --workdir=/tmp/ep \
      --config.mesh.expert=4 --config.mesh.fsdp=2

  # two hosts (or two simulated hosts on one machine), one process each; the
  # mesh spans both, the same flags everywhere except --process_id
  python -m launch.train --config=launch/configs/tiny.py --workdir=/shared/run \
      --config.mesh.expert=4 --config.mesh.fsdp=2 \
      --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0
  # on SLURM (srun, one task per host): JAX reads the job's environment
  srun python -m launch.train ... --multihost

  # preference learning from an SFT run (--config.objective picks the trainer)
  python -m launch.train --config=launch/configs/reward_model.py --workdir=runs/rm \
      --config.init_from=runs/own_sft
  python -m launch.train --config=launch/configs/dpo.py --workdir=runs/dpo \
      --config.init_from=runs/own_sft

  # token-level distillation of the README demo's MoE into a dense student
  python -m launch.train --config=launch/configs/distill_dense.py --workdir=runs/distill \
      --config.distill_teacher=runs/demo

  # fine-tune a published checkpoint (DeepSeek-V2-Lite, V3, ...) on your data
  python -m launch.train --config=launch/configs/finetune.py --workdir=runs/ft \
      --config.init_from_hf=/ckpt/DeepSeek-V2-Lite --config.data_files='("data.jsonl",)'

Rerunning with the same --workdir resumes from its latest checkpoint. Outputs
in the workdir: checkpoints/, metrics.jsonl, loss.png. A user's mistake (an
impossible model field, an unknown preset, a missing or malformed data file or
tokenizer, a workdir of another model, a corrupt checkpoint) exits non-zero
with one line naming it and the fix, before anything compiles; `run` does the
same in-process, raising one of USER_ERRORS.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

from deepseek_jax.parallel import distributed
from deepseek_jax.rl.preference_trainer import train_preferences
from deepseek_jax.train.distill_trainer import train_distill
from deepseek_jax.train.loop import train
from launch.config_flag import begin_main, DEFINE_config_file, parse_flags_or_exit
from launch.configs import build_configs, build_mesh_config

_CONFIG = DEFINE_config_file(
    "config", "Config file with get_config(); override fields with --config.x=y.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).")
_PRESET = flags.DEFINE_string("preset", None, "Model preset; replaces config.preset.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process: HOST:PORT of process 0 (all processes "
    "pass the same value); with --num_processes and --process_id.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process: how many.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process: this one, 0-based.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Multi-process on a cluster JAX detects (SLURM, Open MPI, TPU "
    "pods): coordinator, count and id come from the environment.")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_s", distributed.DEFAULT_HEARTBEAT_TIMEOUT_S,
    "Multi-process: a peer silent this long counts as dead and every process stops "
    "(non-zero exit). A collective in flight notices a dead peer at once.")
_SHUTDOWN = flags.DEFINE_integer(
    "shutdown_timeout_s", distributed.DEFAULT_SHUTDOWN_TIMEOUT_S,
    "Multi-process: how long a finished process waits for its peers to finish.")
flags.mark_flags_as_required(["config", "workdir"])


# TrainConfig.objective -> its trainer, each called as
# trainer(model_cfg, train_cfg, workdir, mesh_cfg=, log=) -> summary.
TRAINERS = {
    "lm": train,                        # next-token prediction: pretraining, SFT
    "reward_model": train_preferences,  # Bradley-Terry on preference pairs
    "dpo": train_preferences,           # DPO / IPO against the start weights
    "distill": train_distill,           # token-level KL to a teacher's top-k
}


# A user's mistake (a config field, a data file, a workdir, a checkpoint): the
# library's messages name the cause and the fix on one line, so main prints
# that line and exits non-zero; a traceback adds nothing for users.
USER_ERRORS = (ValueError, NotImplementedError, FileNotFoundError, FloatingPointError)


class LaunchError(ValueError):
  """A user error found before training, its message prefixed with the stage
  ("config error: ...", "flag error: ...")."""


def run(config, workdir: str, *, preset: str | None = None,
        coordinator_address: str | None = None, num_processes: int | None = None,
        process_id: int | None = None, multihost: bool = False,
        heartbeat_timeout_s: int = distributed.DEFAULT_HEARTBEAT_TIMEOUT_S,
        shutdown_timeout_s: int = distributed.DEFAULT_SHUTDOWN_TIMEOUT_S,
        log=lambda s: print(s, flush=True)) -> dict:
  """Everything `main` does, given plain arguments: the configs from `config`
  (a ConfigDict, e.g. `launch.config_flag.load_config(path, overrides)`),
  multi-process setup, then `train` in `workdir`; returns train's summary.

  Raises one of USER_ERRORS with a one-line message for a user's mistake, all
  of them before anything compiles except a diverged run's FloatingPointError
  (a LaunchError for config and flag errors).
  """
  try:
    model_cfg, train_cfg = build_configs(config, preset)
    mesh_cfg = build_mesh_config(config)
  except USER_ERRORS as e:
    raise LaunchError(f"config error: {e}") from e
  try:
    multi = distributed.initialize(
        coordinator_address, num_processes, process_id, auto=multihost,
        heartbeat_timeout_s=heartbeat_timeout_s, shutdown_timeout_s=shutdown_timeout_s)
  except ValueError as e:
    raise LaunchError(f"flag error: {e}") from e
  if multi:
    import jax  # noqa: PLC0415  (only after initialize)
    log(f"process {jax.process_index()} of {jax.process_count()}: "
        f"{jax.local_device_count()} local of {jax.device_count()} devices")
  if distributed.is_primary():
    log("model config: " + json.dumps(model_cfg.to_dict()))
    log("train config: " + json.dumps(train_cfg.to_dict()))
  return TRAINERS[train_cfg.objective](model_cfg, train_cfg, workdir, mesh_cfg=mesh_cfg,
                                       log=log)


def error_line(prog: str, e: Exception) -> str:
  """The one line `prog` exits with for a user error `e`."""
  text = " ".join(str(e).split())    # a message is one line, whatever its source
  return f"{prog}: {text}" if isinstance(e, LaunchError) else f"{prog}: error: {text}"


def main(argv):
  begin_main(argv, "launch.train")
  try:
    run(_CONFIG.value, _WORKDIR.value, preset=_PRESET.value,
        coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value, multihost=_MULTIHOST.value,
        heartbeat_timeout_s=_HEARTBEAT.value, shutdown_timeout_s=_SHUTDOWN.value)
  except distributed.PeerLostError as e:
    # Leave at once: a normal exit would wait for the dead peer in JAX's
    # shutdown barrier (up to --shutdown_timeout_s) and then abort anyway.
    print(f"launch.train: error: {e}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)
  except USER_ERRORS as e:
    # Bad configs or data files, a mismatched workdir, a corrupt checkpoint,
    # a diverged run: one line naming the cause and the fix.
    sys.exit(error_line("launch.train", e))


if __name__ == "__main__":
  app.run(main, flags_parser=lambda argv: parse_flags_or_exit(argv, "launch.train"))
