"""One writer per workdir: an OS file lock held for the whole run, and a record of its holder.

On a local (or NFS) workdir the lock is the kernel's: `<workdir>/lock.json.flock` is locked exclusively with
`filelock` (flock) for the whole run, so two runs that start in the same instant cannot both take it, and the kernel
releases it when its holder dies (kill -9, crash) — nothing to time out. `<workdir>/lock.json` names the holder
(host, pid, start time, mode, a random token, the time of its last heartbeat); it is written whole under a temporary
name and renamed into place, so a reader never sees it half-written. A run that cannot take the OS lock refuses and
names the holder from lock.json.

The record also covers what the OS lock may not see: a holder on another host of a filesystem whose locks do not
reach this one. While our OS lock is held, a lock.json that names a live holder on another host (heartbeat within
STALE_AFTER_S; a live run refreshes it every HEARTBEAT_S) is respected: the run refuses. A record of this host is
stale (its holder's OS lock is gone), and so is one whose heartbeat is older than STALE_AFTER_S, or one that cannot be
read (other bytes, half a file from an old version) once it has stayed so for UNREADABLE_GRACE_S; a stale record is
replaced with a warning naming its former holder. A lock.json that is a directory is refused with what to remove.

On `gs://` there is no OS lock; lock.json is read and written with the GCS client (google-cloud-storage) and every
change is conditional on the record's generation (GCS request preconditions, `_GcsRecord`): a run creates the record
only if there is none (ifGenerationMatch=0) and replaces a stale one only if it is still the generation it judged, so
of runs starting in the same instant exactly one takes the lock and the others judge its record and refuse. An
unreadable record there is stale at once (a GCS object appears whole or not at all). The heartbeat writes only if the
record is still the generation this run last wrote, and release deletes it only then: a run never overwrites or
removes a record another run wrote. Tests: tests/runtime/test_workdir_lock_gcs.py (a GCS emulator that answers
preconditions as GCS does). Other object stores (s3://, az://, hf://: epath offers no conditional write) are refused.

On every kind of path the heartbeat checks that the record still names this run; a run whose lock was taken over
stops before its next step (`raise_if_taken_over`, asked by the training loop) with a message naming the other holder.

In a multi-process job only process 0 takes the lock; the others wait for its verdict and refuse together with it.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import socket
import threading
import time
import types
import uuid

import filelock
from absl import logging
from etils import epath

from dtm_jax.runtime import errors

LOCK_FILE = "lock.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0
UNREADABLE_GRACE_S = 5.0
_held_tokens: set[str] = set()  # locks this process holds now
_taken_over: dict[str, str] = {}  # token -> why: locks of this process that another run took


class WorkdirLockedError(errors.RunError):
  """Another run holds the workdir (or its lock file cannot be used)."""


class WorkdirUnwritableError(errors.RunError):
  """The workdir cannot be created or written by this user."""


def _is_local(path: epath.Path) -> bool:
  return "://" not in str(path)


def _is_gcs(path: epath.Path) -> bool:
  return str(path).startswith("gs://")


@functools.cache
def _gcs_client() -> types.SimpleNamespace:
  """google-cloud-storage and its exceptions, imported by the first gs:// lock only: importing them costs every run
  0.2–0.5 s of start-up, gs:// or not."""
  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  from google.api_core import exceptions as api_exceptions
  from google.auth import exceptions as auth_exceptions
  from google.cloud import storage
  return types.SimpleNamespace(storage=storage, api=api_exceptions, auth=auth_exceptions)


@contextlib.contextmanager
def _gcs_errors_as_os_errors(uri: str):
  """Other GCS failures (permissions, credentials, a missing bucket) as OSError, which `hold` reports in one line."""
  gcs = _gcs_client()
  try:
    yield
  except (gcs.api.GoogleAPICallError, gcs.auth.GoogleAuthError) as e:
    raise OSError(f"{uri}: {e}") from e


