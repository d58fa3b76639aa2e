"""The workdir lock under races: processes (fork) taking it in the same instant hold it one at a time, on a fresh
workdir, beside a crashed run's empty lock file and beside a dead run's lock."""
import json
import multiprocessing
import os
import time

import pytest

from dtm_jax.runtime import workdir_lock

PROCESSES = 8
TRIALS = 200  # per starting state: a race of 1% shows in at least one trial with probability 1 − 0.99^200 ≈ 87%


def _contend(workdir, barrier, holding, results, index):
  """Takes the lock after the barrier; while holding it, counts the holders at that moment."""
  barrier.wait()
  try:
    lock = workdir_lock.WorkdirLock(workdir, heartbeat_s=3600).acquire()
  except workdir_lock.WorkdirLockedError:
    results.put((index, "refused", 0))
    return
  with holding.get_lock():
    holding.value += 1
    at_once = holding.value
  time.sleep(0.05)  # every contender has tried by now
  with holding.get_lock():
    holding.value -= 1
  lock.release()
  results.put((index, "held", at_once))


def run_trials(root, trials, setup):
  """(trials in which more than one process held the lock at once, total acquisitions) over `trials` races."""
  context = multiprocessing.get_context("fork")
  double, held = 0, 0
  for trial in range(trials):
    workdir = root / f"t{trial}"
    workdir.mkdir()
    setup(workdir)
    barrier, holding, results = context.Barrier(PROCESSES), context.Value("i", 0), context.Queue()
    procs = [context.Process(target=_contend, args=(str(workdir), barrier, holding, results, i))
             for i in range(PROCESSES)]
    for p in procs:
      p.start()
    outcomes = [results.get(timeout=60) for _ in procs]
    for p in procs:
      p.join(timeout=60)
    double += any(at_once > 1 for _, kind, at_once in outcomes if kind == "held")
    held += sum(kind == "held" for _, kind, _ in outcomes)
  return double, held


def _dead_pid():
  pid = os.fork()
  if pid == 0:
    os._exit(0)  # pylint: disable=protected-access
  os.waitpid(pid, 0)
  return pid


def _fresh(workdir):
  del workdir


def _empty_lock_file(workdir):
  """A crashed run's empty lock.json (written a minute ago)."""
  path = workdir / workdir_lock.LOCK_FILE
  path.write_text("")
  os.utime(path, (time.time() - 60, time.time() - 60))


def _dead_runs_lock(workdir):
  now = time.time()
  holder = {"host": os.uname().nodename, "pid": _dead_pid(), "start_time": now - 60, "heartbeat": now - 1,
            "token": "dead", "mode": "pretrain"}
  (workdir / workdir_lock.LOCK_FILE).write_text(json.dumps(holder))


@pytest.mark.slow
@pytest.mark.parametrize("setup", [_fresh, _empty_lock_file, _dead_runs_lock], ids=["fresh", "empty", "dead"])
def test_processes_racing_for_a_workdir_hold_it_one_at_a_time(tmp_path, setup):
  double, held = run_trials(tmp_path, TRIALS, setup)
  assert double == 0, f"{double} of {TRIALS} trials had two holders at once"
  assert held >= TRIALS  # somebody got it every time

