"""Orbax checkpoints of a run: parameters, the rest of the train state, the input-iterator position and metadata.

Layout: `<workdir>/checkpoints/<step>/{params,train,data_iterator,metadata}`. Each step directory is written under a
temporary name and renamed when complete (Orbax's atomic commit), so a crash mid-write leaves only a temporary
directory that is never picked up. `params` is its own item so evaluation restores the student alone.

The input iterator is saved per process by a small handler: each process writes `process_<i>_of_<n>` inside the
step's `data_iterator` directory by calling the iterator's own `save(path)` (the iterator lives in `input_pipeline/`;
nothing here imports TensorFlow). The handler runs synchronously at `save()` time, so the saved position is exactly
the number of batches consumed so far, even though the array items are written asynchronously.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Protocol

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

PyTree = Any
ITEMS = ("params", "train", "data_iterator", "metadata")


class SavableIterator(Protocol):
  def save(self, path: str) -> None: ...
  def restore(self, path: str) -> None: ...


def _iterator_path(directory: epath.Path) -> epath.Path:
  return directory / f"process_{jax.process_index()}_of_{jax.process_count()}"


class DataIteratorHandler(ocp.CheckpointHandler):
  """Saves and restores each process's input-iterator position inside the checkpoint."""

  def save(self, directory: epath.Path, args: "DataIteratorSave"):
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    args.iterator.save(str(_iterator_path(directory)))

  def restore(self, directory: epath.Path, args: "DataIteratorRestore"):
    path = _iterator_path(epath.Path(directory))
    if not path.exists() and not list(path.parent.glob(path.name + "*")):
      raise FileNotFoundError(
          f"No input-iterator state {path} in this checkpoint: it was written with a different number of processes "
          "(the data stream cannot be resumed exactly). Resume with the same process count.")
    args.iterator.restore(str(path))
    return args.iterator

  def metadata(self, directory: epath.Path):
    return None


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
  iterator: SavableIterator


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
  iterator: SavableIterator


