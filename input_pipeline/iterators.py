"""Python-side handles on the tf.data pipelines: numpy batches, resume state, skip counts.

Resume uses tf.data's own iterator checkpointing (`tf.train.Checkpoint(iterator=...)`): the
saved state is the position of every stage plus the elements buffered at that moment, and a
fresh pipeline built from the same config and seed continues the exact same stream after
`restore`. No Python-side read-ahead exists, so the batch after `save` is the first batch
after `restore`. See `input_pipeline.pipeline` for what the state holds and how big it gets.
"""
import os

import tensorflow as tf
from absl import logging

# Per-element count of the distinct corrupt files skipped so far, carried by folder-source batches, and the
# first-epoch positions of the first NAMED_SKIPS of them (-1: none), which the log names once.
SKIPPED_KEY = "_num_skipped"
SKIPPED_POSITIONS_KEY = "_skipped_positions"
NAMED_SKIPS = 5
_STATE_PREFIX = "data_iterator"


class DataIterator:
  """Endless per-host numpy batches whose position can be saved and restored.

  Arrays are read-only views of TensorFlow's buffers (no copy); copy before writing.
  """

  def __init__(self, dataset, name_skipped=None, start_note=""):
    self._iterator = dataset.as_numpy_iterator()
    self.start_note = start_note  # for a stream started at a step (not restored): what it repeats or skips
    self._num_corrupt = tf.Variable(0, dtype=tf.int64, trainable=False)
    self._checkpoint = tf.train.Checkpoint(iterator=self._iterator, num_corrupt=self._num_corrupt)
    self._name_skipped = name_skipped  # first-epoch position -> file name
    self._named = set()

  def __iter__(self):
    return self

  def __next__(self):
    batch = dict(next(self._iterator))
    skipped = batch.pop(SKIPPED_KEY, None)
    positions = batch.pop(SKIPPED_POSITIONS_KEY, None)
    if skipped is not None:
      self._num_corrupt.assign(int(skipped.max()))
    if positions is not None:
      self._log_skipped(positions[-1])
    return batch

  def _log_skipped(self, positions):
    new = [int(p) for p in positions if p >= 0 and int(p) not in self._named]
    if not new:
      return
    self._named.update(new)
    names = [self._name_skipped(p) if self._name_skipped else f"position {p}" for p in new]
    more = (f" (only the first {NAMED_SKIPS} are named; `corrupt_images` counts them all)"
            if len(self._named) >= NAMED_SKIPS else "")
    logging.warning("Skipped unreadable image file(s), counted once each in corrupt_images: %s%s",
                    ", ".join(names), more)

  def num_corrupt(self):
    """Distinct corrupt or unreadable images skipped so far on this host (folder sources; 0 for the others)."""
    return int(self._num_corrupt.numpy())

  def save(self, directory):
    """Writes the iterator state into `directory` (local or tf.io.gfile path, one per process)."""
    tf.io.gfile.makedirs(directory)
    self._checkpoint.write(os.path.join(directory, _STATE_PREFIX))

  def restore(self, directory):
    """Continues from the state that `save(directory)` wrote, in a pipeline built the same way."""
    prefix = os.path.join(directory, _STATE_PREFIX)
    if not tf.io.gfile.exists(prefix + ".index"):
      raise FileNotFoundError(f"No data-iterator state in {directory} (expected "
                              f"{prefix}.index, written by DataIterator.save).")
    self._checkpoint.read(prefix).assert_consumed()


class EvalData:
  """One pass over an evaluation split per iteration, padded to the same steps on every host.

  Batches are {"image", "label", "valid"}; valid is False on padding. Over all hosts, every
  readable example of the split appears exactly once per pass.
  """

  def __init__(self, dataset, *, num_examples, num_batches, local_examples):
    self._dataset = dataset
    self.num_examples = num_examples   # In the split, over all hosts.
    self.num_batches = num_batches     # Per pass, the same on every host.
    self._local_examples = local_examples
    self._num_corrupt = 0

  def __iter__(self):
    num_valid = 0
    for batch in self._dataset.as_numpy_iterator():
      num_valid += int(batch["valid"].sum())
      yield batch
    self._num_corrupt = self._local_examples - num_valid

  def __len__(self):
    return self.num_batches

  def num_corrupt(self):
    """Images of this host that could not be read during the last complete pass."""
    return self._num_corrupt
