"""Training logs: JSON lines in `workdir/metrics.jsonl`, readable progress lines,
and the loss plot `workdir/loss.png`.

Every line of metrics.jsonl is one JSON object with a "step" key: one train
line per step with the step's scalars (loss, ce, mtp, balance, grad_norm, lr,
load_imbalance, tokens, target_tokens; tokens_per_s on the steps that were
also printed; with DeepSeek-V2's balance losses on, balance_expert,
balance_device, balance_comm and the lists balance_expert_per_layer,
balance_device_per_layer, balance_comm_per_layer, device_tokens_per_layer;
with bad-step skipping on, skipped and bad_steps), and eval lines with
`eval_accuracy` and `eval_format_ok`. A resumed run first drops the lines of
steps after the
checkpoint it resumes from (they are about to be recomputed), so the file
always describes one consistent history.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from typing import Any, Callable

import numpy as np
from deepseek_jax.files import atomic_text, atomic_write
from deepseek_jax.train import tfevents

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"
PLOT_FILE = "loss.png"


def read_metrics(path: str) -> list[dict[str, Any]]:
  """All JSON lines of a metrics file ([] if it does not exist).

  A last line cut short (the process was killed while appending it) is
  dropped: its step is recomputed on resume. A bad line elsewhere is a
  ValueError naming it.
  """
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
  records = []
  for k, (i, line) in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if k == len(lines) - 1 and not line.endswith("\n"):
        break
      raise ValueError(f"{path}:{i} is not a JSON line ({e}); move the file away to start "
                       "its history afresh.") from None
  return records


def keep_steps_up_to(path: str, step: int) -> None:
  """Rewrites the JSON-lines file `path` (if it exists) without the records
  of steps after `step`, atomically: a resumed run drops what it is about to
  recompute, and a kill mid-rewrite leaves the old file or the new one."""
  if not os.path.exists(path):
    return
  kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
  atomic_text("".join(json.dumps(r) + "\n" for r in kept), path)


def _scalar(v: Any) -> Any:
  v = np.asarray(v)
  return v.item() if v.ndim == 0 else v.tolist()


class EventFile:
  """One TensorBoard event file, written synchronously (no writer thread, so
  `flush` really puts every event on disk and one run segment keeps one
  file). purge_step: TensorBoard drops the events of earlier files at steps
  >= it (a resumed run recomputes them)."""
  _opened = 0     # files this process opened: names opened within one second sort in order

  def __init__(self, directory: str, purge_step: int | None = None):
    os.makedirs(directory, exist_ok=True)
    EventFile._opened += 1
    name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}"
            f".{os.getpid()}.{EventFile._opened:06d}")
    self.path = os.path.join(directory, name)
    self._file = open(self.path, "ab")
    self._write(tfevents.encode_event(time.time(), step=purge_step or 0,
                                      file_version="brain.Event:2"))
    if purge_step is not None:
      self._write(tfevents.encode_event(time.time(), step=purge_step,
                                        session_status=tfevents.SESSION_START))

  def _write(self, event: bytes) -> None:
    self._file.write(tfevents.record(event))

  def scalar(self, tag: str, value: float, step: int) -> None:
    self._write(tfevents.encode_event(time.time(), step=step, scalars={tag: value}))

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()


class MetricsWriter:
  """Appends JSON lines to metrics.jsonl and the scalars to one TensorBoard
  event file per run segment in `workdir/tb`. On resume both keep only steps
  <= start_step: the JSON file is rewritten atomically (`keep_steps_up_to`:
  a kill leaves the old or the new file, never half of one), TensorBoard
  purges later steps (`purge_step`)."""

  def __init__(self, workdir: str, start_step: int, tensorboard: bool = True):
    self.path = os.path.join(workdir, METRICS_FILE)
    keep_steps_up_to(self.path, start_step)
    if not os.path.exists(self.path):
      atomic_text("", self.path)
    self.tb = (EventFile(os.path.join(workdir, TENSORBOARD_DIR), purge_step=start_step + 1)
               if tensorboard else None)

  def write(self, step: int, values: dict[str, Any]) -> None:
    record = {"step": int(step), **{k: _scalar(v) for k, v in values.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self.tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
          self.tb.scalar(k, v, int(step))

  def flush(self) -> None:
    """Puts every TensorBoard event written so far on disk (before a
    checkpoint: a run killed later resumes from it and must not miss the
    steps up to it)."""
    if self.tb is not None:
      self.tb.flush()

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()
      self.tb = None


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
  """Throughput and ETA over the steps run since the last report.

  Time spent outside steps (evaluation, checkpoints) is excluded from
  tokens/s by `exclude(seconds)`; the first step (compilation) is excluded
  from the rate too (`restart_window`).
  """

  def __init__(self, start_step: int, total_steps: int, clock: Callable[[], float] = time.time):
    self.total = total_steps
    self.clock = clock
    self.step0, self.t0, self.tokens = start_step, clock(), 0.0
    self.compiled = False
    self.rate_steps = 0.0      # steps / second, last window
    self.rate_tokens = 0.0

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` spent outside steps (eval, checkpoints) out of the rate."""
    self.t0 += seconds

  def restart_window(self, step: int) -> None:
    self.step0, self.t0, self.tokens = step, self.clock(), 0.0

  def add(self, tokens: float) -> None:
    self.tokens += tokens

  def report(self, step: int) -> tuple[float, float]:
    """(tokens/s, eta seconds) since the window began; starts a new window."""
    dt = max(self.clock() - self.t0, 1e-9)
    n = step - self.step0
    if n > 0:
      self.rate_steps, self.rate_tokens = n / dt, self.tokens / dt
    eta = (self.total - step) / self.rate_steps if self.rate_steps else float("inf")
    self.restart_window(step)
    return self.rate_tokens, eta


