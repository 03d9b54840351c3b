"""Batched generation: prefill the prompts, then decode from the latent cache.

    gen = generate(cfg, variables, [[1, 5, 9], [1, 7]], max_new_tokens=32)
    gen.tokens    int32 [batch, max_new_tokens], -1 after a row stopped
    gen.lengths   int32 [batch], tokens generated (a stop token counts)
    gen.logprobs  float32 [batch, max_new_tokens], log p(token) under the
                  distribution it was sampled from (logits / temperature, then
                  top_k / top_p / min_p; greedy: the temperature-1 model), 0
                  after the stop

Prompts of different lengths are right-padded to a bucketed length (a power
of two, so nearby lengths share a compilation) and each keeps positions
0, 1, ...; its cache column is its position. Prefill runs the model's naive
forward over the padded prompts (padding masked by segment ids) and keeps
the latent cache entries; each decode step feeds every row's last token at
its own position through the absorbed MLA path (`Transformer(mode="decode")`)
and samples the next. Prefill and the `lax.while_loop` over steps are one
jitted function per (batch, bucketed prompt length, max_new_tokens,
stop_ids, speculative); the sampling settings are traced values. The loop
ends when every row has stopped (a stop id, or max_new_tokens).

DeepSeek-V4 (arch="v4") runs the same loop over its own cache
(infer/cache.py: sliding-window and compressor rings, compressed entries),
built from the prefill by `cache.fill_v4`; its decode mode returns the
updated cache. Not for V4 yet (`check_v4`): speculative decoding,
return_routing.

Routing replay (`return_routing=True`): the MoE experts each token used,
per main MoE layer, for the trainer to replay (`Transformer(routing=...)`,
`rollout_routing`). gen.routing [batch, max_new_tokens, n_moe_layers, k]:
entry j is the experts generated token j went to when it was fed to the
model (to produce token j + 1); a row's last token is never fed, so its
entry is -1 like every entry past it (-1 = no record: route normally; the
last token's routing changes no log-prob of the completion).
gen.prompt_routing [batch, P, n_moe_layers, k] (P the padded prompt
length): the prompt tokens' experts in the prefill, -1 past each prompt.
The MTP block's MoE is not recorded (generation runs MTP only when
speculative, and speculative decoding does not record routing).

`stream` runs the same prefill and step functions from Python, one jitted
step at a time (cache donated), yielding each step's new tokens: what a
terminal or a server shows while generating.

dtype="bfloat16" (`generate`, `stream`): the float weights are cast once,
before the jitted loop (`cast_variables`; norm scales, the MoE router's gate
and biases stay float32: they are tiny, and the router's rounding would
change which experts a token picks), and the model runs with
cfg.dtype=bfloat16 (activations and the latent cache in bfloat16); what the
model already computes in float32 stays so (router, RMSNorm, the attention
softmax, the output head's logits). Greedy tokens follow float32's until a
step whose top-2 logits lie within bfloat16 rounding of each other.
None (default): the model's own cfg.dtype and weights, as before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax.config import ModelConfig
from deepseek_jax.infer import cache as cache_lib
from deepseek_jax.infer import speculative as spec_lib
from deepseek_jax.infer.sampling import next_token_and_logprob
from deepseek_jax.infer.state import emit
from deepseek_jax.model import Transformer
from deepseek_jax.parallel import distributed
from deepseek_jax.parallel import rules as parallel_rules


@dataclasses.dataclass(frozen=True)
class Generation:
  tokens: np.ndarray          # int32 [batch, max_new_tokens]; -1 after a row stopped
  lengths: np.ndarray         # int32 [batch]; generated tokens, the stop token counted
  logprobs: np.ndarray        # float32 [batch, max_new_tokens]; 0 after the stop
  steps: int                  # decode steps run (after the prefill's first token)
  drafted: int = 0            # speculative: draft tokens proposed by MTP
  accepted: int = 0           # ...and accepted by the main model
  # return_routing=True: int32 [batch, max_new_tokens, n_moe_layers, k] and
  # [batch, P, n_moe_layers, k] (module doc); None otherwise.
  routing: np.ndarray | None = None
  prompt_routing: np.ndarray | None = None

  @property
  def acceptance_rate(self) -> float:
    return self.accepted / self.drafted if self.drafted else float("nan")

  def sequences(self) -> list[list[int]]:
    """Each row's generated tokens as a list (the stop token included)."""
    return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


