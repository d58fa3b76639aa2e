"""main.py's command-line parsing, before JAX is imported: config-override errors as one clear line.

`parse_flags` is absl's flags parser for `app.run`: an unknown `--config.<field>` or a value of the wrong type becomes
"Invalid config: unknown field ..." and exit status 2 instead of ml_collections' traceback. Nothing here imports JAX.
"""
from __future__ import annotations

import ast
import re
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
  """ml_collections' error text (the field in quotes, maybe a second line "Did you mean ...") as one plain line."""
  text = str(error.args[0]) if error.args else str(error)
  for _ in range(3):  # some versions nest the message in repr()s: undo them
    try:
      unquoted = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      break
    if not isinstance(unquoted, str) or unquoted == text:
      break
    text = unquoted
  first, _, rest = text.partition("\n")
  name = first.strip().strip("\"'")
  suggestion = re.search(r'Did you mean "([^"]+)"', rest)
  flags_named = [a for a in argv[1:] if a.startswith("--config.") and
                 a.split("=", 1)[0].rsplit(".", 1)[-1] == name]
  where = f" ({flags_named[0]})" if flags_named else ""
  hint = f" Did you mean {suggestion.group(1)!r}?" if suggestion else " Check its spelling against the config file."
  return f"Invalid config: unknown field {name!r}{where}.{hint} Only fields the config defines can be overridden."


def _exit_with(message: str, argv: Sequence[str]) -> None:
  del argv
  if message.startswith("Invalid config"):
    print(message, file=sys.stderr, flush=True)  # the cause, last
  else:
    print("Pass --helpfull to see the flags.", file=sys.stderr, flush=True)
    print(f"FATAL Flags parsing error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)
