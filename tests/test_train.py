"""Training stack: schedule, decay mask, losses, bias update, step, resume, NaN stop.

Oracles: a piecewise schedule formula, numpy loops for cross-entropy, hand
computations for the MTP shift and the bias update, and a straight run for
resume equivalence. Every jitted step shares one tiny configuration (the
`launch/configs/tiny.py` one, which the launch test runs too) so that the
persistent compilation cache compiles it once per session.
"""

import dataclasses
import json
import math
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deepseek_jax import get_preset
from deepseek_jax.data import pipeline, tasks
from deepseek_jax.data.tokenizer import default_tokenizer
from deepseek_jax.model import abstract_variables
from deepseek_jax.train import checkpoint, evaluate, loop, losses, optimizer, step
from deepseek_jax.train import config as train_config
from launch.configs import build_configs
from launch.configs import tiny as tiny_config


@pytest.fixture(scope="module")
def configs():
  return build_configs(tiny_config.get_config())


# ---------------------------------------------------------------------------
# optimizer.py
# ---------------------------------------------------------------------------
def _v3_schedule_formula(t, peak, W, H, D, end, E, final):
  """The V3 schedule written out directly (report sec. 4.2), in steps."""
  if t < W:
    return peak * t / W
  if t < W + H:
    return peak
  if t < W + H + D:
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * (t - W - H) / D))
  if t < W + H + D + E:
    return end
  return final


@pytest.mark.parametrize("W,H,D,E", [(20, 30, 50, 10), (0, 0, 40, 0), (5, 0, 0, 7)])
def test_lr_schedule_matches_piecewise_v3_formula(W, H, D, E):
  peak, end, final = 2.2e-4, 2.2e-5, 7.3e-6
  sched = optimizer.lr_schedule(peak, warmup_steps=W, hold_steps=H, decay_steps=D,
                                end_lr=end, end_steps=E, final_lr=final)
  for t in range(W + H + D + E + 5):
    want = _v3_schedule_formula(t, peak, W, H, D, end, E, final)
    if D == 0 and W + H <= t < W + H + E:    # no decay segment: straight to end_lr
      want = end
    np.testing.assert_allclose(float(sched(t)), want, rtol=1e-5, atol=1e-12,
                               err_msg=f"step {t}")


def test_lr_schedule_rejects_negative_lengths():
  with pytest.raises(ValueError, match="warmup_steps"):
    optimizer.lr_schedule(1e-3, warmup_steps=-1)


def test_weight_decay_mask_skips_norm_scales_and_one_dim_params():
  params = abstract_variables(get_preset("tiny"))["params"]
  mask = optimizer.weight_decay_mask(params)
  flat = {jax.tree_util.keystr(p): m
          for p, m in jax.tree_util.tree_leaves_with_path(mask)}
  # Stacked scales are 2-D ([layers, dim]) and must still be excluded by name.
  assert not flat["['moe_layers']['attn_norm']['scale']"]
  assert not flat["['dense_layers']['attn']['kv_norm']['scale']"]
  assert not flat["['mtp_0']['enorm']['scale']"]
  assert not flat["['norm']['scale']"]
  assert flat["['embed']['embedding']"] and flat["['head']['kernel']"]
  assert flat["['moe_layers']['ffn']['w1']"] and flat["['moe_layers']['ffn']['gate']"]
  for path, m in flat.items():
    assert m == (not path.endswith("['scale']")), path
  # Every no-decay name names parameters of the V3 model (none is dead).
  v3 = abstract_variables(get_preset("v3_671b"))["params"]
  names = {getattr(p[-1], "key", None) for p, _ in jax.tree_util.tree_leaves_with_path(v3)}
  assert set(optimizer.NO_DECAY_NAMES) <= names


def test_flops_per_token_match_the_parameter_shapes_and_a_hand_count():
  from deepseek_jax.train import flops
  for cfg in (get_preset("tiny"), get_preset("tiny", q_lora_rank=0, n_mtp_depth=2),
              get_preset("v3_671b")):
    # Every matmul weight a token meets, from the shapes: 2 FLOPs per weight,
    # routed experts k/E of them, the head once more per MTP module.
    params = abstract_variables(cfg)["params"]
    weights = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
      keys = [getattr(k, "key", None) for k in path]
      n = math.prod(leaf.shape)
      if keys[-1] == "scale" or keys[-2:] == ["embed", "embedding"]:
        continue
      if keys[-1] in ("w1", "w2", "w3"):     # routed experts [..., E, *, *]
        n = n * cfg.n_activated_experts // cfg.n_routed_experts
      weights += n
    weights += cfg.n_mtp_depth * cfg.dim * cfg.vocab_size
    core = (cfg.n_layers + cfg.n_mtp_depth) * flops.attention_core_flops(cfg, 9)
    assert flops.forward_flops_per_token(cfg, 9) == 2 * weights + core
  # Attention core by hand, tiny (H=4, qk 16+8, v 16) at S=7: each token sees
  # (7+1)/2 = 4 positions on average; QK 2*4*24*4 = 768, PV 2*4*16*4 = 512.
  assert flops.attention_core_flops(get_preset("tiny"), 7) == 768 + 512
  assert flops.train_flops_per_token(get_preset("tiny"), 7) == \
      3 * flops.forward_flops_per_token(get_preset("tiny"), 7)


