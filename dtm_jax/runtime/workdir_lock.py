"""One writer per workdir: a lock file taken at start, refreshed by a heartbeat, released at the end.

`<workdir>/lock.json` holds the holder: host, pid, start time, mode, a random token and the time of its last
heartbeat (rewritten every HEARTBEAT_S seconds by a daemon thread). A run that finds the file refuses to start and
names the holder, unless the lock is stale:

  * same host, and the process `pid` no longer exists (killed with -9, crashed, machine rebooted) → stale;
  * same host and pid as this process, but not a lock this process holds now (left by an earlier run in the same
    Python process, e.g. a notebook) → stale;
  * any host: no heartbeat for STALE_AFTER_S seconds (10 minutes; a live run refreshes it every 30 s) → stale
    (this is how a lock of a dead run on another machine is recovered).

A stale lock is replaced with a warning naming its former holder. On local disks the file is created with O_EXCL, so
two runs that start together cannot both take it. On object stores (`gs://`, through etils.epath) there is no
exclusive create: the run writes its token and reads it back after a short pause, which catches all but starts
within that pause of each other. In a multi-process job only process 0 takes the lock; the others wait for its
verdict and refuse together with it.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import threading
import time
import uuid

from absl import logging
from etils import epath

from dtm_jax.runtime import errors

LOCK_FILE = "lock.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0
_OBJECT_STORE_SETTLE_S = 2.0
_held_tokens: set[str] = set()  # locks this process holds now


class WorkdirLockedError(errors.RunError):
  """Another run holds the workdir."""


def _is_local(path: epath.Path) -> bool:
  return "://" not in str(path)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # exists, owned by someone else
  except OSError:
    return False
  return True


def _when(seconds: float | None) -> str:
  if seconds is None:
    return "?"
  return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def describe(holder: dict) -> str:
  return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, {holder.get('mode', 'a run')} started "
          f"{_when(holder.get('start_time'))}, last heartbeat {_when(holder.get('heartbeat'))}")


def stale_reason(holder: dict, *, now: float | None = None, stale_after_s: float = STALE_AFTER_S) -> str | None:
  """Why the lock of `holder` is stale (see the module docstring), or None if its run may still be alive."""
  now = time.time() if now is None else now
  heartbeat = holder.get("heartbeat")
  if not isinstance(heartbeat, (int, float)):
    return "the lock file is unreadable"
  if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
    pid = holder["pid"]
    if not _pid_alive(pid):
      return f"process {pid} on this host no longer exists"
    if pid == os.getpid() and holder.get("token") not in _held_tokens:
      return "it was left by an earlier run in this process"
  if now - heartbeat > stale_after_s:
    return f"no heartbeat for {now - heartbeat:.0f} s (more than {stale_after_s:.0f} s)"
  return None


class WorkdirLock:
  """The lock of one workdir (process-local; see `hold` for multi-process jobs)."""

  def __init__(self, workdir, *, mode: str = "pretrain", heartbeat_s: float = HEARTBEAT_S,
               stale_after_s: float = STALE_AFTER_S):
    self.workdir = epath.Path(workdir)
    self.path = self.workdir / LOCK_FILE
    self.mode = mode
    self._heartbeat_s = heartbeat_s
    self._stale_after_s = stale_after_s
    self._token = uuid.uuid4().hex
    self._holder = None
    self._stop = threading.Event()
    self._thread = None

  # --- Reading and writing the lock file.
  def read(self) -> dict | None:
    """The holder recorded in the lock file; {} when it exists but cannot be parsed; None when there is none."""
    try:
      text = self.path.read_text()
    except FileNotFoundError:
      return None
    try:
      holder = json.loads(text)
      return holder if isinstance(holder, dict) else {}
    except ValueError:
      return {}

  def _create_exclusively(self, text: str) -> bool:
    if _is_local(self.path):
      try:
        fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        return False
      with os.fdopen(fd, "w") as f:
        f.write(text)
      return True
    if self.path.exists():
      return False
    self.path.write_text(text)
    time.sleep(_OBJECT_STORE_SETTLE_S)  # another writer in the same instant overwrote ours → it wins, we refuse
    current = self.read() or {}
    return current.get("token") == self._token

  def _write(self, holder: dict) -> None:
    text = json.dumps(holder)
    if _is_local(self.path):
      tmp = self.path.parent / f".{LOCK_FILE}.{self._token}.tmp"
      tmp.write_text(text)
      os.replace(os.fspath(tmp), os.fspath(self.path))
    else:
      self.path.write_text(text)

  # --- Taking and giving back.
  def acquire(self) -> "WorkdirLock":
    """Takes the lock or raises WorkdirLockedError naming the holder; replaces a stale lock with a warning."""
    self.workdir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    self._holder = {"host": socket.gethostname(), "pid": os.getpid(), "start_time": now, "heartbeat": now,
                    "mode": self.mode, "token": self._token, "workdir": str(self.workdir)}
    for _ in range(3):
      if self._create_exclusively(json.dumps(self._holder)):
        _held_tokens.add(self._token)
        self._start_heartbeat()
        return self
      holder = self.read()
      if holder is None:
        continue  # released in between: try again
      reason = stale_reason(holder, stale_after_s=self._stale_after_s)
      if reason is None:
        raise WorkdirLockedError(
            f"{self.workdir} is in use by another run ({describe(holder)}; lock file {self.path}). Only one run may "
            "write a workdir: wait for that run to end, or use another --workdir. If that run is dead (its host "
            f"cannot be checked from here), the lock counts as stale {self._stale_after_s / 60:.0f} minutes after "
            "its last heartbeat, or delete the lock file.")
      logging.warning("Replacing the stale lock of %s (%s): %s.", self.workdir, describe(holder), reason)
      self._remove_if(holder)
    raise WorkdirLockedError(f"Could not take the lock {self.path}: other runs keep taking it.")

  def _remove_if(self, holder: dict) -> None:
    """Removes the lock file if it still holds `holder` (a concurrent breaker may have replaced it)."""
    if _is_local(self.path):
      aside = self.path.parent / f".{LOCK_FILE}.{self._token}.stale"
      try:
        os.rename(os.fspath(self.path), os.fspath(aside))
      except FileNotFoundError:
        return
      try:
        taken = json.loads(aside.read_text())
      except (OSError, ValueError):
        taken = {}
      if holder and taken.get("token") != holder.get("token"):
        os.rename(os.fspath(aside), os.fspath(self.path))  # a fresh lock appeared meanwhile: put it back
        return
      aside.unlink()
    else:
      current = self.read()
      if current is not None and current.get("token") == holder.get("token"):
        self.path.unlink()

  def _start_heartbeat(self) -> None:
    def beat():
      while not self._stop.wait(self._heartbeat_s):
        try:
          current = self.read()
          if current is None or current.get("token") != self._token:
            logging.error("The lock %s no longer names this run (%s); another run may be writing %s.", self.path,
                          describe(current or {}), self.workdir)
            return
          self._holder["heartbeat"] = time.time()
          self._write(self._holder)
        except Exception as e:  # pylint: disable=broad-except
          logging.warning("Could not refresh the lock %s: %s", self.path, e)

    self._thread = threading.Thread(target=beat, name="workdir-lock-heartbeat", daemon=True)
    self._thread.start()

  def release(self) -> None:
    if self._token not in _held_tokens:
      return
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=10)
    _held_tokens.discard(self._token)
    try:
      current = self.read()
      if current is not None and current.get("token") == self._token:
        self.path.unlink()
    except OSError as e:
      logging.warning("Could not remove the lock %s: %s", self.path, e)

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


@contextlib.contextmanager
def hold(workdir, *, mode: str):
  """The workdir's lock for a whole run; in multi-process jobs process 0 takes it and every process agrees."""
  import jax  # pylint: disable=g-import-not-at-top
  lock, failure = None, None
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock(workdir, mode=mode).acquire()
    except WorkdirLockedError as e:
      failure = e
  if jax.process_count() > 1:
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    refused = int(np.asarray(multihost_utils.broadcast_one_to_all(np.int32(failure is not None))))
    if refused and failure is None:
      failure = WorkdirLockedError(f"{workdir} is in use by another run; process 0's log names it.")
  if failure is not None:
    raise failure
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()
