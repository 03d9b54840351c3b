"""Decode throughput: deepseek_jax's `generate` or transformers' `generate`.

Both sides build the same model from the same JSON (random weights), take a
batch of random prompts of --prompt tokens and greedily generate exactly
--new tokens per row (no stop token). Timing, after --warmup untimed calls
of each shape:

  prefill_s              a call generating 1 token (prefill + first sample)
  total_s                a call generating --new tokens
  decode_tokens_per_s    batch x (new - 1) / (total_s - prefill_s): the
                         tokens of the decode phase per second (null, with
                         a note on stderr, when total_s <= prefill_s: at
                         tiny sizes the decode phase is inside timing noise)

medians over --repeats calls. Prints ONE JSON line (framework "jax" or
"torch-hf"), with cache_bytes_per_token on the JAX side (the latent cache:
(kv_lora_rank + qk_rope_head_dim) x n_layers x bytes per element), and
weight_bytes_per_step (the weights a decode step reads: all but the
embedding table, every routed expert, MTP only with --speculative) with
gemm_floor_s, the time of one [batch, K] x [K, 1024] float32 matmul over as
many bytes: at small batch a decode step cannot beat it, and
decode_step_s / gemm_floor_s says how far above that floor a step runs.

  python bench/decode_throughput.py --model-json bench/shapes/issue2.json \
      --batch 4 --prompt 32 --new 64
  python bench/decode_throughput.py --framework torch-hf ...      # the HF baseline
  python bench/decode_throughput.py --compare-rounds 2 ...         # both, A B A B

--compare-rounds R runs R fresh processes of each framework alternately
and prints one JSON line with both sides' medians and the ratio jax / hf.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
from interleave import run_json
from matmul_peak import median_seconds

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model-json", default=os.path.join(HERE, "shapes", "issue2.json"))
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--prompt", type=int, default=32, help="prompt tokens per row")
  p.add_argument("--new", type=int, default=64, help="generated tokens per row")
  p.add_argument("--framework", default="jax", choices=("jax", "torch-hf"))
  p.add_argument("--speculative", action="store_true", help="jax: MTP drafting")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  p.add_argument("--compare-rounds", type=int, default=0)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  for name in ("batch", "prompt", "new", "repeats"):
    if getattr(args, name) < 1:
      p.error(f"--{name}={getattr(args, name)} must be >= 1")
  return args


def _timed(fn, warmup: int, repeats: int) -> float:
  return median_seconds(fn, repeats, warmup)


def run_jax(args, cfg, prompts) -> dict:
  import jax
  import jax.numpy as jnp
  from deepseek_jax.infer import bytes_per_token, generate
  from deepseek_jax.model import init_variables
  variables = init_variables(cfg, jax.random.key(args.seed))
  rows = prompts.tolist()
  t = time.perf_counter()
  generate(cfg, variables, rows, max_new_tokens=args.new, speculative=args.speculative)
  compile_s = time.perf_counter() - t
  stats = {}

  def full():
    g = generate(cfg, variables, rows, max_new_tokens=args.new, speculative=args.speculative)
    stats.update(steps=g.steps, acceptance=g.acceptance_rate)
    assert (g.lengths == args.new).all()

  prefill = _timed(lambda: generate(cfg, variables, rows, max_new_tokens=1), args.warmup,
                   args.repeats)
  total = _timed(full, args.warmup, args.repeats)
  # The floor of a decode step: it reads every weight it uses once (all
  # routed experts: decode's few tokens run the MoE densely; the embedding
  # table only a row per token; MTP only when drafting). One [batch, K] x
  # [K, 1024] float32 matmul over the same bytes is what XLA:CPU needs for that.
  used = {k: v for k, v in variables["params"].items()
          if k != "embed" and (args.speculative or not k.startswith("mtp_"))}
  weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(used))
  k_rows = max(1, weight_bytes // (4 * 1024))
  w = jax.random.normal(jax.random.key(1), (k_rows, 1024), jnp.float32)
  x = jax.random.normal(jax.random.key(2), (args.batch, k_rows), jnp.float32)
  gemm = jax.jit(lambda x, w: x @ w)
  floor = _timed(lambda: gemm(x, w).block_until_ready(), args.warmup + 1, args.repeats)
  out = {"prefill_s": prefill, "total_s": total, "compile_s": compile_s,
         "cache_bytes_per_token": bytes_per_token(cfg), "decode_steps": stats["steps"],
         "weight_bytes_per_step": int(weight_bytes), "gemm_floor_s": floor,
         "jax": jax.__version__}
  if args.speculative:
    out["acceptance_rate"] = stats["acceptance"]
  return out


def run_hf(args, cfg, prompts) -> dict:
  import torch
  import transformers
  from deepseek_jax.interop import config_to_hf
  torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  hf_config = transformers.DeepseekV3Config.from_dict(config_to_hf(cfg.replace(n_mtp_depth=0)))
  model = transformers.DeepseekV3ForCausalLM(hf_config).to(torch.float32).eval()
  ids = torch.tensor(prompts, dtype=torch.long)
  mask = torch.ones_like(ids)

  def gen(n):
    with torch.no_grad():
      out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + n
  prefill = _timed(lambda: gen(1), args.warmup, args.repeats)
  total = _timed(lambda: gen(args.new), args.warmup, args.repeats)
  return {"prefill_s": prefill, "total_s": total, "torch": torch.__version__,
          "transformers": transformers.__version__, "threads": args.threads}


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.compare_rounds:
    return compare(args)
  sys.path.insert(0, os.path.dirname(HERE))
  from deepseek_jax.config import ModelConfig
  cfg = ModelConfig.from_json(args.model_json)
  if args.prompt + args.new + 1 > cfg.max_seq_len:
    sys.exit(f"--prompt + --new = {args.prompt + args.new} must stay below max_seq_len="
             f"{cfg.max_seq_len} of {args.model_json}")
  if args.framework == "torch-hf" and args.speculative:
    sys.exit("--speculative is the JAX side's MTP drafting; transformers has none here.")
  prompts = np.random.default_rng(args.seed).integers(0, cfg.vocab_size,
                                                      (args.batch, args.prompt))
  side = run_jax(args, cfg, prompts) if args.framework == "jax" else run_hf(args, cfg, prompts)
  decode_s = side["total_s"] - side["prefill_s"]
  if args.framework == "jax":
    side["decode_step_s"] = decode_s / side["decode_steps"] if decode_s > 0 else None
  if decode_s > 0:
    rate = args.batch * (args.new - 1) / decode_s
  else:  # the decode steps took less than the timing noise of the two medians
    rate = None
    print(f"decode_throughput: total_s={side['total_s']:.4g} <= prefill_s="
          f"{side['prefill_s']:.4g}: decode time is below timing noise; raise --new or "
          "--repeats for a rate", file=sys.stderr)
  result = {"bench": "decode_throughput", "framework": args.framework,
            "model_json": args.model_json, "batch": args.batch, "prompt": args.prompt,
            "new": args.new, "speculative": args.speculative,
            "decode_tokens_per_s": rate, **side}
  print(json.dumps(result), flush=True)
  return result


def compare(args) -> dict:
  base = [sys.executable, os.path.abspath(__file__), "--model-json", args.model_json,
          "--batch", str(args.batch), "--prompt", str(args.prompt), "--new", str(args.new),
          "--warmup", str(args.warmup), "--repeats", str(args.repeats),
          "--threads", str(args.threads)]
  runs = {"jax": [], "torch-hf": []}
  for r in range(args.compare_rounds):
    for fw in runs:
      res = run_json(base + ["--framework", fw])
      runs[fw].append(res)
      if res["decode_tokens_per_s"] is None:
        sys.exit(f"round {r + 1} {fw}: decode time below timing noise; raise --new")
      print(f"round {r + 1} {fw}: {res['decode_tokens_per_s']:.1f} decode tok/s",
            file=sys.stderr, flush=True)
  med = {fw: statistics.median(r["decode_tokens_per_s"] for r in rs) for fw, rs in runs.items()}
  result = {"bench": "decode_throughput_compare", "batch": args.batch, "prompt": args.prompt,
            "new": args.new, "rounds": args.compare_rounds, "model_json": args.model_json,
            "jax_decode_tokens_per_s": med["jax"], "hf_decode_tokens_per_s": med["torch-hf"],
            "jax_over_hf": med["jax"] / med["torch-hf"],
            "jax_all": [r["decode_tokens_per_s"] for r in runs["jax"]],
            "hf_all": [r["decode_tokens_per_s"] for r in runs["torch-hf"]],
            "cache_bytes_per_token": runs["jax"][0]["cache_bytes_per_token"]}
  print(json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  main()
