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
import datetime
import json
import os
import sys

from interleave import interleave, summarise

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = {"jax": os.path.join(HERE, "train_throughput.py"),
           "torch-hf": os.path.join(HERE, "hf_train_throughput.py")}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model-json", default=os.path.join(HERE, "shapes", "issue2.json"))
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--steps", type=int, default=10, help="timed steps per run")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps per run")
  p.add_argument("--rounds", type=int, default=3, help="runs of each side")
  p.add_argument("--jax-args", default="", help="extra flags for train_throughput.py")
  p.add_argument("--hf-args", default="", help="extra flags for hf_train_throughput.py")
  args = p.parse_args(argv)
  if args.rounds < 1:
    p.error(f"--rounds={args.rounds} must be >= 1")
  return args


def _command(framework: str, args: argparse.Namespace) -> list[str]:
  extra = args.jax_args if framework == "jax" else args.hf_args
  return [sys.executable, SCRIPTS[framework], "--model-json", args.model_json,
          "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
          "--warmup", str(args.warmup), *extra.split()]


def main(argv=None) -> dict:
  args = parse_args(argv)
  runs = interleave({fw: _command(fw, args) for fw in SCRIPTS}, args.rounds)
  if runs["jax"][0]["params"] != runs["torch-hf"][0]["params"]:
    print(f"warning: parameter counts differ: jax {runs['jax'][0]['params']} vs "
          f"hf {runs['torch-hf'][0]['params']}", file=sys.stderr)
  common = ("moe_impl", "n_mtp_depth", "params", "active_params_per_token")
  jax_side = summarise(runs["jax"], common + ("jax_version", "backend"))
  hf_side = summarise(runs["torch-hf"], common + (
      "attn_impl", "experts_impl", "torch_version", "transformers_version"))
  result = {
      "bench": "compare_hf",
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "nproc": os.cpu_count(), "model_json": args.model_json,
      "batch": args.batch, "seq": args.seq, "steps": args.steps,
      "warmup": args.warmup, "rounds": args.rounds,
      "jax": jax_side, "hf": hf_side,
      "ratio_jax_over_hf": jax_side["train_tokens_per_s"] / hf_side["train_tokens_per_s"],
      "ratio_best_rounds": (jax_side["train_tokens_per_s_best_round"]
                            / hf_side["train_tokens_per_s_best_round"]),
  }
  print(json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  main()
