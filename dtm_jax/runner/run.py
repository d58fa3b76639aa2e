"""The one run wrapper of every mode: checks → workdir lock → mesh → the mode's run → results file.

Every mode goes through `run(mode, config, workdir)`: the config is checked before anything is created or compiled
(all problems at once, dtm_jax.registry), a workdir that is also the pretrained run's is refused, the workdir is
locked for the whole run (one writer, every mode; dtm_jax.runtime.workdir_lock), SIGTERM and Ctrl-C outside the
training loop stop at once with the loop's exit statuses (dtm_jax.runtime.preemption.stop_at_once), the mesh is
built from `config.mesh`, and what the mode returns goes to `<workdir>/results.json` and one line on the console. A
run that fails before its first step leaves the workdir as it found it. A config with `then_evaluate` (the demo's)
runs that evaluation of the finished run's workdir afterwards.
"""
from __future__ import annotations

import importlib
import json
import os

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from dtm_jax import registry, sharding
from dtm_jax.runtime import errors, preemption, workdir_lock


def run(mode: str, config: ml_collections.ConfigDict, workdir: str | epath.Path) -> dict:
  """Runs `mode` per `config` in `workdir` (resuming where the mode resumes); returns its results."""
  registry.validate(mode, config)
  workdir = epath.Path(workdir)
  pretrained = config.get("pretrained", {}).get("workdir") if "pretrained" in config else None
  if pretrained and epath.Path(pretrained).resolve() == workdir.resolve():
    raise errors.ConfigError(
        f"--workdir must differ from config.pretrained.workdir ({pretrained}): --mode={mode} writes its own "
        f"checkpoints, metrics and results; use e.g. --workdir={pretrained}/{mode}.")
  before = {path.name for path in workdir.iterdir()} if workdir.exists() else None
  try:
    with workdir_lock.hold(workdir, mode=mode), preemption.stop_at_once(f"--mode={mode}"):
      results = registry.get(mode).run(config, workdir, sharding.config_mesh(config))
  except errors.Interrupted:
    raise
  except BaseException:
    remove_start_up_leftovers(workdir, before)
    raise
  write_results(workdir, {"mode": mode, **results})
  followup = config.get("then_evaluate")
  if followup and not results.get("preempted"):
    run_followup(followup, workdir)
  return {"mode": mode, **results}


def remove_start_up_leftovers(workdir: epath.Path, before: set[str] | None) -> None:
  """After a run that failed before its first step (no checkpoint, no metrics line), removes what it created (the
  workdir itself when it did not exist before): a failed start leaves the workdir as it found it."""
  if not workdir.exists() or _started(workdir):
    return
  if before is None:
    workdir.rmtree(missing_ok=True)
    return
  for path in workdir.iterdir():
    if path.name not in before:
      path.rmtree(missing_ok=True) if path.is_dir() else path.unlink(missing_ok=True)


def _started(workdir: epath.Path) -> bool:
  checkpoints, lines = workdir / "checkpoints", workdir / "metrics.jsonl"
  return ((checkpoints.is_dir() and any(checkpoints.iterdir())) or
          (lines.exists() and bool(lines.read_text().strip())))


def run_followup(spec: ml_collections.ConfigDict, workdir: epath.Path) -> dict:
  """The evaluation a config asks for after its run (`then_evaluate`: a config module and its argument), of the
  run's workdir, in `<workdir>/<its mode>`."""
  config = importlib.import_module(spec.config_module).get_config(spec.get("config_arg", ""))
  with config.unlocked():
    config.pretrained.workdir = os.fspath(workdir)
  return run(config.mode, config, epath.Path(workdir) / config.mode)


def write_results(workdir: epath.Path, results: dict) -> None:
  """`<workdir>/results.json` (process 0) and one clear line on the console."""
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True, default=_json_default) + "\n")
  scores = ", ".join(f"{k}={v:.2f}%" for k, v in results.items()
                     if k.endswith(("top1", "top5", "miou", "aacc")) and isinstance(v, (int, float)))
  where = f" of {results['checkpoint']} (step {results.get('step')})" if results.get("checkpoint") else ""
  line = f"{results.get('mode')}{where}: " + (scores or ", ".join(
      f"{k}={v:.4g}" for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)))
  logging.info(line)
  print(line, flush=True)


def _json_default(value):
  if isinstance(value, (np.generic, jax.Array)):
    return np.asarray(value).item()
  return str(value)
