"""What a mode is and what it compiles: the two interfaces every mode module implements (a leaf: no project imports).

A `Mode` (one per module in `dtm_jax/modes/`, listed once in `dtm_jax/registry.py`) declares its config checks, its
run, and the programs `--mode=compile` builds for it. A `Program` is one jitted function of a mode with abstract
arguments that carry their shardings, and the analytic FLOPs of one call: what the compile mode lowers, compiles and
reports for a TPU slice, with nothing initialised or read.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Program:
  """One jitted function of a mode with its abstract inputs, and the analytic FLOPs of one call (all chips)."""
  name: str
  jitted: Callable
  args: tuple
  analytic_flops: float


@dataclasses.dataclass(frozen=True)
class Mode:
  """A way to run the project (`main.py --mode=<name>`).

  check: `check(checker, num_devices, check_paths)` adds one line per problem of a config (dtm_jax.config_checks).
  run: `run(config, workdir) -> results` (dtm_jax.runner.run wraps it: lock, mesh, results file).
  programs: `programs(config, mesh) -> [Program]` from abstract inputs, or None when the mode cannot be compiled
    ahead of time (the reason is `not_compilable`).
  memory_knobs: the config fields `--mode=compile --fit` may change to make a program fit (cheapest first), and
    that a program too large for a chip is told to lower.
  """
  name: str
  summary: str
  check: Callable[..., None]
  run: Callable[[Any, str], dict]
  programs: Callable[[Any, Any], list[Program]] | None = None
  not_compilable: str = ""
  memory_knobs: tuple[str, ...] = ()
