"""The workdir lock on gs:// against the GCS emulator (tests/gcs_emulator.py, which answers generation preconditions as
GCS does): processes taking it in the same instant hold it one at a time (fresh workdir, a dead run's record, an
unreadable record; harness: tests/lock_racing.py), a holder whose record another run replaced stops, release removes
only our own record.
"""
import json
import logging
import os
import socket
import subprocess
import time

import gcs_emulator
import lock_racing
import pytest
from etils import epath
from google.api_core import exceptions as api_exceptions
from google.cloud import storage

from dtm_jax.runtime import workdir_lock

pytestmark = pytest.mark.gcs

BUCKET = gcs_emulator.BUCKET
STATES = 3  # starting states, taken in turn by the trials of one pool of workers (one spawn for all)
TRIALS = 10 * STATES
LATE_TRIALS = 6


def _starting_state(workdir):
  """Trial t starts fresh (t % 3 == 0), beside a dead run's record (1), or beside an unreadable record (2)."""
  state = int(workdir.name[1:]) % STATES
  record = workdir / workdir_lock.LOCK_FILE
  if state == 1:
    dead = subprocess.Popen(["true"])
    dead.wait()
    now = time.time()
    record.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "start_time": now - 60,
                                  "heartbeat": now - 1, "token": "dead", "mode": "pretrain"}))
  elif state == 2:
    record.write_text('{"host": "half a fi')


@pytest.mark.slow
def test_processes_racing_for_a_gcs_workdir_hold_it_one_at_a_time(gcs):
  del gcs
  started = time.time()
  holders = lock_racing.run_trials(epath.Path(f"gs://{BUCKET}/races/same_instant"), TRIALS, _starting_state,
                                   prepare=gcs_emulator.use_fsspec_for_gs)
  by_state = {name: lock_racing.summary(holders[i::STATES]) for i, name in enumerate(("fresh", "dead", "unreadable"))}
  print(f"{by_state}; {time.time() - started:.0f} s")
  assert holders == [1] * TRIALS, by_state


@pytest.mark.slow
def test_a_run_that_writes_late_cannot_take_a_gcs_lock_another_run_took_meanwhile(gcs):
  """Half the writes reach the bucket 2.5 s late: longer than the read-back pause (2 s) of the lock before it used
  generations, whose late writers then held the lock beside the first (2 holders in 4 of these 6 trials)."""
  del gcs
  started = time.time()
  holders = lock_racing.run_trials(epath.Path(f"gs://{BUCKET}/races/late"), LATE_TRIALS, lambda workdir: None,
                                   prepare=lock_racing.slow_gcs_writers)
  print(f"late writers: {lock_racing.summary(holders)}; {time.time() - started:.0f} s")
  assert holders == [1] * LATE_TRIALS, lock_racing.summary(holders)


def _blob(name):
  return storage.Client(project=None).bucket(BUCKET).blob(name)


def test_the_emulator_answers_generation_preconditions_as_gcs_does(gcs):
  del gcs
  blob = _blob("preconditions/object")
  blob.upload_from_string("first", if_generation_match=0)  # absent: created
  first = blob.generation
  with pytest.raises(api_exceptions.PreconditionFailed):
    _blob("preconditions/object").upload_from_string("again", if_generation_match=0)  # exists now
  with pytest.raises(api_exceptions.PreconditionFailed):
    _blob("preconditions/object").upload_from_string("stale", if_generation_match=first + 1)
  blob.upload_from_string("second", if_generation_match=first)  # the generation it has: written
  assert blob.generation != first
  with pytest.raises(api_exceptions.PreconditionFailed):
    _blob("preconditions/object").download_as_bytes(if_generation_match=first)
  with pytest.raises(api_exceptions.PreconditionFailed):
    _blob("preconditions/object").delete(if_generation_match=first)
  reader = _blob("preconditions/object")
  assert reader.download_as_bytes(if_generation_match=blob.generation) == b"second"
  assert reader.generation == blob.generation  # read with its generation (x-goog-generation)
  with pytest.raises(api_exceptions.PreconditionFailed):
    _blob("preconditions/object").upload_from_string("other", if_generation_not_match=blob.generation)
  _blob("preconditions/object").delete(if_generation_match=blob.generation)
  with pytest.raises(api_exceptions.NotFound):
    _blob("preconditions/object").delete(if_generation_match=blob.generation)  # absent: 404, as GCS answers
  with pytest.raises(api_exceptions.PreconditionFailed):
    _blob("preconditions/absent").upload_from_string("x", if_generation_match=123)