class Sampling(NamedTuple):
  temperature: Any
  top_k: Any
  top_p: Any
  min_p: Any


# ---------------------------------------------------------------------------
# Input checks (host side, before anything compiles)
# ---------------------------------------------------------------------------
def check_v4(cfg: ModelConfig, speculative: bool, record: bool = False) -> None:
  """DeepSeek-V4 generates plainly (greedy or sampled, prefix sharing, on a
  mesh too); NotImplementedError for what its decoding lacks."""
  if not cfg.is_v4:
    return
  lacking = [what for what, on in (("speculative=True (MTP drafting)", speculative),
                                   ("return_routing=True (routing replay)", record)) if on]
  if lacking:
    raise NotImplementedError(f"generate for DeepSeek-V4 (arch='v4') does not support "
                              f"{', '.join(lacking)} yet.")


def check_request(cfg: ModelConfig, prompts, max_new_tokens, temperature, top_k, top_p,
                  min_p, stop_ids, speculative) -> list[list[int]]:
  check_v4(cfg, speculative)
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer.")
  if not temperature >= 0:
    raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy).")
  if not isinstance(top_k, (int, np.integer)) or top_k < 0:
    raise ValueError(f"top_k={top_k!r} must be an integer >= 0 (0 = off).")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p} must lie in (0, 1] (1 = off).")
  if not 0 <= min_p < 1:
    raise ValueError(f"min_p={min_p} must lie in [0, 1) (0 = off).")
  for s in stop_ids:
    if not isinstance(s, (int, np.integer)) or not 0 <= s < cfg.vocab_size:
      raise ValueError(f"stop id {s!r} is not a token id in [0, vocab_size={cfg.vocab_size}).")
  if speculative and not cfg.n_mtp_depth:
    raise ValueError("speculative=True drafts with the MTP modules; this model has "
                     "n_mtp_depth=0.")
  if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
    raise ValueError("prompts must be a non-empty list of token-id lists.")
  limit = cfg.max_seq_len - max_new_tokens
  out = []
  for i, p in enumerate(prompts):
    p = np.asarray(p)
    if p.ndim != 1 or not (p.size == 0 or np.issubdtype(p.dtype, np.integer)):
      raise ValueError(f"prompt {i} must be a list of integer token ids; got {p.dtype} "
                       f"of shape {p.shape}.")
    if p.size == 0:
      raise ValueError(f"prompt {i} is empty: every prompt needs at least one token "
                       "(e.g. <bos>).")
    if p.size > limit:
      raise ValueError(f"prompt {i} has {p.size} tokens; with max_new_tokens="
                       f"{max_new_tokens} at most max_seq_len - max_new_tokens = {limit} "
                       "fit. Shorten it or lower max_new_tokens.")
    if p.min() < 0 or p.max() >= cfg.vocab_size:
      bad = int(p.min()) if p.min() < 0 else int(p.max())
      raise ValueError(f"prompt {i} holds token id {bad}, outside [0, vocab_size="
                       f"{cfg.vocab_size}); check the tokenizer matches the model.")
    out.append(p.astype(np.int32).tolist())
  return out


def bucket_length(n: int, cfg: ModelConfig, max_new_tokens: int) -> int:
  """Padded prompt length: the next power of two >= n (at least 8), capped at
  max_seq_len - max_new_tokens (which every checked prompt fits)."""
  return max(n, min(max(8, 1 << (n - 1).bit_length()), cfg.max_seq_len - max_new_tokens))