def progress_line(step: int, total: int, m: dict[str, Any], tokens_per_s: float,
                  eta_s: float) -> str:
  v2 = ""
  if "balance_expert" in m:     # DeepSeek-V2's losses (layer sums): expert/device/comm
    v2 = (f" v2 {m['balance_expert']:.3f}/{m['balance_device']:.3f}/"
          f"{m['balance_comm']:.3f}")
  if "indexer_loss" in m:       # DeepSeek-V3.2's indexer KL (dsa_stage warmup / sparse)
    v2 += f" idx {m['indexer_loss']:.4f}"
  return (f"step {step:>6d}/{total} | loss {m['loss']:.4f} ce {m['ce']:.4f} "
          f"mtp {m['mtp']:.4f} bal {m['balance']:.3f}{v2} | gnorm {m['grad_norm']:.3f} "
          f"lr {m['lr']:.2e} | load max/mean {m['load_imbalance']:.2f} | "
          f"{tokens_per_s:,.0f} tok/s | eta {format_duration(eta_s)}"
          + (f" | mfu {m['mfu']:.1%}" if "mfu" in m else "")
          + (f" | skipped {int(m['bad_steps'])}" if m.get("bad_steps") else ""))


def plot_smoothed(ax, steps: np.ndarray, values: np.ndarray, label: str, window: int) -> None:
  """The raw curve faint and its moving average over `window` steps solid
  (just the curve, solid, when window is 1)."""
  line, = ax.plot(steps, values, alpha=0.25)
  if window > 1:
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    ax.plot(steps[window - 1:], smooth, color=line.get_color(), label=label)
  else:
    line.set_alpha(1.0)
    line.set_label(label)


def plot_losses(workdir: str) -> str | None:
  """Plots loss/ce (and eval accuracy if any) from metrics.jsonl to loss.png."""
  records = read_metrics(os.path.join(workdir, METRICS_FILE))
  train = [r for r in records if "loss" in r]
  evals = [r for r in records if "eval_accuracy" in r]
  if not train:
    return None
  # A bare Figure (Agg canvas), not pyplot: the caller's backend and open
  # figures (a notebook's inline plots) stay untouched.
  from matplotlib.figure import Figure

  fig = Figure(figsize=(7, 4))
  ax = fig.add_subplot()
  steps = np.array([r["step"] for r in train])
  window = max(1, len(train) // 50)
  curves = [("loss", "loss (total)"), ("ce", "next-token CE")]
  if any(r.get("mtp") for r in train):
    curves.append(("mtp", "MTP CE"))
  for key, label in curves:
    plot_smoothed(ax, steps, np.array([r[key] for r in train]), label, window)
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats / token)")
  ax.set_yscale("log")
  ax.grid(alpha=0.3)
  handles, labels = ax.get_legend_handles_labels()
  if evals:
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], "o-",
             color="tab:red", label="held-out exact match")
    ax2.set_ylabel("held-out exact match")
    ax2.set_ylim(0, 1)
    h2, l2 = ax2.get_legend_handles_labels()
    handles, labels = handles + h2, labels + l2
  ax.legend(handles, labels, loc="upper right")
  fig.tight_layout()
  return save_figure(fig, os.path.join(workdir, PLOT_FILE))


def save_figure(fig, path: str) -> str:
  """Saves a matplotlib Figure as PNG at `path` atomically (a reader, e.g. an
  image viewer refreshing it, never sees a half-written plot)."""
  atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
  return path


class CompileCounter:
  """Counts XLA compilations while installed (a context manager): jax.monitoring's
  backend-compile events, one per jit cache miss (a program served from the
  persistent compilation cache counts too: it is a new program for this
  process). `count` is the running total."""

  EVENT = "/jax/core/compile/backend_compile_duration"

  def __init__(self):
    self.count = 0

  def _on_event(self, event: str, duration_secs: float, **kwargs) -> None:
    if event == self.EVENT:
      self.count += 1

  def __enter__(self) -> "CompileCounter":
    import jax.monitoring
    jax.monitoring.register_event_duration_secs_listener(self._on_event)
    return self

  def __exit__(self, *exc) -> None:
    import jax.monitoring
    jax.monitoring.unregister_event_duration_listener(self._on_event)

