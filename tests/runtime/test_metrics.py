"""Metrics: console progress counts finished steps; metrics.jsonl keeps one line per step after a kill and resume;
lines are flushed on a timer, never on the step's path, and a kill loses at most the last interval's lines."""
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import train_testing
from train_testing import main_env

from dtm_jax import flops
from dtm_jax.runner import run as runner
from dtm_jax.runtime import metrics


def test_progress_waits_for_the_step_only_when_it_prints(monkeypatch, caplog):
  waits = []

  def slow_device(x):  # stands in for a device still busy with the dispatched steps
    waits.append(x)
    time.sleep(0.3)
    return x

  monkeypatch.setattr(metrics.jax, "block_until_ready", slow_device)
  progress = metrics.Progress(total_steps=100, every_secs=3600)
  with caplog.at_level(logging.INFO):
    progress(1, done="step 1")  # the first finished step starts the clock
    progress(2, done="step 2")  # nothing to print yet: no wait
    assert waits == ["step 1"]
    progress(10, force=True, done="step 10")
  assert waits == ["step 1", "step 10"]
  rate = float(re.search(r"step 10/100 \(10\.0%\), ([0-9.]+) steps/s", caplog.text).group(1))
  assert 0 < rate <= 9 / 0.3  # 9 steps finished in at least the 0.3 s spent waiting for the device


def test_peak_flops_know_the_device_kinds_tpus_report():
  """v5p chips report "TPU v5", v5e "TPU v5 lite", v6e "TPU v6 lite" (seen on the TPU runtime's topologies)."""
  assert flops.peak_flops_per_device("TPU v5") == 459e12
  assert flops.peak_flops_per_device("TPU v5 lite") == 197e12
  assert flops.peak_flops_per_device("TPU v6 lite") == 918e12
  assert flops.peak_flops_per_device("TPU v4") == 275e12


def test_metrics_have_one_line_per_step_after_a_kill_and_resume(tmp_path):
  runner.run("pretrain", train_testing.long_tiny_config(stop_after_step=8), str(tmp_path))
  # What a kill -9 after step 8's metrics and before its checkpoint leaves: lines 6-8 past the last checkpoint (5).
  os.rename(tmp_path / "checkpoints" / "8", tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp-1")
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 9, "lo')  # a line cut by the kill
  runner.run("pretrain", train_testing.long_tiny_config(stop_after_step=10), str(tmp_path))
  rows = metrics.read_jsonl(tmp_path / "metrics.jsonl")
  steps = [r["step"] for r in rows if "loss" in r]
  assert steps == list(range(1, 11)), steps


def test_writes_within_the_flush_interval_do_not_flush_and_close_writes_everything(tmp_path):
  writer = metrics.MetricsWriter(tmp_path, enabled=True, flush_every_secs=3600)
  flushes = []
  for name in ("_jsonl", "_events"):
    item = getattr(writer, name)
    flush = item.flush
    item.flush = lambda flush=flush, name=name: (flushes.append(name), flush())[1]
  for step in range(1, 51):
    writer.write_scalars(step, {"loss": 1.0 / step}, log=False)
  assert flushes == [] and train_testing.jsonl_steps(tmp_path) == []  # nothing written out, nothing uploaded
  writer.close()
  assert train_testing.jsonl_steps(tmp_path) == list(range(1, 51))
  assert sorted(set(flushes)) == ["_events", "_jsonl"]


def test_lines_are_written_out_on_the_timer_without_further_writes(tmp_path):
  writer = metrics.MetricsWriter(tmp_path, enabled=True, flush_every_secs=0.2)
  for step in range(1, 4):
    writer.write_scalars(step, {"loss": 1.0}, log=False)
  deadline = time.time() + 10
  while train_testing.jsonl_steps(tmp_path) != [1, 2, 3] and time.time() < deadline:
    time.sleep(0.05)
  assert train_testing.jsonl_steps(tmp_path) == [1, 2, 3]
  writer.write_scalars(4, {"loss": 1.0}, log=False)
  writer.flush()  # what the training loops call before a checkpoint
  assert train_testing.jsonl_steps(tmp_path) == [1, 2, 3, 4]
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


@pytest.mark.slow
def test_kill_9_loses_at_most_the_last_intervals_lines(tmp_path):
  interval = 0.5
  proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), str(interval)], env=main_env(1),
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
  kept = train_testing.jsonl_steps(tmp_path)
  assert kept == list(range(1, len(kept) + 1)) and kept, kept  # a prefix, no line cut
  lost = [step for step in written if step > len(kept)]
  if lost:  # only lines of the last interval (plus slack for a loaded machine)
    assert killed_at - written[min(lost)] <= interval + 2.0, (killed_at - written[min(lost)], len(kept), len(written))
