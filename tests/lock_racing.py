"""A race harness for the workdir lock: PROCESSES workers (spawned once, so no forked copy of a multithreaded JAX
process) take the lock of a fresh workdir at the same instant, trial after trial, and report how many held it at once.
"""
import multiprocessing
import time

PROCESSES = 8


def _worker(root, trials, start, done, holding, results):
  from dtm_jax.runtime import workdir_lock  # pylint: disable=g-import-not-at-top  # in the spawned process
  for trial in range(trials):
    start.wait()
    try:
      lock = workdir_lock.WorkdirLock(f"{root}/t{trial}", heartbeat_s=3600).acquire()
    except workdir_lock.WorkdirLockedError:
      results.put("refused")
    else:
      with holding.get_lock():
        holding.value += 1
        at_once = holding.value
      time.sleep(0.05)  # every contender has tried by now
      with holding.get_lock():
        holding.value -= 1
      lock.release()
      results.put(at_once)
    done.wait()


def run_trials(root, trials, setup):
  """(trials in which more than one process held the lock at once, total acquisitions) over `trials` races;
  `setup(workdir)` prepares each trial's workdir (a leftover lock file, say) before the race."""
  context = multiprocessing.get_context("spawn")
  start, done = context.Barrier(PROCESSES + 1, timeout=120), context.Barrier(PROCESSES + 1, timeout=120)
  holding, results = context.Value("i", 0), context.Queue()
  workers = [context.Process(target=_worker, args=(str(root), trials, start, done, holding, results), daemon=True)
             for _ in range(PROCESSES)]
  for worker in workers:
    worker.start()
  double, held = 0, 0
  try:
    for trial in range(trials):
      workdir = root / f"t{trial}"
      workdir.mkdir()
      setup(workdir)
      start.wait()
      outcomes = [results.get(timeout=120) for _ in workers]
      done.wait()
      counts = [o for o in outcomes if o != "refused"]
      double += any(count > 1 for count in counts)
      held += len(counts)
  finally:
    for worker in workers:
      worker.join(timeout=30)
      if worker.is_alive():
        worker.kill()
  return double, held
