"""Checkpoints: a damaged newest step falls back to the older one, a full disk is one clear error, a missing iterator
state is named, and readers only ever see finished steps (commit markers on gs://, temporary directories).
"""
import json
import logging
import subprocess
import sys

import eval_testing
import jax
import numpy as np
import pytest
import train_testing
from train_testing import main_command, main_env

from dtm_jax import students, targets
from dtm_jax.runner import run as runner
from dtm_jax.runtime import checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated_json", "deleted", "no_config_key"])
def test_damaged_metadata_of_the_newest_step_resumes_from_the_older_one(tmp_path, damage, caplog):
  runner.run("pretrain", train_testing.long_tiny_config(stop_after_step=10), str(tmp_path))
  assert train_testing.saved_steps(tmp_path) == [5, 10]
  path = tmp_path / "checkpoints" / "10" / "metadata" / "metadata"
  if damage == "truncated_json":
    path.write_text(path.read_text()[:40])
  elif damage == "deleted":
    path.unlink()
  else:
    path.write_text(json.dumps({"step": 10}))
  with caplog.at_level(logging.INFO):
    result = runner.run("pretrain", train_testing.long_tiny_config(stop_after_step=12), str(tmp_path))
  assert "Resumed from the checkpoint of step 5" in caplog.text
  assert result["step"] == 12
  assert (tmp_path / "checkpoints" / "10.unreadable").is_dir()


@pytest.mark.slow
def test_damaged_metadata_of_the_newest_fine_tuning_step_resumes_from_the_older_one(tmp_path):
  run = eval_testing.tiny_fine_tuning(tmp_path, steps_per_epoch=3)
  run(tmp_path / "finetune", eval_testing.InterruptingStream(16))
  assert train_testing.saved_steps(tmp_path / "finetune") == [3, 6]
  (tmp_path / "finetune" / "checkpoints" / "6" / "metadata" / "metadata").write_text("{\"step\": 6")  # truncated
  stream = eval_testing.InterruptingStream(16)
  result = run(tmp_path / "finetune", stream)
  assert stream.first == 3 and result["steps"] == 6  # resumed from step 3, not a crash on step 6's metadata


_FULL_DISK = """
import errno, os, sys
import orbax.checkpoint as ocp
from dtm_jax.runtime import metrics
save = ocp.CheckpointManager.save
disk_full = []
def full_disk_save(self, step, *args, **kwargs):
  if step >= 10:
    disk_full.append(step)
    path = os.path.join(str(self.directory), f"{step}.orbax-checkpoint-tmp", "params.orbax-checkpoint-tmp", "d", "x")
    raise ValueError(f'RESOURCE_EXHAUSTED: Error writing local file "{path}": Failed to write 2889 bytes to file 19: '
                     "No space left on device [os_error_code='28']")
  return save(self, step, *args, **kwargs)
ocp.CheckpointManager.save = full_disk_save
def full_disk_writes(method):  # the metrics.jsonl / TensorBoard writers fail on the same full disk
  def failing(self, *args, **kwargs):
    if disk_full:
      raise OSError(errno.ENOSPC, "No space left on device", "metrics.jsonl")
    return method(self, *args, **kwargs)
  return failing
metrics.MetricsWriter.flush = full_disk_writes(metrics.MetricsWriter.flush)
metrics.MetricsWriter.close = full_disk_writes(metrics.MetricsWriter.close)
sys.argv = [sys.argv[1]] + sys.argv[2:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
import runpy
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_a_full_disk_during_a_save_is_one_clear_error_and_older_checkpoints_stay(tmp_path):
  # ENOSPC in the checkpointer and then in the metrics writers: the save error stays the last line.
  workdir = tmp_path / "run"
  command = main_command(workdir, "--config.checkpoint_every=5", "--config.total_steps=1000",
                     "--config.async_checkpointing=False")
  done = subprocess.run([sys.executable, "-c", _FULL_DISK, *command[1:]], env=main_env(), capture_output=True,
                        text=True,
                        timeout=300)
  assert done.returncode == 1, done.stderr[-3000:]
  last = done.stderr.strip().splitlines()[-1]
  assert "No space left on device" in last and "step 10" in last and "step 5" in last, last
  assert str(workdir / "checkpoints") in last
  assert "No space left on device: 'metrics.jsonl'" in done.stderr  # the writers failed too, reported before it
  assert "Traceback" not in done.stderr and "ImportError" not in done.stderr, done.stderr[-3000:]
  assert train_testing.saved_steps(workdir) == [5]
  params, _, step = checkpoint.restore_params(workdir)
  assert step == 5 and jax.tree.leaves(params)


def test_a_save_error_names_the_step_of_an_earlier_asynchronous_save(tmp_path, monkeypatch):
  ckpt = checkpoint.Checkpointer(tmp_path, async_save=False)
  ckpt.save(5, params={"w": np.ones(3)}, train={"step": np.int32(5)}, data_iterator=None, metadata={"step": 5})
  real_save = ckpt._manager.save

  def failing(step, *args, **kwargs):
    raise ValueError(f'RESOURCE_EXHAUSTED: Failed writing: "{ckpt.directory}/10.orbax-checkpoint-tmp/train/x": '
                     "No space left on device")
  monkeypatch.setattr(ckpt._manager, "save", failing)
  with pytest.raises(checkpoint.CheckpointSaveError) as error:
    ckpt.save(15, params={"w": np.ones(3)}, train={"step": np.int32(15)}, data_iterator=None, metadata={})
  message = str(error.value)
  assert "step 10" in message and "last complete checkpoint is step 5" in message, message
  monkeypatch.setattr(ckpt._manager, "save", real_save)
  ckpt.close()


def test_a_deleted_iterator_state_is_reported_as_missing(tmp_path):
  import eval_testing
  ckpt = checkpoint.Checkpointer(tmp_path, async_save=False)
  ckpt.save(5, params={"w": np.ones(3)}, train={"step": np.int32(5)}, data_iterator=eval_testing.TintedStream(4),
            metadata={"step": 5})
  ckpt.close()
  for path in (tmp_path / "checkpoints" / "5" / "data_iterator").iterdir():
    if path.name.startswith("process_"):
      path.unlink()
  ckpt = checkpoint.Checkpointer(tmp_path, async_save=False)
  abstract = {"w": jax.ShapeDtypeStruct((3,), np.float64)}
  with pytest.raises(FileNotFoundError) as error:
    ckpt.restore(5, params=abstract, train={"step": jax.ShapeDtypeStruct((), np.int32)},
                 data_iterator=eval_testing.TintedStream(4))
  ckpt.close()
  assert "missing" in str(error.value) and "different number of processes" not in str(error.value)


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
