"""The grouped matmul's (model/grouped_matmul.py) 16-bit weights as XLA:CPU
compiles them.

XLA:CPU has no bfloat16 gather: its float normalization gathered each chunk
of expert weights from a float32 copy of the whole [G, K, N] weight, which
loop-invariant code motion hoisted out of the chunk loop (3.5 GiB per V3
expert matrix and call). The kernel now gathers the weights' bits (uint16).
Oracles: the compiled program (no float32 value of the weight's shape
outside a fusion) and a float64 NumPy per-block loop for the numbers.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.model import grouped_matmul as gm

G, K, N, N_BLOCKS, BS, N_USED = 4, 64, 32, 12, 8, 9


def _problem():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(N_BLOCKS * BS, K)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(G, K, N)), jnp.bfloat16)
  bg = np.sort(rng.integers(0, G, N_BLOCKS)).astype(np.int32)
  return x, w, bg


def _loss(x, w, bg):
  return (gm.gmm(x, w, bg, N_USED).astype(jnp.float32) ** 2).sum()


@pytest.fixture
def two_blocks_per_chunk(monkeypatch):
  """A chunk of 2 of the 12 blocks: the while loop over chunks."""
  monkeypatch.setattr(gm, "GATHER_BUDGET_BYTES", 2 * K * N * 2)


def test_bf16_weights_are_not_copied_to_float32_for_the_chunk_gather(two_blocks_per_chunk):
  x, w, bg = _problem()
  grad = jax.grad(_loss, argnums=(0, 1))
  hlo = jax.jit(grad).lower(x, w, jnp.asarray(bg)).compile().as_text()
  # Top-level values (a fusion's internal ones are not buffers): the fusions
  # and copies of each computation, by their shape.
  whole = re.findall(rf"^\s+(?:ROOT )?%[\w.\-]+ = f32\[{G},{K},{N}\]\S* (fusion|copy)\(",
                     hlo, flags=re.M)
  assert not whole, f"{len(whole)} float32 copies of the [G, K, N] weight"


def test_gmm_with_bf16_weights_matches_a_float64_loop(two_blocks_per_chunk):
  x, w, bg = _problem()
  y = gm.gmm(x, w, jnp.asarray(bg), N_USED)
  xf, wf = np.asarray(x, np.float64), np.asarray(w, np.float64)
  want = np.zeros((N_BLOCKS * BS, N))
  for blk in range(N_USED):
    r = slice(blk * BS, (blk + 1) * BS)
    want[r] = xf[r] @ wf[bg[blk]]
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=2e-2, atol=5e-2)
  dx, dw = jax.grad(_loss, argnums=(0, 1))(x, w, jnp.asarray(bg))
  dy = 2 * np.asarray(y, np.float64)
  want_dw = np.zeros((G, K, N))
  want_dx = np.zeros_like(xf)
  for blk in range(N_USED):
    r = slice(blk * BS, (blk + 1) * BS)
    want_dw[bg[blk]] += xf[r].T @ dy[r]
    want_dx[r] = dy[r] @ wf[bg[blk]].T
  scale = np.abs(want_dw).max()
  np.testing.assert_allclose(np.asarray(dw, np.float64) / scale, want_dw / scale, atol=2e-2)
  scale = np.abs(want_dx).max()
  np.testing.assert_allclose(np.asarray(dx, np.float64) / scale, want_dx / scale, atol=2e-2)