def assert_processes_agree(step: int, config_digest: str) -> None:
  """All processes must resume at the same step with the same config; a mismatch would silently corrupt training."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  mine = np.array([step, int(config_digest, 16) % (2 ** 31)], np.int64)
  everyone = np.asarray(multihost_utils.process_allgather(mine))
  if not (everyone == everyone[0]).all():
    raise RuntimeError(f"Processes disagree on (step, config hash): {everyone.tolist()}. Every process must run the "
                       "same command on the same workdir (a shared filesystem or bucket).")


def config_hash(config_dict: dict) -> str:
  """Stable short hash of a config (as a JSON-able dict) to detect resuming with a different config."""
  return hashlib.sha256(json.dumps(config_dict, sort_keys=True, default=str).encode()).hexdigest()[:16]


def absolute_path(path: str | epath.Path) -> epath.Path:
  """`path` made absolute when it is local: Orbax refuses relative checkpoint paths (e.g. `--workdir=workdirs/demo`)."""
  path = epath.Path(path)
  return path if "://" in str(path) else epath.Path(os.path.abspath(path))


class Checkpointer:
  """One run's checkpoints: periodic async saves, keep-N, and restore with fallback to older good steps."""

  def __init__(self, workdir: str | epath.Path, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = absolute_path(workdir) / "checkpoints"
    if self.directory.exists():
      for partial in sorted(self.directory.glob("*.orbax-checkpoint-tmp*")):
        logging.warning("Ignoring the incomplete checkpoint %s (its save was interrupted); it is removed and the "
                        "newest complete checkpoint is used.", partial)
    handlers = {
        "params": ocp.StandardCheckpointHandler(),
        "train": ocp.StandardCheckpointHandler(),
        "data_iterator": DataIteratorHandler(),
        "metadata": ocp.JsonCheckpointHandler(),
    }
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           create=True, cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, *, params: PyTree, train: PyTree, data_iterator: SavableIterator | None,
           metadata: dict) -> None:
    items = dict(params=ocp.args.StandardSave(params), train=ocp.args.StandardSave(train),
                 metadata=ocp.args.JsonSave(metadata))
    if data_iterator is not None:
      items["data_iterator"] = DataIteratorSave(data_iterator)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def read_metadata(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]

  def restore(self, step: int, *, params: PyTree, train: PyTree,
              data_iterator: SavableIterator | None) -> tuple[PyTree, PyTree, dict]:
    """Restore one step onto abstract targets (ShapeDtypeStructs with shardings)."""
    items = dict(params=ocp.args.StandardRestore(params), train=ocp.args.StandardRestore(train),
                 metadata=ocp.args.JsonRestore())
    if data_iterator is not None:
      items["data_iterator"] = DataIteratorRestore(data_iterator)
    out = self._manager.restore(step, args=ocp.args.Composite(**items))
    return out["params"], out["train"], out["metadata"]

  def restore_latest_good(self, **targets) -> tuple[int, PyTree, PyTree, dict] | None:
    """Restore the newest step that reads back completely; warn about and skip broken ones. None if no step."""
    steps = self.all_steps()
    errors = []
    for step in reversed(steps):
      try:
        params, train, metadata = self.restore(step, **targets)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Checkpoint at step %d in %s cannot be restored (%s: %s); trying the previous one.",
                        step, self.directory, type(e).__name__, e)
        errors.append((step, e))
        continue
      if errors:
        self._move_aside([s for s, _ in errors])
      return step, params, train, metadata
    if errors:
      raise RuntimeError(f"No checkpoint in {self.directory} can be restored (steps {steps}); the newest failed "
                         f"with {type(errors[0][1]).__name__}: {errors[0][1]}. Move the workdir aside to start "
                         "afresh.") from errors[0][1]
    return None

  def _move_aside(self, steps: list[int]) -> None:
    """Renames unreadable step directories to `<step>.unreadable` (kept for inspection; never listed as steps)."""
    if jax.process_index() == 0:
      for step in steps:
        broken = self.directory / str(step)
        target = self.directory / f"{step}.unreadable"
        suffix = 1
        while target.exists():
          target, suffix = self.directory / f"{step}.unreadable-{suffix}", suffix + 1
        broken.rename(target)
        logging.warning("Moved the unreadable checkpoint of step %d to %s; training continues from an older step.",
                        step, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("dtm_checkpoint_move_aside")
    self._manager.reload()

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def find_step_directory(path: str | epath.Path, step: int | None = None) -> tuple[epath.Path, int]:
  """Resolve a workdir, a `checkpoints/` directory or a step directory to (checkpoints directory, step)."""
  path = absolute_path(path)
  if (path / "checkpoints").is_dir():
    path = path / "checkpoints"
  if (path / "params").is_dir() and path.name.isdigit():
    if step is not None and step != int(path.name):
      raise ValueError(f"{path} is the checkpoint of step {path.name}, not step {step}.")
    return path.parent, int(path.name)
  if not path.is_dir():
    raise FileNotFoundError(f"No checkpoint directory at {path}.")
  steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / "params").is_dir())
  if not steps:
    raise FileNotFoundError(f"No complete checkpoint in {path} (expected step directories with a params/ item).")
  if step is None:
    return path, steps[-1]
  if step not in steps:
    raise FileNotFoundError(f"No checkpoint of step {step} in {path}; available steps: {steps}.")
  return path, step


def restore_params(path: str | epath.Path, step: int | None = None,
                   target: PyTree | None = None) -> tuple[PyTree, dict, int]:
  """Only the student parameters (+ metadata) of a pretraining checkpoint: for evaluation and export.

  `path`: a workdir, its `checkpoints/` directory or one step directory; `step`: None for the latest.
  `target`: optional abstract tree (ShapeDtypeStructs with shardings) to restore onto; else arrays as saved.
  """
  directory, step = find_step_directory(path, step)
  step_dir = directory / str(step)
  checkpointer = ocp.StandardCheckpointer()
  params = checkpointer.restore(step_dir / "params", target)
  metadata = json.loads((step_dir / "metadata" / "metadata").read_text()) \
      if (step_dir / "metadata" / "metadata").exists() else {}
  logging.info("Restored student parameters of step %d from %s.", step, step_dir)
  return params, metadata, step


def model_config_to_json(config: Any) -> dict:
  """A model config dataclass as JSON-able metadata (dtypes by name)."""
  out = {}
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    out[field.name] = value if isinstance(value, (int, float, str, bool, type(None))) else str(jax.numpy.dtype(value))
  return out


def model_config_from_metadata(metadata: dict, config_cls: type, **overrides) -> Any:
  """Rebuild the model config saved in a checkpoint's metadata (`metadata["model_config"]`)."""
  if "model_config" not in metadata:
    raise ValueError("This checkpoint's metadata has no model_config; it was not written by dtm_jax.train.")
  fields = dict(metadata["model_config"])
  if "dtype" in fields:
    fields["dtype"] = jax.numpy.dtype(fields["dtype"])
  fields.update(overrides)
  return config_cls(**fields)
