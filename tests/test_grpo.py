"""GRPO's objective against a direct NumPy transcription of the formulas."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.rl import group_advantages, grpo_loss, kl_per_token


def _np_advantages(r, g, scale):
  out = np.empty_like(r, dtype=np.float64)
  for s in range(0, len(r), g):
    grp = r[s:s + g]
    out[s:s + g] = grp - grp.mean()
    if scale == "group":
      out[s:s + g] /= grp.std() + 1e-4          # ddof 0
  if scale == "batch":
    out /= r.std() + 1e-4
  return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_the_formula(scale):
  r = np.array([1, 0, 0, 1, 0.5, 0.5, 0.5, 0.5, 2, -1, 0, 3], np.float64)
  got = np.asarray(group_advantages(r, 4, scale))
  np.testing.assert_allclose(got, _np_advantages(r, 4, scale), rtol=1e-5, atol=1e-6)
  assert np.all(got[4:8] == 0)                    # a group of equal rewards: no signal
  with pytest.raises(ValueError, match="multiple of group_size=5"):
    group_advantages(r, 5)
  with pytest.raises(ValueError, match="scale='mean'"):
    group_advantages(r, 4, "mean")


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_unscored_rows_do_not_enter_their_groups_statistics(scale):
  # A reward function failed on row 1 (its total is a placeholder 0): the
  # group's mean and std come from rows 0, 2, 3 only, and row 1 gets 0.
  r = np.array([1, 0, 0.25, 1, 0.5, 0.5, 0.5, 0.5, 2, -1, 0, 3], np.float64)
  scored = np.ones(12, bool)
  scored[[1, 9]] = False
  got = np.asarray(group_advantages(r, 4, scale, scored=scored))
  want = np.zeros(12)
  kept = np.flatnonzero(scored)
  for s in range(0, 12, 4):
    rows = [i for i in range(s, s + 4) if scored[i]]
    want[rows] = r[rows] - r[rows].mean()
    if scale == "group":
      want[rows] /= r[rows].std() + 1e-4
  if scale == "batch":
    want[kept] /= r[kept].std() + 1e-4
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert got[1] == 0 and got[9] == 0
  # Today's bug, for the record: counting row 1 as reward 0 moves the others.
  assert not np.allclose(got[[0, 2, 3]], _np_advantages(r, 4, scale)[[0, 2, 3]])


def test_equal_groups_look_at_scored_rows_only():
  from deepseek_jax.rl.trainer import equal_groups
  total = np.array([1.0, 0.0, 1.0, 1.0, 0.5, 0.5, 0.2, 0.7, 3.0, 0.0, 0.0, 0.0])
  scored = np.array([1, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], bool)
  # group 0: scored rewards all 1 -> equal; group 1: differ; group 2: one scored row.
  assert equal_groups(total, 4, scored).tolist() == [True, False, True]
  assert equal_groups(total, 4).tolist() == [False, False, False]


def _np_kl(logp, ref, est):
  d = ref - logp
  return {"k1": -d, "k2": 0.5 * d * d, "k3": np.exp(d) - d - 1}[est], \
         {"k1": np.ones_like(d), "k2": -d, "k3": 1 - np.exp(d)}[est]   # value, d/dlogp


def _np_loss_and_grad(logp, old, ref, A, m, eps_low, eps_high, beta, loss_type, est):
  """The loss and its gradient in logp, transcribed token by token."""
  N, L = logp.shape
  val, grad = np.zeros((N, L)), np.zeros((N, L))
  for i, t in itertools.product(range(N), range(L)):
    rho = np.exp(logp[i, t] - old[i, t])
    unclipped = rho * A[i]
    clipped = min(max(rho, 1 - eps_low), 1 + eps_high) * A[i]
    if unclipped <= clipped:
      s, ds = unclipped, rho * A[i]
    else:                                     # the clipped branch: constant in logp
      s, ds = clipped, (rho * A[i] if 1 - eps_low < rho < 1 + eps_high else 0.0)
    k, dk = _np_kl(logp[i, t], ref[i, t], est)
    val[i, t], grad[i, t] = s - beta * k, ds - beta * dk
  if loss_type == "grpo":
    n = m.sum(1)
    valid = n > 0
    w = np.where(valid[:, None], m / np.maximum(n, 1)[:, None], 0) / valid.sum()
  elif loss_type == "dapo":
    w = m / m.sum()
  else:
    w = m / (N * L)
  return -(w * val).sum(), -(w * grad)


def _case(seed, N=6, L=7):
  rng = np.random.default_rng(seed)
  logp = -rng.uniform(0.1, 3.0, (N, L))
  old = logp + rng.uniform(-0.6, 0.6, (N, L))   # ratios 0.55-1.8: both clips active
  ref = logp + rng.normal(0, 0.3, (N, L))
  A = np.asarray(_np_advantages(rng.integers(0, 3, N).astype(float), 3, "group"))
  m = (rng.random((N, L)) < 0.8).astype(np.float64)
  m[2] = 0                                        # a completion with no counted token
  m[0, :] = 1
  return logp, old, ref, A, m


@pytest.mark.parametrize("loss_type,est", [("grpo", "k3"), ("dapo", "k3"), ("dr_grpo", "k3"),
                                           ("grpo", "k1"), ("dapo", "k2")])
def test_loss_and_gradient_match_the_numpy_transcription(loss_type, est):
  logp, old, ref, A, m = _case(0)
  eps_low, eps_high, beta = 0.2, 0.28, 0.04      # DAPO's clip-higher
  want, want_grad = _np_loss_and_grad(logp, old, ref, A, m, eps_low, eps_high, beta,
                                      loss_type, est)
  f = lambda lp: grpo_loss(lp, old, ref, A, m, eps_low=eps_low, eps_high=eps_high,  # noqa
                           beta=beta, loss_type=loss_type, kl_estimator=est)
  (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp, jnp.float32))
  np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-4, atol=1e-7)
  rho = np.exp(logp - old)
  low = ((rho < 1 - eps_low) & (A[:, None] < 0) & (m > 0)).sum() / m.sum()
  high = ((rho > 1 + eps_high) & (A[:, None] > 0) & (m > 0)).sum() / m.sum()
  assert low > 0 and high > 0                     # both sides of the clip exercised
  np.testing.assert_allclose([metrics["clip_low"], metrics["clip_high"]], [low, high],
                             rtol=1e-6)
  kl, _ = _np_kl(logp, ref, est)
  np.testing.assert_allclose(float(metrics["kl"]), (kl * m).sum() / m.sum(), rtol=1e-5)


def _np_gspo(logp, old, ref, A, m, eps_low, eps_high, beta, est):
  """GSPO's loss in float64, sequence by sequence (Zheng et al. 2025, eq. 5-7)."""
  total, counted = 0.0, 0
  for i in range(logp.shape[0]):
    idx = np.flatnonzero(m[i])
    if not len(idx):
      continue
    s = np.exp(np.mean(logp[i, idx] - old[i, idx]))
    surrogate = min(s * A[i], min(max(s, 1 - eps_low), 1 + eps_high) * A[i])
    kl, _ = _np_kl(logp[i, idx], ref[i, idx], est)
    total += surrogate - beta * kl.mean()
    counted += 1
  return -total / counted


