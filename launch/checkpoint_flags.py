"""What launch.generate and launch.evaluate share: the model to run, from a
training run (--workdir, --step) or an HF checkpoint (--from_hf), and its
tokenizer (--tokenizer)."""

from __future__ import annotations

import os
import sys
from typing import Any, NamedTuple

from absl import flags


class CheckpointFlags(NamedTuple):
  workdir: Any
  step: Any
  from_hf: Any
  tokenizer: Any

  def load(self) -> tuple[Any, Any, Any, str, str]:
    """load_checkpoint of the flags' values."""
    return load_checkpoint(self.workdir.value, self.step.value, self.from_hf.value,
                           self.tokenizer.value)


def define_checkpoint_flags() -> CheckpointFlags:
  """--workdir, --step, --from_hf, --tokenizer (defined at a program's import)."""
  return CheckpointFlags(
      flags.DEFINE_string("workdir", None, "A launch.train or launch.grpo run directory (its "
                          "latest checkpoint, or --step)."),
      flags.DEFINE_integer("step", None, "With --workdir: this checkpoint step."),
      flags.DEFINE_string("from_hf", None, "An HF DeepSeek-V3 checkpoint directory."),
      flags.DEFINE_string("tokenizer", None, "A tokenizer.json (default: the run's "
                          "tokenizer, or DIR/tokenizer.json with --from_hf)."))


def load_checkpoint(workdir: str | None, step: int | None, from_hf: str | None,
                    tokenizer: str | None) -> tuple[Any, Any, Any, str, str]:
  """(cfg, variables, tokenizer or None, tokenizer path, template).

  With workdir: its checkpoint at `step` (latest by default), the run's
  tokenizer (or `tokenizer`) and prompt template. With from_hf: the HF
  directory, its tokenizer.json (or `tokenizer`; None when neither exists:
  callers that need text say so), template "none". ValueError /
  FileNotFoundError naming the flag otherwise."""
  from deepseek_jax.data.tokenizer import default_tokenizer, load_tokenizer
  if bool(workdir) == bool(from_hf):
    raise ValueError("pass exactly one of --workdir (a training run) and --from_hf (an HF "
                     "directory).")
  if workdir:
    from deepseek_jax.train.export import load_trained_run, require_run
    require_run(workdir, "--workdir")
    cfg, train_cfg, variables, at = load_trained_run(workdir, step)
    path = tokenizer or train_cfg.tokenizer_path
    print(f"loaded {workdir} step {at}", file=sys.stderr)
    return cfg, variables, load_tokenizer(path) if path else default_tokenizer(), path or "", \
        train_cfg.template
  from deepseek_jax.interop import load_hf_checkpoint
  cfg, variables = load_hf_checkpoint(from_hf)
  path = tokenizer or os.path.join(from_hf, "tokenizer.json")
  tok = load_tokenizer(path) if tokenizer or os.path.exists(path) else None
  return cfg, variables, tok, path if tok is not None else "", "none"
