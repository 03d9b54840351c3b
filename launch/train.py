"""Pre-train a DeepSeek-V3-style model on one host.

  python -m launch.train --config=launch/configs/default.py --workdir=/tmp/demo
  python -m launch.train --config=launch/configs/tiny.py --workdir=/tmp/tiny \
      --config.steps=20 --config.model.n_layers=4 --preset=tiny
  # on 8 devices: experts over 4 of them, FSDP over 2 (rule set ep_fsdp)
  python -m launch.train --config=launch/configs/tiny.py --workdir=/tmp/ep \
      --config.mesh.expert=4 --config.mesh.fsdp=2

Rerunning with the same --workdir resumes from its latest checkpoint. Outputs
in the workdir: checkpoints/, metrics.jsonl, loss.png. Config errors (an
impossible model field, an unknown preset) exit non-zero before compiling.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging

from deepseek_jax.train.loop import train
from launch.config_flag import DEFINE_config_file, parse_flags_or_exit
from launch.configs import build_configs, build_mesh_config

_CONFIG = DEFINE_config_file(
    "config", "Config file with get_config(); override fields with --config.x=y.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).")
_PRESET = flags.DEFINE_string("preset", None, "Model preset; replaces config.preset.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:   # orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  try:
    model_cfg, train_cfg = build_configs(_CONFIG.value, _PRESET.value)
    mesh_cfg = build_mesh_config(_CONFIG.value)
  except (ValueError, NotImplementedError) as e:
    sys.exit(f"launch.train: config error: {e}")
  print("model config:", json.dumps(model_cfg.to_dict()), flush=True)
  print("train config:", json.dumps(train_cfg.to_dict()), flush=True)
  try:
    train(model_cfg, train_cfg, _WORKDIR.value, mesh_cfg=mesh_cfg,
          log=lambda s: print(s, flush=True))
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    # Bad data files, a mismatched workdir, a diverged run: the library's
    # messages name the cause and the fix; a traceback adds nothing for users.
    sys.exit(f"launch.train: error: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=lambda argv: parse_flags_or_exit(argv, "launch.train"))
