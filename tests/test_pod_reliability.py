"""Pod-scale reliability (issue 17): restore fallback agreed by all processes, readers that see only finished
checkpoints, and metrics that are flushed off the step's path."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from train_testing import REPO, free_port, losses_by_step, wait_for

from dtm_jax import students, targets
from dtm_jax.runtime import checkpoint, metrics


def _env(devices=2):
  env = dict(os.environ)
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return env


# ---------------------------------------------------------------------------------------------------------------------
# Metrics: flushed on a timer and at close, never on every write.
# ---------------------------------------------------------------------------------------------------------------------
def _jsonl_steps(workdir):
  path = workdir / "metrics.jsonl"
  return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def test_writes_within_the_flush_interval_do_not_flush_and_close_writes_everything(tmp_path):
  writer = metrics.MetricsWriter(tmp_path, enabled=True, flush_every_secs=3600)
  flushes = []
  for name in ("_jsonl", "_events"):
    item = getattr(writer, name)
    flush = item.flush
    item.flush = lambda flush=flush, name=name: (flushes.append(name), flush())[1]
  for step in range(1, 51):
    writer.write_scalars(step, {"loss": 1.0 / step}, log=False)
  assert flushes == [] and _jsonl_steps(tmp_path) == []  # nothing written out, nothing uploaded
  writer.close()
  assert _jsonl_steps(tmp_path) == list(range(1, 51))
  assert sorted(set(flushes)) == ["_events", "_jsonl"]


def test_lines_are_written_out_on_the_timer_without_further_writes(tmp_path):
  writer = metrics.MetricsWriter(tmp_path, enabled=True, flush_every_secs=0.2)
  for step in range(1, 4):
    writer.write_scalars(step, {"loss": 1.0}, log=False)
  deadline = time.time() + 10
  while _jsonl_steps(tmp_path) != [1, 2, 3] and time.time() < deadline:
    time.sleep(0.05)
  assert _jsonl_steps(tmp_path) == [1, 2, 3]
  writer.write_scalars(4, {"loss": 1.0}, log=False)
  writer.flush()  # what the training loops call before a checkpoint
  assert _jsonl_steps(tmp_path) == [1, 2, 3, 4]
  writer.close()


_WRITER = """
import sys, time
from dtm_jax.runtime import metrics
writer = metrics.MetricsWriter(sys.argv[1], enabled=True, flush_every_secs=float(sys.argv[2]))
step = 0
while True:
  step += 1
  writer.write_scalars(step, {"loss": 1.0}, log=False)
  print(step, time.time(), flush=True)
  time.sleep(0.02)
"""


def test_kill_9_loses_at_most_the_last_intervals_lines(tmp_path):
  interval = 0.5
  proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), str(interval)], env=_env(1),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  written = {}
  for line in proc.stdout:
    parts = line.split()
    if len(parts) == 2 and parts[0].isdigit():
      written[int(parts[0])] = float(parts[1])
    if len(written) >= 150:  # about 3 s: several flush intervals
      break
  proc.send_signal(signal.SIGKILL)
  killed_at = time.time()
  proc.communicate(timeout=60)
  kept = _jsonl_steps(tmp_path)
  assert kept == list(range(1, len(kept) + 1)) and kept, kept  # a prefix, no line cut
  lost = [step for step in written if step > len(kept)]
  if lost:  # only lines of the last interval (plus slack for a loaded machine)
    assert killed_at - written[min(lost)] <= interval + 2.0, (killed_at - written[min(lost)], len(kept), len(written))


# ---------------------------------------------------------------------------------------------------------------------
# Readers (evaluation, the `checkpoint` teacher, export) see only finished checkpoints.
# ---------------------------------------------------------------------------------------------------------------------
def _as_if_on_gcs(monkeypatch):
  """Orbax's rule for gs:// paths on local directories: a step is finished once its commit_success.txt exists (on
  gs:// Orbax writes into `<step>/` directly; there is no rename)."""
  from orbax.checkpoint._src.path import gcs_utils  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(gcs_utils, "is_gcs_path", lambda path: True)


def _commit(step_dir):
  (step_dir / "commit_success.txt").write_text("Checkpoint successfully committed.")


@pytest.fixture
def two_students(tmp_path):
  """Pretraining checkpoints of steps 5 and 10 (different weights)."""
  import eval_testing  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "pretrain"
  return workdir, eval_testing.save_pretraining_checkpoints(workdir, steps=(5, 10))