def pad_prompts(prompts: list[list[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
  buf = np.zeros((len(prompts), length), np.int32)
  for i, p in enumerate(prompts):
    buf[i, :len(p)] = p
  return buf, np.array([len(p) for p in prompts], np.int32)


# ---------------------------------------------------------------------------
# The jitted pieces: state is a dict pytree
# ---------------------------------------------------------------------------
def prefill(cfg: ModelConfig, variables, prompts: jax.Array, lengths: jax.Array,
            rng: jax.Array, settings: Sampling, *, max_new: int, stop_ids: tuple[int, ...],
            speculative: bool, record: bool = False, group: int = 1) -> dict:
  """Runs the padded prompts [b, P], fills the cache, samples each row's
  first token; returns the decode state. record: the state also holds
  "prompt_routing" and "routing" (module doc; `step` then fills the latter).
  group > 1: rows come in runs of `group` equal prompts; each run's first
  row is prefilled and its results (logits, cache entries, routing) copied
  to the run's other rows (prefix sharing: 1/group of the prefill's work)."""
  b, p = prompts.shape
  model = Transformer(cfg)
  seg = (jnp.arange(p)[None] < lengths[:, None]).astype(jnp.int32)
  out = model.apply(variables, prompts[::group], segment_ids=seg[::group], mode="prefill",
                    logits_index=lengths[::group] - 1, return_routing=record)
  if group > 1:
    out = _fork(out, group)
  logits, h, entries = out[:3]
  cache = cache_lib.init_cache(cfg, b, p + max_new + 1, mtp=speculative)
  if cfg.is_v4:        # rings and compressed entries from every prompt token's state
    cache = cache_lib.fill_v4(cache, entries, lengths)
  else:
    cache = cache_lib.write(cache, entries, jnp.zeros((b,), jnp.int32))
  rng, key = jax.random.split(rng)
  first, first_logp = next_token_and_logprob(key, logits[:, 0], *settings)
  state = {"cache": cache, "cur": first, "pos": lengths, "rng": rng,
           "out": jnp.full((b, max_new), -1, jnp.int32),
           "out_logp": jnp.zeros((b, max_new), jnp.float32),
           "n_out": jnp.zeros((b,), jnp.int32), "done": jnp.zeros((b,), bool),
           "steps": jnp.zeros((), jnp.int32),
           "drafted": jnp.zeros((), jnp.int32), "accepted": jnp.zeros((), jnp.int32)}
  if record:
    chosen = out[3]                                               # [b, P, L, k]
    state["prompt_routing"] = jnp.where(seg[:, :, None, None] != 0, chosen, -1)
    state["routing"] = jnp.full((b, max_new) + chosen.shape[2:], -1, jnp.int32)
  state = emit(state, first[:, None], first_logp[:, None],
               jnp.ones((b,), jnp.int32), stop_ids, max_new)
  if speculative:
    state = spec_lib.draft_after_prefill(cfg, variables, state, prompts, seg, lengths, h)
  return state


def _fork(out: tuple, group: int) -> tuple:
  """Each row of a prefill's outputs repeated `group` times (cache entries of
  the layer stacks carry the rows on axis 1, everything else on axis 0)."""
  logits, h, entries, *rest = out
  rep = lambda x, axis=0: jnp.repeat(x, group, axis=axis)  # noqa: E731
  entries = {name: jax.tree.map(lambda x: rep(x, 1 if name in cache_lib.STACKS else 0), e)
             for name, e in entries.items()}
  return (rep(logits), rep(h), entries, *[rep(x) for x in rest])


def step(cfg: ModelConfig, variables, state: dict, settings: Sampling, *, max_new: int,
         stop_ids: tuple[int, ...]) -> dict:
  """One decode step: every row's pending token through the absorbed path at
  its position, written to the cache; the next token sampled and emitted.
  With "routing" in the state, a running row's pending token (its output
  n_out - 1) records the experts it went to."""
  b = state["cur"].shape[0]
  record = "routing" in state
  out = Transformer(cfg).apply(
      variables, state["cur"][:, None], positions=state["pos"][:, None], mode="decode",
      cache=state["cache"], return_routing=record)
  logits, _, entries = out[:3]
  if record:
    state = {**state, "routing": record_routing(state["routing"], out[3][:, 0],
                                                state["n_out"] - 1, ~state["done"])}
  # V4's decode mode returns the updated cache itself (rings, compressed entries)
  cache = entries if cfg.is_v4 else cache_lib.write(state["cache"], entries, state["pos"])
  rng, key = jax.random.split(state["rng"])
  nxt, nxt_logp = next_token_and_logprob(key, logits[:, 0], *settings)
  was_done = state["done"]
  state = emit({**state, "cache": cache, "rng": rng}, nxt[:, None],
               nxt_logp[:, None], jnp.ones((b,), jnp.int32),
               stop_ids, max_new)
  return {**state, "cur": nxt, "pos": jnp.where(was_done, state["pos"], state["pos"] + 1),
          "steps": state["steps"] + 1}


def record_routing(routing: jax.Array, chosen: jax.Array, at: jax.Array,
                   write: jax.Array) -> jax.Array:
  """routing [b, max_new, L, k] with chosen [b, L, k] put at column at[b]
  of the rows where write[b]."""
  rows = jnp.arange(routing.shape[0])
  at = jnp.clip(at, 0, routing.shape[1] - 1)
  return routing.at[rows, at].set(jnp.where(write[:, None, None], chosen, routing[rows, at]))


OUTPUTS = ("out", "out_logp", "n_out", "steps", "drafted", "accepted")
ROUTING = ("routing", "prompt_routing")


def _loop_fn(cfg: ModelConfig, max_new: int, stop_ids: tuple[int, ...], speculative: bool,
             record: bool = False, group: int = 1):
  step_fn = spec_lib.step if speculative else step

  def run(variables, prompts, lengths, rng, settings):
    state = prefill(cfg, variables, prompts, lengths, rng, settings, max_new=max_new,
                    stop_ids=stop_ids, speculative=speculative, record=record, group=group)
    state = jax.lax.while_loop(
        lambda s: ~jnp.all(s["done"]) & (s["steps"] < max_new),
        lambda s: step_fn(cfg, variables, s, settings, max_new=max_new, stop_ids=stop_ids),
        state)
    return {k: state[k] for k in OUTPUTS + (ROUTING if record else ())}
  return run


@functools.lru_cache(maxsize=32)
def _compiled(cfg: ModelConfig, max_new: int, stop_ids: tuple[int, ...], speculative: bool,
              mesh, record: bool = False, group: int = 1, rules=None) -> Any:
  """The jitted loop; `rules` only keys the cache (a program traced under
  `parallel.activate(mesh, rules)` is that rule set's)."""
  run = _loop_fn(cfg, max_new, stop_ids, speculative, record, group)
  if mesh is None:
    return jax.jit(run)
  return jax.jit(run, out_shardings=NamedSharding(mesh, P()))


def _prepare(cfg, prompts, max_new_tokens, temperature, top_k, top_p, min_p, stop_ids,
             rng, speculative):
  """Checks a request (before compiling) -> (stop_ids, padded prompts [b, P],
  lengths [b], rng, Sampling)."""
  stop_ids = tuple(int(s) for s in stop_ids)
  prompts = check_request(cfg, prompts, max_new_tokens, temperature, top_k, top_p, min_p,
                          stop_ids, speculative)
  buf, lens = pad_prompts(prompts, bucket_length(max(len(p) for p in prompts), cfg,
                                                 max_new_tokens))
  settings = Sampling(np.float32(temperature), np.int32(top_k), np.float32(top_p),
                      np.float32(min_p))
  return stop_ids, buf, lens, jax.random.key(0) if rng is None else rng, settings


def _generation(out: dict) -> Generation:
  out = jax.device_get({k: out[k] for k in OUTPUTS + ROUTING if k in out})
  routing = {k: np.asarray(out[k]) for k in ROUTING if k in out}
  return Generation(np.asarray(out["out"]), np.asarray(out["n_out"]),
                    np.asarray(out["out_logp"]), int(out["steps"]), int(out["drafted"]),
                    int(out["accepted"]), **routing)


def _check_groups(prompts: Sequence[Sequence[int]], group_size: int) -> None:
  if not (isinstance(group_size, (int, np.integer)) and group_size >= 1):
    raise ValueError(f"group_size={group_size!r} must be an integer >= 1.")
  if len(prompts) % group_size:
    raise ValueError(f"group_size={group_size} must divide the {len(prompts)} prompts "
                     "(consecutive runs of equal prompts).")
  for start in range(0, len(prompts), group_size):
    first = list(prompts[start])
    for i in range(start + 1, start + group_size):
      if list(prompts[i]) != first:
        raise ValueError(f"group_size={group_size}: prompt {i} differs from prompt {start} "
                         "of its run; prefix sharing needs runs of equal prompts.")


def _check_record(return_routing: bool, speculative: bool) -> bool:
  if return_routing and speculative:
    raise ValueError("return_routing=True records the experts of plain decoding; "
                     "speculative=True is not supported with it.")
  return bool(return_routing)


INFER_DTYPES = ("float32", "bfloat16")
# Float params kept in float32 under dtype="bfloat16": RMSNorm scales, the
# MoE router's gate, biases, FP8 block scales (names ending in "_scale").
KEEP_FLOAT32 = ("scale", "gate", "bias")


def check_dtype(dtype) -> str | None:
  """dtype (None, a name or a NumPy/JAX dtype) -> None or its name in
  INFER_DTYPES; ValueError (one line) otherwise."""
  if dtype is None:
    return None
  try:
    name = jnp.dtype(dtype).name
  except TypeError:
    name = None
  if name not in INFER_DTYPES:
    raise ValueError(f"dtype={dtype!r} must be one of {INFER_DTYPES} (the weights' and "
                     "activations' type for generation) or None (the model's own).")
  return name


def inference_model(cfg: ModelConfig, variables, dtype) -> tuple[ModelConfig, Any]:
  """(cfg, variables) to generate with in `dtype` (module doc): cfg.dtype set
  to it and the float params cast to it once, except those KEEP_FLOAT32
  names (kept float32). dtype None: both unchanged. Casting params already
  in dtype is free, so callers may cast once up front and pass the result."""
  name = check_dtype(dtype)
  if name is None:
    return cfg, variables
  return cfg.replace(dtype=name), cast_variables(variables, name)


def cast_variables(variables, dtype: str):
  """The "params" collection's 16/32/64-bit float leaves cast to dtype, but
  leaves named in KEEP_FLOAT32 or ending in "_scale" cast to float32; other
  collections (the router bias) and non-float leaves (FP8 blocks) as they are."""
  dt = jnp.dtype(check_dtype(dtype))

  def cast(path, x):
    name = str(getattr(path[-1], "key", path[-1]))
    if x.dtype not in (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64):
      return x
    keep = name in KEEP_FLOAT32 or name.endswith("_scale")
    return x.astype(jnp.float32 if keep else dt)

  if "params" not in variables:
    return variables
  return {**variables, "params": jax.tree_util.tree_map_with_path(cast, variables["params"])}


def generate(cfg: ModelConfig, variables, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, min_p: float = 0.0, stop_ids: Sequence[int] = (),
             rng: jax.Array | None = None, speculative: bool = False,
             mesh=None, return_routing: bool = False, group_size: int = 1,
             rules=None, dtype=None) -> Generation:
  """Generates up to max_new_tokens per prompt (module docstring).

  temperature 0 = greedy; top_k / top_p / min_p filter the sampling
  distribution (sampling.py); a row stops after any of `stop_ids`; rng
  (default jax.random.key(0)) makes sampling reproducible. speculative: MTP
  module 1 drafts one token per step and the main model verifies it in the
  same forward (speculative.py); greedy output is unchanged, sampling keeps
  the same distribution. mesh: the mesh `variables` live on (possibly several
  processes): inputs are replicated over it and outputs come back replicated.
  mesh + rules (a rule set, as training's): in one process, when the batch
  axes divide the rows, the rows are split over the batch axes and the loop
  runs under `parallel.activate(mesh, rules)` (the MoE's expert-parallel
  dispatch, as in training; prefix sharing only when the groups' first rows
  split too); otherwise replicated as above. Same output.
  return_routing: also gen.routing [batch, max_new_tokens, n_moe_layers, k]
  and gen.prompt_routing, the experts each token used in each main MoE layer
  (the MTP block's not: it does not run), for routing replay (module doc,
  `rollout_routing`); not with speculative.
  group_size > 1: the prompts come in consecutive runs of group_size equal
  prompts (GRPO's G samples of one prompt); each run's prompt is prefilled
  once and its cache forked to the run's rows (prefix sharing). The result
  equals group_size=1's; ValueError when a run's prompts differ.
  dtype: "bfloat16" generates with bfloat16 weights and activations
  (float32 where the model accumulates; module doc); "float32"; None (the
  model's own cfg.dtype, unchanged).
  """
  check_dtype(dtype)
  record = _check_record(return_routing, speculative)
  check_v4(cfg, speculative, record)
  _check_groups(prompts, group_size)
  stop_ids, buf, lens, rng, settings = _prepare(
      cfg, prompts, max_new_tokens, temperature, top_k, top_p, min_p, stop_ids, rng,
      speculative)
  group, context = int(group_size), contextlib.nullcontext()
  if mesh is not None and rules is not None and _rows_split(mesh, len(buf)):
    rules = parallel_rules.resolve(rules)
    rows = parallel_rules.batch_sharding(mesh, rules)
    buf = jax.device_put(buf, rows)
    lens = jax.device_put(lens, NamedSharding(mesh, P(rows.spec[0])))
    # the prefill of one row per group must split too; else every row is prefilled
    group = group if _rows_split(mesh, len(buf) // group) else 1
    context = parallel_rules.activate(mesh, rules)
  else:
    rules = None
    if mesh is not None:
      buf, lens = distributed.replicate((buf, lens), mesh)
  cfg, variables = inference_model(cfg, variables, dtype)      # once, outside the loop
  with context:          # traced and run under the mesh's rules when rows are split
    run = _compiled(cfg, int(max_new_tokens), stop_ids, bool(speculative), mesh, record,
                    group, rules)
    return _generation(run(variables, buf, lens, rng, settings))


def _rows_split(mesh, n_rows: int) -> bool:
  """Whether rows can be split over the mesh's batch axes here (one process,
  a multiple of their size)."""
  split = parallel_rules.axes_size(dict(mesh.shape), parallel_rules.BATCH_AXES)
  return jax.process_count() == 1 and n_rows % split == 0


def stream(cfg: ModelConfig, variables, prompts: Sequence[Sequence[int]], *,
           max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0, min_p: float = 0.0, stop_ids: Sequence[int] = (),
           rng: jax.Array | None = None, speculative: bool = False,
           return_routing: bool = False, dtype=None) -> Iterator[list[list[int]]]:
  """Like `generate`, one step at a time: yields each row's new tokens (a
  list per row, empty once it stopped) after the prefill and after every
  step; the generator's return value (StopIteration.value) is the Generation.
  dtype: as `generate`'s."""
  check_dtype(dtype)
  record = _check_record(return_routing, speculative)
  check_v4(cfg, speculative, record)
  stop_ids, buf, lens, rng, settings = _prepare(
      cfg, prompts, max_new_tokens, temperature, top_k, top_p, min_p, stop_ids, rng,
      speculative)
  cfg, variables = inference_model(cfg, variables, dtype)      # once, outside the loop
  first, step_fn = _stream_fns(cfg, int(max_new_tokens), stop_ids, bool(speculative), record)
  state = first(variables, buf, lens, rng, settings)
  seen = np.zeros(len(buf), np.int64)
  while True:
    n_out, out, done, steps = jax.device_get(
        (state["n_out"], state["out"], state["done"], state["steps"]))
    yield [out[i, seen[i]:n_out[i]].tolist() for i in range(len(buf))]
    seen = n_out.astype(np.int64)
    if done.all() or steps >= max_new_tokens:
      break
    state = step_fn(variables, state, settings)
  return _generation(state)


@functools.lru_cache(maxsize=32)
def _stream_fns(cfg: ModelConfig, max_new: int, stop_ids: tuple[int, ...], speculative: bool,
                record: bool = False):
  kw = dict(max_new=max_new, stop_ids=stop_ids)
  first = jax.jit(functools.partial(prefill, cfg, speculative=speculative, record=record,
                                    **kw))
  step_fn = spec_lib.step if speculative else step
  nxt = jax.jit(lambda v, s, st: step_fn(cfg, v, s, st, **kw), donate_argnums=1)
  return first, nxt


def rollout_routing(gen: Generation, prompt_lengths: Sequence[int], seq_len: int, *,
                    prompt: bool = True) -> np.ndarray:
  """The `routing=` array (Transformer, infer.token_logprobs) that replays a
  rollout: int32 [batch, seq_len, n_moe_layers, k] for rows laid out as
  prompt then completion, right-padded to seq_len (rl.trainer.rollout_batch's
  tokens). Row i: positions [0, prompt_lengths[i]) hold gen.prompt_routing
  (prompt=True; -1 = route normally when False), completion token j at
  prompt_lengths[i] + j holds gen.routing[i, j], everything else -1 (the
  last completion token, padding). gen from `generate(..., return_routing=True)`
  on the same prompts in the same order."""
  if gen.routing is None or (prompt and gen.prompt_routing is None):
    raise ValueError("gen has no routing record: generate with return_routing=True.")
  n, max_new, n_layers, k = gen.routing.shape
  plen = np.asarray(prompt_lengths, np.int64)
  if plen.shape != (n,):
    raise ValueError(f"prompt_lengths must give one length per row ({n}); got {plen.shape}.")
  if (plen + gen.lengths).max() > seq_len:
    raise ValueError(f"seq_len={seq_len} is shorter than a row's prompt + completion "
                     f"({int((plen + gen.lengths).max())}).")
  out = np.full((n, seq_len, n_layers, k), -1, np.int32)
  for i in range(n):
    p, m = int(plen[i]), int(gen.lengths[i])
    if prompt:
      out[i, :p] = gen.prompt_routing[i, :p]
    out[i, p:p + m] = gen.routing[i, :m]
  return out
