"""SIGTERM and Ctrl-C (SIGINT) during training: finish the current step, save it, then exit.

SIGTERM (what schedulers send before preempting) and the first Ctrl-C both save the step reached; the training loop
(dtm_jax/runner/loop.py) then raises `errors.Interrupted`, and main.py exits with status 0 after SIGTERM, 130 after
Ctrl-C. A second Ctrl-C exits at once (status 130) without waiting for the checkpoint.

Every process must save the same step. One process reads its own flag, set by the handlers below. Several processes
(a pod slice; GKE and Spot VMs warn one host at a time) use JAX's preemption sync point: `jax.distributed.initialize`
starts a preemption sync manager with its own SIGTERM handler; on a notice the processes agree in the background on
the step after the fastest one's, and `multihost_utils.reached_preemption_sync_point` turns True at that step on
every process. It is a host call (no device collective, nothing drained), so the loops ask it at every step. A Python
SIGTERM handler would replace the manager's (the notice would never leave the host), so multi-process runs handle
only Ctrl-C here and hand the first one to the manager as a SIGTERM of their own process.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils

from dtm_jax.runtime import errors

# should_stop() calls of every PreemptionFlag of this process: the sync point's step counter. It never goes back
# (a pretraining run and the evaluation that follows it count on), and every process runs the same loops, so the
# processes' counters agree.
_sync_calls = 0


class PreemptionFlag:
  """When a training loop should save the step reached and stop: `should_stop()`, asked once per step (or epoch) by
  every process, answers True on all of them at the same call."""

  def __init__(self):
    self.requested = False  # a stop signal reached this process
    self.interrupted = False  # Ctrl-C among them
    self._previous = {}
    self._synced = False  # several processes: JAX's preemption sync point decides

  def install(self) -> "PreemptionFlag":
    self._synced = jax.process_count() > 1
    if self._synced:
      try:  # registers the counter: a notice that came before the loop (while compiling) stops it at its first step
        multihost_utils.reached_preemption_sync_point(_sync_calls)
      except RuntimeError as e:
        raise errors.RunError(
            "This run has several processes but JAX's preemption service is off (jax_enable_preemption_service="
            "False): the processes could not agree on the step to save when one host is preempted. Remove that "
            "setting.") from e
    if threading.current_thread() is not threading.main_thread():
      logging.warning("Not in the main thread: Ctrl-C keeps its default behaviour (no checkpoint)%s.",
                      "" if self._synced else ", and so does SIGTERM")
      return self
    for sig in (signal.SIGINT,) if self._synced else (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def should_stop(self) -> bool:
    """True when this step is to be saved and the loop stopped; call it exactly once per step on every process."""
    global _sync_calls
    if not self._synced:
      return self.requested
    _sync_calls += 1
    if not multihost_utils.reached_preemption_sync_point(_sync_calls):
      return False
    logging.warning("A process received a preemption notice (SIGTERM%s): every process saves this step and stops.",
                    " or Ctrl-C" if self.interrupted else "")
    self.requested = True
    return True

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT:
      if self.interrupted:
        logging.warning("Second Ctrl-C: exiting now, without the checkpoint of the current step.")
        _flush()
        os._exit(errors.EXIT_INTERRUPTED)  # pylint: disable=protected-access
        return  # only reached when os._exit is replaced (tests)
      self.interrupted = True
      logging.warning("Ctrl-C: will save a checkpoint of the current step and exit (Ctrl-C again exits at once, "
                      "without it).")
      if self._synced:  # the preemption sync manager's SIGTERM handler tells every process
        signal.raise_signal(signal.SIGTERM)
    else:
      logging.warning("SIGTERM received: will save a checkpoint after the current step and exit.")
    self.requested = True

  def uninstall(self) -> None:
    for sig, previous in self._previous.items():
      if previous is not None:
        signal.signal(sig, previous)
    self._previous = {}

  def __enter__(self):
    return self.install()

  def __exit__(self, *exc):
    self.uninstall()


def _flush():
  try:
    logging.flush()
    sys.stderr.flush()
  except Exception:  # pylint: disable=broad-except
    pass


@contextlib.contextmanager
def stop_at_once(what: str):
  """SIGTERM and Ctrl-C outside the training loop (building programs, restoring, encoding features): stop at once
  with errors.Interrupted, one line and the same exit statuses (0 after SIGTERM, 130 after Ctrl-C). The loop installs
  its own handlers (PreemptionFlag), which save the step reached first; these come back after it."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def handle(signum, frame):
    del frame
    ctrl_c = signum == signal.SIGINT
    raise errors.Interrupted(
        f"{what} stopped ({'Ctrl-C' if ctrl_c else 'SIGTERM'}) outside its training steps; nothing new was saved. "
        "Rerun the same command to resume from its last checkpoint.",
        exit_code=errors.EXIT_INTERRUPTED if ctrl_c else 0)

  # With several processes JAX's preemption sync manager owns SIGTERM (see the module docstring).
  signals = (signal.SIGINT,) if jax.process_count() > 1 else (signal.SIGTERM, signal.SIGINT)
  previous = {sig: signal.signal(sig, handle) for sig in signals}
  try:
    yield
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
