"""Training throughput of transformers' DeepseekV3ForCausalLM on CPU (the baseline).

The same model as `bench/train_throughput.py` -- built from the same JSON via
`deepseek_jax.interop.config_to_hf` -- and the same step as far as HF
allows: float32, forward + backward of next-token cross-entropy on the same
random batch, grad-norm clipping to 1.0, `torch.optim.AdamW` (the library's
b1, b2, eps and weight decay; fused CPU kernel). HF trains no MTP module and
has neither the sequence-wise balance loss nor the router-bias update, so the
model is built with n_mtp_depth = 0 whatever the JSON says (the JSON line
records 0).
Prints ONE JSON line with "framework": "torch-hf".

  python bench/hf_train_throughput.py --model-json bench/shapes/issue2.json \
      --batch 8 --seq 256 --steps 10 --warmup 2

--attn-impl / --experts-impl / --adamw-impl pick transformers' attention and
routed-experts kernels and torch's AdamW kernel; the defaults are the fastest
measured on the 2-core CPU box (bench/RESULTS.md). transformers 5 defaults
to experts "grouped_mm" when torch can dispatch it, else "eager" (a Python
loop over the experts that were hit); "batched_mm" gathers every token's k
expert weight matrices and is far slower and larger on CPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import numpy as np
import torch
import transformers

from deepseek_jax.config import ModelConfig
from deepseek_jax.interop import config_to_hf
from deepseek_jax.train.config import TrainConfig


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model-json", required=True,
                 help="ModelConfig field values (optionally with \"preset\").")
  p.add_argument("--batch", type=int, default=8, help="rows per step")
  p.add_argument("--seq", type=int, default=256, help="tokens per row")
  p.add_argument("--steps", type=int, default=10, help="timed steps")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
  p.add_argument("--moe-impl", default=None,
                 help="accepted for symmetry with train_throughput.py; use --experts-impl")
  p.add_argument("--attn-impl", default="sdpa", choices=("eager", "sdpa"))
  p.add_argument("--experts-impl", default="grouped_mm",
                 choices=("eager", "batched_mm", "grouped_mm"))
  p.add_argument("--adamw-impl", default="fused", choices=("fused", "foreach", "for-loop"),
                 help="torch.optim.AdamW kernel (fused is fastest on CPU)")
  p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  for name in ("batch", "seq", "steps", "threads"):
    if getattr(args, name) < 1:
      p.error(f"--{name}={getattr(args, name)} must be >= 1")
  if args.warmup < 0:
    p.error(f"--warmup={args.warmup} must be >= 0")
  return args


def random_batch(vocab_size: int, batch: int, seq: int, seed: int):
  """Same tokens and targets as train_throughput.random_batch (same seed)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab_size, size=(batch, seq + 1), dtype=np.int32)
  tokens = torch.from_numpy(ids[:, :-1].astype(np.int64))             # [b, s]
  targets = torch.from_numpy(ids[:, 1:].astype(np.int64))             # [b, s]
  positions = torch.arange(seq).expand(batch, seq)                    # [b, s]
  return tokens, targets, positions


def active_params_per_token(model, cfg: ModelConfig) -> int:
  """All parameters except the routed experts a token does not visit."""
  total = routed = 0
  for name, p in model.named_parameters():
    total += p.numel()
    if ".mlp.experts." in name:  # fused [E, ...] gate_up_proj / down_proj
      routed += p.numel()
  if not routed:
    return total
  return total - routed + routed * cfg.n_activated_experts // cfg.n_routed_experts


_ADAMW_KWARGS = {"fused": {"fused": True}, "foreach": {"foreach": True},
                 "for-loop": {"foreach": False}}


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def main(argv=None) -> dict:
  args = parse_args(argv)
  torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  cfg = ModelConfig.from_json(args.model_json)
  if cfg.n_mtp_depth:
    print(f"note: n_mtp_depth={cfg.n_mtp_depth} in {args.model_json} ignored: "
          "transformers trains no MTP module; measuring with 0.", file=sys.stderr)
    cfg = cfg.replace(n_mtp_depth=0)
  if args.seq > cfg.max_seq_len:
    sys.exit(f"--seq={args.seq} exceeds max_seq_len={cfg.max_seq_len} of {args.model_json}")
  train_cfg = TrainConfig(steps=1, warmup_steps=0, batch_size=args.batch, seq_len=args.seq)
  rss_after_import = peak_rss_mb()

  hf_config = transformers.DeepseekV3Config.from_dict(config_to_hf(cfg))
  hf_config._attn_implementation = args.attn_impl
  hf_config._experts_implementation = args.experts_impl
  model = transformers.DeepseekV3ForCausalLM(hf_config).to(torch.float32)
  model.set_attn_implementation(args.attn_impl)
  model.set_experts_implementation(args.experts_impl)
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=train_cfg.lr, betas=(train_cfg.b1, train_cfg.b2),
                          eps=train_cfg.eps, weight_decay=train_cfg.weight_decay,
                          **_ADAMW_KWARGS[args.adamw_impl])
  tokens, targets, positions = random_batch(cfg.vocab_size, args.batch, args.seq, args.seed)

  def step() -> float:
    logits = model(input_ids=tokens, position_ids=positions, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, cfg.vocab_size), targets.reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, train_cfg.clip_norm)
    opt.step()
    return loss.item()  # synchronises; CPU torch is eager anyway

  first_step_s = None
  for i in range(args.warmup):
    t0 = time.perf_counter()
    step()
    if i == 0:
      first_step_s = time.perf_counter() - t0
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - t0)
  if not np.isfinite(loss):
    sys.exit(f"non-finite loss {loss} after {args.warmup + args.steps} steps")

  median = statistics.median(times)
  result = {
      "bench": "train_throughput", "framework": "torch-hf",
      "train_tokens_per_s": args.batch * args.seq / median,
      "step_s_median": median, "step_s_min": min(times), "step_s_all": times,
      "compile_s": 0.0, "first_step_s": first_step_s,
      "peak_rss_mb": peak_rss_mb(), "rss_after_import_mb": rss_after_import,
      "params": sum(p.numel() for p in params),
      "active_params_per_token": active_params_per_token(model, cfg),
      "batch": args.batch, "seq": args.seq, "steps": args.steps, "warmup": args.warmup,
      "final_loss": loss,
      "torch_version": torch.__version__, "transformers_version": transformers.__version__,
      "backend": "cpu", "torch_threads": torch.get_num_threads(),
      "attn_impl": model.config._attn_implementation,
      "experts_impl": model.config._experts_implementation,
      "moe_impl": f"hf:{model.config._experts_implementation}",
      "adamw_impl": args.adamw_impl, "n_mtp_depth": cfg.n_mtp_depth,
      "model_json": args.model_json,
  }
  print(json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  main()
