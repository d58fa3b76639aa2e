"""Several processes of one job (two on 127.0.0.1): a restore fallback every process agrees on, and a preemption notice
or Ctrl-C reaching one process makes every process save the same step.
"""
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import train_testing
from train_testing import REPO, free_port, losses_by_step, main_env, wait_for

from dtm_jax.runtime import checkpoint


def _start_two_processes(workdir, *flags):
  port = free_port()
  command = [sys.executable, os.path.join(REPO, "main.py"), "--config=" + os.path.join(REPO, "configs/test_tiny.py"),
             f"--workdir={workdir}", "--config.log_every=1", "--config.checkpoint_every=4",
             "--config.total_steps=12", *flags, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
  return [subprocess.Popen(command + [f"--process_id={i}"], env=main_env(2), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True) for i in range(2)]


def _two_processes(workdir, *flags, timeout=300):
  return wait_for(_start_two_processes(workdir, *flags), timeout)


@pytest.mark.slow
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


@pytest.mark.slow
def test_pretraining_with_a_long_flush_interval_keeps_the_lines_up_to_the_checkpoint_after_kill_9(tmp_path):
  """Lines are flushed before each checkpoint, so a kill -9 between flushes loses only lines past the newest
  checkpoint, which the resumed run computes again: metrics.jsonl still has one line per step."""
  workdir = tmp_path / "run"
  command = [sys.executable, os.path.join(REPO, "main.py"), "--config=" + os.path.join(REPO, "configs/test_tiny.py"),
             f"--workdir={workdir}", "--config.log_every=1", "--config.checkpoint_every=5",
             "--config.total_steps=1000", "--config.async_checkpointing=False", "--config.metrics_flush_secs=3600"]
  proc = subprocess.Popen(command, env=main_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  while not (workdir / "checkpoints" / "10").is_dir() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  assert proc.poll() is None, proc.communicate()[0][-3000:]
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  saved = checkpoint.find_step_directory(workdir)[1]
  kept = train_testing.jsonl_steps(workdir)
  assert saved >= 10 and kept[:saved] == list(range(1, saved + 1)), (saved, kept)
  resumed = subprocess.run(command + [f"--config.stop_after_step={saved + 5}"], env=main_env(), capture_output=True,
                           text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
  assert train_testing.jsonl_steps(workdir) == list(range(1, saved + 6))


@pytest.mark.slow
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
  assert max(train_testing.jsonl_steps(workdir)) == saved  # the checkpoint is of the last step taken

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
  while (len(train_testing.jsonl_steps(workdir)) < steps and all(p.poll() is None for p in procs) and
         time.time() < deadline):
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


@pytest.mark.slow
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
