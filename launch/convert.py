"""Convert checkpoints between Hugging Face (DeepSeek-V4 / V3.2 / V3 / V2, Llama, Qwen2) and ours.

  # HF directory (config.json + *.safetensors, FP8 or bf16) -> deepseek_jax
  python -m launch.convert --from_hf /ckpt/DeepSeek-V3 --to_jax /ckpt/v3_jax

  # deepseek_jax directory -> HF (loadable by DeepseekV3ForCausalLM.from_pretrained)
  python -m launch.convert --from_jax /ckpt/v3_jax --to_hf /ckpt/v3_hf --max_shard_gb 5

  # a training run's latest checkpoint (launch.train --workdir) -> HF (with the
  # run's tokenizer.json) or deepseek_jax
  python -m launch.convert --from_workdir runs/demo --to_hf runs/demo_hf [--step N]

  # a dense model: DeepSeek LLM / R1-Distill-Llama (LlamaForCausalLM) or
  # R1-Distill-Qwen (Qwen2ForCausalLM), both ways
  python -m launch.convert --from_hf /ckpt/DeepSeek-R1-Distill-Qwen-1.5B --to_jax /ckpt/q15_jax

The DeepSeek families: V4 (DeepseekV4ForCausalLM, arch="v4": the tensor names
transformers' save_pretrained writes, or DeepSeek's own; float weights only,
MTP under mtp.{k}. which transformers skips), V3.2 (DeepseekV32ForCausalLM: V3
with DeepSeek Sparse Attention, index_topk > 0), V3 / R1 (DeepseekV3ForCausalLM)
and V2 / V2-Lite / V2.5 / Coder-V2 (DeepseekV2ForCausalLM); a model with DSA is written as
V3.2, one with softmax routing as V2, one with sigmoid routing as V3. Dense decoders
(attention="gqa"): LlamaForCausalLM, and Qwen2ForCausalLM for a model with
q/k/v biases; a tied model's head is the embedding (no lm_head.weight).

The deepseek_jax format is `model_config.json` + `variables.safetensors`
(see `deepseek_jax.interop.jax_format`). `--dtype` casts the written weights
(the router bias stays float32); by default weights are float32 after an HF
load and keep their dtype on export.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time

from absl import app, flags
from absl import logging as absl_logging

from deepseek_jax import interop
from launch.config_flag import parse_flags_or_exit

_log = logging.getLogger("launch.convert")

_FROM_HF = flags.DEFINE_string("from_hf", None, "HF checkpoint directory to read.")
_TO_JAX = flags.DEFINE_string("to_jax", None, "deepseek_jax directory to write.")
_FROM_JAX = flags.DEFINE_string("from_jax", None, "deepseek_jax directory to read.")
_TO_HF = flags.DEFINE_string("to_hf", None, "HF checkpoint directory to write.")
_FROM_WORKDIR = flags.DEFINE_string(
    "from_workdir", None, "Training run directory (launch.train --workdir) to export; "
    "with --to_hf or --to_jax.")
_STEP = flags.DEFINE_integer("step", None, "With --from_workdir: the step (default latest).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "Weight dtype to write (default: float32 from HF, unchanged to HF).")
_MAX_SHARD_GB = flags.DEFINE_float("max_shard_gb", interop.DEFAULT_MAX_SHARD_BYTES / 2**30,
                                   "Largest HF safetensors shard, GiB.")


# A user's mistake (flags, a missing, incomplete or corrupt checkpoint, another
# architecture): the messages name the file or flag and the fix on one line.
USER_ERRORS = (ValueError, NotImplementedError, FileNotFoundError, app.UsageError)


def convert(*, from_hf: str | None = None, to_jax: str | None = None,
            from_jax: str | None = None, to_hf: str | None = None,
            dtype: str | None = None,
            max_shard_bytes: int = interop.DEFAULT_MAX_SHARD_BYTES,
            from_workdir: str | None = None, step: int | None = None) -> None:
  """Runs one conversion; exactly one of (from_hf, to_jax) / (from_jax, to_hf) /
  (from_workdir, to_hf or to_jax).

  Raises one of USER_ERRORS with a one-line message for a user's mistake (bad
  flags, a missing, incomplete or corrupt source), before writing anything.
  """
  for dst in (to_hf, to_jax):
    if dst and os.path.exists(dst) and not os.path.isdir(dst):
      raise app.UsageError(f"destination {dst!r} is a file, not a directory; pass a "
                           "directory to write the checkpoint into.")
  if from_workdir:
    if from_hf or from_jax or bool(to_hf) == bool(to_jax):
      raise app.UsageError("give --from_workdir DIR with exactly one of --to_hf / --to_jax.")
    from deepseek_jax.data.tokenizer import ASSET_PATH  # training deps only here
    from deepseek_jax.train.export import load_trained_run
    start = time.time()
    cfg, train_cfg, variables, saved_step = load_trained_run(from_workdir, step)
    _log.info("restored step %d of %s in %.1fs", saved_step, from_workdir, time.time() - start)
    if to_hf:
      interop.save_hf_checkpoint(cfg, variables, to_hf, max_shard_bytes=max_shard_bytes,
                                 dtype=dtype)
      # The run's tokenizer goes along: the directory is then all a fine-tune
      # (launch.train --config.init_from_hf) or transformers needs.
      tokenizer = train_cfg.tokenizer_path or ASSET_PATH
      if os.path.isfile(tokenizer):
        shutil.copyfile(tokenizer, os.path.join(to_hf, "tokenizer.json"))
    else:
      interop.save_jax_variables(cfg, variables, to_jax)
    _log.info("done in %.1fs: %s (step %d) -> %s", time.time() - start, from_workdir,
                 saved_step, to_hf or to_jax)
    return
  hf_to_jax, jax_to_hf = bool(from_hf or to_jax), bool(from_jax or to_hf)
  if hf_to_jax == jax_to_hf:
    raise app.UsageError("give either --from_hf DIR --to_jax DIR or --from_jax DIR --to_hf DIR.")
  src, dst = (from_hf, to_jax) if hf_to_jax else (from_jax, to_hf)
  if not src or not dst:
    raise app.UsageError(f"both a source and a destination are needed (got {src!r} -> {dst!r}).")
  if os.path.abspath(src) == os.path.abspath(dst):
    raise app.UsageError(f"source and destination are the same directory {src!r}.")
  if os.path.exists(src) and not os.path.isdir(src):
    raise app.UsageError(f"source {src!r} is a file, not a directory; pass the checkpoint's "
                         "directory.")
  if not os.path.isdir(src):
    raise app.UsageError(f"source directory {src!r} does not exist.")
  start = time.time()
  if hf_to_jax:
    _log.info("reading HF checkpoint %s", src)
    cfg, variables = interop.load_hf_checkpoint(src, dtype=dtype)
    _log.info("read in %.1fs; writing deepseek_jax checkpoint %s", time.time() - start, dst)
    interop.save_jax_variables(cfg, variables, dst)
  else:
    _log.info("reading deepseek_jax checkpoint %s", src)
    cfg, variables = interop.load_jax_variables(src)
    _log.info("read in %.1fs; writing HF checkpoint %s", time.time() - start, dst)
    interop.save_hf_checkpoint(cfg, variables, dst, max_shard_bytes=max_shard_bytes,
                               dtype=dtype)
  _log.info("done in %.1fs: %s -> %s", time.time() - start, src, dst)


def main(argv):
  if len(argv) > 1:
    sys.exit(f"launch.convert: error: unexpected arguments {argv[1:]}; every option is a "
             "--flag=value (see --help).")
  # Our progress at INFO; the libraries' (orbax: ~30 lines a conversion) at
  # WARNING unless --verbosity says otherwise.
  if not flags.FLAGS["verbosity"].present:
    absl_logging.set_verbosity(absl_logging.WARNING)
  for name in ("launch.convert", "deepseek_jax"):
    logging.getLogger(name).setLevel(logging.INFO)
  try:
    convert(from_hf=_FROM_HF.value, to_jax=_TO_JAX.value, from_jax=_FROM_JAX.value,
            to_hf=_TO_HF.value, dtype=_DTYPE.value,
            max_shard_bytes=int(_MAX_SHARD_GB.value * 2**30),
            from_workdir=_FROM_WORKDIR.value, step=_STEP.value)
  except USER_ERRORS as e:
    sys.exit(f"launch.convert: error: {' '.join(str(e).split())}")


if __name__ == "__main__":
  app.run(main, flags_parser=lambda argv: parse_flags_or_exit(argv, "launch.convert"))