def test_warmup_longer_than_the_run_is_refused():
  with pytest.raises(ValueError, match="warmup_steps=20 exceeds steps=10"):
    train_config.TrainConfig(steps=10, warmup_steps=20)
  defaults = train_config.TrainConfig()
  assert defaults.warmup_steps <= defaults.steps
  # A checkpoint written under the old defaults (warmup 2000 > steps 1000) is
  # still compared, not re-validated: its resolved decay was max(1000-2000, 0).
  old = dict(train_config.TrainConfig().to_dict(), steps=1000, warmup_steps=2000)
  assert train_config.resolved_schedule(old)["decay_steps"] == 0
  longer = train_config.TrainConfig(steps=3000, warmup_steps=2000)
  assert train_config.schedule_changes(old, longer) == ["decay_steps: 0 -> 1000"]
  # A schedule flat after its warmup (GRPO's: end_lr = lr) does not bend when
  # the run grows, so resuming it with more steps is allowed.
  flat = dict(old, steps=100, warmup_steps=5, end_lr=old["lr"])
  assert train_config.schedule_changes(flat, train_config.TrainConfig(
      steps=400, warmup_steps=5, end_lr=old["lr"], lr=old["lr"])) == []
  # ... and such a run still exports (its config is read, not re-validated).
  assert train_config.TrainConfig.from_saved({**old, "grpo": {}}).warmup_steps == 1000


def test_adamw_decays_matrices_but_not_scales():
  # With zero gradients Adam's update is 0, so only decoupled weight decay
  # moves a parameter: p <- p - lr * wd * p, and only where the mask is True.
  params = {"norm": {"scale": jnp.full((2, 4), 2.0)},
            "ffn": {"kernel": jnp.full((4, 4), 2.0)},
            "vec": jnp.full((4,), 2.0)}
  tx = optimizer.make_optimizer(optax.constant_schedule(0.1), weight_decay=0.5)
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, state, params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["norm"]["scale"], 2.0)
  np.testing.assert_allclose(new["vec"], 2.0)
  np.testing.assert_allclose(new["ffn"]["kernel"], 2.0 - 0.1 * 0.5 * 2.0, rtol=1e-6)


# ---------------------------------------------------------------------------
# losses.py
# ---------------------------------------------------------------------------
def test_cross_entropy_matches_naive_loop():
  rng = np.random.default_rng(0)
  b, s, v = 2, 5, 7
  logits = rng.normal(size=(b, s, v)).astype(np.float32) * 3
  targets = rng.integers(0, v, size=(b, s)).astype(np.int32)
  mask = rng.integers(0, 2, size=(b, s)).astype(np.float32)
  total, count = 0.0, 0.0
  for i in range(b):
    for j in range(s):
      z = logits[i, j].astype(np.float64)
      log_z = math.log(sum(math.exp(x) for x in z))
      total += mask[i, j] * (log_z - z[targets[i, j]])
      count += mask[i, j]
  ce, n = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  np.testing.assert_allclose(float(ce), total / count, rtol=1e-5)
  assert float(n) == count


def test_cross_entropy_without_targets_is_zero_not_nan():
  ce, _ = losses.cross_entropy(jnp.ones((1, 3, 4)), jnp.zeros((1, 3), jnp.int32),
                               jnp.zeros((1, 3)))
  assert float(ce) == 0.0


def _packed_two_docs():
  """Row `b a1 a2 e | b c1 e | pad` (ids b=1, e=2, pad=0), as the pipeline packs it."""
  docs = [[1, 11, 12, 2], [1, 21, 2]]
  batch = pipeline.pack_documents(docs, seq_len=8, pad_id=0)
  # The hand-written contract for this row (pipeline docstring example).
  np.testing.assert_array_equal(batch["tokens"][0], [1, 11, 12, 2, 1, 21, 2, 0])
  np.testing.assert_array_equal(batch["targets"][0], [11, 12, 2, 1, 21, 2, 0, 0])
  np.testing.assert_array_equal(batch["segment_ids"][0], [1, 1, 1, 1, 2, 2, 2, 0])
  np.testing.assert_array_equal(batch["loss_mask"][0], [1, 1, 1, 0, 1, 1, 0, 0])
  return {k: jnp.asarray(v) for k, v in batch.items()}


def test_mtp_targets_shift_within_each_packed_document():
  batch = _packed_two_docs()
  # Depth 1 at position i predicts t_{i+2} = targets[i+1]. By hand:
  #   i=0 (b)  -> 12 (a2)       valid
  #   i=1 (a1) -> 2  (e of A)   valid
  #   i=2 (a2) -> 1  (b of B)   invalid: not a real target (loss_mask[3] = 0)
  #   i=3 (e)  -> 21 (c1 of B)  invalid: other document
  #   i=4 (b)  -> 2  (e of B)   valid
  #   i=5..7                    invalid: past the document / padding
  t1, w1 = losses.mtp_targets(batch["targets"], batch["loss_mask"], batch["segment_ids"], 1)
  np.testing.assert_array_equal(t1[0], [12, 2, 1, 21, 2, 0, 0, 0])
  np.testing.assert_array_equal(w1[0], [1, 1, 0, 0, 1, 0, 0, 0])
  # Depth 2: only i=0 (b -> e of A) stays inside a document with a real target.
  t2, w2 = losses.mtp_targets(batch["targets"], batch["loss_mask"], batch["segment_ids"], 2)
  np.testing.assert_array_equal(t2[0], [2, 1, 21, 2, 0, 0, 0, 0])
  np.testing.assert_array_equal(w2[0], [1, 0, 0, 0, 0, 0, 0, 0])


