"""Where examples come from: TFDS builders, image folders, Fashion-MNIST IDX files.

A source hands the pipeline, per host, a tf.data stream of *keys* and a `load(key)` that
turns a key into {"image": encoded bytes or uint8 [h, w, 3], "label": int} inside the
pipeline's parallel map. Keys are what gets shuffled (TFDS: the still-encoded example;
folders and IDX files: an example index), and the reading and decoding (which, for
folders, can fail) happen in the map, where errors can be skipped and counted.

Sharding: TFDS splits per host with `tfds.split_for_jax_process` (even slices); folders and
IDX files give host p the examples p, p + P, p + 2P, ... of their sorted order. Training
streams are infinite; folder and IDX sources visit their host's examples in a new random
permutation each epoch, computed from (seed, epoch), so no shuffle buffer is needed.
"""
import dataclasses
import functools
import gzip
import os
import struct
import zlib
from typing import Any, Callable

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from dtm_jax.runtime import errors  # pure Python: the errors main.py prints as one line

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclasses.dataclass(frozen=True)
class Examples:
  """A per-host stream of example keys and the TF function that loads one.

  Training streams of indexed sources also give `epoch_size` (the host's examples, each visited once per epoch) and
  `name(position)`: the file or example at a position of the first epoch, so skipped files can be named.
  """
  keys: tf.data.Dataset
  load: Callable[[Any], dict]
  epoch_size: int | None = None
  name: Callable[[int], str] | None = None
  start_note: str = ""  # a stream started at a position (not restored): what it repeats or skips; see train()


@dataclasses.dataclass(frozen=True)
class SplitCounts:
  """Example counts of an evaluation split."""
  local: int          # On this host.
  largest_host: int   # On the host that holds the most; every host pads up to it.
  total: int          # Over all hosts.


def get_source(cfg):
  """The source that `cfg.source` names, configured from the `input` ConfigDict."""
  if cfg.source == "tfds":
    return TfdsSource(cfg.dataset, cfg.data_dir, cfg.shuffle_buffer)
  if cfg.source == "folder":
    return FolderSource(cfg.data_dir, cfg.train_split)
  if cfg.source == "fashion_mnist":
    return FashionMnistSource(cfg.data_dir or FASHION_MNIST_DIR)
  raise ValueError(f"input.source={cfg.source!r} is unknown; use 'tfds', 'folder' or "
                   "'fashion_mnist'.")


class TfdsSource:
  """A TFDS builder read with SkipDecoding, so images stay encoded until the crop is known."""
  skips_corrupt = False   # TFDS decoded every image when preparing: an error here is a bug.
  _encoded_features = ("image",)   # Read as bytes; the pipeline's map decodes them.

  def __init__(self, name, data_dir, shuffle_buffer):
    try:
      self._builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise errors.DataError(f"input.dataset={name!r} is not a TFDS dataset (see "
                             "https://www.tensorflow.org/datasets/catalog).") from e
    features = self._builder.info.features
    if "image" not in features:
      raise errors.DataError(f"TFDS dataset {name!r} has no 'image' feature (it has "
                             f"{sorted(features)}); only image datasets can feed this pipeline.")
    self.has_labels = "label" in features
    self._name = name
    self._shuffle_buffer = shuffle_buffer

  def train(self, split, *, seed, process_index, process_count, min_examples=1, start_position=0):
    """start_position > 0: a stream that stands in for one at that position, without reading what comes before
    (an encoded example is ~110 KB on ImageNet): a fresh shuffle seeded by (seed, start_position)."""
    host_split = tfds.split_for_jax_process(split, process_index=process_index,
                                            process_count=process_count)
    if start_position:
      seed = int(np.random.SeedSequence([seed, start_position]).generate_state(1, np.uint32)[0])
    keys = self._read(host_split, split, shuffle_seed=seed)
    host_examples = int(keys.cardinality())
    if host_examples >= 0:  # TFDS splits report their size; a size TF cannot know is not checked
      _check_enough(split, host_examples, min_examples, process_count)
    keys = keys.shuffle(self._shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
    note = ("each process starts a fresh shuffled pass over its shard (seeded by the step): the pass under way is "
            "not continued, so the examples it had already given (up to one epoch's worth) are seen once more, and "
            "none is skipped") if start_position else ""
    return Examples(keys, load=lambda example: example, start_note=note)

  def evaluation(self, split, *, process_index, process_count):
    def host(index):
      return self._read(tfds.split_for_jax_process(split, process_index=index,
                                                   process_count=process_count), split)
    keys = host(process_index)
    counts = SplitCounts(
        local=_cardinality(keys),
        largest_host=_cardinality(host(0)),   # Even splits give the remainder to the first hosts.
        total=_cardinality(self._read(split, split)))
    return Examples(keys, load=lambda example: example), counts

  def _read(self, split, requested, shuffle_seed=None):
    """Examples of `split` as {"image": bytes, "label"}; `requested` names it in errors."""
    try:
      examples = self._builder.as_dataset(
          split=split, shuffle_files=shuffle_seed is not None,
          decoders={name: tfds.decode.SkipDecoding() for name in self._encoded_features},
          read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False))
    except AssertionError as e:  # TFDS's "could not find data" for a dataset never prepared.
      if self._builder.is_prepared():
        raise
      raise errors.MissingDataError(_not_prepared_message(self._builder, self._name)) from e
    except ValueError as e:      # Unknown split names and malformed slices.
      raise errors.DataError(f"Split {requested!r} of TFDS dataset {self._builder.name!r}: {e}") from e
    return examples.map(self._select)

  def _select(self, example):
    """The features the pipeline reads, under the names it reads them by."""
    keep = ("image", "label") if self.has_labels else ("image",)
    return {k: example[k] for k in keep}