def test_gspo_matches_the_sequence_level_numpy_transcription():
  """loss_type="gspo": value against a float64 per-sequence loop, gradient
  against central differences of it; sequences clipped on both sides."""
  logp, old, ref, A, m = _case(4)
  # sequence ratios: seq 3 (A > 0) above the clip range, 4 (A > 0) inside, 5 (A < 0) below
  shift = np.array([0.0, 0.0, 0.0, -0.12, 0.0, 0.12])[:, None]
  old = logp + (old - logp) * 0.05 + shift
  eps_low, eps_high, beta = 0.05, 0.06, 0.04
  f = lambda lp: grpo_loss(lp, old, ref, A, m, eps_low=eps_low, eps_high=eps_high,  # noqa
                           beta=beta, loss_type="gspo")
  (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp, jnp.float32))
  np_loss = lambda lp: _np_gspo(lp, old, ref, A, m, eps_low, eps_high, beta, "k3")  # noqa
  np.testing.assert_allclose(float(loss), np_loss(logp), rtol=1e-5, atol=1e-6)
  want = np.zeros_like(logp)
  for i, t in itertools.product(*map(range, logp.shape)):
    e = np.zeros_like(logp)
    e[i, t] = 1e-6
    want[i, t] = (np_loss(logp + e) - np_loss(logp - e)) / 2e-6
  np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-3, atol=1e-6)
  s = np.exp(((logp - old) * m).sum(1) / np.maximum(m.sum(1), 1))
  assert ((s < 1 - eps_low) & (A < 0) & (m.sum(1) > 0)).any()
  assert ((s > 1 + eps_high) & (A > 0)).any()
  low = (((s < 1 - eps_low) & (A < 0))[:, None] * m).sum() / m.sum()
  np.testing.assert_allclose(float(metrics["clip_low"]), low, rtol=1e-6)
  # the sequence ratio differs from the token ratios GRPO clips
  assert not np.isclose(float(loss), float(grpo_loss(
      logp, old, ref, A, m, eps_low=eps_low, eps_high=eps_high, beta=beta)[0]))