def test_total_loss_is_ce_plus_lambda_mtp_plus_alpha_balance():
  batch = _packed_two_docs()
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(1, 8, 32)), jnp.float32)
  mtp_logits = jnp.asarray(rng.normal(size=(2, 1, 8, 32)), jnp.float32)
  aux = {"mtp_logits": mtp_logits, "balance_loss": jnp.float32(1.7)}
  loss, m = losses.total_loss(logits, aux, batch, mtp_weight=0.3, balance_weight=0.01)
  ce = losses.cross_entropy(logits, batch["targets"], batch["loss_mask"])[0]
  ces = [losses.cross_entropy(mtp_logits[k - 1], *losses.mtp_targets(
      batch["targets"], batch["loss_mask"], batch["segment_ids"], k))[0] for k in (1, 2)]
  want = ce + 0.3 / 2 * (ces[0] + ces[1]) + 0.01 * 1.7
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
  np.testing.assert_allclose(float(m["mtp"]), float((ces[0] + ces[1]) / 2), rtol=1e-6)
  assert float(m["balance"]) == pytest.approx(1.7)


# ---------------------------------------------------------------------------
# step.py
# ---------------------------------------------------------------------------
def test_router_bias_update_matches_hand_computation():
  bias = {"moe_layers": {"ffn": {"bias": jnp.array([[0.5, 0.0, 0.0, -0.5],
                                                     [0.0, 0.0, 0.0, 0.0]])}},
          "mtp_0": {"block": {"ffn": {"bias": jnp.array([0.3, 0.1, 0.0, 0.0])}}}}
  load = jnp.array([[3.0, 1.0, 2.0, 2.0],       # mean 2: over, under, even, even
                    [0.0, 4.0, 4.0, 0.0]])      # mean 2: under, over, over, under
  new = step.update_router_bias(bias, load, 0.01)
  np.testing.assert_allclose(new["moe_layers"]["ffn"]["bias"],
                             [[0.49, 0.01, 0.0, -0.5], [0.01, -0.01, -0.01, 0.01]],
                             rtol=1e-6)
  assert new["mtp_0"] is bias["mtp_0"]       # no MTP loads given: unchanged
  assert step.update_router_bias(bias, load, 0.0) is bias
  new = step.update_router_bias(bias, load, 0.01, jnp.array([[1.0, 1.0, 5.0, 1.0]]))
  np.testing.assert_allclose(new["mtp_0"]["block"]["ffn"]["bias"],
                             [0.31, 0.11, -0.01, 0.01], rtol=1e-6)


def _fixed_batch(train_cfg):
  tok = default_tokenizer()
  problems = tasks.generate_problems(train_cfg.batch_size, seed=3,
                                     max_digits=train_cfg.max_digits)
  docs = [pipeline.encode_problem(tok, p) for p in problems]
  rows = pipeline.pack_documents(docs, train_cfg.seq_len, pad_id=tok.pad_id)
  return {k: v[:train_cfg.batch_size] for k, v in rows.items()}


def test_train_step_moves_bias_by_hand_rule_only_and_reduces_loss(configs):
  model_cfg, train_cfg = configs
  batch = _fixed_batch(train_cfg)
  pipeline.validate_batch(batch, model_cfg.vocab_size, model_cfg.max_seq_len)
  state = step.init_train_state(model_cfg, train_cfg, jax.random.key(0))
  # The bias starts non-zero, so weight decay or a gradient touching it would show.
  state = state.replace(router_bias=jax.tree.map(
      lambda b: b + jnp.linspace(-0.2, 0.2, b.size).reshape(b.shape), state.router_bias))
  # The optimizer state mirrors params only: the bias has no Adam moments.
  assert not any("router_bias" in jax.tree_util.keystr(p)
                 for p, _ in jax.tree_util.tree_leaves_with_path(state.opt_state))
  train_step = step.make_train_step(model_cfg, train_cfg)
  gamma = train_cfg.bias_update_speed
  first_loss = None
  for i in range(train_cfg.steps):
    before = jax.device_get(state.router_bias)
    state, m = train_step(state, batch)
    after = jax.device_get(state.router_bias)
    load = np.asarray(m["expert_load"])
    assert load.shape == (model_cfg.n_moe_layers, model_cfg.n_routed_experts)
    # Every non-padding token picks k experts in every MoE layer.
    np.testing.assert_allclose(load.sum(-1), m["tokens"] * model_cfg.n_activated_experts)
    want = before["moe_layers"]["ffn"]["bias"] + gamma * np.sign(
        load.mean(-1, keepdims=True) - load)
    np.testing.assert_allclose(after["moe_layers"]["ffn"]["bias"], want, atol=1e-7)
    mtp_load = np.asarray(m["mtp_expert_load"])[0]
    np.testing.assert_allclose(mtp_load.sum(), m["tokens"] * model_cfg.n_activated_experts)
    np.testing.assert_allclose(
        after["mtp_0"]["block"]["ffn"]["bias"],
        before["mtp_0"]["block"]["ffn"]["bias"]
        + gamma * np.sign(mtp_load.mean() - mtp_load), atol=1e-7)
    assert int(state.step) == i + 1
    for key in ("loss", "ce", "mtp", "balance", "grad_norm", "lr", "load_imbalance"):
      assert np.isfinite(m[key]), key
    first_loss = float(m["loss"]) if first_loss is None else first_loss
  # Same batch again: the loss must have gone down.
  _, m = train_step(state, batch)
  assert float(m["loss"]) < first_loss - 0.3, (first_loss, float(m["loss"]))


