"""f32 matmul throughput of this machine through XLA (jax) and torch.

Puts the training-throughput figures in context: a train step cannot beat the
machine's matmul rate, so RESULTS.md records both side by side.

  python bench/matmul_peak.py            # one JSON line per (framework, shape)
"""

from __future__ import annotations

import json
import time

import numpy as np

SHAPES = ((2048, 256, 768), (2048, 256, 4096), (2048, 768, 256))


def median_seconds(fn, repeats: int = 15, warmup: int = 3) -> float:
  """Median wall time of fn() over `repeats` calls after `warmup` untimed ones."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def main() -> None:
  import jax
  import jax.numpy as jnp
  for m, k, n in SHAPES:
    a = jnp.ones((m, k), jnp.float32)
    b = jnp.ones((k, n), jnp.float32)
    mm = jax.jit(lambda x, y: x @ y)
    s = median_seconds(lambda: mm(a, b).block_until_ready())
    print(json.dumps({"bench": "matmul_peak", "framework": "jax", "shape": [m, k, n],
                      "gflops": round(2 * m * k * n / s / 1e9, 1),
                      "jax_version": jax.__version__}), flush=True)
  try:
    import torch
  except ImportError:
    return
  torch.set_num_threads(2)
  for m, k, n in SHAPES:
    a, b = torch.ones(m, k), torch.ones(k, n)
    s = median_seconds(lambda: a @ b)
    print(json.dumps({"bench": "matmul_peak", "framework": "torch", "shape": [m, k, n],
                      "gflops": round(2 * m * k * n / s / 1e9, 1), "threads": 2,
                      "torch_version": torch.__version__}), flush=True)


if __name__ == "__main__":
  main()
