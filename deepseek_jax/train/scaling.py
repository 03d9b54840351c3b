"""DeepSeek LLM's scaling laws (Bi et al. 2024, sec. 3): hyperparameters and
the model / data split for a compute budget.

The report measures compute as C = M * D, with M the non-embedding FLOPs
per token of training (forward + backward) and D the training tokens:

  M = 72 n_layer d_model^2 + 6 n_layer d_model l_seq

(the attention's cost counted, the vocabulary's not), and fits, for C in FLOPs,

  B_opt   = 0.292 * C^0.3271     the batch size in tokens
  eta_opt = 0.3118 * C^-0.1250   the peak learning rate
  M_opt   = 0.1715 * C^0.5243    the model scale (FLOPs per token)
  D_opt   = 5.8316 * C^0.4757    the data scale (tokens); M_opt * D_opt = C

`python -m launch.plan --compute=C` prints them. Check (tests/test_plan.py):
the report's own models, 7B (30 layers, d_model 4096) and 67B (95 layers,
8192) on 2T tokens of 4096, give batch sizes and learning rates within 10%
of the ones they were trained with (2304 and 4608 sequences of 4096 tokens;
4.2e-4 and 3.2e-4).
"""

from __future__ import annotations


def non_embedding_flops_per_token(n_layers: int, dim: int, seq_len: int) -> float:
  """M = 72 n_layer d_model^2 + 6 n_layer d_model l_seq (training FLOPs per token)."""
  return 72.0 * n_layers * dim ** 2 + 6.0 * n_layers * dim * seq_len


def optimal(compute: float) -> dict[str, float]:
  """The fitted optima for a budget of `compute` FLOPs (module docstring)."""
  if not compute > 0:
    raise ValueError(f"compute={compute} must be a positive number of FLOPs, e.g. 1e21.")
  return {"compute": float(compute),
          "batch_tokens_opt": 0.292 * compute ** 0.3271,
          "lr_opt": 0.3118 * compute ** -0.1250,
          "model_flops_per_token_opt": 0.1715 * compute ** 0.5243,
          "tokens_opt": 5.8316 * compute ** 0.4757}