def test_a_step_without_its_commit_marker_on_gcs_is_never_read(two_students, monkeypatch):
  import ml_collections  # pylint: disable=g-import-not-at-top

  from dtm_jax import sharding  # pylint: disable=g-import-not-at-top
  workdir, saved = two_students
  # Step 10 as a save in progress, or a crashed one, leaves it on gs://: everything but commit_success.txt.
  (workdir / "checkpoints" / "10" / "commit_success.txt").unlink()
  assert (workdir / "checkpoints" / "5" / "commit_success.txt").exists()
  _as_if_on_gcs(monkeypatch)
  assert checkpoint.find_step_directory(workdir)[1] == 5
  assert checkpoint.find_step_directory(workdir / "checkpoints")[1] == 5
  for path, step in ((workdir, 10), (workdir / "checkpoints" / "10", None)):
    with pytest.raises(FileNotFoundError, match="not finished"):
      checkpoint.find_step_directory(path, step)
  params, _, step = checkpoint.restore_params(workdir)
  assert step == 5
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(saved[5]), strict=True):
    np.testing.assert_array_equal(np.asarray(got), want)
  student = students.restore_student(ml_collections.ConfigDict({"workdir": str(workdir), "step": None}),
                                   sharding.make_mesh(data=-1, fsdp=1))
  assert student.step == 5 and student.checkpoint.endswith("checkpoints/5")
  for got, want in zip(jax.tree.leaves(student.params), jax.tree.leaves(saved[5]), strict=True):
    np.testing.assert_array_equal(np.asarray(got), want)
  import eval_testing  # pylint: disable=g-import-not-at-top
  teacher = targets.build_target(ml_collections.ConfigDict(dict(
      kind="checkpoint", checkpoint=str(workdir), step=None, dtype="float32", features="head")),
      image_size=eval_testing.IMAGE_SIZE, patch_size=4)
  assert teacher.description.endswith("checkpoints/5")
  for got, want in zip(jax.tree.leaves(teacher.params), jax.tree.leaves(saved[5]), strict=True):
    np.testing.assert_array_equal(np.asarray(got), want)
  _commit(workdir / "checkpoints" / "10")  # once committed, it is the newest
  assert checkpoint.find_step_directory(workdir)[1] == 10


def test_an_unfinalized_temporary_step_directory_is_never_read(two_students):
  workdir, _ = two_students
  directory = workdir / "checkpoints"
  # What a crash during the save of step 15 leaves on a local disk: the step under its temporary name, with params/.
  (directory / "10").rename(directory / "15.orbax-checkpoint-tmp-1234567")
  assert checkpoint.find_step_directory(workdir)[1] == 5
  with pytest.raises(FileNotFoundError):
    checkpoint.find_step_directory(directory / "15.orbax-checkpoint-tmp-1234567")
  assert checkpoint.restore_params(workdir)[2] == 5


