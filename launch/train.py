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

  # fine-tune a published checkpoint (DeepSeek-V2-Lite, V3, ...) on your data
  python -m launch.train --config=launch/configs/finetune.py --workdir=runs/ft \
      --config.init_from_hf=/ckpt/DeepSeek-V2-Lite --config.data_files='("data.jsonl",)'

Rerunning with the same --workdir resumes from its latest checkpoint. Outputs
in the workdir: checkpoints/, metrics.jsonl, loss.png. Config errors (an
impossible model field, an unknown preset) exit non-zero before compiling.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

from deepseek_jax.parallel import distributed
from deepseek_jax.train.loop import train
from launch.config_flag import DEFINE_config_file, parse_flags_or_exit
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:   # orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  try:
    model_cfg, train_cfg = build_configs(_CONFIG.value, _PRESET.value)
    mesh_cfg = build_mesh_config(_CONFIG.value)
  except (ValueError, NotImplementedError, FileNotFoundError) as e:
    sys.exit(f"launch.train: config error: {e}")
  try:
    multi = distributed.initialize(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, auto=_MULTIHOST.value,
        heartbeat_timeout_s=_HEARTBEAT.value, shutdown_timeout_s=_SHUTDOWN.value)
  except ValueError as e:
    sys.exit(f"launch.train: flag error: {e}")
  if multi:
    import jax  # noqa: PLC0415  (only after initialize)
    print(f"process {jax.process_index()} of {jax.process_count()}: "
          f"{jax.local_device_count()} local of {jax.device_count()} devices", flush=True)
  if distributed.is_primary():
    print("model config:", json.dumps(model_cfg.to_dict()), flush=True)
    print("train config:", json.dumps(train_cfg.to_dict()), flush=True)
  try:
    train(model_cfg, train_cfg, _WORKDIR.value, mesh_cfg=mesh_cfg,
          log=lambda s: print(s, flush=True))
  except distributed.PeerLostError as e:
    # Leave at once: a normal exit would wait for the dead peer in JAX's
    # shutdown barrier (up to --shutdown_timeout_s) and then abort anyway.
    print(f"launch.train: error: {e}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    # Bad data files, a mismatched workdir, a diverged run: the library's
    # messages name the cause and the fix; a traceback adds nothing for users.
    sys.exit(f"launch.train: error: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=lambda argv: parse_flags_or_exit(argv, "launch.train"))
