"""main.py's command-line parsing, before JAX is imported: config-override errors as one clear line.

`parse_flags` is absl's flags parser for `app.run`: an unknown `--config.<field>` or a value of the wrong type becomes
"Invalid config: unknown field ..." and exit status 2 instead of ml_collections' traceback. Nothing here imports JAX.
"""
from __future__ import annotations

import sys
from typing import Sequence


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with config-override errors (an unknown field, a value of the wrong type) reported as
  one clear line and exit status 2 instead of ml_collections' traceback."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _exit_with(str(e), argv)
  except (AttributeError, KeyError) as e:
    _exit_with(_unknown_field_message(e, argv), argv)
  return []  # unreachable


def _unknown_field_message(error: Exception, argv: list[str]) -> str:
  name = str(error).strip("\"'")
  flags_named = [a for a in argv[1:] if a.startswith("--config.") and
                 a.split("=", 1)[0].rsplit(".", 1)[-1] == name]
  where = f" ({flags_named[0]})" if flags_named else ""
  return (f"Invalid config: unknown field {name!r}{where}. Check its spelling against the config file; only fields "
          "the config defines can be overridden.")


def _exit_with(message: str, argv: Sequence[str]) -> None:
  del argv
  print(f"FATAL Flags parsing error: {message}" if not message.startswith("Invalid config") else message,
        file=sys.stderr, flush=True)
  print("Pass --helpfull to see the flags.", file=sys.stderr, flush=True)
  sys.exit(2)
