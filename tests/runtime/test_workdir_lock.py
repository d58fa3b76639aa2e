"""One writer per workdir: a second run is refused naming the holder, a dead run's lock is recovered.
"""
import json
import logging
import os
import signal
import socket
import time

import eval_testing
import lock_racing
import pytest
import train_testing

from dtm_jax.runner import run as runner
from dtm_jax.runtime import workdir_lock


@pytest.mark.slow
def test_a_second_run_on_a_locked_workdir_is_refused_naming_the_holder(tmp_path):
  workdir = tmp_path / "run"
  holder = train_testing.hold_lock(workdir)
  try:
    with pytest.raises(workdir_lock.WorkdirLockedError) as error:
      runner.run("pretrain", train_testing.long_tiny_config(stop_after_step=2), str(workdir))
    message = str(error.value)
    assert socket.gethostname() in message and f"pid {holder.pid}" in message and "started" in message
    assert not (workdir / "checkpoints").exists() and not (workdir / "metrics.jsonl").exists()
    for mode, config in eval_testing.eval_configs(tmp_path).items():  # every mode takes the lock, kNN included
      with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {holder.pid}"):
        runner.run(mode, config, str(workdir))
  finally:
    holder.kill()
    holder.wait()


@pytest.mark.slow
def test_a_stale_lock_left_by_kill_9_is_recovered(tmp_path, caplog):
  workdir = tmp_path / "run"
  holder = train_testing.hold_lock(workdir)
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  assert (workdir / workdir_lock.LOCK_FILE).exists()
  with caplog.at_level(logging.WARNING):
    result = runner.run("pretrain", train_testing.long_tiny_config(stop_after_step=2), str(workdir))
  assert result["step"] == 2
  assert "stale" in caplog.text and str(holder.pid) in caplog.text
  assert not (workdir / workdir_lock.LOCK_FILE).exists()  # released at the end of the run


def test_stale_lock_rule_for_other_hosts(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  now = time.time()
  holder = {"host": "some-other-host", "pid": 12345, "start_time": now - 3600, "heartbeat": now - 5,
            "token": "abc", "mode": "pretrain"}
  (workdir / workdir_lock.LOCK_FILE).write_text(json.dumps(holder))
  with pytest.raises(workdir_lock.WorkdirLockedError, match="some-other-host.*pid 12345"):
    workdir_lock.WorkdirLock(workdir).acquire()
  holder["heartbeat"] = now - workdir_lock.STALE_AFTER_S - 60  # no heartbeat for longer than the rule allows
  (workdir / workdir_lock.LOCK_FILE).write_text(json.dumps(holder))
  lock = workdir_lock.WorkdirLock(workdir).acquire()
  assert json.loads((workdir / workdir_lock.LOCK_FILE).read_text())["pid"] == os.getpid()
  lock.release()
  assert not (workdir / workdir_lock.LOCK_FILE).exists()


def test_a_directory_in_place_of_the_lock_file_is_one_clear_refusal(tmp_path):
  workdir = tmp_path / "run"
  (workdir / workdir_lock.LOCK_FILE).mkdir(parents=True)
  with pytest.raises(workdir_lock.WorkdirLockedError, match=r"is a directory.*rm -r"):
    workdir_lock.WorkdirLock(workdir).acquire()
  assert (workdir / workdir_lock.LOCK_FILE).is_dir() and os.listdir(workdir) == [workdir_lock.LOCK_FILE]


@pytest.mark.parametrize("content", [b"", b"\xff\xfe\x00 not text", b'{"host": "half a fi'])
def test_an_unreadable_lock_file_is_replaced_once_it_stayed_unreadable_for_the_grace_period(tmp_path, caplog, content):
  workdir = tmp_path / "run"
  workdir.mkdir()
  path = workdir / workdir_lock.LOCK_FILE
  path.write_bytes(content)
  started = time.time()
  with caplog.at_level(logging.WARNING):
    lock = workdir_lock.WorkdirLock(workdir, unreadable_grace_s=0.5).acquire()
  assert time.time() - started >= 0.4  # it waited: a writer might have been mid-write
  assert "unreadable" in caplog.text and json.loads(path.read_text())["pid"] == os.getpid()
  lock.release()


def test_a_heartbeat_far_in_the_future_counts_as_stale():
  now = time.time()
  holder = {"host": "some-other-host", "pid": 1, "heartbeat": now + 2 * workdir_lock.STALE_AFTER_S}
  assert "future" in workdir_lock.stale_reason(holder, now=now)
  assert workdir_lock.stale_reason({**holder, "heartbeat": now + 5}, now=now) is None


def test_a_run_whose_lock_is_taken_over_stops_naming_the_other_holder(tmp_path):
  workdir = tmp_path / "run"
  lock = workdir_lock.WorkdirLock(workdir, heartbeat_s=0.05).acquire()
  try:
    workdir_lock.raise_if_taken_over()  # ours: nothing to say
    other = {"host": "some-other-host", "pid": 4242, "start_time": time.time(), "heartbeat": time.time(),
             "token": "theirs", "mode": "finetune"}
    (workdir / workdir_lock.LOCK_FILE).write_text(json.dumps(other))
    lock_racing.wait_for_takeover_notice("some-other-host", 4242, timeout_s=5)
  finally:
    lock.release()
  workdir_lock.raise_if_taken_over()  # released: nothing held, nothing to report


def _unwritable_workdirs(tmp_path):
  """A path below a regular file (cannot be created by anyone) and an existing directory of sysfs (root included)."""
  (tmp_path / "a_file").write_text("not a directory")
  return {"below a file": tmp_path / "a_file" / "run", "read-only": "/sys/kernel"}


@pytest.mark.parametrize("case", ["below a file", "read-only"])
def test_a_workdir_that_cannot_be_written_is_one_clear_refusal(tmp_path, case):
  workdir = _unwritable_workdirs(tmp_path)[case]
  assert case != "read-only" or os.path.isdir("/sys/kernel"), "no sysfs here: pick another read-only directory"
  with pytest.raises(workdir_lock.WorkdirUnwritableError, match=r"Cannot write the workdir") as error:
    with workdir_lock.hold(workdir, mode="pretrain"):
      pass
  assert str(workdir) in str(error.value) and "--workdir" in str(error.value)


@pytest.mark.slow
def test_a_run_on_an_unwritable_workdir_ends_with_one_line_naming_it(tmp_path):
  workdir = _unwritable_workdirs(tmp_path)["below a file"]
  done = train_testing.subprocess.run(train_testing.main_command(workdir), env=train_testing.main_env(),
                                      capture_output=True, text=True, timeout=300)
  assert done.returncode == 1, done.stderr[-3000:]
  last = done.stderr.strip().splitlines()[-1]
  assert last.startswith("Error: Cannot write the workdir") and str(workdir) in last, done.stderr[-3000:]
  assert "Traceback" not in done.stderr
