"""Metric writing, progress, throughput and MFU.

Why not `clu.metric_writers`: it imports TensorFlow at import time, and `dtm_jax/` must run where TensorFlow is absent
(the GPU/TPU hot path). TensorBoard event files are written here with the `tensorboard` package's record writer and
protos, which need no TensorFlow. Every scalar also goes to `metrics.jsonl` (one JSON object per line) and the log.
"""
from __future__ import annotations

import json
import logging as logging_std
import socket
import threading
import time
from typing import Mapping

import jax
from absl import logging
from etils import epath
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from dtm_jax import flops
from dtm_jax.runtime import errors


class _DropLibraryInfo(logging_std.Filter):
  """Drops INFO records logged from inside the named libraries (Orbax logs every file it writes)."""

  def __init__(self, libraries: tuple[str, ...]):
    super().__init__()
    self._markers = tuple(f"/{name}/" for name in libraries)

  def filter(self, record: logging_std.LogRecord) -> bool:
    if not any(m in record.pathname for m in self._markers):
      # asyncio's "Task/Future exception was never retrieved" at exit: the failed writes of a save that was
      # reported (checkpoint.CheckpointSaveError), one per file.
      return not (record.name == "asyncio" and errors.was_reported("checkpoint_save") and
                  "never retrieved" in str(record.msg))
    if record.levelno <= logging_std.INFO or errors.was_reported("checkpoint_save"):
      return False  # chatter, or more about a failed save the run has explained
    if record.exc_info or len(record.getMessage()) > _LIBRARY_LINE:
      # Orbax logs each failed background write with its traceback (a full disk gave dozens); the run reports the
      # failure itself (checkpoint.CheckpointSaveError), so one short line each is kept.
      message = record.getMessage()
      record.msg = message[:_LIBRARY_LINE] + (" …" if len(message) > _LIBRARY_LINE else "")
      record.args, record.exc_info, record.exc_text, record.stack_info = (), None, None, None
    return True


_LIBRARY_LINE = 400


def quiet_library_logs(libraries: tuple[str, ...] = ("orbax",)) -> None:
  """Keep the run's own INFO lines readable: library INFO chatter is dropped, warnings and errors stay (one line
  each, without tracebacks)."""
  logging.get_absl_handler().addFilter(_DropLibraryInfo(libraries))


FLUSH_EVERY_SECS = 30.0  # default interval of MetricsWriter's background flush (config.metrics_flush_secs)


class MetricsWriter:
  """Scalars to TensorBoard events, metrics.jsonl and the log. Only process 0 writes files.

  resume_step: the step a resumed run continues from; lines of later steps in metrics.jsonl (written before a kill,
  and about to be computed again) are dropped, as is a line cut short by the kill, so each step keeps one line.

  flush_every_secs: written lines are kept in memory and written out and flushed by a background thread every this
  many seconds (and by flush() and close()), never on the step's path: on `gs://` a flush re-uploads the whole object
  from process 0 while every other host waits at the next collective. A `kill -9` loses at most the lines written in
  the last interval (the training loops call flush() before each checkpoint, so the lines up to a checkpoint's step
  are never lost). 0 writes and flushes on every write (`tail -f` sees each line at once).
  """

  def __init__(self, workdir: str | epath.Path, *, enabled: bool | None = None, resume_step: int | None = None,
               flush_every_secs: float = FLUSH_EVERY_SECS):
    self._enabled = jax.process_index() == 0 if enabled is None else enabled
    self._events = None
    self._jsonl = None
    self._every = flush_every_secs
    self._pending: list[tuple[bytes, str]] = []  # (event record, jsonl line) written since the last flush
    self._lock = threading.Lock()  # guards _pending (taken only to append or swap it: never held while writing)
    self._io_lock = threading.Lock()  # one writer of the files at a time (the flusher thread, flush(), close())
    self._stop = threading.Event()
    self._thread = None
    if self._enabled:
      workdir = epath.Path(workdir)
      if resume_step is not None:
        truncate_jsonl(workdir / "metrics.jsonl", resume_step)
      tb_dir = workdir / "tensorboard"
      tb_dir.mkdir(parents=True, exist_ok=True)
      name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
      self._events = RecordWriter(_open(tb_dir / name, "wb"))
      self._events.write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
      self._jsonl = _open_for_append(workdir / "metrics.jsonl")
      if self._every > 0:
        self._thread = threading.Thread(target=self._flush_periodically, name="metrics-flush", daemon=True)
        self._thread.start()

  @classmethod
  def for_run(cls, workdir: str | epath.Path, config, resume_step: int) -> "MetricsWriter":
    """The writer of a run resuming at `resume_step`, flushed every `config.metrics_flush_secs` (default 30 s)."""
    return cls(workdir, resume_step=resume_step,
               flush_every_secs=config.get("metrics_flush_secs", FLUSH_EVERY_SECS))

  def write_scalars(self, step: int, scalars: Mapping[str, float], *, log: bool = True):
    scalars = {k: float(v) for k, v in scalars.items()}
    if log:
      logging.info("[%d] %s", step, ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(scalars.items())))
    if not self._enabled:
      return
    values = [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()]
    event = event_pb2.Event(wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=values))
    with self._lock:
      self._pending.append((event.SerializeToString(), json.dumps({"step": step, **scalars}) + "\n"))
    if self._every <= 0:
      self.flush()

  def flush(self):
    """Writes out and flushes the lines written so far (the caller waits for it)."""
    if self._enabled:
      self._write_pending()

  def _write_pending(self):
    with self._io_lock:
      with self._lock:
        pending, self._pending = self._pending, []
      if not pending:
        return
      for record, line in pending:
        self._events.write(record)
      self._jsonl.write("".join(line for _, line in pending))
      self._events.flush()
      self._jsonl.flush()

  def _flush_periodically(self):
    while not self._stop.wait(self._every):
      try:
        self._write_pending()
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Writing metrics failed (%s: %s); retrying in %.0f s.", type(e).__name__, e, self._every)

  def close(self):
    if self._enabled:
      self._stop.set()
      if self._thread is not None:
        self._thread.join()
      self._write_pending()
      self._events.close()
      self._jsonl.close()
      self._enabled = False


