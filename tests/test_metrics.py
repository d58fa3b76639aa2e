"""Console progress: the rate counts finished steps, not dispatched ones."""
import logging
import re
import time

from dtm_jax import flops
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
