"""A race harness for the workdir lock: PROCESSES workers (spawned once, so no forked copy of a multithreaded JAX
process) take the lock of a fresh workdir at the same instant, trial after trial; a worker that got it holds it until
every worker has tried, so the number that got it is the number of holders at once (1 in every trial, or the lock
failed). The root may be local or gs:// (an epath.Path; `prepare` then points each worker's epath at the emulator).
"""
import multiprocessing
import time

PROCESSES = 8


def _worker(root, trials, start, done, results, prepare, lock_options):
  from dtm_jax.runtime import workdir_lock  # pylint: disable=g-import-not-at-top  # in the spawned process
  if prepare is not None:
    prepare()
  for trial in range(trials):
    start.wait()
    try:
      lock = workdir_lock.WorkdirLock(f"{root}/t{trial}", heartbeat_s=3600, **lock_options).acquire()
    except workdir_lock.WorkdirLockedError:
      lock = None
    results.put(lock is not None)
    done.wait()  # every worker has tried
    if lock is not None:
      lock.release()


def run_trials(root, trials, setup, *, prepare=None, lock_options=None) -> list[int]:
  """The number of holders in each of `trials` races. `setup(workdir)` prepares each trial's workdir (a leftover lock
  file, say) before the race; each worker calls `prepare()` (picklable) once before its first trial and passes
  `lock_options` to WorkdirLock."""
  context = multiprocessing.get_context("spawn")
  start, done = context.Barrier(PROCESSES + 1, timeout=120), context.Barrier(PROCESSES + 1, timeout=120)
  results = context.Queue()
  args = (str(root), trials, start, done, results, prepare, lock_options or {})
  workers = [context.Process(target=_worker, args=args, daemon=True) for _ in range(PROCESSES)]
  for worker in workers:
    worker.start()
  holders = []
  try:
    for trial in range(trials):
      workdir = root / f"t{trial}"
      workdir.mkdir(parents=True)
      setup(workdir)
      start.wait()
      holders.append(sum(results.get(timeout=120) for _ in workers))
      done.wait()
  finally:
    for worker in workers:
      worker.join(timeout=30)
      if worker.is_alive():
        worker.kill()
  return holders


def summary(holders: list[int]) -> str:
  """'N trials of P processes: holders 1 in A, 0 in B, more than 1 in C' (for assertion messages and reports)."""
  return (f"{len(holders)} trials of {PROCESSES} processes: 1 holder in {holders.count(1)}, none in "
          f"{holders.count(0)}, more than 1 in {sum(h > 1 for h in holders)} (at most {max(holders, default=0)})")


SLOW_WRITE_S = 2.5


def slow_gcs_writers():
  """For a gs:// race (a worker's `prepare`): epath through gcsfs (as `gcs_emulator.use_fsspec_for_gs`), and each
  write of a lock record reaches the bucket SLOW_WRITE_S late with probability 1/2: a run stalled between looking at
  the lock and writing it (a pause, a network retry). Both clients a lock may write with are slowed: epath's
  write_text and google-cloud-storage's upload."""
  import random  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top

  import gcs_emulator  # pylint: disable=g-import-not-at-top
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top
  from google.cloud import storage  # pylint: disable=g-import-not-at-top
  gcs_emulator.use_fsspec_for_gs()

  def slowed(write):
    def maybe_late(*args, **kwargs):
      if random.random() < 0.5:
        time.sleep(SLOW_WRITE_S)
      return write(*args, **kwargs)
    return maybe_late

  gpath.PosixGPath.write_text = slowed(gpath.PosixGPath.write_text)
  storage.Blob.upload_from_string = slowed(storage.Blob.upload_from_string)


def wait_for_takeover_notice(other_host: str, other_pid: int, timeout_s: float) -> None:
  """Waits until this process's heartbeat reports its lock taken over by (other_host, other_pid); fails if it does not
  within timeout_s."""
  import pytest  # pylint: disable=g-import-not-at-top  # not in the spawned workers
  from dtm_jax.runtime import workdir_lock  # pylint: disable=g-import-not-at-top
  deadline = time.time() + timeout_s
  while time.time() < deadline:
    try:
      workdir_lock.raise_if_taken_over()
    except workdir_lock.WorkdirLockedError as error:
      assert "taken over" in str(error) and other_host in str(error) and f"pid {other_pid}" in str(error)
      return
    time.sleep(0.05)
  pytest.fail("the takeover was not noticed")
