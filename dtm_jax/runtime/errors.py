"""Errors whose message says everything a user needs, and how `main.py` turns them into exit statuses.

`RunError` (and its kinds: an invalid config, a workdir in use, a checkpoint that could not be saved) is printed as one
line without a traceback and exits with status 1; `Interrupted` (SIGTERM or Ctrl-C after the step reached was saved)
exits with 0 after SIGTERM and 130, the shell's status for SIGINT, after Ctrl-C.
"""
from __future__ import annotations

import functools
import sys
import traceback

EXIT_INTERRUPTED = 130
_reported: set[str] = set()  # failures already explained to the user (see report/was_reported)


def report(kind: str) -> None:
  """Marks a failure kind (e.g. "checkpoint_save") as explained, so library noise about it can be dropped."""
  _reported.add(kind)


def was_reported(kind: str) -> bool:
  return kind in _reported


class RunError(RuntimeError):
  """A failure the message fully explains (what happened, what to change); no traceback is needed."""


class DataError(RunError, ValueError):
  """Input data that cannot be used (a truncated or corrupt file): the message names the file and what to do."""


class MissingDataError(RunError, FileNotFoundError):
  """Input data that is not where the config says: the message names the path and how to get the files."""


class NonFiniteError(RunError, FloatingPointError):
  """A loss, gradient norm or other logged scalar became NaN or infinite; nothing of that state was saved."""


class ConfigError(RunError, ValueError):
  """The config cannot work; the message lists every field to change."""


class Interrupted(KeyboardInterrupt):
  """SIGTERM or Ctrl-C (SIGINT) in any mode: the run saved the step it reached and stopped (dtm_jax/runner/loop.py).
  `main.py` exits with `exit_code`: 0 after SIGTERM (a preemption the rerun recovers from), 130 after Ctrl-C."""

  def __init__(self, message: str, exit_code: int = EXIT_INTERRUPTED):
    super().__init__(message)
    self.exit_code = exit_code


def cli(main, verbose=lambda: False):
  """Wraps absl's `main(argv)`: RunError → its message as the last line and exit 1, Interrupted → its message and
  its exit status (0 after SIGTERM, 130 after Ctrl-C). `verbose()` True (main.py's --verbose) prints the traceback
  too. Other exceptions are internal errors and keep their traceback."""

  @functools.wraps(main)
  def wrapped(argv):
    from absl import logging  # pylint: disable=g-import-not-at-top
    try:
      return main(argv)
    except Interrupted as e:
      logging.warning("%s", e)
      _flush_logs()
      sys.exit(e.exit_code)
    except RunError as e:
      if verbose():
        traceback.print_exc()
      logging.error("%s", e)
      _flush_logs()
      print(f"Error: {e}", file=sys.stderr, flush=True)
      sys.exit(1)

  return wrapped


def _flush_logs():
  from absl import logging  # pylint: disable=g-import-not-at-top
  try:
    logging.flush()
  except Exception:  # pylint: disable=broad-except
    pass