def _cardinality(dataset):
  count = int(dataset.cardinality())
  if count < 0:
    raise ValueError("TFDS did not report the size of an evaluation split; cannot pad the "
                     "last batch so that every host runs the same number of steps.")
  return count


def _not_prepared_message(builder, name):
  """Where to put which files, for a dataset that `download_and_prepare` has not built."""
  root = str(builder.data_dir_root)
  manual_dir = os.path.join(root, "downloads", "manual")
  prepare = (f"python -c \"import tensorflow_datasets as tfds; tfds.builder({name!r}, "
             f"data_dir={root!r}).download_and_prepare()\"")
  if builder.name == "imagenet2012":
    missing = [f for f in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
               if not tf.io.gfile.exists(os.path.join(manual_dir, f))]
    where = (f"Put {' and '.join(missing)} (from https://image-net.org/download-images, after "
             f"registering) in {manual_dir}, then run once:\n  {prepare}" if missing else
             f"The archives are in {manual_dir}; run once:\n  {prepare}")
    return (f"ImageNet (imagenet2012) is not prepared under {root}. {where}\n"
            f"It writes ~150 GB of TFRecords to {os.path.join(root, 'imagenet2012')} (README: "
            f"'Preparing ImageNet for TFDS'); keep input.data_dir={root!r}.")
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    return (f"TFDS dataset {name!r} is not prepared under {root}. It needs a manual "
            f"download into {manual_dir}:\n{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}\n"
            f"then run once:\n  {prepare}")
  return (f"TFDS dataset {name!r} is not prepared under {root}. Run once (it "
          f"downloads the data):\n  {prepare}\nor set input.data_dir to where it is prepared.")


def _check_enough(split, host_examples, min_examples, process_count):
  """A training split must fill at least one local batch on every host (else it would only repeat itself)."""
  if host_examples < max(min_examples, 1):
    raise errors.DataError(f"Split {split!r} gives this process {host_examples} examples ({process_count} "
                           f"processes), fewer than one local batch of {min_examples}; use a smaller "
                           "batch_size or a larger dataset.")


