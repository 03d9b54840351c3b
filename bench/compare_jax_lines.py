"""The library's train step on two Python / JAX lines, interleaved A B A B ...

Runs `train_throughput.py` under two interpreters (each a venv with the
project installed: by default this one, A, and `.venv312/bin/python`, B) as
fresh processes, alternating, `--rounds` times each. Prints every run's line
to stderr and ONE JSON line to stdout: each side's median tokens/s over
rounds, its Python / jax / flax versions, and `ratio_b_over_a` (> 1: B is
faster). See README "Python and JAX" for setting up the 3.12 venv.

  python bench/compare_jax_lines.py --python-b .venv312/bin/python \\
      --model-json bench/shapes/issue2.json --batch 8 --seq 256 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import sys

from interleave import add_run_args, interleave, report, run_flags, summarise

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPT = os.path.join(HERE, "train_throughput.py")
VERSION_KEYS = ("python_version", "jax_version", "jaxlib_version", "flax_version", "backend",
                "moe_impl", "n_mtp_depth", "params", "active_params_per_token")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--python-a", default=sys.executable, help="interpreter of side A")
  p.add_argument("--python-b", default=os.path.join(ROOT, ".venv312", "bin", "python"),
                 help="interpreter of side B")
  add_run_args(p)
  p.add_argument("--jax-args", default="", help="extra flags for train_throughput.py")
  args = p.parse_args(argv)
  if args.rounds < 1:
    p.error(f"--rounds={args.rounds} must be >= 1")
  for side in ("python_a", "python_b"):
    if not os.access(getattr(args, side), os.X_OK):
      p.error(f"--{side.replace('_', '-')}={getattr(args, side)} is not an executable "
              "interpreter (make the venv first: README, 'Python and JAX')")
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  flags = [SCRIPT, *run_flags(args), *args.jax_args.split()]
  runs = interleave({"a": [args.python_a, *flags], "b": [args.python_b, *flags]},
                    args.rounds)
  sides = {s: summarise(runs[s], VERSION_KEYS) for s in ("a", "b")}
  if sides["a"]["params"] != sides["b"]["params"]:
    sys.exit(f"the two sides built different models: {sides['a']['params']} vs "
             f"{sides['b']['params']} params")
  return report("compare_jax_lines", args, sides, ("ratio_b_over_a", "b", "a"))


if __name__ == "__main__":
  main()