class _GcsRecord:
  """One object on GCS, read with its generation and written or deleted only if its generation is still the one
  given (GCS request preconditions: https://cloud.google.com/storage/docs/request-preconditions). Generation 0 means
  "no such object", so a write against 0 creates it only if nobody did. GCS applies the check and the write as one
  step and answers 412 when the check fails, so each change of the record is a compare-and-swap."""

  def __init__(self, uri: str):
    self.uri = uri
    bucket, _, self._name = uri[len("gs://"):].partition("/")
    with _gcs_errors_as_os_errors(uri):
      # No project: objects are read and written by bucket name. Credentials: Application Default Credentials (on
      # TPU VMs the metadata server); with STORAGE_EMULATOR_HOST set (tests) the client goes there anonymously.
      self._bucket = _gcs_client().storage.Client(project=None).bucket(bucket)
    self._errors = _gcs_client().api

  def read(self) -> tuple[bytes, int] | None:
    """The object's bytes and their generation (from one response), or None if there is none."""
    blob = self._bucket.blob(self._name)
    with _gcs_errors_as_os_errors(self.uri):
      try:
        data = blob.download_as_bytes()
      except self._errors.NotFound:
        return None
    if blob.generation is None:  # a write conditional on None would be unconditional
      raise OSError(f"{self.uri}: the storage server sent no generation with the object")
    return data, blob.generation

  def write(self, text: str, generation: int) -> int | None:
    """Writes `text` if the object's generation is still `generation` (0: if there is no object); the new generation,
    or None when it had changed."""
    blob = self._bucket.blob(self._name)
    with _gcs_errors_as_os_errors(self.uri):
      try:
        blob.upload_from_string(text, content_type="application/json", if_generation_match=generation)
      except self._errors.PreconditionFailed:
        return None
    return blob.generation

  def delete(self, generation: int) -> bool:
    """Deletes the object if its generation is still `generation`; False when it changed or is gone."""
    with _gcs_errors_as_os_errors(self.uri):
      try:
        self._bucket.blob(self._name).delete(if_generation_match=generation)
      except (self._errors.PreconditionFailed, self._errors.NotFound):
        return False
    return True


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


def _when(seconds) -> str:
  if not isinstance(seconds, (int, float)):
    return "?"
  return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def describe(holder: dict) -> str:
  return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, {holder.get('mode', 'a run')} started "
          f"{_when(holder.get('start_time'))}, last heartbeat {_when(holder.get('heartbeat'))}")


def stale_reason(holder: dict, *, now: float | None = None, stale_after_s: float = STALE_AFTER_S) -> str | None:
  """Why the record `holder` is stale, or None if its run may still be alive (see the module docstring)."""
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
  if heartbeat - now > stale_after_s:  # a clock far ahead wrote it: its age cannot be told, so it counts as stale
    return f"its heartbeat lies {heartbeat - now:.0f} s in the future (a skewed clock)"
  return None


def _parse_record(data: bytes) -> dict:
  """The holder in a record's bytes; {} when they are not a JSON object (other bytes, half a file)."""
  try:
    holder = json.loads(data.decode("utf-8"))
  except ValueError:  # UnicodeDecodeError included
    return {}
  return holder if isinstance(holder, dict) else {}


def raise_if_taken_over() -> None:
  """WorkdirLockedError if another run took a lock this process holds (the training loop asks before each step)."""
  if _taken_over:
    raise WorkdirLockedError(next(iter(_taken_over.values())))


