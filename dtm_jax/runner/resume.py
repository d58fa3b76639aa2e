"""The one resume of every mode that checkpoints: newest readable step, one config-drift policy, another slice.

`find(checkpointer, config, required=...)` reads what the workdir's newest readable checkpoint says before anything
is built (a fine-tuning or segmentation run needs its model config first); `Found.restore(...)` then restores the
state into the program's shardings, with the input at the step reached.

* Newest readable step: the metadata goes through the same fallback as every other item, so a damaged newest step
  leaves the older ones (dtm_jax.runtime.checkpoint.Checkpointer.restore_latest_good); a workdir none of whose
  checkpoints can be read is an error, never a silent fresh start.
* Config drift: a checkpoint of a run with another config is refused, naming the differing keys, unless
  `config.allow_config_change=True`; keys that do not change what is computed (`RESUMABLE_KEYS`: logging,
  checkpoint cadence, evaluation, the mesh, ...) may change freely.
* Another process count (a resume on another slice): the input-iterator states, one per old process, fit no process
  of this run, so the state is restored without them and the input rebuilt at the step reached (the parameters and
  optimizer state are resharded onto this run's mesh through the abstract shardings).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import ml_collections
from absl import logging

from dtm_jax.runtime import checkpoint, errors

PyTree = Any
# Config keys that may change between a run and its resumption without changing what is computed.
RESUMABLE_KEYS = ("mode", "log_every", "checkpoint_every", "keep_checkpoints", "async_checkpointing", "profile",
                  "eval", "eval_every_epochs", "eval_every_steps", "eval_batch_size", "allow_config_change",
                  "progress_every_secs", "stop_after_step", "metrics_flush_secs", "mesh")


class ConfigDriftError(errors.ConfigError):
  """The workdir holds a checkpoint of a run with another config."""


def flatten_config(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten_config(v, key + "."))
    else:
      out[key] = v
  return out


def config_differences(old: dict, new: dict) -> list[str]:
  """Keys (dotted) whose values differ, ignoring those that may change on resumption."""
  a = flatten_config(json.loads(json.dumps(old, default=str)))
  b = flatten_config(json.loads(json.dumps(new, default=str)))
  return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k.split(".")[0] not in RESUMABLE_KEYS]


@dataclasses.dataclass(frozen=True)
class Found:
  """The newest readable checkpoint of a workdir, before restoring: its step and metadata, and whether another
  process count wrote it."""
  checkpointer: checkpoint.Checkpointer
  step: int
  metadata: dict
  required: tuple[str, ...]

  @property
  def other_layout(self) -> bool:
    return checkpoint.written_by_other_process_count(self.metadata) is not None

  def restore(self, abstract_state: PyTree, data_fn: Callable[[int], Any] | None) -> tuple[int, PyTree, dict, Any]:
    """(step, state, metadata, data): the newest step that restores completely, into the shardings of
    `abstract_state` (ShapeDtypeStructs), and `data_fn(start_step)`'s input positioned at it (None: no input)."""
    data = None if (self.other_layout or data_fn is None) else data_fn(0)
    step, params, train, metadata = self.checkpointer.restore_latest_good(
        params=abstract_state["params"], train={k: v for k, v in abstract_state.items() if k != "params"},
        data_iterator=data, required_metadata=self.required)
    if self.other_layout and data_fn is not None:
      data = data_fn(step)
      logging.warning("%s", checkpoint.rebuilt_input_warning(step, metadata, data))
    logging.info("Resumed from the checkpoint of step %d in %s.", step, self.checkpointer.directory)
    return step, {"params": params, **train}, metadata, data


def find(checkpointer: checkpoint.Checkpointer, config: ml_collections.ConfigDict, *,
         required: tuple[str, ...] = ()) -> Found | None:
  """What the workdir's newest readable checkpoint says, or None when it has none (a fresh start).

  Raises ConfigDriftError when that checkpoint's run had another config and `config.allow_config_change` is not
  set. `required`: metadata keys a usable checkpoint must hold."""
  if checkpointer.latest_step() is None:
    return None
  readable = checkpointer.latest_readable_metadata(required=required)
  if readable is None:
    raise RuntimeError(f"No checkpoint in {checkpointer.directory} can be restored (steps {checkpointer.all_steps()}): "
                       "no step's metadata reads back (the warnings above say why). Move the workdir aside to start "
                       "afresh.")
  step, metadata = readable
  check_drift(metadata, config, checkpointer)
  return Found(checkpointer, step, metadata, required)


def check_drift(metadata: dict, config: ml_collections.ConfigDict, checkpointer: checkpoint.Checkpointer) -> None:
  """Refuses to resume a run whose saved config differs from `config` (see the module docstring)."""
  if "config" not in metadata:  # written before checkpoints recorded their config: nothing to compare
    logging.warning("The checkpoint in %s records no config; resuming with this run's.", checkpointer.directory)
    return
  diffs = config_differences(metadata["config"], config.to_dict())
  if not diffs:
    return
  if config.get("allow_config_change"):
    logging.warning("Resuming %s with a changed config (allow_config_change): %s.", checkpointer.directory,
                    ", ".join(diffs))
    return
  raise ConfigDriftError(
      f"{checkpointer.directory} holds a checkpoint of a run with a different config (differing keys: "
      f"{', '.join(diffs)}). Use a new --workdir, or pass --config.allow_config_change=True to resume with the new "
      "values.")
