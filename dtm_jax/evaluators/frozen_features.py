"""Evaluation slices held in memory, and the two scores of frozen features: kNN and linear-probe top-1.

Comparing several encoders (a pretrained student, the same student at initialisation, raw pixels) on the same
images should decode them once (`load_split`) and run only each encoder's forward pass. The scores are the
project's own evaluations applied to precomputed features: DINO's weighted kNN (`knn`) and MAE's BatchNorm + linear
probe (`linear_probe.train_on_features`). Used by `--mode=compare` and the study tools (tools/).
"""
from __future__ import annotations

import dataclasses

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from dtm_jax import images as images_lib
from dtm_jax import sharding
from dtm_jax.evaluators import classification, encoding, knn, linear_probe
from dtm_jax.runtime import metrics


@dataclasses.dataclass(frozen=True)
class Split:
  """The first examples of a split in the evaluation crop: images f32 [M, H, W, C] (normalised), labels int32 [M]."""
  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)


def load_split(input_cfg: ml_collections.ConfigDict, split: str, num_examples: int, *, image_size: int,
               batch_size: int = 1000) -> Split:
  """Reads the first `num_examples` (0: all) of `split` through the input pipeline's evaluation view."""
  import input_pipeline  # pylint: disable=g-import-not-at-top  # Only here: dtm_jax itself never loads TensorFlow.
  data = input_pipeline.build_eval(input_cfg, split=split, image_size=image_size, global_batch_size=batch_size)
  images, labels = [], []
  for batch in encoding.take_batches(data, batch_size, num_examples):
    images.append(batch["image"][batch["valid"]])
    labels.append(batch["label"][batch["valid"]])
  if not labels:
    raise ValueError(f"The {split!r} split gave no examples; check config.input (source, data_dir, splits).")
  images, labels = np.concatenate(images)[:num_examples or None], np.concatenate(labels)[:num_examples or None]
  mean, std = (np.asarray(v, np.float32) for v in images_lib.normalization_of(input_cfg))
  images = (images.astype(np.float32) / 255.0 - mean) / std  # decoded once, normalised once (the pipeline sends uint8)
  if len(labels) < num_examples:
    raise ValueError(f"The {split!r} split has only {len(labels)} examples; ask for at most that many.")
  return Split(images, labels.astype(np.int32))


def padded_batches(arrays: dict[str, np.ndarray], batch_size: int) -> list[dict[str, np.ndarray]]:
  """Batches of `arrays` (same first dimension) plus a "valid" flag; the last batch is padded with valid=False."""
  count = len(next(iter(arrays.values())))
  batch_size = multiple_of_devices(batch_size)
  out = []
  for start in range(0, count, batch_size):
    stop = min(start + batch_size, count)
    pad = batch_size - (stop - start)
    batch = {k: np.concatenate([v[start:stop], np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in arrays.items()}
    batch["valid"] = np.arange(batch_size) < stop - start
    out.append(batch)
  return out


def multiple_of_devices(n: int) -> int:
  """`n` rounded down to a multiple of the device count (at least one row per device)."""
  devices = jax.device_count()
  return max(devices, n // devices * devices)


def encoder_features(encode_fn: encoding.EncodeFn, params, split: Split, mesh: Mesh,
                     batch_size: int = 500) -> encoding.FeatureSet:
  """`encode_fn(params, images) -> [B, D]` over the whole split, kept on the devices."""
  batches = padded_batches({"image": split.images, "label": split.labels}, batch_size)
  return encoding.extract_features(encode_fn, params, batches, mesh)


def feature_set(features: np.ndarray, labels: np.ndarray, mesh: Mesh) -> encoding.FeatureSet:
  """Host features [M, D] and labels [M] → a FeatureSet split over the devices (padding rows invalid)."""
  count = len(labels)
  rows = -(-count // jax.device_count()) * jax.device_count()
  pad = lambda x: np.concatenate([x, np.zeros((rows - count,) + x.shape[1:], x.dtype)])
  host = {"features": pad(features.astype(np.float32)), "labels": pad(labels.astype(np.int32)),
          "valid": np.arange(rows) < count}
  on_devices = sharding.to_global(host, mesh)
  return encoding.FeatureSet(on_devices["features"], on_devices["labels"], on_devices["valid"])


def pixel_features(split: Split, mesh: Mesh) -> encoding.FeatureSet:
  """The normalised pixels as features: the baseline any encoder should beat. Grey images stored as RGB (all
  channels equal, e.g. Fashion-MNIST) keep one channel, which leaves kNN unchanged and the probe 3× smaller."""
  images = split.images
  if images.shape[-1] > 1 and all(np.array_equal(images[..., 0], images[..., c]) for c in range(1, images.shape[-1])):
    images = images[..., :1]
  return feature_set(images.reshape(len(split), -1), split.labels, mesh)


def knn_top1(train: encoding.FeatureSet, test: encoding.FeatureSet, mesh: Mesh, *, k: int = 20,
             temperature: float = 0.07) -> float:
  """Top-1 (%) of DINO's weighted kNN: the train features are the bank, the test features the queries."""
  bank = encoding.FeatureSet(jax.jit(knn.l2_normalize)(train.features), train.labels, train.valid)
  votes = knn.knn_votes(bank, test.features, mesh, num_classes=knn.num_classes_of(bank), k=k,
                        temperature=temperature)
  return classification.accuracy_from_counts(classification.accuracy_counts(votes, test.labels, test.valid))["top1"]


def probe_top1(train: encoding.FeatureSet, test: encoding.FeatureSet, mesh: Mesh,
               config: ml_collections.ConfigDict) -> float:
  """Top-1 (%) on `test` of a linear probe trained on `train` (the last epoch's accuracy, not the best).

  `config`: what `linear_probe.train_on_features` reads (seed, epochs, warmup_epochs, eval_every_epochs, batch_size,
  optimizer, bn_momentum, num_classes)."""
  writer = metrics.MetricsWriter("", enabled=False)
  return linear_probe.train_on_features(config, train, test, mesh, writer)["top1"]