# ---------------------------------------------------------------------------------------------------------------------
# Restore fallback decided by all processes together.
# ---------------------------------------------------------------------------------------------------------------------
def _start_two_processes(workdir, *flags):
  port = free_port()
  command = [sys.executable, os.path.join(REPO, "main.py"), "--config=" + os.path.join(REPO, "configs/test_tiny.py"),
             f"--workdir={workdir}", "--config.log_every=1", "--config.checkpoint_every=4",
             "--config.total_steps=12", *flags, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
  return [subprocess.Popen(command + [f"--process_id={i}"], env=_env(2), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True) for i in range(2)]


def _two_processes(workdir, *flags, timeout=300):
  return wait_for(_start_two_processes(workdir, *flags), timeout)


@pytest.mark.parametrize("broken", [0, 1])
def test_one_processs_unreadable_copy_of_the_newest_step_makes_all_processes_fall_back_together(tmp_path, broken):
  workdir = tmp_path / "run"
  codes, outs = _two_processes(workdir, "--config.stop_after_step=8")
  assert codes == [0, 0], "\n".join(outs)
  before = losses_by_step(workdir)
  assert sorted(before) == list(range(1, 9))
  # Only one process fails on step 8: its own input-iterator state is unreadable; the other's reads fine. (Before,
  # a failing process 0 moved step 8 aside and waited at a barrier the other never reached; a failing process 1 fell
  # back to step 4 alone.)
  (workdir / "checkpoints" / "8" / "data_iterator" / f"process_{broken}_of_2").write_text("\0garbage")
  codes, outs = _two_processes(workdir)
  assert codes == [0, 0], "\n".join(out[-4000:] for out in outs)
  for out in outs:
    assert "Resumed from the checkpoint of step 4" in out, out[-4000:]
    assert "Checkpoint at step 8" in out and f"cannot be restored on process {broken}" in out, out[-4000:]
  assert "Moved the unreadable checkpoint of step 8" in outs[0]
  assert (workdir / "checkpoints" / "8.unreadable").is_dir()
  after = losses_by_step(workdir)
  assert sorted(after) == list(range(1, 13))
  for step in range(5, 9):  # steps 5-8 again from step 4's state and input positions: the same losses
    np.testing.assert_allclose(after[step], before[step], rtol=1e-6)
  assert checkpoint.find_step_directory(workdir)[1] == 12


def test_pretraining_with_a_long_flush_interval_keeps_the_lines_up_to_the_checkpoint_after_kill_9(tmp_path):
  """Lines are flushed before each checkpoint, so a kill -9 between flushes loses only lines past the newest
  checkpoint, which the resumed run computes again: metrics.jsonl still has one line per step."""
  workdir = tmp_path / "run"
  command = [sys.executable, os.path.join(REPO, "main.py"), "--config=" + os.path.join(REPO, "configs/test_tiny.py"),
             f"--workdir={workdir}", "--config.log_every=1", "--config.checkpoint_every=5",
             "--config.total_steps=1000", "--config.async_checkpointing=False", "--config.metrics_flush_secs=3600"]
  proc = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  while not (workdir / "checkpoints" / "10").is_dir() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  assert proc.poll() is None, proc.communicate()[0][-3000:]
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  saved = checkpoint.find_step_directory(workdir)[1]
  kept = _jsonl_steps(workdir)
  assert saved >= 10 and kept[:saved] == list(range(1, saved + 1)), (saved, kept)
  resumed = subprocess.run(command + [f"--config.stop_after_step={saved + 5}"], env=_env(), capture_output=True,
                           text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
  assert _jsonl_steps(workdir) == list(range(1, saved + 6))


# ---------------------------------------------------------------------------------------------------------------------
# Preemption at pod scale: the notice reaches one host; every process saves the same step.
# ---------------------------------------------------------------------------------------------------------------------
def test_sigterm_to_one_process_saves_the_same_step_on_both_and_the_rerun_equals_an_uninterrupted_run(tmp_path):
  """GKE/Spot preempt one host at a time: JAX's preemption sync point gives every process the same step to save,
  within the grace period, and both exit 0."""
  workdir = tmp_path / "run"
  flags = ("--config.total_steps=1000", "--config.checkpoint_every=1000")  # only the preemption saves
  procs = _start_two_processes(workdir, *flags)
  _wait_for_steps(workdir, procs, 3)
  procs[1].send_signal(signal.SIGTERM)  # the other process is never signalled
  codes, outs = wait_for(procs)
  assert codes == [0, 0], "\n".join(out[-3000:] for out in outs)
  stopped = [re.findall(r"Preempted: checkpoint of step (\d+) written", out) for out in outs]
  assert stopped[0] == stopped[1] and len(stopped[0]) == 1, "\n".join(out[-3000:] for out in outs)
  saved = int(stopped[0][0])
  assert saved >= 3 and checkpoint.find_step_directory(workdir)[1] == saved
  iterator_states = workdir / "checkpoints" / str(saved) / "data_iterator"
  assert sorted(p for p in os.listdir(iterator_states) if p.startswith("process_")) == [
      "process_0_of_2", "process_1_of_2"]
  assert max(_jsonl_steps(workdir)) == saved  # the checkpoint is of the last step taken

  end = (f"--config.stop_after_step={saved + 3}",)
  codes, outs = _two_processes(workdir, *flags, *end)
  assert codes == [0, 0], "\n".join(out[-3000:] for out in outs)
  assert all(f"Resumed from the checkpoint of step {saved}" in out for out in outs)
  reference = tmp_path / "reference"
  codes, outs = _two_processes(reference, *flags, *end)
  assert codes == [0, 0], "\n".join(out[-3000:] for out in outs)
  expected, got = losses_by_step(reference), losses_by_step(workdir)
  assert sorted(got) == sorted(expected) == list(range(1, saved + 4))
  for step in expected:
    np.testing.assert_allclose(got[step], expected[step], rtol=1e-6, err_msg=f"step {step}")
  for a, b in zip(jax.tree.leaves(_params_on_one_device(workdir)), jax.tree.leaves(_params_on_one_device(reference))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def _wait_for_steps(workdir, procs, steps):
  deadline = time.time() + 300
  while len(_jsonl_steps(workdir)) < steps and all(p.poll() is None for p in procs) and time.time() < deadline:
    time.sleep(0.01)
  assert all(p.poll() is None for p in procs), "a process ended before the signal"


def _params_on_one_device(workdir):
  """The newest parameters of a two-process run, read onto one device here (their saved shardings name the two
  processes' devices)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory, step = checkpoint.find_step_directory(workdir)
  saved = ocp.StandardCheckpointer().metadata(directory / str(step) / "params").item_metadata.tree
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return checkpoint.restore_params(workdir, target=jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device), saved))[0]


def test_ctrl_c_in_one_process_makes_both_save_the_same_step(tmp_path):
  """The first Ctrl-C is handed to JAX's preemption sync manager as a SIGTERM of its own process: the other process
  saves the same step and exits 0, the interrupted one exits with 130."""
  workdir = tmp_path / "run"
  procs = _start_two_processes(workdir, "--config.total_steps=1000", "--config.checkpoint_every=1000")
  _wait_for_steps(workdir, procs, 3)
  procs[0].send_signal(signal.SIGINT)
  codes, outs = wait_for(procs)
  assert codes == [130, 0], "\n".join(out[-3000:] for out in outs)
  stopped = [re.findall(r"Preempted: checkpoint of step (\d+) written", out) for out in outs]
  assert stopped[0] == stopped[1] and len(stopped[0]) == 1, "\n".join(out[-3000:] for out in outs)
  assert checkpoint.find_step_directory(workdir)[1] == int(stopped[0][0])
