"""The list of modes: every way to run the project, one module each in `dtm_jax/modes/`, one line each here.

`main.py` dispatches from it, `--mode=compile` (dtm_jax/aot.py) compiles any mode that declares programs, and the
config checks of a mode are found through it. Adding a mode is a module that defines `MODE` and a line in `_MODULES`.
"""
from __future__ import annotations

import jax

from dtm_jax import config_checks
from dtm_jax.modes import compare, finetune, knn, linear_probe, pretrain, segment
from dtm_jax.program import Mode
from dtm_jax.runtime import errors

_MODULES = (pretrain, finetune, linear_probe, knn, compare, segment)
MODES: dict[str, Mode] = {module.MODE.name: module.MODE for module in _MODULES}


def get(name: str) -> Mode:
  """The mode called `name`; errors.ConfigError naming the known ones otherwise."""
  if name not in MODES:
    raise errors.ConfigError(f"Unknown mode {name!r}; choose one of {', '.join(MODES)} (or compile).")
  return MODES[name]


def mode_of(config, requested: str | None = None) -> str:
  """The mode a run of `config` is: `config.mode` (every shipped config names its own), or `requested` (main.py's
  --mode) when the config names none; a --mode that contradicts the config is refused."""
  declared = config.get("mode") if hasattr(config, "get") else None
  if declared and requested and declared != requested:
    raise errors.ConfigError(f"This config is for --mode={declared} (config.mode={declared!r}), not "
                             f"--mode={requested}; "
                             f"drop --mode or use a {requested} config.")
  name = declared or requested
  if not name:
    raise errors.ConfigError("The config names no mode: add `config.mode = \"<mode>\"` to it or pass --mode "
                             f"(one of {', '.join(MODES)}).")
  get(name)
  return name


def problems(mode: str, config, *, num_devices: int | None = None, check_paths: bool = True) -> list[str]:
  """Every problem of `config` for `mode`, one line each (empty when it can run). check_paths: whether the files
  the run would read (teacher, pretrained workdir) must be named and exist (False for `--mode=compile`)."""
  checker = config_checks.Checker(config)
  declared = checker.get("mode")
  if declared is not config_checks.MISSING and declared != mode:
    checker.add("mode", declared, f"does not match the mode being run ({mode}).")
  get(mode).check(checker, jax.device_count() if num_devices is None else num_devices, check_paths)
  return checker.problems


def validate(mode: str, config, *, num_devices: int | None = None, check_paths: bool = True) -> None:
  """Raises errors.ConfigError listing every problem (the field and what to change)."""
  found = problems(mode, config, num_devices=num_devices, check_paths=check_paths)
  if found:
    raise errors.ConfigError("Invalid config:\n  - " + "\n  - ".join(found))