class IndexedSource:
  """Shared logic of sources whose examples are addressed by index in a sorted table."""
  has_labels = True

  def _table(self, split):
    """Returns (num_examples, load) where load maps a global example index to an example."""
    raise NotImplementedError

  def _check_host_examples(self, split, host_indices):
    """Lets a source reject a host's examples before the stream starts."""

  def train(self, split, *, seed, process_index, process_count, min_examples=1, start_position=0):
    """start_position: the stream from that position on, found by arithmetic (epoch, index in it), nothing read."""
    num_examples, load = self._table(split)
    host_indices = np.arange(process_index, num_examples, process_count)
    if host_indices.size:
      self._check_host_examples(split, host_indices)  # all-corrupt shards: the more specific error first
    _check_enough(split, host_indices.size, min_examples, process_count)
    epoch_size = int(host_indices.size)
    start_epoch, start_index = divmod(start_position, epoch_size)
    host_indices = tf.constant(host_indices, tf.int64)

    def epoch(epoch_index):
      order = tf.random.experimental.stateless_shuffle(
          host_indices, seed=tf.stack([tf.constant(seed, tf.int64), epoch_index]))
      return tf.data.Dataset.from_tensor_slices(order[tf.where(epoch_index == start_epoch, start_index, 0):])

    keys = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(epoch)
    first_epoch = []

    def name(position):
      if not first_epoch:  # epoch(0)'s permutation, computed once when a file must be named
        first_epoch.append(tf.random.experimental.stateless_shuffle(
            host_indices, seed=tf.stack([tf.constant(seed, tf.int64), tf.constant(0, tf.int64)])).numpy())
      return self._describe(split, int(first_epoch[0][position]))

    return Examples(keys, load, epoch_size=epoch_size, name=name,
                    start_note=self._start_note(start_epoch, start_index, epoch_size) if start_position else "")

  def _start_note(self, epoch, index, epoch_size):
    note = (f"each process continues its shard at epoch {epoch}, {index / epoch_size:.0%} through it: earlier and "
            "later epochs are whole, but in this one the examples the old processes had already drawn may be drawn "
            "again, and as many others are not drawn until the next epoch")
    if self.skips_corrupt:
      note += ("; unreadable files met before the resume are not known, so the position is off by their number, "
               "and corrupt_images (the first epoch's unreadable files) restarts at 0")
    return note

  def _describe(self, split, index):
    """What example `index` of `split` is, for messages (a file path for folders)."""
    del split
    return f"example {index}"

  def evaluation(self, split, *, process_index, process_count):
    num_examples, load = self._table(split)
    host_indices = np.arange(process_index, num_examples, process_count)
    if host_indices.size:
      self._check_host_examples(split, host_indices)
    counts = SplitCounts(local=len(host_indices),
                         largest_host=len(range(0, num_examples, process_count)),
                         total=num_examples)
    return Examples(tf.data.Dataset.from_tensor_slices(host_indices), load), counts


class FolderSource(IndexedSource):
  """Images in `root/<split>/<class>/*.{jpg,jpeg,png}`, labelled by sorted class folder.

  The class list comes from the training split's folder so that every split uses the same
  label ids. Corrupt or truncated files are skipped (and counted) by the pipeline.
  """
  skips_corrupt = True

  def __init__(self, root, train_split):
    if not root:
      raise ValueError("input.source='folder' needs input.data_dir: a directory with one "
                       "sub-folder per split, each holding one sub-folder per class.")
    self._root = root
    self._train_split = train_split
    self._files = {}
    self._classes = _subfolders(self._split_dir(train_split))
    if not self._classes:
      raise errors.DataError(f"{self._split_dir(train_split)} has no class sub-folders; expected "
                             "<split>/<class>/<image files>.")

  def _split_dir(self, split):
    path = os.path.join(self._root, split)
    if not tf.io.gfile.isdir(path):
      present = (sorted(tf.io.gfile.listdir(self._root)) if tf.io.gfile.isdir(self._root)
                 else "nothing: the directory does not exist")
      raise errors.MissingDataError(f"Split folder {path} not found; {self._root} holds {present}. "
                              "Check input.data_dir and the split name.")
    return path

  def files(self, split):
    """Sorted image paths of a split and their labels (listed once per split)."""
    if split not in self._files:
      self._files[split] = self._list_files(split)
    return self._files[split]

  def _list_files(self, split):
    split_dir = self._split_dir(split)
    class_ids = {name: i for i, name in enumerate(self._classes)}
    paths, labels = [], []
    for name in _subfolders(split_dir):
      class_dir = os.path.join(split_dir, name)
      if name not in class_ids:
        raise errors.DataError(f"Class folder {class_dir} is not in the training split's folder "
                               f"{os.path.join(self._root, self._train_split)}; labels would not "
                               "match. Every split must use the training split's classes.")
      images = sorted(f for f in tf.io.gfile.listdir(class_dir)
                      if f.lower().endswith(IMAGE_EXTENSIONS))
      paths += [os.path.join(class_dir, f) for f in images]
      labels += [class_ids[name]] * len(images)
    if not paths:
      raise errors.DataError(f"No {'/'.join(IMAGE_EXTENSIONS)} files in the class folders of "
                             f"{split_dir}.")
    return paths, labels

  def _describe(self, split, index):
    return self.files(split)[0][index]

  def _table(self, split):
    paths, labels = self.files(split)
    paths_t = tf.constant(paths)
    labels_t = tf.constant(labels, tf.int32)

    def load(index):
      return {"image": tf.io.read_file(tf.gather(paths_t, index)),
              "label": tf.gather(labels_t, index)}
    return len(paths), load

  def _check_host_examples(self, split, host_indices):
    check_decodable(self.files(split)[0], host_indices, f"split {split!r} under {self._root}")


