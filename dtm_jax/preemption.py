"""SIGTERM and Ctrl-C (SIGINT) during training: finish the current step, save it, then exit.

SIGTERM (what schedulers send before preempting) ends the run with status 0 after the checkpoint; the first Ctrl-C
does the same and then raises `errors.Interrupted` (main.py exits with 130); a second Ctrl-C exits at once (status
130) without waiting for the checkpoint.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

import jax
import numpy as np
from absl import logging

from dtm_jax import errors


class PreemptionFlag:
  """Set by SIGTERM or SIGINT; the loop then checkpoints the step reached and stops (all processes agree)."""

  def __init__(self):
    self.requested = False  # any stop signal
    self.interrupted = False  # Ctrl-C among them
    self._previous = {}

  def install(self) -> "PreemptionFlag":
    if threading.current_thread() is not threading.main_thread():
      logging.warning("Not in the main thread: SIGTERM and Ctrl-C keep their default behaviour (no checkpoint).")
      return self
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

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
    else:
      logging.warning("SIGTERM received: will save a checkpoint after the current step and exit.")
    self.requested = True

  def uninstall(self) -> None:
    for sig, previous in self._previous.items():
      if previous is not None:
        signal.signal(sig, previous)
    self._previous = {}

  def any_process(self) -> bool:
    """True if any process was asked to stop (all processes must save the same step)."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))

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
