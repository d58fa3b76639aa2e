"""Where segmentation examples come from: ADE20K (its released folders or TFDS) and Fashion-MNIST canvases.

Each is a `sources` source (same per-host sharding, shuffling, resume state and corrupt-file rules) whose `load(key)`
gives {"image": encoded bytes or uint8 [h, w, 3], "label": encoded PNG bytes or uint8 [h, w]}. Label values are the
stored ones (ADE20K: 0 = "other", 1..150 = the classes); the pipeline applies `reduce_zero_label` once, after decoding.
"""
import os

import tensorflow as tf
from absl import logging

from dtm_jax.runtime import errors  # pure Python: the errors main.py prints as one line
from input_pipeline import sources

ADE20K_FOLDER = "ADEChallengeData2016"
ADE20K_URL = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
# Fashion-MNIST pixels brighter than this belong to the garment; darker ones (the flat background and its faint
# noise, ~4% of the pixels) to class 0.
FOREGROUND_THRESHOLD = 16
FASHION_MNIST_CLASSES = 11   # Background + the 10 garment classes.


def get_segment_source(cfg):
  """The source that `cfg.source` of a `segment_config()` block names."""
  if cfg.source == "ade20k_folder":
    return Ade20kFolderSource(cfg.data_dir)
  if cfg.source == "tfds":
    return TfdsSegmentSource(cfg.dataset, cfg.data_dir, cfg.shuffle_buffer)
  if cfg.source == "fashion_mnist_segmentation":
    return FashionMnistCanvasSource(cfg.data_dir or sources.FASHION_MNIST_DIR)
  raise ValueError(f"input.source={cfg.source!r} is unknown for segmentation; use 'ade20k_folder', 'tfds' or "
                   "'fashion_mnist_segmentation'.")


class Ade20kFolderSource(sources.IndexedSource):
  """ADE20K as released: <data_dir>/ADEChallengeData2016/images/<split>/*.jpg and annotations/<split>/*.png.

  An image and its label map share a file stem. Unreadable files are skipped and counted, as image folders are.
  """
  skips_corrupt = True

  def __init__(self, data_dir):
    if not data_dir:
      raise ValueError(f"input.source='ade20k_folder' needs input.data_dir: the directory holding {ADE20K_FOLDER}/ "
                       f"(unzip {ADE20K_URL} there; README: 'ADE20K').")
    self._data_dir = data_dir
    self._root = os.path.join(data_dir, ADE20K_FOLDER)
    self._pairs = {}

  def pairs(self, split):
    """Sorted image paths of a split and the label map path of each (listed once per split)."""
    if split not in self._pairs:
      self._pairs[split] = self._list_pairs(split)
    return self._pairs[split]

  def _list_pairs(self, split):
    image_dir = os.path.join(self._root, "images", split)
    label_dir = os.path.join(self._root, "annotations", split)
    missing = [d for d in (image_dir, label_dir) if not tf.io.gfile.isdir(d)]
    if missing:
      raise errors.MissingDataError(
          f"ADE20K split {split!r} not found: {' and '.join(missing)} missing. Expected {image_dir}/*.jpg and "
          f"{label_dir}/*.png with the same file names, as in {ADE20K_FOLDER}.zip: download {ADE20K_URL} (923 MB) "
          f"and unzip it in input.data_dir={self._data_dir} (README: 'ADE20K'). Splits are 'training' and "
          "'validation'.")
    stems = sorted(os.path.splitext(f)[0] for f in tf.io.gfile.listdir(image_dir) if f.lower().endswith(".jpg"))
    if not stems:
      raise errors.MissingDataError(
          f"No .jpg images in {image_dir}; expected ADE20K's {ADE20K_FOLDER}/images/{split}/.")
    labels = set(tf.io.gfile.listdir(label_dir))
    unlabelled = [s + ".jpg" for s in stems if s + ".png" not in labels]
    if unlabelled:
      raise errors.MissingDataError(
          f"{len(unlabelled)} images in {image_dir} have no label map <name>.png in {label_dir}, "
                              f"e.g. {', '.join(unlabelled[:3])}. Unzip {ADE20K_FOLDER}.zip again.")
    return ([os.path.join(image_dir, s + ".jpg") for s in stems],
            [os.path.join(label_dir, s + ".png") for s in stems])

  def _describe(self, split, index):
    return self.pairs(split)[0][index]

  def _table(self, split):
    image_paths, label_paths = self.pairs(split)
    image_paths_t, label_paths_t = tf.constant(image_paths), tf.constant(label_paths)

    def load(index):
      return {"image": tf.io.read_file(tf.gather(image_paths_t, index)),
              "label": tf.io.read_file(tf.gather(label_paths_t, index))}
    return len(image_paths), load

  def _check_host_examples(self, split, host_indices):
    """Fails early on unreadable images or mismatched label maps, which the pipeline would skip forever."""
    image_paths, label_paths = self.pairs(split)
    sources.check_decodable(image_paths, host_indices, f"ADE20K split {split!r} under {self._root}")
    first = host_indices[0]
    try:
      image_size = tf.io.decode_image(tf.io.read_file(image_paths[first]), channels=3).shape[:2]
      label_size = tf.io.decode_png(tf.io.read_file(label_paths[first])).shape[:2]
    except tf.errors.OpError:
      return   # A corrupt file: skipped and counted like the others.
    if image_size != label_size:
      raise errors.DataError(f"{image_paths[first]} is {image_size[0]}x{image_size[1]} px but its label map "
                             f"{label_paths[first]} is {label_size[0]}x{label_size[1]}; images and annotations must "
                             f"both come from {ADE20K_FOLDER}.zip.")