def check_decodable(paths, host_indices, where):
  """Fails early if none of this host's image files decodes: skipping unreadable files would then never end."""
  for index in host_indices:
    try:
      tf.io.decode_image(tf.io.read_file(paths[index]), channels=3, expand_animations=False)
      return
    except tf.errors.OpError:
      continue
  raise errors.DataError(f"None of the {len(host_indices)} image files of {where} that this host reads can be decoded.")


def _subfolders(directory):
  """Sorted names of the sub-directories (gfile lists them with a trailing '/' on GCS)."""
  names = (name.rstrip("/") for name in tf.io.gfile.listdir(directory))
  return sorted(n for n in names if tf.io.gfile.isdir(os.path.join(directory, n)))


class FashionMnistSource(IndexedSource):
  """Fashion-MNIST from its four IDX files (gzipped or not); splits 'train' and 'test'."""
  skips_corrupt = False
  _PREFIXES = {"train": "train", "test": "t10k"}

  def __init__(self, directory):
    self._dir = directory

  def _table(self, split):
    if split not in self._PREFIXES:
      raise ValueError(f"Fashion-MNIST has splits 'train' and 'test', not {split!r}.")
    prefix = self._PREFIXES[split]
    images = _read_idx(self._path(f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(self._path(f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.shape != images.shape[:1]:
      raise errors.DataError(f"Fashion-MNIST {split} files in {self._dir} disagree: images "
                             f"{images.shape}, labels {labels.shape}.")
    images_t = tf.constant(images)
    labels_t = tf.constant(labels.astype(np.int32))

    def load(index):
      grey = tf.gather(images_t, index)[..., None]
      return {"image": tf.tile(grey, [1, 1, 3]), "label": tf.gather(labels_t, index)}
    return len(labels), load

  def _path(self, name):
    for candidate in (name + ".gz", name):
      path = os.path.join(self._dir, candidate)
      if tf.io.gfile.exists(path):
        return path
    raise errors.MissingDataError(
        f"Fashion-MNIST file {name}[.gz] not found in {self._dir}. Install Debian's package "
        "(sudo apt-get install dataset-fashion-mnist, which fills "
        f"{FASHION_MNIST_DIR}; `make fashion-mnist` does it) or point input.data_dir at the "
        "four *-ubyte.gz files.")


@functools.lru_cache(maxsize=4)   # Train and eval pipelines of one run share the arrays.
def _read_idx(path):
  """An IDX array (the MNIST file format: big-endian header, then raw uint8 data); errors.DataError naming the file
  when it is truncated or not an IDX file."""
  fix = ("Reinstall the files (sudo apt-get install --reinstall dataset-fashion-mnist) or download them again, and "
         "point input.data_dir at them.")
  with tf.io.gfile.GFile(path, "rb") as f:
    data = f.read()
  if path.endswith(".gz"):
    try:
      data = gzip.decompress(data)
    except (EOFError, OSError, zlib.error) as e:
      raise errors.DataError(f"{path} is truncated or not gzip data ({e}). {fix}") from None
  if len(data) < 4:
    raise errors.DataError(f"{path} is truncated: {len(data)} bytes, not even an IDX header. {fix}")
  zeros, dtype_code, ndim = struct.unpack(">HBB", data[:4])
  if zeros != 0 or dtype_code != 0x08 or len(data) < 4 + 4 * ndim:
    raise errors.DataError(f"{path} is not a uint8 IDX file. {fix}")
  shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
  expected, found = int(np.prod(shape)), len(data) - 4 - 4 * ndim
  if found != expected:
    raise errors.DataError(f"{path} is truncated: its header promises an array of shape {tuple(shape)} "
                           f"({expected:,} bytes) but the file holds {found:,}. {fix}")
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)
