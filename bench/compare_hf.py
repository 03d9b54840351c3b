"""deepseek_jax vs transformers training throughput, interleaved A B A B ...

Runs `train_throughput.py` (A, JAX) and `hf_train_throughput.py` (B, torch)
as fresh processes, alternating, `--rounds` times each, so that a slow
phase of a shared machine hits both sides alike. Each run does its own
warm-up and reports its median step; this script prints every run's line to
stderr and ONE JSON line to stdout: the median over rounds of each side's
tokens/s, and the ratio jax / hf (> 1: JAX is faster). On a shared machine
`ratio_best_rounds` (each side's fastest round) is the less noisy figure:
other load only ever slows a run down.

  python bench/compare_hf.py --model-json bench/shapes/issue2.json \
      --batch 8 --seq 256 --rounds 3

Both sides run without MTP (n_mtp_depth = 0: HF trains none).
"""

from __future__ import annotations

import argparse
import os
import sys

from interleave import add_run_args, interleave, report, run_flags, summarise

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = {"jax": os.path.join(HERE, "train_throughput.py"),
           "torch-hf": os.path.join(HERE, "hf_train_throughput.py")}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  add_run_args(p)
  p.add_argument("--jax-args", default="", help="extra flags for train_throughput.py")
  p.add_argument("--hf-args", default="", help="extra flags for hf_train_throughput.py")
  args = p.parse_args(argv)
  if args.rounds < 1:
    p.error(f"--rounds={args.rounds} must be >= 1")
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  extra = {"jax": args.jax_args, "torch-hf": args.hf_args}
  runs = interleave({fw: [sys.executable, SCRIPTS[fw], *run_flags(args), *extra[fw].split()]
                     for fw in SCRIPTS}, args.rounds)
  if runs["jax"][0]["params"] != runs["torch-hf"][0]["params"]:
    print(f"warning: parameter counts differ: jax {runs['jax'][0]['params']} vs "
          f"hf {runs['torch-hf'][0]['params']}", file=sys.stderr)
  common = ("moe_impl", "n_mtp_depth", "params", "active_params_per_token")
  sides = {"jax": summarise(runs["jax"], common + ("jax_version", "backend")),
           "hf": summarise(runs["torch-hf"], common + (
               "attn_impl", "experts_impl", "torch_version", "transformers_version"))}
  return report("compare_hf", args, sides, ("ratio_jax_over_hf", "jax", "hf"))


if __name__ == "__main__":
  main()
