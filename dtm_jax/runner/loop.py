"""The one training loop of every mode that trains: pretraining, fine-tuning, segmentation and the linear probe.

`train_loop` runs steps `step` → `total` of a mode's `train_step(state, batch) -> (state, scalars)` (a step is a
batch; for the linear probe, an epoch) with one behaviour for every mode:

* Double buffering: the next batch (`next_batch()`, already sent to the devices) is read while the devices run a step,
  never past a step that saves, so a saved input position is exactly the steps taken.
* The scalars are read only at log, evaluation and save steps; a non-finite one (`check`) stops the run with
  errors.NonFiniteError (a FloatingPointError) before anything is evaluated or saved, so the last checkpoint stays
  the last good state; the message says which step a rerun resumes from, or that none was saved.
* Cadence: log every `log_every` steps, evaluate (`evaluate(state, step)`) every `eval_every`, save
  (`save(state, step)`) every `save_every`; all three at the last step, and a save when stopped.
* Stopping: SIGTERM, Ctrl-C and JAX's preemption notice (dtm_jax.runtime.preemption; every process stops at the same
  step) save the step reached and raise `errors.Interrupted`: exit status 0 after SIGTERM (a preemption the rerun
  recovers from), 130 after Ctrl-C; `stop_after` saves and returns normally (`Finished.stopped`).
* A run whose workdir lock another run took over (dtm_jax.runtime.workdir_lock) stops before its next step.
* On the way out the checkpointer is closed (waiting for the last save) and the metrics writer closed; an error
  while closing the writer is logged, never put in place of the error that ended the run.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
from absl import logging
from etils import epath

from dtm_jax.runtime import checkpoint, errors, metrics, workdir_lock
from dtm_jax.runtime import preemption as preemption_lib

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Finished:
  """Where the loop ended: the state and step reached, whether it stopped early (`stop_after`), and the scalars of
  the last logged step (with `log_extra`'s)."""
  state: PyTree
  step: int
  stopped: bool
  last_scalars: dict


def require_finite(scalars: dict, step: int, what: str) -> None:
  """errors.NonFiniteError naming every non-finite scalar and the step."""
  bad = sorted(name for name, value in scalars.items() if not np.all(np.isfinite(value)))
  if bad:
    raise errors.NonFiniteError(f"{what}: non-finite {', '.join(bad)} at step {step}; no checkpoint of this state "
                                "was written.")


def _what_to_do(checkpointer: checkpoint.Checkpointer | None) -> str:
  latest = checkpointer.latest_step() if checkpointer is not None else None
  if latest is None:
    return "No checkpoint was written before it: lower the learning rate or check the input, then rerun."
  return (f"Lower the learning rate or check the input, then rerun the same command: it resumes from the "
          f"checkpoint of step {latest} (with --config.allow_config_change=True for a changed learning rate).")


def train_loop(state: PyTree, *, what: str, step: int, total: int, train_step: Callable[[PyTree, Any], tuple],
               next_batch: Callable[[], Any] | None, log_every: int, writer: metrics.MetricsWriter,
               save: Callable[[PyTree, int], None] | None, save_every: int | None = None,
               checkpointer: checkpoint.Checkpointer | None = None,
               evaluate: Callable[[PyTree, int], None] | None = None, eval_every: int | None = None,
               check: Callable[[dict, int], None] | None = None,
               log_extra: Callable[[int], dict] | None = None, stop_after: int | None = None,
               progress_every_secs: float = 30.0, unit: str = "step", metrics_step: Callable[[int], int] = int,
               profile_dir: epath.Path | None = None, profile_start: int = 0, profile_steps: int = 0,
               close_writer: bool = True) -> Finished:
  """Runs the steps (see the module docstring) and closes `checkpointer` and `writer`.

  save_every: steps between checkpoints (None: only at the end and when stopped). check(fetched
  scalars, step): raises on a bad step (default: `require_finite`). log_extra(step): more scalars for the log line
  (throughput). unit / metrics_step: what a step is called in messages and the step number its metrics are written
  at (the probe counts epochs and writes at the batch count). profile_*: a profiler trace of steps
  [profile_start, profile_start + profile_steps) in `profile_dir` (process 0). close_writer: False when the caller
  goes on writing to `writer` (the probe inside --mode=linear_probe's run).
  """
  check = check or (lambda scalars, at: require_finite(scalars, at, what))
  eval_every = eval_every if evaluate is not None else None
  progress = metrics.Progress(total, every_secs=progress_every_secs)
  preemption = preemption_lib.PreemptionFlag().install()
  tracing = profile_dir is not None and profile_steps > 0 and jax.process_index() == 0
  batch = None  # the next step's batch, when it is already on its way to the devices
  stopped = False
  last_scalars: dict = {}
  try:
    while step < total:
      workdir_lock.raise_if_taken_over()  # another run took this workdir's lock: stop before writing anything more
      if tracing and step == profile_start:
        jax.profiler.start_trace(str(profile_dir))
      state, scalars = train_step(state, batch if batch is not None else (next_batch() if next_batch else None))
      step += 1
      last = step == total
      # Asked at every step on every process (a host call; every process gets the same answer at the same step).
      stopped = preemption.should_stop() or step == stop_after
      evaluating = eval_every is not None and (step % eval_every == 0 or last)
      saving = save is not None and ((save_every is not None and step % save_every == 0) or last or stopped)
      # Double buffering: the step was only dispatched, so the next batch is read and sent to the devices while they
      # run it, before the waits below. Not past a step that saves: a saved input position is the steps taken.
      batch = None if (saving or stopped or last or next_batch is None) else next_batch()
      if tracing and step == profile_start + profile_steps:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
      progress(step, done=scalars)
      logging_step = step % log_every == 0 or last
      if logging_step or evaluating or saving or stopped:  # never evaluate or save a diverged state
        fetched = jax.device_get(scalars)
        try:
          check(fetched, step)
        except errors.NonFiniteError as error:
          raise errors.NonFiniteError(f"{error} {_what_to_do(checkpointer)}") from None
        if logging_step:
          last_scalars = {k: float(v) for k, v in fetched.items() if np.ndim(v) == 0}
          if log_extra is not None:
            last_scalars.update(log_extra(step))
          writer.write_scalars(metrics_step(step), last_scalars)
      if evaluating:
        evaluate(state, step)
      if saving:
        writer.flush()  # the lines up to a checkpoint's step survive a kill (they are not computed again)
        save(state, step)
      if stopped:
        if saving:
          logging.warning("Preempted: checkpoint of %s %d written; exiting.", unit, step)
        break
    progress(step, force=True, done=state)
  except BaseException:
    preemption.uninstall()
    _close_after_error(checkpointer, writer if close_writer else None)
    raise
  preemption.uninstall()
  _close(checkpointer, writer if close_writer else None)
  if stopped and step < total:
    where = (f"its checkpoint is in {checkpointer.directory}. Rerun the same command to resume from it."
             if checkpointer is not None else "rerun it to start again.")
    if preemption.requested:
      signal = "Ctrl-C" if preemption.interrupted else "SIGTERM"
      raise errors.Interrupted(f"{what} stopped ({signal}) after {unit} {step} of {total}; {where}",
                               exit_code=errors.EXIT_INTERRUPTED if preemption.interrupted else 0)
    logging.warning("%s stopped after %s %d of %d (stop_after_step); %s", what, unit, step, total, where)
  return Finished(state, step, stopped and step < total, last_scalars)


def _close(checkpointer: checkpoint.Checkpointer | None, writer: metrics.MetricsWriter | None) -> None:
  """Waits for the last save (a failed one raises CheckpointSaveError) and closes the writer; when the save failed,
  a writer that cannot be closed either (the same full disk) is only logged: the save's error is the one reported."""
  try:
    if checkpointer is not None:
      checkpointer.close()
  except BaseException:
    if writer is not None:
      _close_quietly(writer.close, "the metrics writer")
    raise
  if writer is not None:
    writer.close()


def _close_after_error(checkpointer: checkpoint.Checkpointer | None, writer: metrics.MetricsWriter | None) -> None:
  """Closes both while an error is on its way out: their own failures are logged, never put in its place."""
  if checkpointer is not None:
    _close_quietly(checkpointer.close, "the checkpointer")
  if writer is not None:
    _close_quietly(writer.close, "the metrics writer")


def _close_quietly(close: Callable[[], None], what: str) -> None:
  try:
    close()
  except Exception as error:  # pylint: disable=broad-except
    logging.error("Could not close %s: %s", what, error)
