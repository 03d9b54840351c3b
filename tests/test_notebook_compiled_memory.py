"""experiments/compiled_memory.ipynb at tiny size: the compiled train step's
memory (XLA's memory_analysis of make_train_step(...).lower().compile(), on
abstract inputs: nothing runs) vs sequence length for naive vs blockwise
attention and full vs vocabulary-chunked CE, and against the planner.

Oracles, computed here from the shapes alone:
  * a quadratic term: from seq s to 4s the naive arm's temporaries grow by at
    least one float32 [b, h, s, s] score buffer's growth (b h 15 s^2 4 bytes),
    and by more than 6x; the blockwise arm's by less than 5x (linear: 4x plus
    the fixed part);
  * the full-CE arm holds at least one float32 [tokens, V] logits buffer more
    than the chunked one, less the chunked CE's own [tokens, chunk] chunk;
  * planner: compiled / planned total recomputed from the two byte counts, the
    compiled arguments = the planner's exact state + a few int32 per token of
    batch, and the ratio within the bound measured at this size (docstring
    of test_planner_bound).
A fast test checks the planner's own attention term scales as the notebook
says (quadratic naive, linear blockwise).
"""

import json
import os
import sys

import numpy as np
import pytest

from deepseek_jax import get_preset
from deepseek_jax.data.pipeline import BATCH_DTYPES
from deepseek_jax.parallel.plan import memory_plan
from deepseek_jax.train.config import TrainConfig
from deepseek_jax.train.step import abstract_train_state

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "experiments"))

from run_notebook import image_outputs, result_records, run_notebook  # noqa: E402

