"""The one training loop (dtm_jax/runner/loop.py) with stand-in steps: what a bad step or a full disk ends the run
with."""
import errno

import jax.numpy as jnp
import pytest

from dtm_jax.runner import loop
from dtm_jax.runtime import checkpoint, errors, metrics


def count_step(losses):
  """A step whose state counts steps and whose loss is losses[state]."""
  return lambda state, batch: (state + 1, {"loss": jnp.float32(losses[int(state)])})


def test_a_non_finite_loss_before_any_checkpoint_says_there_is_none(tmp_path):
  writer = metrics.MetricsWriter(tmp_path, flush_every_secs=0.0)
  with pytest.raises(errors.NonFiniteError, match="non-finite loss at step 2.*No checkpoint was written") as error:
    loop.train_loop(jnp.int32(0), what="Pretraining", step=0, total=4, train_step=count_step([1.0, float("nan")] * 2),
                    next_batch=None, log_every=1, writer=writer, save=None)
  assert isinstance(error.value, errors.RunError)  # main.py prints it as one line, without a traceback


def test_a_non_finite_loss_after_a_checkpoint_names_the_step_a_rerun_resumes_from(tmp_path):
  checkpointer = checkpoint.Checkpointer(tmp_path, async_save=False)
  saved = []

  def save(state, step):
    checkpointer.save_state(step, {"params": {"w": jnp.ones(2)}, "step": state}, data_iterator=None,
                            metadata={"step": step})
    saved.append(step)

  with pytest.raises(errors.NonFiniteError, match="resumes from the checkpoint of step 2"):
    loop.train_loop(jnp.int32(0), what="Pretraining", step=0, total=6,
                    train_step=count_step([1.0, 1.0, float("inf"), 1.0, 1.0, 1.0]), next_batch=None, log_every=1,
                    writer=metrics.MetricsWriter(tmp_path, flush_every_secs=0.0), save=save, save_every=2,
                    checkpointer=checkpointer)
  assert saved == [2]


class _FullDiskWriter(metrics.MetricsWriter):
  def close(self):
    super().close()
    raise OSError(errno.ENOSPC, "No space left on device")


class _FailingCheckpointer:
  directory = "/somewhere/checkpoints"

  def __init__(self):
    self.closed = False

  def latest_step(self):
    return None

  def close(self):
    self.closed = True
    raise checkpoint.CheckpointSaveError("Saving the checkpoint of step 2 to /somewhere/checkpoints failed: No space "
                                         "left on device. The newest complete checkpoint is step 0.")


@pytest.mark.parametrize("fails_in", ["save", "close"])
def test_on_a_full_disk_the_save_error_is_the_one_the_run_ends_with(tmp_path, caplog, fails_in):
  """The metrics writer cannot be closed on the same full disk: that is logged, never put in the save error's place."""
  checkpointer = _FailingCheckpointer()

  def save(state, step):
    if fails_in == "save":
      raise checkpoint.CheckpointSaveError(f"Saving the checkpoint of step {step} to /somewhere/checkpoints failed.")

  with pytest.raises(checkpoint.CheckpointSaveError, match="Saving the checkpoint of step 2"):
    loop.train_loop(jnp.int32(0), what="Pretraining", step=0, total=2, train_step=count_step([1.0, 1.0]),
                    next_batch=None, log_every=1, writer=_FullDiskWriter(tmp_path), save=save,
                    checkpointer=checkpointer)
  assert checkpointer.closed and "No space left on device" in caplog.text  # the writer's failure, logged
