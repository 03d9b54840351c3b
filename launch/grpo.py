"""GRPO (DeepSeekMath / DeepSeek-R1) on the embedded arithmetic task.

  python -m launch.grpo --config=launch/configs/grpo_demo.py --workdir=runs/grpo
  # start from a run you trained (skips the cold-start SFT stage)
  python -m launch.grpo --config=launch/configs/grpo_demo.py --workdir=runs/grpo2 \
      --config.init_from=runs/demo --config.loss_type=dr_grpo --config.scale=none
  # your own prompts ({"prompt", "answer"} records), checked by a verifier
  python -m launch.grpo --config=launch/configs/grpo_demo.py --workdir=runs/grpo_files \
      --config.init_from=runs/demo --config.prompt_files=launch/data/arith_prompts.jsonl \
      --config.eval_prompt_files=launch/data/arith_eval.jsonl --config.verifier=math

With `init_from` empty the command first runs the cold-start SFT stage (the
config's `sft_config` file, trained into WORKDIR/sft, resumable; with
`--config.init_from_hf=DIR` it fine-tunes that HF checkpoint, e.g. with
`--config.sft_config=launch/configs/finetune.py`), then GRPO from it into
WORKDIR. Outputs: WORKDIR/summary.json (held-out greedy and
sampled accuracy before and after, format rate, wall_s), metrics.jsonl,
samples.jsonl, grpo.png, checkpoints/ (readable by launch.generate).
Rerunning with the same --workdir resumes; SIGTERM / SIGINT checkpoint the
step reached (of either stage) and exit 0. Config errors exit non-zero
before compiling. `--config.mesh.<axis>=N` (data/fsdp/tensor/expert; the
default fills `data` with every device) runs the GRPO stage on a device
mesh, and the SFT stage too unless its own config sets a mesh.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

from launch.config_flag import begin_main, DEFINE_config_file, parse_flags_or_exit

_CONFIG = DEFINE_config_file(
    "config", "Config file with get_config(); override fields with --config.x=y.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory of the GRPO run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  begin_main(argv, "launch.grpo")
  from deepseek_jax.files import atomic_json
  from deepseek_jax.parallel import MeshConfig
  from deepseek_jax.rl.trainer import GRPOConfig, check_inputs, train_grpo
  from deepseek_jax.train.loop import train
  from launch.configs import build_configs, build_mesh_config
  from launch.config_flag import ConfigFileParser
  t0 = time.time()
  values = dict(_CONFIG.value)
  sft_config = values.pop("sft_config", "")
  init_from_hf = values.pop("init_from_hf", "")
  mesh = values.pop("mesh", None)
  workdir = _WORKDIR.value
  log = lambda s: print(s, flush=True)  # noqa: E731
  try:
    gcfg = GRPOConfig.from_dict(values)
    check_inputs(gcfg)           # prompt files, reward functions: before any stage runs
    mesh_cfg = MeshConfig.from_dict(dict(mesh)) if mesh is not None else None
    if gcfg.init_from and init_from_hf:
      raise ValueError(f"init_from={gcfg.init_from!r} and init_from_hf={init_from_hf!r}: "
                       "GRPO starts from a trained run, or the SFT stage from an HF "
                       "checkpoint; set one of them.")
    if not gcfg.init_from:
      if not sft_config:
        raise ValueError("init_from is empty and no sft_config is given: name a trained "
                         "run (--config.init_from=DIR) or an SFT config file.")
      sft = ConfigFileParser("sft_config").parse(sft_config)
      if init_from_hf:       # the SFT stage fine-tunes the published checkpoint
        sft.init_from_hf = init_from_hf
      model_cfg, train_cfg = build_configs(sft)
      # The SFT stage runs on its own config's mesh when that sets one, else on
      # the GRPO stage's (--config.mesh.*), so one set of flags shards both.
      sft_mesh = build_mesh_config(sft)
      if sft_mesh == MeshConfig():
        sft_mesh = mesh_cfg
  except (ValueError, NotImplementedError, FileNotFoundError) as e:
    sys.exit(f"launch.grpo: config error: {e}")
  print("grpo config:", json.dumps(gcfg.to_dict()), flush=True)
  try:
    if not gcfg.init_from:
      sft_dir = os.path.join(workdir, "sft")
      log(f"== stage 1: cold-start SFT ({sft_config}) into {sft_dir}")
      if train(model_cfg, train_cfg, sft_dir, mesh_cfg=sft_mesh, log=log)["stopped_by"]:
        return               # SIGTERM / SIGINT: checkpointed; a rerun resumes the SFT stage
      gcfg = GRPOConfig.from_dict({**gcfg.to_dict(), "init_from": sft_dir})
      log("== stage 2: GRPO")
    summary = train_grpo(gcfg, workdir, mesh_cfg=mesh_cfg, log=log)
  except (ValueError, NotImplementedError, FileNotFoundError, FloatingPointError) as e:
    sys.exit(f"launch.grpo: error: {e}")
  path = os.path.join(workdir, "summary.json")
  if summary["stopped_by"] is None and os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    saved["grpo_wall_s"] = saved["wall_s"]
    saved["wall_s"] = time.time() - t0      # the whole pipeline, SFT stage included
    atomic_json(saved, path)
  log("summary: " + json.dumps({k: v for k, v in summary.items() if k != "history"}))


if __name__ == "__main__":
  app.run(main, flags_parser=lambda argv: parse_flags_or_exit(argv, "launch.grpo"))
