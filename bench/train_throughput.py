"""Training throughput of the library's own train step (deepseek_jax.train).

Times `make_train_step(cfg, train_cfg)` -- the real step: CE (+ MTP when
n_mtp_depth > 0) + sequence-wise balance loss, AdamW with gradient clipping,
and the router-bias update -- on one fixed random batch shaped like a packed
one (one document per row). Compilation is timed on its own (AOT
lower + compile); then `--warmup` steps run untimed and `--steps` steps are
timed one by one, each ended by `block_until_ready`. Prints ONE JSON line.

  python bench/train_throughput.py --model-json bench/shapes/issue2.json \
      --batch 8 --seq 256 --steps 10 --warmup 2
  # on a mesh of 8 fake CPU devices, experts over 4 (the EP exchange)
  python bench/train_throughput.py --model-json bench/shapes/issue2.json \
      --batch 16 --seq 256 --devices 8 --mesh expert=4,fsdp=2 --ep-capacity 2

`bench/hf_train_throughput.py` measures the same thing for transformers'
DeepseekV3ForCausalLM; `bench/compare_hf.py` interleaves the two.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time

import flax
import jax
import jaxlib
import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.model import count_active_params, count_params
from deepseek_jax.model.moe import resolve_moe_impl
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.step import init_train_state, make_train_step


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model-json", required=True,
                 help="ModelConfig field values (optionally with \"preset\").")
  p.add_argument("--batch", type=int, default=8, help="rows per step")
  p.add_argument("--seq", type=int, default=256, help="tokens per row")
  p.add_argument("--steps", type=int, default=10, help="timed steps")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  p.add_argument("--moe-impl", default=None,
                 help="override ModelConfig.moe_impl (auto, blocked, ragged, dense)")
  p.add_argument("--n-mtp-depth", type=int, default=None,
                 help="override ModelConfig.n_mtp_depth")
  p.add_argument("--fast-compile", action="store_true",
                 help="TrainConfig.fast_compile: XLA backend optimisation level 0 "
                      "(faster compile, slower steps; for smoke tests, not for figures)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--mesh", default="",
                 help="mesh axis sizes, e.g. expert=4,fsdp=2 (rule set --rules); "
                      "empty: one device")
  p.add_argument("--rules", default="ep_fsdp", help="sharding rule set with --mesh")
  p.add_argument("--devices", type=int, default=None,
                 help="fake CPU devices to create (jax_num_cpu_devices) for --mesh")
  p.add_argument("--ep-capacity", type=float, default=None,
                 help="ModelConfig.moe_ep_capacity (0: room for every row)")
  args = p.parse_args(argv)
  for name in ("batch", "seq", "steps"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
  if args.warmup < 0:
    p.error(f"--warmup={args.warmup} must be >= 0")
  return args


def random_batch(vocab_size: int, batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
  """A packed-looking batch of one document per row, every target counted.

  tokens are uniform in [0, vocab); targets are the tokens shifted left by
  one (the last target is one more random token), as the pipeline makes them.
  """
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab_size, size=(batch, seq + 1), dtype=np.int32)
  return {
      "tokens": ids[:, :-1],                                          # [b, s]
      "targets": ids[:, 1:],                                          # [b, s]
      "segment_ids": np.ones((batch, seq), np.int32),
      "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
      "loss_mask": np.ones((batch, seq), np.float32),
  }


def active_params_per_token(cfg: ModelConfig, params) -> int:
  """All parameters a token touches (the input embedding included)."""
  return count_active_params(cfg, params, embedding=True)


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def main(argv=None) -> dict:
  args = parse_args(argv)
  cfg = ModelConfig.from_json(args.model_json)
  if args.moe_impl is not None:
    cfg = cfg.replace(moe_impl=args.moe_impl)
  if args.n_mtp_depth is not None:
    cfg = cfg.replace(n_mtp_depth=args.n_mtp_depth)
  if args.ep_capacity is not None:
    cfg = cfg.replace(moe_ep_capacity=args.ep_capacity)
  if args.devices:
    jax.config.update("jax_num_cpu_devices", args.devices)
  mesh = rules = None
  if args.mesh:
    from deepseek_jax import parallel
    from deepseek_jax.parallel.mesh import parse_axis_sizes
    sizes = parse_axis_sizes(args.mesh, flag="--mesh")
    mesh, rules = parallel.setup(parallel.MeshConfig(**{"data": 1, **sizes,
                                                        "rules": args.rules}))
  if args.seq > cfg.max_seq_len:
    sys.exit(f"--seq={args.seq} exceeds max_seq_len={cfg.max_seq_len} of {args.model_json}")
  # Constant peak lr (no warmup, no decay), as the torch side runs: the
  # final_loss of the two is then roughly comparable; speed does not depend on it.
  n_steps = args.warmup + args.steps + 1
  train_cfg = TrainConfig(steps=n_steps, seed=args.seed, warmup_steps=0, hold_steps=n_steps,
                          batch_size=args.batch, seq_len=args.seq,
                          fast_compile=args.fast_compile)
  rss_after_import = peak_rss_mb()

  state = init_train_state(cfg, train_cfg, jax.random.key(args.seed), mesh, rules)
  params = count_params(state.params)
  active = active_params_per_token(cfg, state.params)
  batch = random_batch(cfg.vocab_size, args.batch, args.seq, args.seed)
  if mesh is None:
    batch = jax.device_put(batch)
  else:
    from deepseek_jax.parallel import batch_sharding, distributed
    batch = distributed.put_batch(batch, batch_sharding(mesh, rules), args.batch)
  train_step = make_train_step(cfg, train_cfg, mesh, rules)

  t0 = time.perf_counter()
  step = train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0

  first_step_s = None
  for i in range(args.warmup):
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    if i == 0:
      first_step_s = time.perf_counter() - t0
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  loss = float(metrics["loss"])
  if not np.isfinite(loss):
    sys.exit(f"non-finite loss {loss} after {args.warmup + args.steps} steps")

  median = statistics.median(times)
  result = {
      "bench": "train_throughput", "framework": "jax",
      "train_tokens_per_s": args.batch * args.seq / median,
      "step_s_median": median, "step_s_min": min(times), "step_s_all": times,
      "compile_s": compile_s, "first_step_s": first_step_s,
      "peak_rss_mb": peak_rss_mb(), "rss_after_import_mb": rss_after_import,
      "params": params, "active_params_per_token": active,
      "batch": args.batch, "seq": args.seq, "steps": args.steps, "warmup": args.warmup,
      "final_loss": loss,
      "jax_version": jax.__version__, "jaxlib_version": jaxlib.__version__,
      "flax_version": flax.__version__, "python_version": platform.python_version(),
      "backend": jax.default_backend(),
      "n_devices": jax.device_count(),
      "mesh": dict(mesh.shape) if mesh is not None else None,
      "rules": args.rules if mesh is not None else None,
      "moe_ep_capacity": cfg.moe_ep_capacity,
      "moe_impl": resolve_moe_impl(cfg), "n_mtp_depth": cfg.n_mtp_depth,
      "fast_compile": args.fast_compile,
      "model_json": args.model_json,
  }
  print(json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  main()
