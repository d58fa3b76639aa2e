"""Resuming on another slice (issue 17): a run checkpointed by N processes resumes on N' processes.

Parameters and optimizer state reshard through the abstract shardings; the per-process input-iterator states cannot
be restored, so the input is rebuilt at the checkpoint's step, with one warning. The synthetic source's global
batches depend on the step alone, so there the resumed run must take exactly the step an uninterrupted run takes.
"""
import pytest
import logging
import shutil

import numpy as np
from train_testing import (
  as_if_written_by_two_processes,
  losses_by_step,
  run_main,
  tiny_config,
)

from dtm_jax.runner import run as runner
from dtm_jax.runtime import checkpoint

_FLAGS = ("--config.log_every=1", "--config.checkpoint_every=4", "--config.total_steps=12")


@pytest.mark.slow
def test_another_process_count_restores_the_newest_step_without_trying_its_iterator_state(tmp_path, monkeypatch,
                                                                                           caplog):
  config = lambda **overrides: tiny_config(log_every=1, checkpoint_every=4, total_steps=12, async_checkpointing=False,
                                           **overrides)
  runner.run("pretrain", config(stop_after_step=9), str(tmp_path))
  reference = losses_by_step(tmp_path)
  shutil.rmtree(tmp_path / "checkpoints" / "9")  # as if the job was lost before saving step 9
  for step in (4, 8):
    as_if_written_by_two_processes(tmp_path / "checkpoints" / str(step))
  tried = []
  restore = checkpoint.DataIteratorHandler.restore
  monkeypatch.setattr(checkpoint.DataIteratorHandler, "restore",
                      lambda self, directory, args: (tried.append(str(directory)), restore(self, directory, args))[1])
  with caplog.at_level(logging.INFO):  # on another mesh too: FSDP over 2 devices (the mesh may change on resume)
    runner.run("pretrain", config(stop_after_step=9, **{"mesh.data": 4, "mesh.fsdp": 2, "mesh.min_fsdp_size": 16}),
               str(tmp_path))
  assert tried == []  # the process count is checked first: neither step 8's states nor an older step's are read
  assert "trying the previous one" not in caplog.text and "Resumed from the checkpoint of step 8" in caplog.text
  warnings = [r.getMessage() for r in caplog.records if "written by 2 processes" in r.getMessage()]
  assert len(warnings) == 1 and "rebuilt at global batch 8" in warnings[0], caplog.text
  assert (tmp_path / "checkpoints" / "8").is_dir() and (tmp_path / "checkpoints" / "4").is_dir()  # none moved aside
  resumed = losses_by_step(tmp_path)
  np.testing.assert_allclose(resumed[9], reference[9], rtol=1e-5)  # the batch of step 9, on the restored parameters


@pytest.mark.slow
def test_a_run_saved_by_2_processes_of_4_devices_resumes_on_1_process_of_8_devices_and_of_2(tmp_path):
  saved = tmp_path / "2x4"
  codes, outs = run_main(saved, *_FLAGS, "--config.stop_after_step=9", num_processes=2, devices=4)
  assert codes == [0, 0], "\n".join(out[-3000:] for out in outs)
  reference = losses_by_step(saved)  # the uninterrupted 2-process run's step 9
  shutil.rmtree(saved / "checkpoints" / "9")  # the slice is lost before step 9's checkpoint
  for devices in (8, 2):
    workdir = tmp_path / f"1x{devices}"
    shutil.copytree(saved, workdir)
    codes, outs = run_main(workdir, *_FLAGS, "--config.stop_after_step=10", devices=devices)
    out = outs[0]
    assert codes == [0], out[-4000:]
    assert "Resumed from the checkpoint of step 8" in out and "trying the previous one" not in out, out[-4000:]
    assert out.count("written by 2 processes") == 1 and "rebuilt at global batch 8" in out, out[-4000:]
    losses = losses_by_step(workdir)
    assert sorted(losses) == list(range(1, 11))
    # Same global batch (synthetic data is a function of the step), restored parameters and optimizer state: the
    # step the 2-process run took.
    np.testing.assert_allclose(losses[9], reference[9], rtol=1e-5)
    assert checkpoint.find_step_directory(workdir)[1] == 10