def test_update_step_takes_any_loss_and_skips_non_finite_updates(configs):
  model_cfg, train_cfg = configs
  batch = _fixed_batch(train_cfg)
  base = step.pretraining_loss(model_cfg, train_cfg)

  def scaled(params, router_bias, b):      # the pretraining loss times a batch field
    loss, aux = base(params, router_bias, {k: v for k, v in b.items() if k != "scale"})
    return loss * b["scale"][0, 0], aux

  update = step.make_update_step(model_cfg, train_cfg, scaled, skip_nonfinite=True)
  state = step.init_train_state(model_cfg, train_cfg, jax.random.key(0))
  before = jax.device_get((state.params, state.opt_state, state.router_bias))
  ones = np.ones(batch["tokens"].shape, np.float32)
  state, m = update(state, dict(batch, scale=ones * np.nan))
  assert float(m["skipped"]) == 1.0 and int(state.step) == 1
  for x, y in zip(jax.tree.leaves(before),
                  jax.tree.leaves(jax.device_get((state.params, state.opt_state,
                                                  state.router_bias)))):
    np.testing.assert_array_equal(x, y)
  # A finite step moves params exactly as the plain pretraining step does.
  plain = step.make_train_step(model_cfg, train_cfg)
  state, m = update(state, dict(batch, scale=ones))
  ref = step.init_train_state(model_cfg, train_cfg, jax.random.key(0))
  ref = ref.replace(step=ref.step + 1)
  ref, m_ref = plain(ref, batch)
  assert float(m["skipped"]) == 0.0
  np.testing.assert_allclose(float(m["loss"]), float(m_ref["loss"]), rtol=1e-6)
  for x, y in zip(jax.tree.leaves((state.params, state.router_bias)),
                  jax.tree.leaves((ref.params, ref.router_bias))):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------
