"""DeepSeek-V4 generation: the decode caches (sliding-window ring, compressor
windows in progress and compressed entries, the indexer's compressed keys)
against the full-sequence forward and against transformers' greedy
`generate`.

tiny_v4 has every attention type (sliding, CSA rate 4, HCA rate 8) and both
MLP types; prompts of 5 and 13 tokens (right-padded to 16) run 24 new tokens
past the sliding window (8) and several CSA / HCA windows. The first
prompt is shorter than an HCA window, so its first entries are all formed
while decoding; the second crosses window boundaries inside the prompt.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import get_preset
from deepseek_jax.infer import cache as cache_lib
from deepseek_jax.infer.decode import generate, stream
from deepseek_jax.model import Transformer
from random_weights import random_variables

try:
  import torch
  import transformers
except ImportError:
  torch = transformers = None

TOL = 1e-4
LENS = (5, 13)
MAX_NEW = 24


def _prompts(seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(2, 256, n).tolist() for n in LENS]


@pytest.fixture(scope="module")
def model():
  """(cfg, random variables): N(0, 0.1) weights (compressor biases and
  sinks included) and a valid hash table (a permutation of experts per token)."""
  cfg = get_preset("tiny_v4")
  variables = random_variables(cfg, 0)
  rng = np.random.default_rng(1)
  tables = {name: jnp.asarray(np.stack([rng.permutation(cfg.n_routed_experts)[
                :cfg.n_activated_experts] for _ in range(cfg.vocab_size)]), jnp.int32)
            for name, kind in zip([f"layers_{i}" for i in range(cfg.n_layers)],
                                  cfg.mlp_layer_types) if kind == "hash_moe"}
  rb = {k: ({**v, "tid2eid": tables[k]} if k in tables else v)
        for k, v in variables["router_bias"].items()}
  return cfg, {**variables, "router_bias": rb}


def _teacher_forced(cfg, variables, prompts, lengths, feed):
  """Prefill the right-padded prompts [b, P], then feed tokens feed [b, n]
  one decode step at a time (row b's j-th at position lengths[b] + j):
  (prefill logits [b, vocab] at each row's last prompt token, decode
  logits [n, b, vocab])."""
  model = Transformer(cfg)
  b, p = prompts.shape

  @jax.jit
  def run(variables, prompts, lengths, feed):
    seg = (jnp.arange(p)[None] < lengths[:, None]).astype(jnp.int32)
    first, _, states = model.apply(variables, prompts, segment_ids=seg, mode="prefill",
                                   logits_index=lengths - 1)
    cache = cache_lib.fill_v4(cache_lib.init_cache(cfg, b, p + feed.shape[1]), states,
                              lengths)

    def one(carry, tok):
      cache, pos = carry
      logits, _, cache = model.apply(variables, tok[:, None], positions=pos[:, None],
                                     mode="decode", cache=cache)
      return (cache, pos + 1), logits[:, 0]
    _, logits = jax.lax.scan(one, (cache, lengths), feed.T)
    return first[:, 0], logits
  return jax.tree.map(np.asarray, run(variables, prompts, lengths, feed))


def _forward(cfg, variables, tokens):
  return np.asarray(jax.jit(Transformer(cfg).apply)(variables, jnp.asarray(tokens)))


def test_decode_logits_equal_full_forward(model):
  """Every decode step's logits equal the full-sequence forward's at that
  position (1e-4), rows of different lengths in one batch."""
  cfg, variables = model
  total = 40
  seqs = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, total)).astype(np.int32)
  lengths = np.asarray(LENS, np.int32)
  prompts = np.where(np.arange(16)[None] < lengths[:, None], seqs[:, :16], 0)
  n = total - max(LENS)
  feed = np.stack([seqs[i, n0:n0 + n] for i, n0 in enumerate(LENS)])
  first, logits = _teacher_forced(cfg, variables, jnp.asarray(prompts), jnp.asarray(lengths),
                                  jnp.asarray(feed))
  full = _forward(cfg, variables, seqs)
  for i, n0 in enumerate(LENS):
    assert np.abs(first[i] - full[i, n0 - 1]).max() < TOL
    err = np.abs(logits[:, i] - full[i, n0:n0 + n]).max()
    assert err < TOL, (i, err)
  # the compressed layers matter at these lengths: without the compressed
  # entries (sliding attention only) the logits move
  sliding = cfg.replace(layer_types=("sliding_attention",) * cfg.n_layers)
  assert np.abs(_forward(sliding, variables, seqs)[:, 16:] - full[:, 16:]).max() > 100 * TOL


@pytest.fixture(scope="module")
def batched(model):
  cfg, variables = model
  return generate(cfg, variables, _prompts(), max_new_tokens=MAX_NEW)


def test_greedy_generate_is_the_full_forward_argmax(model, batched):
  """Every token of a batched greedy generation (two prompt lengths) is the
  argmax of the full forward over the prompt and the tokens before it (rows
  right-padded to one length: causal, the padding changes no earlier logit)."""
  cfg, variables = model
  assert batched.lengths.tolist() == [MAX_NEW] * 2
  seqs = np.zeros((2, max(LENS) + MAX_NEW), np.int32)
  for i, prompt in enumerate(_prompts()):
    seqs[i, :len(prompt) + MAX_NEW] = prompt + batched.tokens[i].tolist()
  logits = _forward(cfg, variables, seqs)
  for i, n in enumerate(LENS):
    np.testing.assert_array_equal(logits[i, n - 1:n - 1 + MAX_NEW].argmax(-1),
                                  batched.tokens[i])


def test_alone_streamed_and_shared_prefix_equal_batched(model, batched):
  """A prompt generated alone (through `stream`: the same prefill and step,
  one jitted step at a time) or twice with prefix sharing gives the batched
  row's tokens."""
  cfg, variables = model
  p = _prompts()[1]
  got = []
  for new in stream(cfg, variables, [p], max_new_tokens=MAX_NEW):
    got.extend(new[0])
  assert got == batched.tokens[1].tolist()
  shared = generate(cfg, variables, [p, p], max_new_tokens=MAX_NEW, group_size=2)
  np.testing.assert_array_equal(shared.tokens, np.stack([batched.tokens[1]] * 2))


def test_generate_on_a_mesh_equals_one_device(model, batched):
  """Rows split over the batch axes (data x fsdp x expert), the MoE's
  expert-parallel dispatch under the rules (hash-routed layers included),
  parameters sharded: each row's tokens are the one-device batch's."""
  from deepseek_jax.parallel import MeshConfig, setup, tree_shardings
  cfg, variables = model
  mesh, rules = setup(MeshConfig(data=2, fsdp=2, expert=2))
  sharded = jax.device_put(variables, tree_shardings(variables, mesh, rules))
  got = generate(cfg, sharded, _prompts() * 4, max_new_tokens=MAX_NEW, mesh=mesh, rules=rules)
  np.testing.assert_array_equal(got.tokens, np.concatenate([batched.tokens] * 4))


@pytest.mark.torch
def test_greedy_generate_matches_transformers(model, batched):
  """transformers' DeepseekV4ForCausalLM.generate(do_sample=False), one prompt
  at a time (its compressors pool left padding), equals our batched greedy
  generation token for token, with the same weights."""
  if torch is None:
    pytest.skip("needs torch + transformers")
  from deepseek_jax.interop.hf_v4 import v4_variables_from_state_dict
  from random_weights import random_hf_v4
  from test_v4 import HF
  hf = random_hf_v4(HF)
  cfg = get_preset("tiny_v4")            # = the HF config's (test_v4), YaRN off
  state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  variables = v4_variables_from_state_dict(cfg, state, model[1])   # base: the MTP module
  ours = generate(cfg, variables, _prompts(), max_new_tokens=MAX_NEW)
  for i, prompt in enumerate(_prompts()):
    with torch.no_grad():
      out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                                                          dtype=torch.long),
                        max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None,
                        pad_token_id=0)
    want = out[0, len(prompt):].numpy()
    np.testing.assert_array_equal(ours.tokens[i], want)
  # the weights differ from the random fixture's: not a coincidence of one program
  assert ours.tokens.tolist() != batched.tokens.tolist()


@pytest.mark.parametrize("kw, match", [
    (dict(speculative=True), "speculative"),
    (dict(return_routing=True), "return_routing"),
])
def test_v4_generate_refuses_what_it_lacks(kw, match):
  cfg = get_preset("tiny_v4")
  with pytest.raises(NotImplementedError, match=match):
    generate(cfg, {}, [[1, 2, 3]], max_new_tokens=2, **kw)
  with pytest.raises(NotImplementedError, match="MTP drafting cache"):
    cache_lib.init_cache(cfg, 1, 8, mtp=True)
