"""The workdir lock under races: processes taking it in the same instant hold it one at a time, on a fresh workdir,
beside a crashed run's empty lock file and beside a dead run's lock (harness: tests/lock_racing.py)."""
import json
import os
import socket
import subprocess
import time

import lock_racing
import pytest

from dtm_jax.runtime import workdir_lock

TRIALS = 200  # per starting state: a race of 1% shows in at least one trial with probability 1 − 0.99^200 ≈ 87%


def _fresh(workdir):
  del workdir


def _empty_lock_file(workdir):
  """A crashed run's empty lock.json (written a minute ago)."""
  path = workdir / workdir_lock.LOCK_FILE
  path.write_text("")
  os.utime(path, (time.time() - 60, time.time() - 60))


def _dead_runs_lock(workdir):
  dead = subprocess.Popen(["true"])
  dead.wait()
  now = time.time()
  holder = {"host": socket.gethostname(), "pid": dead.pid, "start_time": now - 60, "heartbeat": now - 1,
            "token": "dead", "mode": "pretrain"}
  (workdir / workdir_lock.LOCK_FILE).write_text(json.dumps(holder))


@pytest.mark.slow
@pytest.mark.parametrize("setup", [_fresh, _empty_lock_file, _dead_runs_lock], ids=["fresh", "empty", "dead"])
def test_processes_racing_for_a_workdir_hold_it_one_at_a_time(tmp_path, setup):
  holders = lock_racing.run_trials(tmp_path, TRIALS, setup)
  assert holders == [1] * TRIALS, lock_racing.summary(holders)
