"""FP8 (emulated) vs float32 training loss on a smooth task: the README demo
model and optimizer on plain text instead of the arithmetic task.

The arithmetic demo memorises its task in a sharp drop whose timing varies
from seed to seed by ~20% in final loss (bench/RESULTS.md), far more than FP8
rounding moves it. Character-level language modelling of English text has a
smooth loss curve, so the gap FP8 makes can be read at the 0.5% level. The
corpus is the project's own prose (README, WORKSPACE, bench and experiment
notes, module docstrings and comments of deepseek_jax/), cut into
120-character documents (a 128-token row holds one whole): no download. For
each seed, one float32 run and one `model.fp8=True` run share the data
order and the initial weights; the figure is the relative gap of the mean
loss over the last `--tail` steps. Prints one JSON line per run, one per
seed with the gap.

`--controls fp8 rounding` also runs, per seed, a second float32 run that
computes the same function with another MoE kernel (model.moe_impl="ragged"
instead of the CPU's "blocked": the same sums in another order, differing
in the last bits). Its gap is the noise floor of the comparison: how far
two float32 runs drift apart from rounding alone by the end. An FP8 gap is
only meaningful outside that floor: at the demo's lr 3e-3 it is up to
0.6% after 400 steps, at `--lr 1e-3` at most 0.005% after 300
(bench/RESULTS.md), so the FP8 figure is read at 1e-3. `bf16` adds a run
with bfloat16 activations and matmuls (float32 master weights): the
baseline the V3 report's 0.25% is measured against (FP8 vs BF16, not vs
float32).

  python bench/fp8_loss_gap.py --steps 300 --seeds 0 1
  python bench/fp8_loss_gap.py --steps 400 --tail 40 --seeds 0 1 --controls fp8 rounding
  python bench/fp8_loss_gap.py --steps 300 --lr 1e-3 --seeds 0 --controls rounding fp8
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from launch.configs import build_configs  # noqa: E402
from launch.configs import default as demo  # noqa: E402


def write_corpus(path: str, chars_per_doc: int = 120) -> int:
  """The project's prose as JSON lines {"text": ...}; returns the count."""
  files = sorted(glob.glob(os.path.join(REPO, "*.md")) + glob.glob(os.path.join(REPO, "*/*.md"))
                 + glob.glob(os.path.join(REPO, "deepseek_jax", "**", "*.py"), recursive=True))
  docs = []
  for name in files:
    with open(name, encoding="utf-8") as f:
      text = f.read()
    if name.endswith(".py"):   # prose only: docstrings and comments
      lines = [ln.strip().lstrip("#").strip() for ln in text.splitlines()]
      text = "\n".join(ln for ln in lines if ln and not ln.startswith(("import", "from")))
    text = "".join(ch for ch in text if 32 <= ord(ch) < 127 or ch == "\n")
    docs += [text[i:i + chars_per_doc] for i in range(0, len(text), chars_per_doc)]
  with open(path, "w") as f:
    for d in docs:
      if len(d) > 50:
        f.write(json.dumps({"text": d}) + "\n")
  return len(docs)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--tail", type=int, default=30, help="steps averaged at the end")
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  p.add_argument("--fp8-layers", default="attn,mlp,experts")
  p.add_argument("--controls", nargs="+", choices=("fp8", "rounding", "bf16"),
                 default=["fp8"],
                 help="runs compared with each seed's float32 run: FP8, float32 with "
                      "another MoE kernel (the rounding noise floor), bfloat16 compute "
                      "(the V3 report's baseline)")
  p.add_argument("--lr", type=float, default=None,
                 help="peak learning rate (default: the demo's 3e-3; the schedule's end "
                      "lr stays a tenth of it). Lower rates make the float32 trajectory "
                      "less sensitive to rounding, which lowers the noise floor")
  p.add_argument("--workdir", default="", help="default: a temporary directory")
  args = p.parse_args(argv)

  from deepseek_jax.train.loop import train   # noqa: PLC0415  (after sys.path)
  root = args.workdir or tempfile.mkdtemp(prefix="fp8_gap_")
  os.makedirs(root, exist_ok=True)
  corpus = os.path.join(root, "corpus.jsonl")
  n_docs = write_corpus(corpus)
  for seed in args.seeds:
    tails = {}
    for run in ["float32"] + list(args.controls):
      config = demo.get_config()
      config.steps = args.steps
      config.warmup_steps = min(config.warmup_steps, args.steps)
      config.seed = seed
      if args.lr is not None:
        config.lr, config.end_lr = args.lr, args.lr / 10
      config.data_files = (corpus,)
      config.completion_only = False
      config.ckpt_every = args.steps
      config.model.fp8 = run == "fp8"
      config.model.fp8_layers = args.fp8_layers
      if run == "rounding":
        config.model.moe_impl = "ragged"
      if run == "bf16":             # activations / matmuls in bfloat16, float32 master weights
        config.model.dtype = "bfloat16"
      model_cfg, train_cfg = build_configs(config)
      t = time.time()
      summary = train(model_cfg, train_cfg, os.path.join(root, f"seed{seed}_{run}"),
                      log=lambda s: None)
      losses = [h["loss"] for h in summary["history"]]
      ces = [h["ce"] for h in summary["history"]]
      tails[run] = statistics.fmean(losses[-args.tail:])
      print(json.dumps({"seed": seed, "run": run, "moe_impl": model_cfg.moe_impl,
                        "lr": train_cfg.lr,
                        "steps": args.steps, "docs": n_docs, "tail_loss": tails[run],
                        "tail_ce": statistics.fmean(ces[-args.tail:]),
                        "first_loss": losses[0], "wall_s": round(time.time() - t, 1)}),
            flush=True)
    for run in args.controls:
      print(json.dumps({"seed": seed, "tail": args.tail, "control": run,
                        "gap_rel": (tails[run] - tails["float32"]) / tails["float32"]}),
            flush=True)


if __name__ == "__main__":
  main()