# loop.py + checkpoint.py
# ---------------------------------------------------------------------------
def _read(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _params(workdir, model_cfg, train_cfg):
  ckpts = checkpoint.Checkpoints(workdir, model_cfg, train_cfg.to_dict(), every=1, keep=5)
  try:
    state, data_state = ckpts.restore(step.abstract_train_state(model_cfg, train_cfg))
  finally:
    ckpts.close()
  return state, data_state


def test_checkpoints_keep_latest_k_and_refuse_another_model(tmp_path):
  cfg = get_preset("tiny")
  workdir = str(tmp_path)
  ckpts = checkpoint.Checkpoints(workdir, cfg, {"lr": 1.0}, every=2, keep=2)
  for s in range(1, 6):       # saves 2 and 4 by the interval, 5 forced (the last step)
    ckpts.save(s, {"w": jnp.arange(3.0) + s}, {"step": s, "seed": 0}, force=s == 5)
  assert sorted(ckpts.manager.all_steps()) == [4, 5]
  state, data_state = ckpts.restore(checkpoint.abstract_like({"w": jnp.zeros(3)}))
  np.testing.assert_array_equal(state["w"], [5.0, 6.0, 7.0])
  assert data_state == {"step": 5, "seed": 0}
  ckpts.close()
  # Dropped checkpoints leave by an atomic rename, then are deleted: nothing of
  # step 2 stays, and what a kill in the middle of deleting leaves behind (here
  # a step whose "meta" is already gone) is no step and goes at the next open.
  ckpt_dir = os.path.join(workdir, checkpoint.CHECKPOINT_DIR)
  assert sorted(os.listdir(ckpt_dir)) == ["4", "5"]
  os.makedirs(os.path.join(ckpt_dir, checkpoint.TRASH_DIR, "2", "state"))
  reader = checkpoint.Checkpoints.existing(workdir)
  assert reader.all_steps() == [4, 5]
  reader.close()
  assert checkpoint.TRASH_DIR in os.listdir(ckpt_dir)        # a reader deletes nothing
  # Train-config changes are reported; model-config changes are refused.
  ckpts, diff = checkpoint.open_checkpoints(workdir, cfg, {"lr": 2.0}, every=2, keep=2)
  ckpts.close()
  assert diff == ["lr: saved 1.0, requested 2.0"]
  assert sorted(os.listdir(ckpt_dir)) == ["4", "5"]
  with pytest.raises(ValueError, match=r"dim: saved 64, requested 32; n_heads: saved 4, "
                                       r"requested 2\. Use a new workdir"):
    checkpoint.open_checkpoints(workdir, cfg.replace(dim=32, n_heads=2), {"lr": 1.0},
                                every=2, keep=2)
  # Implementation knobs may change between calls (reported); a field the
  # saved run predates counts as its default.
  ckpts, diff = checkpoint.open_checkpoints(
      workdir, cfg.replace(remat_policy="full", moe_ep_capacity=0.0), {"lr": 1.0},
      every=2, keep=2)
  ckpts.close()
  assert diff == ["model.moe_ep_capacity: saved 2.0, requested 0.0",
                  "model.remat_policy: saved 'none', requested 'full'"]
  older = str(tmp_path / "older")
  ckpts = checkpoint.Checkpoints(older, cfg, {"lr": 1.0}, every=1, keep=1)
  ckpts.model_cfg = type("Older", (), {"to_dict": lambda self: {
      k: v for k, v in cfg.to_dict().items() if k != "moe_ep_capacity"}})()
  ckpts.save(1, {"w": jnp.zeros(3)}, {"step": 1, "seed": 0})
  ckpts.close()
  ckpts, diff = checkpoint.open_checkpoints(older, cfg, {"lr": 1.0}, every=1, keep=1)
  ckpts.close()
  assert diff == []


def test_resume_equals_straight_run(configs, tmp_path):
  model_cfg, train_cfg = configs
  quiet = lambda s: None
  straight = loop.train(model_cfg, train_cfg, str(tmp_path / "straight"), log=quiet)
  first = loop.train(model_cfg, train_cfg, str(tmp_path / "resumed"), stop_after=3, log=quiet)
  assert first["final_step"] == 3 and first["resumed_from"] is None
  second = loop.train(model_cfg, train_cfg, str(tmp_path / "resumed"), log=quiet)
  assert second["resumed_from"] == 3 and second["final_step"] == 6
  assert [h["step"] for h in second["history"]] == [4, 5, 6]

  a, data_a = _params(str(tmp_path / "straight"), model_cfg, train_cfg)
  b, data_b = _params(str(tmp_path / "resumed"), model_cfg, train_cfg)
  assert int(a.step) == int(b.step) == 6
  assert data_a == data_b == {"step": 6, "seed": 0, "bad_in_a_row": 0, "bad_steps": 0}
  for x, y in zip(jax.tree.leaves((a.params, a.router_bias, a.opt_state)),
                  jax.tree.leaves((b.params, b.router_bias, b.opt_state))):
    np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-6)

  ms = {r["step"]: r for r in _read(str(tmp_path / "straight")) if "loss" in r}
  mr = {r["step"]: r for r in _read(str(tmp_path / "resumed")) if "loss" in r}
  assert sorted(mr) == sorted(ms) == [1, 2, 3, 4, 5, 6]
  for s in (4, 5, 6):
    for key in ("loss", "ce", "mtp", "balance", "grad_norm", "lr", "load_imbalance"):
      assert ms[s][key] == mr[s][key], (s, key)
  np.testing.assert_array_equal(straight["expert_load"][3:], second["expert_load"])
  assert straight["eval"][-1]["step"] == 6 and second["eval"] == straight["eval"]
  assert 0.0 <= straight["eval"][-1]["accuracy"] <= 1.0
  assert os.path.exists(tmp_path / "straight" / "loss.png")

  # SIGTERM while step 1 is being processed (and a second one, as while its
  # checkpoint is written): the call finishes that step, checkpoints it and
  # returns; the rerun resumes from there and ends where the straight run did.
  def signal_twice(line):
    if line.startswith("first step"):
      os.kill(os.getpid(), signal.SIGTERM)
      os.kill(os.getpid(), signal.SIGTERM)
  lines = []
  cut = loop.train(model_cfg, train_cfg, str(tmp_path / "signalled"),
                   log=lambda line: (lines.append(line), signal_twice(line)))
  assert cut["stopped_by"] == "SIGTERM" and cut["final_step"] == 1 and not cut["eval"]
  assert any(line.startswith("stopped by SIGTERM after step 1: checkpoint written")
             for line in lines), lines
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL     # handlers put back
  rest = loop.train(model_cfg, train_cfg, str(tmp_path / "signalled"), log=quiet)
  assert rest["resumed_from"] == 1 and rest["stopped_by"] is None
  c, _ = _params(str(tmp_path / "signalled"), model_cfg, train_cfg)
  for x, y in zip(jax.tree.leaves((a.params, a.router_bias, a.opt_state)),
                  jax.tree.leaves((c.params, c.router_bias, c.opt_state))):
    np.testing.assert_array_equal(x, y)

  # Resuming with a larger `steps` (decay_steps=0) would stretch the cosine
  # mid-run: refused, naming the resolved decay length.
  with pytest.raises(ValueError, match=r"schedule differs .*decay_steps: (\d+) -> (?!\1)\d+"):
    loop.train(model_cfg, dataclasses.replace(train_cfg, steps=train_cfg.steps + 2,
                                              decay_steps=0), str(tmp_path / "resumed"),
               log=quiet)

  # A different model in the same workdir is refused before anything is built.
  with pytest.raises(ValueError, match=r"n_layers: saved 3, requested 4"):
    loop.train(model_cfg.replace(n_layers=4), train_cfg, str(tmp_path / "resumed"), log=quiet)