class TfdsSegmentSource(sources.TfdsSource):
  """A TFDS builder whose "annotation" image feature is the label map (its first channel), both kept encoded."""
  _encoded_features = ("image", "annotation")

  def __init__(self, name, data_dir, shuffle_buffer):
    super().__init__(name, data_dir, shuffle_buffer)
    features = self._builder.info.features
    if "annotation" not in features:
      raise errors.DataError(f"TFDS dataset {name!r} has no 'annotation' feature (it has {sorted(features)}); "
                             "segmentation reads the label map from 'annotation', as scene_parse150 stores it.")
    self.has_labels = True
    if self._builder.name == "scene_parse150":
      logging.warning(
          "TFDS scene_parse150 stores the Places Challenge 2017 *instance* masks: their first channel is one of "
          "100 object categories (0 elsewhere, stuff such as wall or sky included), not the 150 classes of the "
          "ADE20K benchmark (with reduce_zero_label: 100 classes). For ADE20K mIoU use "
          "input.source='ade20k_folder' (README: 'ADE20K').")

  def _select(self, example):
    return {"image": example["image"], "label": example["annotation"]}


class FashionMnistCanvasSource(sources.FashionMnistSource):
  """The offline segmentation task: 56x56 canvases of 2x2 Fashion-MNIST garments, FASHION_MNIST_CLASSES classes.

  Canvas i of a split holds the split's garments 4i, 4i+1 (top row), 4i+2, 4i+3 (bottom row), so the task is fixed
  by the IDX files: 15,000 training and 2,500 test canvases. A pixel's label is 1 + its garment's class where the
  garment is brighter than FOREGROUND_THRESHOLD, else 0 (background). Grey is fed as RGB.
  """

  def _table(self, split):
    num_garments, load_garment = super()._table(split)

    def load(index):
      garments = [load_garment(4 * index + k) for k in range(4)]
      grey = [g["image"][..., 0] for g in garments]
      labels = [tf.where(image > FOREGROUND_THRESHOLD, tf.cast(g["label"] + 1, tf.uint8), tf.constant(0, tf.uint8))
                for image, g in zip(grey, garments)]

      def tile(parts):
        return tf.concat([tf.concat(parts[:2], axis=1), tf.concat(parts[2:], axis=1)], axis=0)
      return {"image": tf.tile(tile(grey)[..., None], [1, 1, 3]), "label": tile(labels)}
    return num_garments // 4, load
