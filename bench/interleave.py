"""Shared by the comparison scripts: run benchmark processes A B A B, summarise.

Each run is a fresh process printing one JSON line (train_throughput.py,
hf_train_throughput.py); alternating the two sides round by round makes a
slow phase of a shared machine hit both alike.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from typing import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))


def add_run_args(p: argparse.ArgumentParser) -> None:
  """The flags every run of a comparison shares (passed on to each script)."""
  p.add_argument("--model-json", default=os.path.join(HERE, "shapes", "issue2.json"))
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--steps", type=int, default=10, help="timed steps per run")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps per run")
  p.add_argument("--rounds", type=int, default=3, help="runs of each side")


def run_flags(args: argparse.Namespace) -> list[str]:
  """The shared flags as a throughput script takes them."""
  return ["--model-json", args.model_json, "--batch", str(args.batch), "--seq", str(args.seq),
          "--steps", str(args.steps), "--warmup", str(args.warmup)]


def run_json(cmd: Sequence[str]) -> dict:
  """Runs `cmd`; returns the last JSON line it printed (exits with its stderr on failure)."""
  proc = subprocess.run(list(cmd), capture_output=True, text=True)
  if proc.returncode:
    sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if not lines:
    sys.exit(f"{' '.join(cmd)} printed no JSON line:\n{proc.stdout[-2000:]}")
  return json.loads(lines[-1])


def interleave(commands: dict[str, Sequence[str]], rounds: int) -> dict[str, list[dict]]:
  """{side: [result per round]}, running the sides in turn within each round."""
  runs = {side: [] for side in commands}
  for r in range(rounds):
    for side, cmd in commands.items():
      res = run_json(cmd)
      runs[side].append(res)
      print(f"round {r + 1}/{rounds} {side}: {res['train_tokens_per_s']:.1f} tok/s  "
            f"{json.dumps(res)}", file=sys.stderr, flush=True)
  return runs


def summarise(results: list[dict], keys: Sequence[str] = ()) -> dict:
  """Medians over rounds (and the best round) of one side, plus `keys` from round 1."""
  tps = [r["train_tokens_per_s"] for r in results]
  return {
      "train_tokens_per_s": statistics.median(tps),
      "train_tokens_per_s_all": tps,
      "train_tokens_per_s_best_round": max(tps),
      "step_s_median": statistics.median(r["step_s_median"] for r in results),
      "compile_s_median": statistics.median(r["compile_s"] for r in results),
      "peak_rss_mb_max": max(r["peak_rss_mb"] for r in results),
      **{k: results[0][k] for k in keys if k in results[0]},
  }


def report(bench: str, args: argparse.Namespace, sides: dict[str, dict],
           ratio: tuple[str, str, str]) -> dict:
  """Prints and returns ONE JSON line: the run settings, each side, and the
  ratio `name = side num / side den` of median (and best-round) tokens/s."""
  name, num, den = ratio
  result = {
      "bench": bench,
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "nproc": os.cpu_count(), "model_json": args.model_json,
      "batch": args.batch, "seq": args.seq, "steps": args.steps,
      "warmup": args.warmup, "rounds": args.rounds,
      **sides,
      name: sides[num]["train_tokens_per_s"] / sides[den]["train_tokens_per_s"],
      "ratio_best_rounds": (sides[num]["train_tokens_per_s_best_round"]
                            / sides[den]["train_tokens_per_s_best_round"]),
  }
  print(json.dumps(result), flush=True)
  return result