@pytest.mark.slow   # 20-60 s on 2 cores: CI's slow step keeps the default suite under 15 min
def test_init_from_starts_a_stage_from_another_runs_weights(configs, tmp_path):
  model_cfg, train_cfg = configs
  src = str(tmp_path / "src")
  loop.train(model_cfg, train_cfg, src, stop_after=2, log=lambda s: None)
  a, _ = _params(src, model_cfg, train_cfg)
  # A long-context stage: YaRN-extended model, longer rows, passkey data.
  ext = model_cfg.replace(max_seq_len=256, rope_factor=2.0)
  tcfg = dataclasses.replace(train_cfg, init_from=src, seq_len=256,
                             task_kinds="add,passkey")   # a command line's string
  assert tcfg.task_kinds == ("add", "passkey")
  lines = []
  loop.train(ext, tcfg, str(tmp_path / "ext"), stop_after=0, log=lines.append)
  assert any(l.startswith(f"initialised from {src} (step 2)") for l in lines), lines
  b, data_b = _params(str(tmp_path / "ext"), ext, tcfg)
  assert int(b.step) == 0 and data_b["step"] == 0
  for x, y in zip(jax.tree.leaves((a.params, a.router_bias)),
                  jax.tree.leaves((b.params, b.router_bias))):
    np.testing.assert_array_equal(x, y)
  assert all(not np.any(m) for m in jax.tree.leaves(b.opt_state) if m.ndim > 0)  # fresh
  assert any(np.any(m) for m in jax.tree.leaves(a.opt_state) if m.ndim > 0)
  # Refused before anything compiles: another model, a path without a run.
  with pytest.raises(ValueError, match=r"differs in route_scale: 2.5 -> 1.0"):
    loop.train(ext.replace(route_scale=1.0), tcfg, str(tmp_path / "bad"), log=lambda s: None)
  with pytest.raises(FileNotFoundError, match="holds no checkpoints/"):
    loop.train(ext, dataclasses.replace(tcfg, init_from=str(tmp_path / "none")),
               str(tmp_path / "bad2"), log=lambda s: None)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(configs, tmp_path, monkeypatch):
  model_cfg, train_cfg = configs
  real = loop.make_train_step

  def poisoned(cfg, tcfg, *mesh_and_rules):
    fn = real(cfg, tcfg, *mesh_and_rules)

    def wrapped(state, batch):
      state, m = fn(state, batch)
      if int(state.step) == 5:
        m = dict(m, loss=jnp.float32(jnp.nan))
      return state, m
    return wrapped

  monkeypatch.setattr(loop, "make_train_step", poisoned)
  workdir = str(tmp_path / "nan")
  with pytest.raises(FloatingPointError, match=r"loss=nan at step 5.*checkpoint is step 3"):
    loop.train(model_cfg, train_cfg, workdir, log=lambda s: None)
  ckpts = checkpoint.Checkpoints(workdir, model_cfg, train_cfg.to_dict(), every=1, keep=5)
  assert ckpts.latest_step() == 3
  ckpts.close()
  assert max(r["step"] for r in _read(workdir)) == 4


