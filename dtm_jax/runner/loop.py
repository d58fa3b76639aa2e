"""What the three evaluations share: the restored student, its features, the sharded accuracy loop and results.

Everything runs on global jax.Arrays built from each host's slice of the data (`sharding.to_global`), and counts are
summed on device over the valid examples only, so on several hosts every example is counted exactly once.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from absl import logging

from dtm_jax.runtime import checkpoint, errors, metrics
from dtm_jax.runtime import preemption as preemption_lib

PyTree = Any


def _require_finite(scalars: dict, step: int, what: str) -> None:
  bad = sorted(name for name, value in scalars.items() if not np.all(np.isfinite(value)))
  if bad:
    raise FloatingPointError(
        f"{what}: non-finite {', '.join(bad)} at step {step}; no checkpoint of this state was written. Lower the "
        "learning rate or check the input, then rerun the same command to resume from the last checkpoint.")


def run_training_steps(state: PyTree, *, what: str, step: int, total_steps: int, train_step: Callable,
                       next_batch: Callable[[], PyTree], rng: jax.Array, is_eval_step: Callable[[int], bool],
                       evaluate: Callable[[PyTree, int], None], save: Callable[[PyTree, int], None],
                       checkpointer: checkpoint.Checkpointer, writer: metrics.MetricsWriter,
                       progress: metrics.Progress, log_every: int, stop_after: int | None = None) -> tuple[PyTree, int]:
  """Steps `step` → `total_steps` of `train_step(state, batch, rng) -> (state, scalars)`; returns (state, step).

  The scalars are read at log, evaluation and save steps; a non-finite one stops the run with FloatingPointError
  before anything is evaluated or saved, so the last checkpoint stays the last good state.

  Evaluates (`evaluate(state, step)`) and checkpoints (`save(state, step)`) at each `is_eval_step`, and checkpoints
  and stops at a preemption (SIGTERM, Ctrl-C, JAX's preemption notice) or at `stop_after`. Double buffering: the next
  batch (`next_batch()`, already sent to the devices) is read while they run a step, never past a step that saves,
  so a saved input position is exactly the steps taken. Closes `checkpointer` (waits for the last save) and
  `writer`. A preemption before `total_steps` raises `errors.Interrupted` (exit 0 after SIGTERM, 130 after Ctrl-C).
  """
  preemption = preemption_lib.PreemptionFlag().install()
  batch = None  # the next step's batch, when it is already on its way to the devices
  stopped = False
  try:
    while step < total_steps:
      state, scalars = train_step(state, batch if batch is not None else next_batch(), rng)
      step += 1
      evaluating = is_eval_step(step) or step == total_steps
      stopped = preemption.should_stop() or step == stop_after  # every step on every process: all stop together
      batch = None if (evaluating or stopped) else next_batch()
      progress(step, done=scalars)
      logging_step = step % log_every == 0
      if logging_step or evaluating or stopped:  # never evaluate or save a diverged state
        fetched = jax.device_get(scalars)
        _require_finite(fetched, step, what)
        if logging_step:
          writer.write_scalars(step, fetched)
      if evaluating:
        evaluate(state, step)
      if evaluating or stopped:  # a mid-epoch step when stopped: resumable
        writer.flush()  # the lines up to a checkpoint's step survive a kill (they are not computed again)
        save(state, step)
      if stopped:
        logging.warning("Stopped at step %d of %d: its checkpoint is written; rerunning the same command resumes "
                        "from it.", step, total_steps)
        break
  finally:
    preemption.uninstall()
    try:
      checkpointer.close()  # waits for the last save; a failed one raises CheckpointSaveError
    finally:
      writer.close()
  if stopped and step < total_steps and preemption.requested:
    raise errors.Interrupted(
        f"{what} stopped ({'Ctrl-C' if preemption.interrupted else 'SIGTERM'}) at step {step} of {total_steps}; its "
        f"checkpoint is in {checkpointer.directory}. Rerun the same command to resume from it.",
        exit_code=errors.EXIT_INTERRUPTED if preemption.interrupted else 0)
  return state, step