def _other_run(now):
  return {"host": "some-other-host", "pid": 4242, "start_time": now, "heartbeat": now, "token": "theirs",
          "mode": "finetune"}


def test_a_live_holders_gcs_record_is_respected_and_a_stale_one_replaced(gcs, caplog):
  del gcs
  workdir = f"gs://{BUCKET}/respected"
  record = epath.Path(workdir) / workdir_lock.LOCK_FILE
  record.write_text(json.dumps(_other_run(time.time())))
  with pytest.raises(workdir_lock.WorkdirLockedError, match="some-other-host.*pid 4242"):
    workdir_lock.WorkdirLock(workdir).acquire()
  record.write_text(json.dumps(_other_run(time.time() - workdir_lock.STALE_AFTER_S - 60)))
  with caplog.at_level(logging.WARNING):
    lock = workdir_lock.WorkdirLock(workdir).acquire()
  assert "stale" in caplog.text and "pid 4242" in caplog.text
  assert json.loads(record.read_text())["pid"] == os.getpid()
  lock.release()
  assert not record.exists()


def test_a_run_whose_gcs_lock_is_replaced_stops_naming_the_other_holder(gcs):
  """The other run's write changes the record's generation, so our next heartbeat's conditional write fails."""
  del gcs
  workdir = f"gs://{BUCKET}/taken"
  lock = workdir_lock.WorkdirLock(workdir, heartbeat_s=0.1).acquire()
  try:
    time.sleep(0.3)
    workdir_lock.raise_if_taken_over()  # ours, refreshed by its heartbeats: nothing to say
    _blob("taken/lock.json").upload_from_string(json.dumps(_other_run(time.time())))
    lock_racing.wait_for_takeover_notice("some-other-host", 4242, timeout_s=10)
  finally:
    lock.release()
  assert json.loads(_blob("taken/lock.json").download_as_bytes())["token"] == "theirs"  # release left theirs
  workdir_lock.raise_if_taken_over()


def test_our_gcs_record_at_a_generation_we_did_not_see_is_still_ours(gcs):
  """A write of ours whose answer was lost (the client's retry then fails its precondition) leaves our record at a
  generation this run never saw: the heartbeat's write fails, the record still names this run, and it carries on."""
  del gcs
  lock = workdir_lock.WorkdirLock(f"gs://{BUCKET}/retried", heartbeat_s=0.05).acquire()
  try:
    blob = _blob("retried/lock.json")
    ours = blob.download_as_bytes()
    blob.upload_from_string(ours)  # the same record, a new generation
    time.sleep(0.5)
    workdir_lock.raise_if_taken_over()
    assert json.loads(_blob("retried/lock.json").download_as_bytes())["heartbeat"] > json.loads(ours)["heartbeat"]
  finally:
    lock.release()
  assert not epath.Path(f"gs://{BUCKET}/retried/{workdir_lock.LOCK_FILE}").exists()


def test_release_deletes_only_our_own_gcs_record(gcs):
  del gcs
  workdir = f"gs://{BUCKET}/released"
  lock = workdir_lock.WorkdirLock(workdir, heartbeat_s=3600).acquire()
  blob = _blob("released/lock.json")
  ours = json.loads(blob.download_as_bytes())
  assert ours["token"] and ours["pid"] == os.getpid()
  blob.upload_from_string(json.dumps(_other_run(time.time())))  # replaced behind its back
  lock.release()
  assert json.loads(_blob("released/lock.json").download_as_bytes())["token"] == "theirs"

  lock = workdir_lock.WorkdirLock(f"gs://{BUCKET}/released2", heartbeat_s=3600).acquire()
  lock.release()
  assert not epath.Path(f"gs://{BUCKET}/released2/{workdir_lock.LOCK_FILE}").exists()


def test_a_workdir_on_another_object_store_is_refused():
  with pytest.raises(workdir_lock.WorkdirLockedError, match="local path or gs://"):
    workdir_lock.WorkdirLock("s3://bucket/run")