@pytest.mark.slow   # 20-60 s on 2 cores: CI's slow step keeps the default suite under 15 min
def test_bad_steps_are_skipped_then_stop_the_run(configs, tmp_path):
  """NaN batches at steps 2 and 3 (the nan_steps hook): both updates are
  skipped, so the parameters after step 3 are exactly those after step 1 of a
  clean run, the data moved on, and metrics.jsonl counts them; a third
  consecutive bad step with max_bad_steps=3 stops the run with the message."""
  model_cfg, train_cfg = configs
  quiet = lambda s: None  # noqa: E731
  tcfg = dataclasses.replace(train_cfg, steps=4, ckpt_every=1, eval_every=0,
                             n_eval_problems=0 if train_cfg.data_files else 1)
  clean = loop.train(model_cfg, tcfg, str(tmp_path / "clean"), stop_after=1, log=quiet)
  lines = []
  bad = dataclasses.replace(tcfg, nan_steps=(2, 3), max_bad_steps=3)
  out = loop.train(model_cfg, bad, str(tmp_path / "bad"), stop_after=3, log=lines.append)
  assert [h["skipped"] for h in out["history"]] == [0.0, 1.0, 1.0]
  assert [h["bad_steps"] for h in out["history"]] == [0.0, 1.0, 2.0]
  assert sum("not finite, update skipped (2 in a row" in line for line in lines) == 1
  rows = [r for r in _read(str(tmp_path / "bad")) if "loss" in r]
  assert [r["skipped"] for r in rows] == [0.0, 1.0, 1.0]
  skipped_state, data_state = _params(str(tmp_path / "bad"), model_cfg, bad)
  clean_state, _ = _params(str(tmp_path / "clean"), model_cfg, bad)
  assert int(skipped_state.step) == 3 and data_state["step"] == 3     # the data moved on
  for a, b in zip(jax.tree.leaves((skipped_state.params, skipped_state.opt_state,
                                   skipped_state.router_bias)),
                  jax.tree.leaves((clean_state.params, clean_state.opt_state,
                                   clean_state.router_bias))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert clean["history"][0]["loss"] == out["history"][0]["loss"]

  with pytest.raises(FloatingPointError, match="3 consecutive non-finite steps .*step 4.*"
                     "still those of step 1"):
    loop.train(model_cfg, dataclasses.replace(bad, nan_steps=(2, 3, 4)),
               str(tmp_path / "bad"), log=quiet)
  with pytest.raises(ValueError, match="nan_steps"):
    dataclasses.replace(bad, nan_steps=(0,))


def test_trains_on_user_jsonl_files_without_exact_match_eval(configs, tmp_path):
  model_cfg, train_cfg = configs
  path = tmp_path / "corpus.jsonl"
  with open(path, "w") as f:
    for i in range(40):
      f.write(json.dumps({"body": f"doc {i}: " + "abc " * (i % 7)}) + "\n")
  train_cfg = dataclasses.replace(train_cfg, data_files=(str(path),), text_field="body",
                                  fim_rate=0.5)
  lines = []
  summary = loop.train(model_cfg, train_cfg, str(tmp_path / "run"), stop_after=2,
                       log=lines.append)
  assert summary["final_step"] == 2 and summary["eval"] == []
  assert summary["expert_load"].shape == (2, model_cfg.n_moe_layers, model_cfg.n_routed_experts)
  assert all(np.isfinite(h["loss"]) for h in summary["history"])
  assert any(line.startswith("data: 40 documents") for line in lines), lines


@pytest.mark.slow   # 20-60 s on 2 cores: CI's slow step keeps the default suite under 15 min
def test_sft_parquet_records_keep_every_and_the_mtp_weight_switch(configs, tmp_path):
  """One run: prompt/completion records from parquet (loss on completions
  only), keep_every retention, V3's MTP weight switch, the bounded summary."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  model_cfg, train_cfg = configs
  path = str(tmp_path / "sft.parquet")
  pq.write_table(pa.table({"prompt": [f"{i}+{i}=" for i in range(60)],
                           "completion": [str(2 * i) for i in range(60)]}), path)
  train_cfg = dataclasses.replace(
      train_cfg, data_files=(path,), ckpt_every=1, keep_ckpts=1, keep_every=2,
      mtp_weight=0.3, mtp_weight_final=0.1, mtp_weight_switch_step=2, summary_steps=2)
  data = loop.build_data(model_cfg, train_cfg)
  batch = data.iterator.batch_at(0)
  tok = data.tokenizer
  # The loss falls on the completion digits and <eos> only (exact positions:
  # tests/test_data.py).
  for row_t, row_m in zip(batch["targets"], batch["loss_mask"]):
    text = tok.decode(row_t[row_m > 0])
    assert set(text.replace("<eos>", "")) <= set("0123456789"), text
    assert row_m.sum() > 0
  lines = []
  summary = loop.train(model_cfg, train_cfg, str(tmp_path / "run"), stop_after=4,
                       log=lines.append)
  assert any("prompt/completion records (loss on completions only)" in line for line in lines)
  assert any(line.startswith("step 3: MTP weight 0.3 -> 0.1") for line in lines), lines
  records = {r["step"]: r for r in _read(str(tmp_path / "run")) if "loss" in r}
  for step_no, weight in ((1, 0.3), (2, 0.3), (3, 0.1), (4, 0.1)):
    r = records[step_no]
    assert r["mtp_weight"] == pytest.approx(weight)      # the float32 lambda the step used
    assert r["loss"] == pytest.approx(
        r["ce"] + weight * r["mtp"] + train_cfg.balance_weight * r["balance"], rel=1e-6)
  assert sorted(int(d) for d in os.listdir(tmp_path / "run" / "checkpoints")
                if d.isdigit()) == [2, 4]          # latest 1 + every 2nd
  assert [h["step"] for h in summary["history"]] == [3, 4]
  assert summary["expert_load"].shape[0] == 2
  # eval_task: held-out problems of the task's test split beside the files
  held_out = loop.build_data(model_cfg, dataclasses.replace(train_cfg, eval_task=True))
  assert len(held_out.eval_problems) == train_cfg.n_eval_problems
  assert all(tasks.split_of(p.prompt) == "test" for p in held_out.eval_problems)
  with pytest.raises(ValueError, match="keep_every=3 must be a multiple of ckpt_every=2"):
    dataclasses.replace(train_cfg, ckpt_every=2, keep_every=3)
  with pytest.raises(ValueError, match="fim_rate=0.5 rewrites plain-text documents"):
    loop.build_data(model_cfg, dataclasses.replace(train_cfg, fim_rate=0.5))


# ---------------------------------------------------------------------------
# evaluate.py
# ---------------------------------------------------------------------------
def test_greedy_decoder_matches_python_loop_and_stops_at_eos(configs):
  model_cfg, _ = configs
  from deepseek_jax.model import Transformer
  state = step.init_train_state(model_cfg, configs[1], jax.random.key(1))
  variables = {"params": state.params, "router_bias": state.router_bias}
  length, new = 16, 6
  forward = jax.jit(Transformer(model_cfg).apply)
  prompts = [[1, 5, 6, 7], [1, 9]]

  def python_greedy(prompt, eos):
    seq = list(prompt)
    while len(seq) < len(prompt) + new:
      buf = np.zeros((1, length), np.int32)
      buf[0, :len(seq)] = seq
      nxt = int(np.argmax(forward(variables, buf)[0, len(seq) - 1]))
      seq.append(nxt)
      if nxt == eos:
        break
    return seq

  # Make row 0's second generated token the eos, to see it stop there.
  eos = python_greedy(prompts[0], eos=-1)[len(prompts[0]) + 1]
  got = evaluate.greedy_completions(model_cfg, variables, prompts + [[1, 2, 3]],
                                    max_new_tokens=new, eos_id=eos, batch_size=2)
  assert len(got) == 3                       # the last batch is padded, then cut
  for i, p in enumerate(prompts + [[1, 2, 3]]):
    want = python_greedy(p, eos)[len(p):]
    assert got[i] == (want[:-1] if want[-1] == eos else want)
  assert len(got[0]) == 1
  assert evaluate.eval_max_new_tokens([[1] * 10], 64, 16) == 6


def test_token_ids_beyond_model_vocab_are_refused_before_compiling(configs, tmp_path,
                                                                   monkeypatch):
  """A tokenizer larger than the model's vocab is refused, naming both sizes,
  before any step compiles."""
  model_cfg, train_cfg = configs
  monkeypatch.setattr(loop, "make_train_step", lambda *a: pytest.fail("compiled"))
  with pytest.raises(ValueError, match=r"tokenizer has 107 ids but vocab_size=20"):
    loop.train(model_cfg.replace(vocab_size=20), train_cfg, str(tmp_path / "run"),
               log=lambda s: None)


def test_loss_plot_leaves_the_callers_matplotlib_backend_and_figures_alone(tmp_path):
  # A notebook calling train() keeps its inline backend and open figures.
  import matplotlib
  import matplotlib.pyplot as plt
  from deepseek_jax.train import metrics
  writer = metrics.MetricsWriter(str(tmp_path), 0, tensorboard=False)
  for i in range(1, 4):
    writer.write(i, {"loss": 3.0 / i, "ce": 2.0 / i})
  before = matplotlib.get_backend()
  matplotlib.use("svg")
  try:
    fig = plt.figure()
    path = metrics.plot_losses(str(tmp_path))
    assert matplotlib.get_backend() == "svg"
    assert plt.get_fignums() == [fig.number]
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["loss.png", "metrics.jsonl"]   # no temp left
  finally:
    plt.close("all")
    matplotlib.use(before)


def _adamw_oracle(params, grads_seq, *, lr, b1, b2, eps, wd, clip, dtype):
  """AdamW as the docstring of optimizer.apply_update states it, in float64
  numpy, the moments rounded to their storage dtype after each step."""
  import ml_dtypes
  store = (lambda x: np.asarray(np.asarray(x, ml_dtypes.bfloat16), np.float64)) \
      if dtype == "bfloat16" else (lambda x: np.asarray(np.float32(x), np.float64))
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v2 = {k: np.zeros_like(v) for k, v in p.items()}
  for t, g in enumerate(grads_seq, start=1):
    norm = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in g.values()))
    scale = min(1.0, clip / norm)
    for k in p:
      gk = np.asarray(g[k], np.float64) * scale
      m[k] = store(b1 * m[k] + (1 - b1) * gk)
      v2[k] = store(b2 * v2[k] + (1 - b2) * gk ** 2)
      u = (m[k] / (1 - b1 ** t)) / (np.sqrt(v2[k] / (1 - b2 ** t)) + eps)
      if p[k].ndim >= 2 and k != "scale":
        u = u + wd * p[k]
      p[k] = p[k] - lr * u
  return p


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_apply_update_is_adamw_in_place(dtype):
  rng = np.random.default_rng(0)
  shapes = {"w": (24, 16), "experts": (3, 8, 16), "scale": (16,)}
  params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
  grads_seq = [{k: jnp.asarray(rng.normal(size=s) * (3.0 if i % 2 else 0.01), jnp.float32)
                for k, s in shapes.items()} for i in range(6)]     # clipped, then not
  tx = optimizer.make_optimizer(optax.constant_schedule(1e-2), weight_decay=0.1,
                                moments_dtype=dtype)
  step = jax.jit(lambda g, s, p, ok: optimizer.apply_update(tx, g, s, p, keep_if=ok))
  p, state = params, tx.init(params)
  for g in grads_seq:
    p, state = step(g, state, p, True)
    kept = step(jax.tree.map(lambda x: x * jnp.nan, g), state, p, False)  # a skipped step
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((a == b).all()), kept, (p, state))))
  want = _adamw_oracle(params, grads_seq, lr=1e-2, b1=0.9, b2=0.95, eps=1e-8, wd=0.1,
                       clip=1.0, dtype=dtype)
  for k in shapes:
    np.testing.assert_allclose(p[k], want[k], rtol=0, atol=2e-6)
  # optax's (updates, state) interface takes the same step.
  p2, s2 = params, tx.init(params)
  for g in grads_seq:
    u, s2 = tx.update(g, s2, p2)
    p2 = optax.apply_updates(p2, u)
  for k in shapes:
    np.testing.assert_allclose(p2[k], p[k], rtol=0, atol=1e-6)
  # In place: a donated step holds no copy of the state (optax's chain held 6
  # bytes per parameter of temporaries: copied moments, a clipped gradient).
  big = {k: jax.ShapeDtypeStruct((64,) + s, jnp.float32) for k, s in shapes.items()}
  compiled = jax.jit(lambda p, s, g: optimizer.apply_update(tx, g, s, p, keep_if=True),
                     donate_argnums=(0, 1)).lower(     # outputs in the donated order
      big, jax.eval_shape(tx.init, big), big).compile()
  n_bytes = sum(np.prod(x.shape) * 4 for x in big.values())
  assert compiled.memory_analysis().temp_size_in_bytes < 0.05 * n_bytes


def test_bfloat16_moments_are_stored_in_bfloat16_and_track_float32_adamw():
  params = {"w": jnp.linspace(-1.0, 1.0, 24).reshape(4, 6), "scale": jnp.ones(6)}
  grad_fn = jax.grad(lambda p: jnp.sum((p["w"] - 0.3) ** 2) + jnp.sum(p["scale"] ** 2))
  runs = {}
  for dtype in ("float32", "bfloat16"):
    tx = optimizer.make_optimizer(optax.constant_schedule(1e-2), moments_dtype=dtype)
    p, state = params, tx.init(params)
    for _ in range(5):
      updates, state = tx.update(grad_fn(p), state, p)
      p = optax.apply_updates(p, updates)
    adam = [s for s in jax.tree.leaves(state, is_leaf=lambda n: isinstance(
        n, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)][0]
    assert {a.dtype for a in jax.tree.leaves((adam.mu, adam.nu))} == {jnp.dtype(dtype)}
    assert p["w"].dtype == jnp.float32                     # master weights stay FP32
    runs[dtype] = p
  # The update reads the stored moments: per step |du| <= lr * ~2^-8 (m's and
  # half of v's relative rounding, |u| <= ~1), over 5 steps.
  for k in params:
    np.testing.assert_allclose(runs["bfloat16"][k], runs["float32"][k], rtol=0,
                               atol=5 * 1e-2 * 2.0 ** -7)
  with pytest.raises(ValueError, match="moments_dtype='float16' must be one of"):
    optimizer.make_optimizer(optax.constant_schedule(1e-2), moments_dtype="float16")