def test_first_pass_has_ratio_one_no_clipping_and_a_loss_of_minus_mean_advantage():
  logp, _, _, A, m = _case(1)
  m[2] = 1
  loss, metrics = grpo_loss(logp, logp, None, A, m, beta=0.0)
  assert float(metrics["ratio_mean"]) == 1.0
  assert float(metrics["clip_low"]) == float(metrics["clip_high"]) == 0.0
  # centred advantages: the GRPO loss starts at ~0 although the gradient does not
  np.testing.assert_allclose(float(loss), -A.mean(), atol=1e-6)
  assert abs(float(loss)) < 1e-5
  grad = jax.grad(lambda lp: grpo_loss(lp, logp, None, A, m, beta=0.0)[0])(
      jnp.asarray(logp, jnp.float32))
  np.testing.assert_allclose(np.asarray(grad), -(A[:, None] * m / m.sum(1, keepdims=True))
                             / len(A), rtol=1e-5, atol=1e-7)


def test_truncated_importance_weights_and_kl_clamp():
  logp, old, ref, A, m = _case(2)
  rollout = old + 0.5                                  # a cheaper engine, off by 0.5 nats
  base, _ = grpo_loss(logp, old, None, A, m, beta=0.0, loss_type="dapo")
  tis, _ = grpo_loss(logp, old, None, A, m, beta=0.0, loss_type="dapo", rollout_logp=rollout,
                     tis_cap=2.0)
  np.testing.assert_allclose(float(tis), float(base) * np.exp(-0.5), rtol=1e-5)
  capped, _ = grpo_loss(logp, old, None, A, m, beta=0.0, loss_type="dapo",
                        rollout_logp=old - 1.0, tis_cap=2.0)   # weight e^1 capped at 2
  np.testing.assert_allclose(float(capped), 2.0 * float(base), rtol=1e-5)
  ref = jnp.array([-5.0, 0.0, 0.5])
  np.testing.assert_allclose(np.asarray(kl_per_token(jnp.zeros(3), ref, "k3")),
                             [np.exp(-5) + 4, 0.0, np.exp(0.5) - 1.5], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(kl_per_token(jnp.zeros(3), ref, "k3", clamp=1.0)),
                             [1.0, 0.0, np.exp(0.5) - 1.5], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(kl_per_token(jnp.zeros(3), ref, "k1", clamp=1.0)),
                             [1.0, 0.0, -0.5], rtol=1e-6)


def test_bad_arguments_are_refused_by_name():
  logp, old, ref, A, m = _case(3)
  for kwargs, msg in (({"loss_type": "ppo"}, "loss_type='ppo'"),
                      ({"kl_estimator": "k4"}, "kl_estimator='k4'"),
                      ({"beta": -1.0}, "beta=-1.0"),
                      ({"eps_low": 1.0}, "eps_low=1.0")):
    with pytest.raises(ValueError, match=msg):
      grpo_loss(logp, old, ref, A, m, **kwargs)
  with pytest.raises(ValueError, match="beta > 0 needs ref_logp"):
    grpo_loss(logp, old, None, A, m)
  with pytest.raises(ValueError, match="mask shape"):
    grpo_loss(logp, old, ref, A, m[:, :3])
  with pytest.raises(ValueError, match="advantages shape"):
    grpo_loss(logp, old, ref, A[:3], m)


# ---------------------------------------------------------------------------
# rewards.py
# ---------------------------------------------------------------------------
from deepseek_jax.rl import rewards  # noqa: E402

