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
  python bench/decode_throughput.py --dtype bfloat16 ...          # bf16 weights/activations
  python bench/decode_throughput.py --compare-rounds 2 ...         # all sides, A B C A B C

--dtype (jax side): `generate(..., dtype=)`, float32 (default) or bfloat16
(weights cast once before the timed calls; weight_bytes_per_step counts the
cast weights). --compare-rounds R runs R rounds of fresh processes, each
round JAX float32, JAX bfloat16 and (when transformers is installed) HF, one
after the other; it prints each run's JSON line, then one summary line with
every side's median, the ratios bf16 / f32 and jax / hf, and the load
average (os.getloadavg) before and after.
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
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="jax: generate's dtype (weights and activations)")
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
  from deepseek_jax.infer import bytes_per_token, decode, generate
  from deepseek_jax.model import init_variables
  variables = init_variables(cfg, jax.random.key(args.seed))
  # cast once, as launch.generate does (generate's own cast is then free)
  cfg, variables = decode.inference_model(cfg, variables, args.dtype)
  rows = prompts.tolist()
  dt = dict(dtype=args.dtype)
  t = time.perf_counter()
  generate(cfg, variables, rows, max_new_tokens=args.new, speculative=args.speculative, **dt)
  compile_s = time.perf_counter() - t
  stats = {}

  def full():
    g = generate(cfg, variables, rows, max_new_tokens=args.new, speculative=args.speculative,
                 **dt)
    stats.update(steps=g.steps, acceptance=g.acceptance_rate)
    assert (g.lengths == args.new).all()

  prefill = _timed(lambda: generate(cfg, variables, rows, max_new_tokens=1, **dt),
                   args.warmup, args.repeats)
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
         "dtype": args.dtype, "jax": jax.__version__}
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


def _has_transformers() -> bool:
  import importlib.util
  return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def compare(args) -> dict:
  """R rounds of fresh processes: JAX float32, JAX bfloat16, HF (if installed)."""
  base = [sys.executable, os.path.abspath(__file__), "--model-json", args.model_json,
          "--batch", str(args.batch), "--prompt", str(args.prompt), "--new", str(args.new),
          "--warmup", str(args.warmup), "--repeats", str(args.repeats),
          "--threads", str(args.threads)]
  sides = {"jax": ["--framework", "jax", "--dtype", "float32"],
           "jax_bf16": ["--framework", "jax", "--dtype", "bfloat16"]}
  if _has_transformers():
    sides["hf"] = ["--framework", "torch-hf"]
  load_before = os.getloadavg()
  runs = {side: [] for side in sides}
  for r in range(args.compare_rounds):
    for side, flags in sides.items():
      res = run_json(base + flags)
      runs[side].append(res)
      print(json.dumps({"round": r + 1, "side": side, **res}), flush=True)
      if res["decode_tokens_per_s"] is None:
        sys.exit(f"round {r + 1} {side}: decode time below timing noise; raise --new")
      print(f"round {r + 1} {side}: {res['decode_tokens_per_s']:.1f} decode tok/s",
            file=sys.stderr, flush=True)
  med = {side: statistics.median(r["decode_tokens_per_s"] for r in rs)
         for side, rs in runs.items()}
  result = {"bench": "decode_throughput_compare", "batch": args.batch, "prompt": args.prompt,
            "new": args.new, "rounds": args.compare_rounds, "model_json": args.model_json,
            "jax_decode_tokens_per_s": med["jax"],
            "jax_bf16_decode_tokens_per_s": med["jax_bf16"],
            "bf16_over_f32": med["jax_bf16"] / med["jax"],
            "jax_all": [r["decode_tokens_per_s"] for r in runs["jax"]],
            "jax_bf16_all": [r["decode_tokens_per_s"] for r in runs["jax_bf16"]],
            "cache_bytes_per_token": runs["jax"][0]["cache_bytes_per_token"],
            "cache_bytes_per_token_bf16": runs["jax_bf16"][0]["cache_bytes_per_token"],
            "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
  if "hf" in runs:
    result.update(hf_decode_tokens_per_s=med["hf"], jax_over_hf=med["jax"] / med["hf"],
                  jax_bf16_over_hf=med["jax_bf16"] / med["hf"],
                  hf_all=[r["decode_tokens_per_s"] for r in runs["hf"]])
  print(json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  main()
