"""SIGTERM and Ctrl-C: the step reached is saved, Ctrl-C exits with 130 (a second one at once), and the rerun resumes,
mid-epoch too.
"""
import os
import signal
import subprocess
import time

import eval_testing
import pytest
import train_testing
from train_testing import losses_by_step, main_command, main_env

from dtm_jax.runtime import errors, metrics, preemption


@pytest.mark.slow
def test_ctrl_c_checkpoints_the_step_reached_exits_130_and_the_rerun_resumes(tmp_path):
  workdir = tmp_path / "run"
  flags = ("--config.total_steps=100000", "--config.checkpoint_every=100000", "--config.log_every=1")
  proc = subprocess.Popen(main_command(workdir, *flags), env=main_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT,
                          text=True)
  deadline = time.time() + 300
  while time.time() < deadline and len(losses_by_step(workdir) if (workdir / "metrics.jsonl").exists() else {}) < 3:
    time.sleep(0.1)
  # While it runs, a second run on the same workdir is refused and names it.
  second = subprocess.run(main_command(workdir, *flags), env=main_env(), capture_output=True, text=True, timeout=300)
  assert second.returncode != 0
  assert f"pid {proc.pid}" in second.stderr and "Traceback" not in second.stderr, second.stderr[-3000:]
  proc.send_signal(signal.SIGINT)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 130, out[-3000:]
  steps = train_testing.saved_steps(workdir)
  assert len(steps) == 1 and steps[0] == max(losses_by_step(workdir)), (steps, out[-2000:])
  resumed = subprocess.run(main_command(workdir, *flags, f"--config.stop_after_step={steps[0] + 2}"), env=main_env(),
                           capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Resumed from the checkpoint of step {steps[0]}" in resumed.stderr


def test_a_second_ctrl_c_exits_at_once(monkeypatch, sigint_guard):
  exits = []
  monkeypatch.setattr(os, "_exit", exits.append)
  flag = preemption.PreemptionFlag().install()
  try:
    os.kill(os.getpid(), signal.SIGINT)
    assert flag.requested and flag.interrupted and not exits
    os.kill(os.getpid(), signal.SIGINT)
    assert exits == [130]
  finally:
    flag.uninstall()


@pytest.mark.slow
def test_ctrl_c_during_fine_tuning_saves_the_step_and_the_rerun_resumes_mid_epoch(tmp_path, sigint_guard):
  run = eval_testing.tiny_fine_tuning(tmp_path, steps_per_epoch=6)

  reference = run(tmp_path / "reference", eval_testing.InterruptingStream(16))
  stream = eval_testing.InterruptingStream(16, interrupt_at=8)  # mid-way through the second epoch
  with pytest.raises(errors.Interrupted):
    run(tmp_path / "finetune", stream)
  # The first epoch's evaluation, then the step reached.
  assert train_testing.saved_steps(tmp_path / "finetune") == [6, 9]
  stream = eval_testing.InterruptingStream(16)
  result = run(tmp_path / "finetune", stream)
  assert stream.first == 9 and result["steps"] == 12
  assert result["top1"] == pytest.approx(reference["top1"])
  expected, got = (losses_by_step_of(tmp_path / name) for name in ("reference", "finetune"))
  assert sorted(got) == list(range(1, 13))
  for step in expected:
    assert got[step] == pytest.approx(expected[step], rel=1e-5), step


def losses_by_step_of(workdir):
  rows = metrics.read_jsonl(workdir / "metrics.jsonl")
  steps = [r["step"] for r in rows if "train_loss" in r]
  assert len(steps) == len(set(steps)), steps  # one line per step
  return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}