_EX = {"answer": "405"}
REWARD_TABLE = [
    # completion, accuracy, format
    (" <think>7+8=15</think> <answer>405</answer>", 1.0, 1.0),
    ("<think>x</think><answer> 405 </answer>", 1.0, 1.0),
    (" <think>a</think> <answer>0405</answer>", 1.0, 1.0),          # same number
    (" <think>a</think> <answer>405.000</answer>", 1.0, 1.0),
    (" <think>a</think> <answer>4.05e2</answer>", 1.0, 1.0),
    (" <think>a</think> <answer>+405</answer>", 1.0, 1.0),
    (" <think>a</think> <answer>404</answer>", 0.0, 1.0),
    (" <think>a</think> <answer>405.5</answer>", 0.0, 1.0),
    (" <think>a</think> <answer>405 apples</answer>", 0.0, 1.0),     # not one number
    (" <think>a</think> <answer></answer>", 0.0, 0.0),               # missing answer
    (" <think>a</think>", 0.0, 0.0),
    ("405", 0.0, 0.0),                                                # no tags at all
    (" <answer>405</answer> <think>a</think>", 1.0, 0.0),            # wrong order
    (" <think>a</think> <answer>405</answer> <answer>404</answer>", 1.0, 0.0),  # two answers
    (" <think>a</think> <answer>404</answer> <answer>405</answer>", 0.0, 0.0),
    (" <think><think>a</think></think> <answer>405</answer>", 1.0, 0.0),        # nested
    (" <think>a</think> <answer><answer>405</answer></answer>", 1.0, 0.0),
    (" <think>a</think> <answer>" + "9" * 5000 + "</answer>", 0.0, 1.0),       # huge
    (" <think>a</think> <answer>1e999999999</answer>", 0.0, 1.0),
    (" <think>a</think> <answer>٤٠٥</answer>", 0.0, 1.0),            # Arabic-Indic digits
    (" <think>a</think> <answer>405</answer> trailing", 1.0, 0.0),
]


@pytest.mark.parametrize("completion,acc,fmt", REWARD_TABLE)
def test_accuracy_and_format_rewards_on_a_table(completion, acc, fmt):
  assert rewards.accuracy(completion, _EX) == acc
  assert rewards.format_reward(completion, _EX) == fmt


def test_language_overlong_and_number_parsing():
  assert rewards.language(" <think>carry the one</think> <answer>1</answer>", _EX) == 1.0
  assert rewards.language(" <think>7+8=15</think>", _EX) == 1.0            # no letters
  mixed = " <think>ab进位</think> <answer>1</answer>"
  assert rewards.language(mixed, _EX) == 0.5
  assert rewards.language(mixed, {"answer": "1", "script": "cjk"}) == 0.5
  assert [rewards.overlong(n, 100, 20) for n in (50, 80, 90, 100, 101)] == \
      [0.0, 0.0, -0.5, -1.0, -1.0]
  assert rewards.parse_number("1,234") == 1234
  assert rewards.parse_number("-0.5") == rewards.parse_number("-.50")
  assert rewards.parse_number("1e3") == 1000 and rewards.parse_number("nan") is None
  with pytest.raises(ValueError, match="buffer=0"):
    rewards.overlong(5, 10, 0)


def test_combine_weights_functions_and_excludes_what_a_broken_one_cannot_score(caplog):
  comps = [" <think>a</think> <answer>405</answer>", " <think>a</think> <answer>4</answer>",
           "garbage"]
  exs = [_EX, _EX, {"answer": "405", "boom": True}]

  def flaky(c, ex):
    if ex.get("boom"):
      raise RuntimeError("judge offline")
    return 0.5

  total, per, valid = rewards.combine(comps, exs, {"accuracy": (rewards.accuracy, 1.0),
                                                   "format": (rewards.format_reward, 0.5),
                                                   "flaky": (flaky, 2.0)})
  np.testing.assert_allclose(total, [1 + 0.5 + 1.0, 0 + 0.5 + 1.0, 0.0])
  assert valid.tolist() == [True, True, False]
  assert np.isnan(per["flaky"][2]) and per["accuracy"][2] == 0.0
  assert "reward 'flaky' could not score 1 of 3" in caplog.text
  assert "judge offline" in caplog.text
  none_total, _, none_valid = rewards.combine(comps, exs, {"none": (lambda c, e: None, 1.0)})
  assert not none_valid.any() and not none_total.any()