NOTEBOOK = os.path.join(REPO_ROOT, "experiments", "compiled_memory.ipynb")
SWEEP = {"n_layers": 1, "n_dense_layers": 1, "n_mtp_depth": 0, "dim": 64, "inter_dim": 128,
         "n_heads": 16, "vocab_size": 2048, "q_lora_rank": 32, "kv_lora_rank": 32,
         "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16}
SEQS, BLOCK, CHUNK = [128, 512], 64, 256
PLAN = {"n_layers": 2, "n_dense_layers": 1, "dim": 128, "inter_dim": 256, "moe_inter_dim": 64,
        "n_heads": 8, "n_routed_experts": 8, "n_expert_groups": 1, "n_limited_groups": 1,
        "n_activated_experts": 2, "vocab_size": 4096, "q_lora_rank": 64,
        "kv_lora_rank": 32, "attn_block_size": 64}
MESHES = [{"expert": 4, "fsdp": 2, "rules": "ep_fsdp"}]
PLAN_BATCH, PLAN_SEQ = 8, 256


@pytest.fixture(scope="module")
def records(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("compiled_memory"))
  params = dict(sweep_model=SWEEP, seq_lens=SEQS, sweep_batch=1, attn_block=BLOCK,
                vocab_chunk=CHUNK, plan_model=PLAN, plan_meshes=MESHES, plan_batch=PLAN_BATCH,
                plan_seq=PLAN_SEQ, workdir_root=workdir,
                jax_cache_dir=os.environ["DSJ_TEST_JAX_CACHE"])
  nb = run_notebook(NOTEBOOK, params, out=os.path.join(workdir, "executed.ipynb"), timeout=600)
  assert image_outputs(nb) == 2
  for name in ("compiled_memory_sweep.png", "compiled_memory_planner.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  recs = result_records(nb)
  sweep = {r["arm"]: r for r in recs if r["part"] == "sweep"}
  planned = [r for r in recs if r["part"] == "planner"]
  return sweep, planned


# The fixture runs the notebook: ~25 s cold on 2 busy cores (6 one-device compiles, one
# 8-device compile); CI's slow step keeps the default suite under 15 min.
@pytest.mark.slow
def test_sweep_naive_quadratic_blockwise_linear(records):
  sweep, _ = records
  assert set(sweep) == {"naive_attention", "blockwise", "full_ce"}
  with open(sweep["blockwise"]["path"]) as f:           # the saved figures are the printed ones
    saved = json.load(f)
  for arm, r in sweep.items():
    assert r["seq_lens"] == SEQS and saved[arm]["temp_bytes"] == r["temp_bytes"]
    assert r["growth"] == pytest.approx(r["temp_bytes"][-1] / r["temp_bytes"][0], rel=1e-12)
  assert (sweep["naive_attention"]["attn_block_size"], sweep["blockwise"]["attn_block_size"],
          sweep["full_ce"]["vocab_chunk"]) == (0, BLOCK, 0)
  s, heads, grow = SEQS[0], SWEEP["n_heads"], SEQS[1] // SEQS[0]
  naive, block = sweep["naive_attention"]["temp_bytes"], sweep["blockwise"]["temp_bytes"]
  # one float32 [1, h, s, s] buffer's growth from s to 4s: a lower bound of the naive arm's growth
  assert naive[1] - naive[0] >= heads * ((grow * s) ** 2 - s ** 2) * 4
  assert naive[1] / naive[0] > 6 and block[1] / block[0] < 5
  assert naive[1] > 2 * block[1]
  # full CE: at least the float32 [tokens, V] logits beyond the chunked CE's [tokens, chunk]
  full = sweep["full_ce"]["temp_bytes"]
  for seq, f_bytes, b_bytes in zip(SEQS, full, block):
    assert f_bytes - b_bytes >= seq * (SWEEP["vocab_size"] - CHUNK) * 4
  # the arguments are the state (the same for every arm and length) and the batch
  per_token = sum(np.dtype(d).itemsize for d in BATCH_DTYPES.values())
  state = {a - seq * per_token for r in sweep.values()
           for a, seq in zip(r["argument_bytes"], r["seq_lens"])}
  assert len(state) == 1


@pytest.mark.slow
def test_planner_bound(records):
  """At this size (dim 128, 2 layers, expert=4 x fsdp=2, 8 x 256 tokens) the
  compiled total was 1.65x the planner's (61.2 vs 37.2 MiB) on jax 0.10 and
  1.31x (48.9 MiB) on jax 0.12. The planner's activation terms were fitted to
  V3-width compiles (parallel/plan.py); what it leaves out (12-24 MiB here)
  weighs more in a tiny model than at 1/7 of V3's width, where the two agree
  within 25% (tests/test_planner_vs_compiler.py). Bound here: [1, 2]."""
  _, planned = records
  assert len(planned) == len(MESHES)
  for r in planned:
    assert r["compiled_over_planner"] == pytest.approx(
        r["compiled_total_bytes"] / r["planner_total_bytes"], rel=1e-12)
    assert r["compiled_total_bytes"] == (r["argument_bytes"] + r["temp_bytes"]
                                         + r["output_bytes"] - r["alias_bytes"])
    state = r["planner_params_bytes"] + r["planner_opt_state_bytes"]
    rows = r["mesh"]["data"] * r["mesh"]["fsdp"] * r["mesh"]["expert"]
    assert 0 <= r["argument_bytes"] - state <= 6 * 4 * PLAN_BATCH * PLAN_SEQ // rows + 1024
    assert 1.0 <= r["compiled_over_planner"] <= 2.0, r


def test_planner_attention_term_is_quadratic_naive_linear_blockwise():
  """The planner's attention term (parallel/plan.py): 3 s^2 h 4 bytes per
  sequence naive, linear in s blockwise; x4 sequence -> x16 and x4."""
  cfg = get_preset("tiny", max_seq_len=1024, original_seq_len=1024)
  state = abstract_train_state(cfg, TrainConfig())
  sizes = {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1, "pipe": 1}

  def attention(block, seq):
    plan = memory_plan(cfg.replace(attn_block_size=block), sizes, "ep_fsdp", state=state,
                       batch_size=1, seq_len=seq)
    return plan["activation_terms_bytes"]["attention"]
  assert attention(0, 128) == 3 * cfg.n_heads * 128 ** 2 * 4
  assert attention(0, 512) == 16 * attention(0, 128)
  assert attention(32, 512) == 4 * attention(32, 128)
