"""Where the train step's time goes on this machine: XLA's ops, traced and grouped.

    python bench/profile_step.py --model-json bench/shapes/issue2.json --batch 8 --seq 256

Compiles `make_train_step` exactly as `train_throughput.py` does (same
arguments), runs --warmup steps, then traces --steps steps with the JAX
profiler (`jax.profiler.trace(..., create_perfetto_trace=True)`). On CPU
every executed HLO instruction (a thunk: a fusion, a dot, a sort, a
collective) is one event carrying its `hlo_op` name; the compiled module's
text maps that name to its `op_name` metadata (the JAX/Flax scope path:
`jvp(Transformer)/.../moe_layers/ffn/...`), which `category` sorts into:

  attention     MLA / GQA: projections, RoPE, scores, softmax, the blockwise loops
  moe_experts   the expert kernel (grouped matmul over row blocks)
  moe_routing   router scores, top-k, sort / gather / scatter of rows, the exchange
  dense_mlp     dense blocks' and shared experts' SwiGLU
  norms         RMSNorm
  embed_head    embedding lookup, output head, log-softmax / cross-entropy, MTP head
  optimizer     AdamW, clipping, the finite-step check, the router-bias update
  other         the rest (named in `top_ops`)

Forward and backward ops (`jvp(...)` / `transpose(...)`) of a category are
summed together; `backward_share` says how much of the step is transposes.
Thunks run on a thread pool and may overlap: the per-category seconds are
busy time summed over threads, normalised per step; `wall_s_per_step` is
the traced steps' wall time. Prints ONE JSON line (categories sorted by
time, shares of the summed busy time, the 15 dearest ops with their
op_name) and, with --table, a Markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

import train_throughput as tt  # noqa: E402
from deepseek_jax.config import ModelConfig  # noqa: E402
from deepseek_jax.train.config import TrainConfig  # noqa: E402
from deepseek_jax.train.step import init_train_state, make_train_step  # noqa: E402

# (category, op_name patterns), first match wins; patterns are regexes on the
# instruction's op_name (lower-cased) or, when it has none, its HLO name.
CATEGORIES = (
    ("optimizer", (r"^jit\(step\)/(?!.*(jvp|transpose)\()", r"is_finite", r"reduce_and",
                   r"apply_update", r"router_bias", r"clip")),
    # the expert kernel's block GEMMs (model/grouped_matmul.py einsums)
    ("moe_experts", (r"gmm", r"grouped_matmul", r"cbk,ckn->cbn", r"cbn,ckn->cbk",
                     r"cbk,cbn->ckn", r"cbk,cbn->kn")),
    ("moe_routing", (r"moe_layers/ffn/.*(gate|router|top_k|sort|argsort|searchsorted|"
                     r"scatter|gather|cumsum|one_hot|all_to_all|exchange)",
                     r"^(sort|scatter|scatter-add|gather)")),
    ("attention", (r"/attn/", r"attention", r"/mla/", r"rope")),
    ("dense_mlp", (r"dense_layers/ffn", r"shared", r"/mlp/", r"swiglu")),
    ("moe_routing_other", (r"moe_layers/ffn",)),
    ("norms", (r"/norm/", r"rms_norm", r"_norm/")),
    ("embed_head", (r"embed", r"head", r"log_softmax", r"cross_entropy", r"logits", r"mtp",
                    r"d,dv->", r"vocab")),
)


def category(op_name: str) -> str:
  name = op_name.lower()
  for cat, patterns in CATEGORIES:
    if any(re.search(p, name) for p in patterns):
      return "moe_routing" if cat == "moe_routing_other" else cat
  return "other"


def op_names(hlo_text: str) -> dict[str, str]:
  """{instruction name: its op_name metadata} over every computation."""
  out = {}
  for m in re.finditer(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*op_name=\"([^\"]*)\"",
                       hlo_text, re.M):
    out.setdefault(m.group(1), m.group(2))
  return out


def thunk_events(trace_dir: str) -> list[tuple[str, float]]:
  """(hlo_op, seconds) of every executed HLO thunk in the perfetto trace."""
  files = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not files:
    raise RuntimeError(f"the profiler wrote no perfetto_trace.json.gz under {trace_dir}")
  data = json.load(gzip.open(files[0]))
  events = data["traceEvents"] if isinstance(data, dict) else data
  return [(e["args"]["hlo_op"], e.get("dur", 0) / 1e6) for e in events
          if e.get("ph") == "X" and "hlo_op" in (e.get("args") or {})]


def profile(args) -> dict:
  cfg = ModelConfig.from_json(args.model_json)
  if args.moe_impl is not None:
    cfg = cfg.replace(moe_impl=args.moe_impl)
  if args.n_mtp_depth is not None:
    cfg = cfg.replace(n_mtp_depth=args.n_mtp_depth)
  n_steps = args.warmup + args.steps + 1
  train_cfg = TrainConfig(steps=n_steps, seed=args.seed, warmup_steps=0, hold_steps=n_steps,
                          batch_size=args.batch, seq_len=args.seq)
  state = init_train_state(cfg, train_cfg, jax.random.key(args.seed), None, None)
  batch = jax.device_put(tt.random_batch(cfg.vocab_size, args.batch, args.seq, args.seed))
  step = make_train_step(cfg, train_cfg, None, None).lower(state, batch).compile()
  names = op_names(step.as_text())
  for _ in range(max(args.warmup, 1)):
    state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  with tempfile.TemporaryDirectory() as trace_dir:
    t0 = time.perf_counter()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(args.steps):
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
    wall = (time.perf_counter() - t0) / args.steps
    events = thunk_events(trace_dir)
  by_cat, by_op = collections.Counter(), collections.Counter()
  backward = 0.0
  for op, dur in events:
    name = names.get(op, op)
    by_cat[category(name)] += dur / args.steps
    by_op[op] += dur / args.steps
    backward += dur / args.steps if "transpose(" in name else 0.0
  busy = sum(by_cat.values())
  return {
      "bench": "profile_step", "batch": args.batch, "seq": args.seq,
      "wall_s_per_step": wall, "busy_s_per_step": busy,
      "categories": {k: round(v, 5) for k, v in by_cat.most_common()},
      "shares": {k: round(v / busy, 4) for k, v in by_cat.most_common()},
      "backward_share": round(backward / busy, 4) if busy else 0.0,
      "top_ops": [{"op": op, "s": round(s, 5), "category": category(names.get(op, op)),
                   "op_name": names.get(op, "")[-140:]} for op, s in by_op.most_common(15)],
      "jax_version": jax.__version__,
  }


def main(argv=None) -> dict:
  p = tt.argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model-json", required=True)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--steps", type=int, default=5, help="traced steps")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--moe-impl", default=None)
  p.add_argument("--n-mtp-depth", type=int, default=None)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--table", action="store_true", help="also print a Markdown table")
  args = p.parse_args(argv)
  result = profile(args)
  print(json.dumps(result), flush=True)
  if args.table:
    print("\n| category | s / step | share |\n|---|---|---|")
    for k, v in result["categories"].items():
      print(f"| {k} | {v:.4f} | {result['shares'][k]:.1%} |")
  return result


if __name__ == "__main__":
  main()
