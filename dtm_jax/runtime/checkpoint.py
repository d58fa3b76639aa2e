"""Orbax checkpoints of a run: parameters, the rest of the train state, the input-iterator position and metadata.

Layout: `<workdir>/checkpoints/<step>/{params,train,data_iterator,metadata}`. On local disks each step directory is
written under a temporary name and renamed when complete (Orbax's atomic commit); on `gs://` it is written in place
and `commit_success.txt` marks it complete. Every reader here (resume, `find_step_directory`, `restore_params`) takes
only finished steps (`is_finished`), so a crash mid-write is never picked up. `params` is its own item so evaluation
restores the student alone.

The input iterator is saved per process by a small handler: each process writes `process_<i>_of_<n>` inside the
step's `data_iterator` directory by calling the iterator's own `save(path)` (the iterator lives in `input_pipeline/`;
nothing here imports TensorFlow). The handler runs synchronously at `save()` time, so the saved position is exactly
the number of batches consumed so far, even though the array items are written asynchronously. A checkpoint of
another process count has no state for this run's processes: pretraining reads `metadata["process_count"]` before
restoring (`written_by_other_process_count`), skips the item and rebuilds its input at the step.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from typing import Any, Protocol

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from dtm_jax.runtime import errors

PyTree = Any
ITEMS = ("params", "train", "data_iterator", "metadata")
_NO_SPACE = ("No space left on device", "os_error_code='28'", "ENOSPC")


class CheckpointSaveError(errors.RunError):
  """A checkpoint could not be written (full disk, quota, permissions): the message names the path, the step and the
  newest complete checkpoint, which is left intact."""


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
      states = sorted(p.name for p in path.parent.glob("process_*_of_*")) if path.parent.exists() else []
      counts = sorted({name.rsplit("_of_", 1)[-1].split(".")[0] for name in states})
      if states and str(jax.process_count()) not in counts:
        raise FileNotFoundError(
            f"No input-iterator state {path} in this checkpoint: it was written by {' or '.join(counts)} processes, "
            f"not {jax.process_count()} (the data stream cannot be resumed exactly). Resume with the same process "
            "count, or restore without the data_iterator item (pretraining does, and rebuilds its input at the step).")
      raise FileNotFoundError(
          f"The input-iterator state {path} of this checkpoint is missing (deleted, or its write was cut short); "
          "this step cannot resume the data stream exactly.")
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


def written_by_other_process_count(metadata: dict) -> int | None:
  """The process count that wrote a checkpoint (its metadata's `process_count`) when it is not this run's, else None.

  Input-iterator states are per process, so none of such a checkpoint's fits this run, and every step the same job
  wrote fails alike: resume restores the newest step without them (no fallback through older steps) and rebuilds
  the input at its step."""
  written = metadata.get("process_count")
  return int(written) if written is not None and int(written) != jax.process_count() else None


def rebuilt_input_warning(step: int, saved: dict, data) -> str:
  """What a resume on another process count does (one warning): what is resharded, and what the input repeats or
  skips (`data.start_note`, which the input pipeline knows)."""
  def layout(processes, devices):
    return f"{processes} process{'' if processes == 1 else 'es'}" + (f" ({devices} devices)" if devices else "")
  written_by = layout(saved.get("process_count"), saved.get("device_count"))
  return (f"The checkpoint of step {step} was written by {written_by}; this run has "
          f"{layout(jax.process_count(), jax.device_count())}. Parameters and optimizer state are resharded onto "
          "this run's mesh; the input-iterator states, one per old process, fit no process of this run, so the input "
          f"is rebuilt at global batch {step}, where {data.start_note}.")


def layout_metadata() -> dict:
  """What a checkpoint records of the job that wrote it, so that a resume can tell another slice
  (`written_by_other_process_count`)."""
  return {"process_count": jax.process_count(), "device_count": jax.device_count()}


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
    handlers = _item_handlers()
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           create=True, cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    self._in_flight: int | None = None  # the step whose (asynchronous) save was started last
    self._closed = False

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
    try:
      self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(step, e) from None
    self._in_flight = step

  def save_state(self, step: int, state: dict, *, data_iterator: SavableIterator | None, metadata: dict) -> None:
    """`save` of a train state dict: its "params" as the params item (what evaluation restores alone), the rest as
    the train item."""
    self.save(step, params=state["params"], train={k: v for k, v in state.items() if k != "params"},
              data_iterator=data_iterator, metadata=metadata)

  def _restore_items(self, step: int, items: dict[str, ocp.args.CheckpointArgs]) -> dict[str, Any]:
    """Reads the items of a finished step with their handlers, on this process alone.

    Not through CheckpointManager.restore: that ends at a barrier of all processes which a process whose read
    failed never reaches (the others would wait at it, or pair it with that process's next attempt).
    restore_latest_good makes the processes agree after each attempt instead."""
    step_dir = self.directory / str(step)
    if not step_dir.is_dir() or not is_finished(step_dir):
      raise FileNotFoundError(f"No finished checkpoint of step {step} at {step_dir}.")
    handlers = _item_handlers()
    try:
      return {name: handlers[name].restore(step_dir / name, args=args) for name, args in items.items()}
    finally:
      for handler in handlers.values():
        handler.close()

  def read_metadata(self, step: int, required: tuple[str, ...] = ()) -> dict:
    """The metadata item of `step`; ValueError if it is not a JSON object with the `required` keys."""
    metadata = self._restore_items(step, {"metadata": ocp.args.JsonRestore()})["metadata"]
    _check_metadata(step, metadata, required)
    return metadata

  def latest_readable_metadata(self, required: tuple[str, ...] = ()) -> tuple[int, dict] | None:
    """(step, metadata) of the newest step whose metadata reads back with the `required` keys; broken ones are
    skipped with a warning (restore_latest_good then moves them aside). None if no step has readable metadata."""
    for step in reversed(self.all_steps()):
      try:
        return step, self.read_metadata(step, required)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("The metadata of the checkpoint at step %d in %s cannot be read (%s: %s); trying the "
                        "previous step.", step, self.directory, type(e).__name__, e)
    return None

  def restore(self, step: int, *, params: PyTree, train: PyTree, data_iterator: SavableIterator | None,
              required_metadata: tuple[str, ...] = ()) -> tuple[PyTree, PyTree, dict]:
    """Restore one step onto abstract targets (ShapeDtypeStructs with shardings); every item must read back, the
    metadata as a JSON object with the `required_metadata` keys."""
    items = dict(params=ocp.args.StandardRestore(params), train=ocp.args.StandardRestore(train),
                 metadata=ocp.args.JsonRestore())
    if data_iterator is not None:
      items["data_iterator"] = DataIteratorRestore(data_iterator)
    out = self._restore_items(step, items)
    _check_metadata(step, out["metadata"], required_metadata)
    return out["params"], out["train"], out["metadata"]

  def restore_latest_good(self, required_metadata: tuple[str, ...] = (),
                          **targets) -> tuple[int, PyTree, PyTree, dict] | None:
    """Restore the newest step whose items (metadata included) all read back on every process; warn about and skip
    broken ones. None if no step.

    The processes decide together: after each attempt they exchange a success flag, and a step counts as restored
    only when it read back on all of them (a process's own items, e.g. its input-iterator state, can fail alone).
    Otherwise all fall back to the previous step together, and steps that failed (on any process) are moved aside
    once an older one restored everywhere; nothing is moved when no step restores."""
    steps = self.all_steps()
    failures = []  # (step, this process's error or None, processes that failed)
    for step in reversed(steps):
      error = None
      try:
        params, train, metadata = self.restore(step, required_metadata=required_metadata, **targets)
      except Exception as e:  # pylint: disable=broad-except
        error = e
      failed = _processes_that_failed(step, error is not None)
      if not failed:
        if failures:
          self._move_aside([s for s, _, _ in failures])
        return step, params, train, metadata
      where = "" if jax.process_count() == 1 else f" on process{'es' if len(failed) > 1 else ''} " + \
          ", ".join(map(str, failed))
      logging.warning("Checkpoint at step %d in %s cannot be restored%s (%s); trying the previous one.", step,
                      self.directory, where, f"{type(error).__name__}: {error}" if error is not None else
                      "this process read it")
      failures.append((step, error, failed))
    if failures:
      step, error, failed = failures[0]
      cause = f"{type(error).__name__}: {error}" if error is not None else \
          f"an error on process{'es' if len(failed) > 1 else ''} {', '.join(map(str, failed))} (see its log)"
      raise RuntimeError(f"No checkpoint in {self.directory} can be restored (steps {steps}); the newest failed "
                         f"with {cause}. Move the workdir aside to start afresh.") from error
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
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(self._in_flight, e) from None

  def close(self):
    """Waits for the save in progress and closes; a failed save raises CheckpointSaveError (after closing)."""
    if self._closed:
      return
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(self._in_flight, e) from None
    self._closed = True
    self._manager.close()

  # --- Save failures: one clear error instead of Orbax's tracebacks.
  def _save_failed(self, step: int | None, error: Exception) -> CheckpointSaveError:
    """Closes the manager (so no background write outlives the error) and explains the failure."""
    text = str(error)
    found = re.search(r"/(\d+)\.orbax-checkpoint-tmp", text) or re.search(
        re.escape(str(self.directory)) + r"/(\d+)/", text)
    failed = int(found.group(1)) if found else (self._in_flight if self._in_flight is not None else step)
    self._close_quietly()
    complete = sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit() and int(p.name) != failed) \
        if self.directory.exists() else []
    no_space = any(marker in text for marker in _NO_SPACE) or (isinstance(error, OSError) and error.errno == 28)
    if no_space or "quota" in text.lower() or "RESOURCE_EXHAUSTED" in text:
      what = ("No space left on device" if no_space else
              "Quota exceeded" if "quota" in text.lower() else "RESOURCE_EXHAUSTED (storage full, quota or rate limit)")
      cause = what + (" (RESOURCE_EXHAUSTED)" if no_space and "RESOURCE_EXHAUSTED" in text else "") + \
          _free_space(self.directory)
      fix = f"free space in {self.directory} (or lower keep_checkpoints)"
    else:
      first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
      cause = f"{type(error).__name__}: {first[:400]}"
      fix = "fix the cause"
    last = (f"The last complete checkpoint is step {complete[-1]}, intact; {fix}, then rerun the same command to "
            "resume from it." if complete else f"There is no complete checkpoint yet; {fix}, then rerun.")
    errors.report("checkpoint_save")  # Orbax's leftover tasks then die quietly (metrics.quiet_library_logs)
    return CheckpointSaveError(f"Saving the checkpoint of step {failed} to {self.directory} failed: {cause}. {last}")

  def _close_quietly(self) -> None:
    if self._closed:
      return
    self._closed = True
    manager = self._manager
    try:
      manager.wait_until_finished()
    except Exception:  # pylint: disable=broad-except
      pass  # the error being reported
    for part in ("_checkpointer", "_non_blocking_metadata_store", "_blocking_metadata_store", "_checkpoint_deleter"):
      try:
        getattr(manager, part).close()
      except Exception:  # pylint: disable=broad-except
        pass


def _item_handlers() -> dict[str, ocp.CheckpointHandler]:
  return {
      "params": ocp.StandardCheckpointHandler(),
      "train": ocp.StandardCheckpointHandler(),
      "data_iterator": DataIteratorHandler(),
      "metadata": ocp.JsonCheckpointHandler(),
  }


def _processes_that_failed(step: int, failed: bool) -> list[int]:
  """The indices of the processes whose attempt at `step` failed (every process calls this once per attempt)."""
  if jax.process_count() == 1:
    return [0] if failed else []
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  everyone = np.asarray(multihost_utils.process_allgather(np.array([step, int(failed)], np.int64)))
  if not (everyone[:, 0] == step).all():
    raise RuntimeError(f"Processes try to restore different checkpoint steps {everyone[:, 0].tolist()}: they do not "
                       "see the same checkpoints. Every process must use the same workdir (a shared filesystem or "
                       "bucket).")
  return [int(i) for i in np.nonzero(everyone[:, 1])[0]]


def _check_metadata(step: int, metadata: Any, required: tuple[str, ...]) -> None:
  if not isinstance(metadata, dict):
    raise ValueError(f"The metadata of step {step} is not a JSON object ({type(metadata).__name__}).")
  missing = [k for k in required if k not in metadata]
  if missing:
    raise ValueError(f"The metadata of step {step} lacks {', '.join(missing)}.")


def _free_space(directory: epath.Path) -> str:
  if "://" in str(directory):
    return ""
  path = str(directory)
  while path and not os.path.exists(path):
    path = os.path.dirname(path)
  try:
    usage = shutil.disk_usage(path)
  except OSError:
    return ""
  return f"; {usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB on the filesystem of {directory}"


def is_finished(step_dir: str | epath.Path) -> bool:
  """Whether Orbax finished writing this step directory, by Orbax's own rule: on local disks a step is written under
  a temporary name (`<step>.orbax-checkpoint-tmp-*`) and renamed when complete; on `gs://` it is written into
  `<step>/` directly and `commit_success.txt` is written last. A step still being written, or left by a crash, is
  not finished."""
  return ocp.path.step.is_path_finalized(epath.Path(step_dir))


def _unfinished(step_dir: epath.Path) -> FileNotFoundError:
  return FileNotFoundError(f"The checkpoint {step_dir} is not finished (it is being written, or its save was cut "
                           "short): only finished steps are read.")


def find_step_directory(path: str | epath.Path, step: int | None = None) -> tuple[epath.Path, int]:
  """Resolve a workdir, a `checkpoints/` directory or a step directory to (checkpoints directory, step).

  Only finished steps (`is_finished`) are chosen: evaluation, export and the `checkpoint` teacher never read a step
  that is still being written or was left half-written by a crash."""
  path = absolute_path(path)
  if (path / "checkpoints").is_dir():
    path = path / "checkpoints"
  if (path / "params").is_dir() and path.name.isdigit():
    if step is not None and step != int(path.name):
      raise ValueError(f"{path} is the checkpoint of step {path.name}, not step {step}.")
    if not is_finished(path):
      raise _unfinished(path)
    return path.parent, int(path.name)
  if not path.is_dir():
    raise FileNotFoundError(f"No checkpoint directory at {path}.")
  candidates = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / "params").is_dir())
  steps = [s for s in candidates if is_finished(path / str(s))]
  unfinished = sorted(set(candidates) - set(steps))
  if unfinished:
    logging.warning("Ignoring the unfinished checkpoint steps %s in %s (being written, or cut short by a crash).",
                    unfinished, path)
  if step is not None and step in unfinished:
    raise _unfinished(path / str(step))
  if not steps:
    raise FileNotFoundError(f"No complete checkpoint in {path} (expected finished step directories with a params/ "
                            "item).")
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
  if target is not None:
    check_params_fit(checkpointer, step_dir, target)
  params = checkpointer.restore(step_dir / "params", target)
  metadata = json.loads((step_dir / "metadata" / "metadata").read_text()) \
      if (step_dir / "metadata" / "metadata").exists() else {}
  logging.info("Restored student parameters of step %d from %s.", step, step_dir)
  return params, metadata, step


class ParamsMismatchError(errors.RunError, ValueError):
  """Saved parameters that do not fit the model they are restored into (another architecture or kind of run)."""


def _flat_shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
  def name(path):
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
  return {name(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_params_fit(checkpointer: ocp.StandardCheckpointer, step_dir: epath.Path, target: PyTree) -> None:
  """ParamsMismatchError naming the parameters (and shapes) of `step_dir/params` that do not fit `target`, before
  Orbax would fail with its whole tree."""
  saved_tree = checkpointer.metadata(step_dir / "params")
  saved = _flat_shapes(getattr(saved_tree, "item_metadata", saved_tree))
  wanted = _flat_shapes(target)
  differ = [f"{k}: saved {saved[k]}, expected {wanted[k]}" for k in sorted(wanted) if k in saved and
            saved[k] != wanted[k]]
  missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
  if not (differ or missing or extra):
    return
  listed = lambda names, sep: sep.join(names[:3]) + (sep + "..." if len(names) > 3 else "")
  parts = [f"{len(differ)} of other shapes ({listed(differ, '; ')})"] if differ else []
  parts += [f"{len(missing)} missing ({listed(missing, ', ')})"] if missing else []
  parts += [f"{len(extra)} not expected ({listed(extra, ', ')})"] if extra else []
  raise ParamsMismatchError(
      f"The parameters saved in {step_dir / 'params'} do not fit the model they are restored into: "
      f"{'; '.join(parts)}. Point the config at a checkpoint of that architecture (or fix the architecture fields "
      "of the config).")


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
    raise ValueError("This checkpoint's metadata has no model_config; it was not written by dtm_jax.modes.pretrain.")
  fields = dict(metadata["model_config"])
  if "dtype" in fields:
    fields["dtype"] = jax.numpy.dtype(fields["dtype"])
  fields.update(overrides)
  return config_cls(**fields)


def run_metadata(model_config: Any, source: dict, config: Any) -> dict:
  """What a fine-tuning or segmentation checkpoint records besides its step: the trunk's architecture, the pretrained
  checkpoint it started from, the run's config (and its hash), and the job's layout (a resume on another slice)."""
  return {"model_config": model_config_to_json(model_config), "pretrained": source, "config": config.to_dict(),
          "config_hash": config_hash(config.to_dict()), **layout_metadata()}
