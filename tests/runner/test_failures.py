"""Failure scenarios of docs/RELIABILITY.md through `main.py`: kills, interrupted or corrupted checkpoints, repeated
preemptions, NaNs, bad configs; every interrupted run resumes to the result of an uninterrupted one.

Subprocess runs use 2 fake CPU devices and the real Fashion-MNIST input pipeline, so resumption covers the data stream.
"""
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from train_testing import free_port, losses_by_step, main_command, main_env, tiny_config

from dtm_jax.runner import run as runner
from dtm_jax.runtime import checkpoint

STEPS = 20  # every run is stopped at or before this step; total_steps is larger so no run ends on its own


TOTAL_STEPS = 1000


# Synchronous saves: a kill a few steps after a checkpoint then finds it complete (async saves are covered by
# tests/test_train.py's resume test).
COMMON_FLAGS = ["--config.log_every=1", "--config.checkpoint_every=5", f"--config.total_steps={TOTAL_STEPS}",
                "--config.input.source=fashion_mnist", "--config.async_checkpointing=False"]


def _command(workdir, *extra):
  return main_command(workdir, *COMMON_FLAGS, *extra)


def _logged_steps(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  return max(losses_by_step(workdir), default=0) if os.path.exists(path) else 0


def _final_params(workdir):
  params, _, _ = checkpoint.restore_params(workdir, STEPS)
  return params


def _run_until(workdir, step, sig, *extra):
  """Starts the run and sends `sig` once `step` steps have been logged; returns the process's exit code and log."""
  proc = subprocess.Popen(_command(workdir, *extra), env=main_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  deadline = time.time() + 300
  while _logged_steps(workdir) < step and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  assert proc.poll() is None, "the run ended before it could be interrupted"
  proc.send_signal(sig)
  out, _ = proc.communicate(timeout=300)
  return proc.returncode, out


def _run(workdir, *extra):
  """Runs to step STEPS (or to the given stop) and checks that it exits cleanly; returns its log."""
  extra = extra or (f"--config.stop_after_step={STEPS}",)
  done = subprocess.run(_command(workdir, *extra), env=main_env(), capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  return done.stdout + done.stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted 20-step run: what every interrupted run must reproduce."""
  workdir = tmp_path_factory.mktemp("reference")
  _run(workdir)
  return workdir


def _assert_same_run(workdir, reference):
  expected, got = losses_by_step(reference), losses_by_step(workdir)
  assert sorted(got) == list(range(1, STEPS + 1))
  for step in range(1, STEPS + 1):
    assert abs(got[step] - expected[step]) <= 1e-6 * max(1.0, abs(expected[step])), (step, got[step], expected[step])
  for a, b in zip(jax.tree.leaves(_final_params(workdir)), jax.tree.leaves(_final_params(reference))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_kill_9_between_checkpoints_then_rerun_equals_uninterrupted(tmp_path, reference):
  workdir = tmp_path / "run"
  kill_at = random.Random(os.getpid()).randint(6, 9)  # after the checkpoint of step 5, before the one of step 10
  code, out = _run_until(workdir, kill_at, signal.SIGKILL)
  assert code == -signal.SIGKILL, out[-2000:]
  killed_after = _logged_steps(workdir)
  saved = checkpoint.find_step_directory(workdir)[1]
  last_due = 5 * (killed_after // 5)  # its save may have been the write the kill interrupted
  assert saved in (last_due, last_due - 5) and 5 <= saved < STEPS, (saved, killed_after)
  log = _run(workdir)
  assert f"Resumed from the checkpoint of step {saved}" in log
  _assert_same_run(workdir, reference)


@pytest.mark.slow
def test_repeated_preemptions_lose_no_steps(tmp_path, reference):
  workdir = tmp_path / "run"
  for stop_after in (4, 11):
    code, out = _run_until(workdir, stop_after, signal.SIGTERM)
    assert code == 0, out[-2000:]
    saved = checkpoint.find_step_directory(workdir)[1]
    assert saved == _logged_steps(workdir), "the checkpoint must be of the last step taken"
  _run(workdir)
  _assert_same_run(workdir, reference)


def _copy_run(reference, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  return workdir


@pytest.mark.slow
def test_interrupted_checkpoint_write_is_ignored(tmp_path, reference, caplog):
  workdir = _copy_run(reference, tmp_path)
  # What a kill during the save of step 20 leaves: the step directory under its temporary name, never renamed.
  (workdir / "checkpoints" / "20").rename(workdir / "checkpoints" / "20.orbax-checkpoint-tmp-1234567")
  with caplog.at_level(logging.INFO):
    result = runner.run("pretrain", _config(), str(workdir))
  assert "incomplete checkpoint" in caplog.text and "20.orbax-checkpoint-tmp" in caplog.text
  assert "Resumed from the checkpoint of step 15" in caplog.text
  assert result["step"] == STEPS
  assert checkpoint.find_step_directory(workdir)[1] == STEPS


def _config(**overrides):
  base = {"log_every": 1, "checkpoint_every": 5, "total_steps": TOTAL_STEPS, "stop_after_step": STEPS,
          "input.source": "fashion_mnist", "async_checkpointing": False}
  return tiny_config(**{**base, **overrides})


def _corrupt(step_dir):
  for path in sorted((step_dir / "params").rglob("*")):
    if path.is_file() and path.parent.name == "d":
      path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])


@pytest.mark.slow
def test_corrupted_latest_checkpoint_falls_back_to_the_previous_good_one(tmp_path, reference, caplog):
  workdir = _copy_run(reference, tmp_path)
  _corrupt(workdir / "checkpoints" / "20")
  with caplog.at_level(logging.INFO):
    result = runner.run("pretrain", _config(), str(workdir))
  assert "Checkpoint at step 20" in caplog.text and "cannot be restored" in caplog.text
  assert "Resumed from the checkpoint of step 15" in caplog.text
  assert "Moved the unreadable checkpoint of step 20" in caplog.text
  assert result["step"] == STEPS
  assert (workdir / "checkpoints" / "20.unreadable").is_dir()
  assert checkpoint.find_step_directory(workdir)[1] == STEPS


@pytest.mark.slow
def test_all_checkpoints_corrupted_is_a_clear_error(tmp_path, reference):
  workdir = _copy_run(reference, tmp_path)
  for step_dir in (workdir / "checkpoints").iterdir():
    if step_dir.name.isdigit():
      _corrupt(step_dir)
  with pytest.raises(RuntimeError, match="No checkpoint in .* can be restored"):
    runner.run("pretrain", _config(), str(workdir))


@pytest.mark.slow
def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  runner.run("pretrain", _config(stop_after_step=5), str(tmp_path))
  with pytest.raises(FloatingPointError, match=r"Non-finite (loss|gradient norm).* at step (\d+)") as error:
    runner.run("pretrain", _config(**{"optim.base_lr": 1e10, "allow_config_change": True}), str(tmp_path))
  bad_step = int(error.value.args[0].split(" at step ")[1].split(";")[0])
  assert bad_step >= 5
  assert checkpoint.find_step_directory(tmp_path)[1] == 5  # nothing of the broken state was written
  assert json.loads((tmp_path / "config.json").read_text())["optim"]["base_lr"] != 1e10  # nor its config
  result = runner.run("pretrain", _config(), str(tmp_path))  # the original (fixed) config resumes from step 5
  assert result["step"] == STEPS


@pytest.mark.parametrize("overrides, message", [
    ({"input.num_masking_patches": 17}, "num_masking_patches=17 must be in"),
    ({"model.image_size": 18}, "image_size=18 is not divisible by patch_size=4"),
    ({"batch_size": 12}, "batch_size=12 must be divisible by devices"),
    ({"batch_size": 16, "grad_accum_steps": 4}, "grad_accum_steps"),
    ({"model.variant": "huge"}, "variant='huge' is unknown"),
    ({"target.kind": "dino"}, "Unknown target kind 'dino'"),
    ({"target.init": "checkpoint", "target.checkpoint": "/nonexistent/clip"}, "does not exist"),
    ({"target.init": "checkpoint"}, "config.target.checkpoint is empty"),
    ({"dtm.max_merge": 17}, "max_merge=17 exceeds the 16 tokens"),
    ({"model.out_dim": 8}, "set config.model.out_dim=16"),
])
def test_bad_configs_fail_before_compiling_with_what_to_change(tmp_path, overrides, message):
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    runner.run("pretrain", tiny_config(**overrides), str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_unknown_config_key_is_refused(tmp_path):
  done = subprocess.run(_command(tmp_path, "--config.optim.base_lrr=1e-3"), env=main_env(), capture_output=True,
                        text=True, timeout=300)
  assert done.returncode != 0
  assert "base_lrr" in done.stderr
  assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_processes_that_disagree_on_the_config_refuse_to_start(tmp_path):
  port = free_port()
  procs = []
  for i, lr in enumerate(("1e-3", "2e-3")):
    flags = [f"--config.optim.base_lr={lr}", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
             f"--process_id={i}", "--config.input.source=synthetic"]
    procs.append(subprocess.Popen(_command(tmp_path, *flags), env=main_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode != 0 for p in procs)
  assert any("Processes disagree on (step, config hash)" in out for out in outs), outs[0][-3000:]