class WorkdirLock:
  """The lock of one workdir (process-local; see `hold` for multi-process jobs)."""

  def __init__(self, workdir, *, mode: str = "pretrain", heartbeat_s: float = HEARTBEAT_S,
               stale_after_s: float = STALE_AFTER_S, unreadable_grace_s: float = UNREADABLE_GRACE_S):
    self.workdir = epath.Path(workdir)
    self.path = self.workdir / LOCK_FILE
    self.mode = mode
    self._heartbeat_s = heartbeat_s
    self._stale_after_s = stale_after_s
    self._grace_s = unreadable_grace_s
    self._token = uuid.uuid4().hex
    self._holder = None
    self._os_lock = None
    if not _is_local(self.path) and not _is_gcs(self.path):
      raise WorkdirLockedError(
          f"{self.workdir}: the workdir lock works on local (or NFS) paths and on gs://, where writes can be made "
          "conditional; through etils.epath this store has no conditional write. Use a local path or gs://.")
    self._gcs = _GcsRecord(str(self.path)) if _is_gcs(self.path) else None
    self._generation = None  # gs://: the generation of our record, the one our next write or delete must find
    self._stop = threading.Event()
    self._thread = None

  # --- Reading and writing the record.
  def read(self) -> dict | None:
    """The holder recorded in lock.json; {} when it exists but cannot be parsed; None when there is none."""
    return self._read()[0]

  def _read(self) -> tuple[dict | None, int | None]:
    """`read`'s holder and, on gs://, the generation of the record it came from (0 when there is none)."""
    if self._gcs is not None:
      found = self._gcs.read()
      return (None, 0) if found is None else (_parse_record(found[0]), found[1])
    try:
      data = self.path.read_bytes()
    except FileNotFoundError:
      return None, None
    except OSError:
      return ({} if self.path.is_file() else self._refuse_odd_file()), None
    return _parse_record(data), None

  def _refuse_odd_file(self):
    kind = "a directory" if self.path.is_dir() else "not a readable file"
    raise WorkdirLockedError(
        f"{self.path} is {kind}, so this workdir's lock cannot be taken. If no run uses {self.workdir}, remove it "
        f"(rm -r {self.path}) and rerun.")

  def _write(self, holder: dict, generation: int | None) -> bool:
    """The whole record at once. Locally: written under a temporary name, then renamed into place (atomic; the OS
    lock keeps other writers out), always True. On gs://: only if the record is still at `generation` (0: absent);
    False when another run changed it meanwhile."""
    text = json.dumps(holder)
    if self._gcs is not None:
      written = self._gcs.write(text, generation)
      if written is None:
        return False
      self._generation = written
      return True
    tmp = self.path.parent / f".{LOCK_FILE}.{self._token}.tmp"
    tmp.write_text(text)
    os.replace(os.fspath(tmp), os.fspath(self.path))
    return True

  # --- Taking and giving back.
  def acquire(self) -> "WorkdirLock":
    """Takes the lock or raises WorkdirLockedError naming the holder; replaces a stale record with a warning."""
    self.workdir.mkdir(parents=True, exist_ok=True)
    if self.path.is_dir():
      self._refuse_odd_file()
    now = time.time()
    self._holder = {"host": socket.gethostname(), "pid": os.getpid(), "start_time": now, "heartbeat": now,
                    "mode": self.mode, "token": self._token, "workdir": str(self.workdir)}
    if _is_local(self.path):
      self._take_os_lock()
    try:
      self._take_record()
    except BaseException:
      self._drop_os_lock()
      raise
    _held_tokens.add(self._token)
    self._start_heartbeat()
    return self

  def _take_os_lock(self) -> None:
    self._os_lock = filelock.FileLock(os.fspath(self.path) + ".flock", timeout=0)
    try:
      self._os_lock.acquire()
    except filelock.Timeout:
      self._os_lock = None
      holder = self.read() or {}
      raise WorkdirLockedError(
          f"{self.workdir} is in use by another run ({describe(holder)}; lock file {self.path}). Only one run may "
          "write a workdir: wait for that run to end, or use another --workdir.") from None

  def _drop_os_lock(self) -> None:
    if self._os_lock is not None:
      self._os_lock.release()
      self._os_lock = None

  def _take_record(self) -> None:
    """Writes our record unless a live holder's is there. On gs:// every write is conditional on the generation just
    judged, so of runs that judged the same record only one replaces it; the others judge the new one."""
    local = self._gcs is None
    while True:
      holder, generation = self._read()
      if holder is None:
        if self._write(self._holder, generation):
          return
        continue
      if holder.get("token") == self._token:  # gs://: our write landed, but its answer was lost and the retry failed
        self._generation = generation
        return
      reason = stale_reason(holder, stale_after_s=self._stale_after_s)
      if reason == "the lock file is unreadable" and local:
        # A writer on another host (or of an older version) may be mid-write: unreadable counts as stale only once
        # it has stayed so for the grace period. (A GCS object appears whole or not at all: stale at once.)
        wait = self._grace_s - self._age()
        if wait > 0:
          time.sleep(min(wait, 0.5))
          continue
      if reason is None and not (local and holder.get("host") == socket.gethostname()):
        raise WorkdirLockedError(
            f"{self.workdir} is in use by another run ({describe(holder)}; lock file {self.path}). Only one run may "
            "write a workdir: wait for that run to end, or use another --workdir. If that run is dead (its host "
            f"cannot be checked from here), the lock counts as stale {self._stale_after_s / 60:.0f} minutes after "
            "its last heartbeat, or delete the lock file.")
      if reason is None:  # this host, and we hold the OS lock: its holder is gone
        reason = "its holder no longer holds the workdir's OS lock"
      if self._write(self._holder, generation):
        logging.warning("Replaced the stale lock of %s (%s): %s.", self.workdir, describe(holder), reason)
        return

  def _age(self) -> float:
    """Seconds since lock.json was last written (local files)."""
    try:
      return time.time() - os.stat(os.fspath(self.path)).st_mtime
    except OSError:
      return float("inf")

  def _beat(self) -> dict | None:
    """Refreshes our record's heartbeat; returns the record found instead of ours if another run took the lock.
    Locally the record is read first (no conditional write). On gs:// the write is conditional on our record's
    generation: it fails if anyone wrote since, and only then is the record read."""
    if self._gcs is None:
      current = self.read()
      if current is None or current.get("token") != self._token:
        return current or {}
    self._holder["heartbeat"] = time.time()
    if self._write(self._holder, self._generation):
      return None
    current, generation = self._read()
    if current is not None and current.get("token") == self._token:  # our earlier write's answer was lost
      self._generation = generation
      return None
    return current or {}

  def _start_heartbeat(self) -> None:
    def beat():
      while not self._stop.wait(self._heartbeat_s):
        try:
          other = self._beat()
          if other is not None:
            why = (f"The lock {self.path} of this run was taken over by another run ({describe(other)}); "
                   f"two runs may be writing {self.workdir}. This run stops; check which run should own it.")
            logging.error("%s", why)
            _taken_over[self._token] = why
            return
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
    _taken_over.pop(self._token, None)
    try:
      if self._gcs is not None:
        if not self._gcs.delete(self._generation):  # only our own record: as we last wrote it
          logging.warning("Left the lock %s in place: it is no longer this run's record.", self.path)
      else:
        current = self.read()
        if current is not None and current.get("token") == self._token:
          self.path.unlink()
    except (OSError, WorkdirLockedError) as e:
      logging.warning("Could not remove the lock %s: %s", self.path, e)
    finally:
      self._drop_os_lock()

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
    except OSError as e:  # not creatable or not writable: read-only filesystem, permissions, a file in the path
      failure = WorkdirUnwritableError(f"Cannot write the workdir {workdir}: {e.strerror or e}. Choose a --workdir "
                                       "this user can create and write (a local path or gs://).")
  if jax.process_count() > 1:
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    refused = int(np.asarray(multihost_utils.broadcast_one_to_all(np.int32(failure is not None))))
    if refused and failure is None:
      failure = WorkdirLockedError(f"Process 0 could not take the lock of {workdir}; its log says why.")
  if failure is not None:
    raise failure
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()