class _EnteredFile:
  """The file of a context manager that epath's open() returned, kept open (with its context manager) until close()."""

  def __init__(self, manager):
    self._manager = manager
    self._file = manager.__enter__()  # pylint: disable=unnecessary-dunder-call

  def write(self, data):
    return self._file.write(data)

  def flush(self):
    self._file.flush()

  def close(self):
    self._manager.__exit__(None, None, None)


def _open(path: epath.Path, mode: str):
  """An open file of `path`. epath's tf.io.gfile backend (gs:// paths when TensorFlow is installed) returns a context
  manager from open() rather than a file (writes to it fail); it is entered here and kept open until close()."""
  handle = path.open(mode)
  return handle if hasattr(handle, "write") else _EnteredFile(handle)


def _open_for_append(path: epath.Path):
  """Appends to a local file. Object stores (gs://) cannot append (gcsfs silently overwrites): the object is
  rewritten with its old content first."""
  if "://" not in str(path):
    return _open(path, "a")
  old = path.read_text() if path.exists() else ""
  handle = _open(path, "w")
  handle.write(old)
  return handle


def _fmt(v: float) -> str:
  return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"


def truncate_jsonl(path: str | epath.Path, last_step: int) -> None:
  """Keeps the rows of metrics.jsonl up to `last_step` (and drops unparseable, i.e. cut, lines); atomic rewrite."""
  path = epath.Path(path)
  if not path.exists():
    return
  lines = path.read_text().splitlines()
  kept = []
  for line in lines:
    try:
      row = json.loads(line)
    except ValueError:
      continue
    if isinstance(row, dict) and isinstance(row.get("step"), (int, float)) and row["step"] <= last_step:
      kept.append(line)
  if len(kept) == len(lines):
    return
  logging.info("metrics.jsonl: dropped %d lines past step %d (they are computed again).", len(lines) - len(kept),
               last_step)
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text("".join(line + "\n" for line in kept))
  tmp.replace(path)


def read_jsonl(path: str | epath.Path) -> list[dict]:
  """Rows of a metrics.jsonl file (for scripts and tests)."""
  text = epath.Path(path).read_text()
  return [json.loads(line) for line in text.splitlines() if line.strip()]


class Throughput:
  """Step time, images/s, TFLOP/s per device and MFU between two calls of `measure`."""

  def __init__(self, *, flops_per_step: float, images_per_step: int):
    self._flops_per_step = flops_per_step
    self._images_per_step = images_per_step
    self._peak = flops.peak_flops_per_device(jax.devices()[0].device_kind)
    self._last_time = None
    self._last_step = None

  def start(self, step: int):
    self._last_time, self._last_step = time.perf_counter(), step

  def measure(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    steps = step - self._last_step
    out = {}
    if steps > 0:
      step_time = (now - self._last_time) / steps
      tflops = self._flops_per_step / step_time / jax.device_count() / 1e12
      out = {"step_time_s": step_time, "images_per_s": self._images_per_step / step_time,
             "tflops_per_device": tflops}
      if self._peak:
        out["mfu"] = tflops * 1e12 / self._peak
    self._last_time, self._last_step = now, step
    return out


class Progress:
  """Console progress: step, steps/s and ETA, at most every `every_secs` seconds.

  Steps are dispatched asynchronously, so the loop can be ahead of the device; pass `done`, an output of the step,
  and the line waits for it first (only when it prints), so the rate counts finished steps.
  """

  def __init__(self, total_steps: int, every_secs: float = 30.0):
    self._total = total_steps
    self._every = every_secs
    self._t0 = self._last = time.time()
    self._step0 = None

  def __call__(self, step: int, force: bool = False, done=None):
    now = time.time()
    if self._step0 is None:
      jax.block_until_ready(done)
      self._step0, self._t0 = step, time.time()
      return
    if not force and now - self._last < self._every:
      return
    jax.block_until_ready(done)
    now = self._last = time.time()
    rate = (step - self._step0) / max(now - self._t0, 1e-9)
    eta = (self._total - step) / rate if rate > 0 else float("inf")
    logging.info("progress: step %d/%d (%.1f%%), %.2f steps/s, ETA %s", step, self._total,
                 100.0 * step / self._total, rate, _duration(eta))


def _duration(seconds: float) -> str:
  if seconds == float("inf"):
    return "?"
  minutes, s = divmod(int(seconds), 60)
  hours, m = divmod(minutes, 60)
  return f"{hours}h{m:02d}m" if hours else f"{m}m{s:02d}s"
