"""Evaluation slices held in memory, and the two scores of frozen features: kNN and linear-probe top-1.

The study scores dozens of students on the same few thousand images, so the images are decoded once (`load_split`)
and each student only runs its forward pass. The scores are the project's own evaluations applied to precomputed
features: DINO's weighted kNN (`dtm_jax.evaluate.knn`) and MAE's BatchNorm + linear probe
(`dtm_jax.evaluate.linear_probe`).
"""
from __future__ import annotations

import dataclasses

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from configs import linear_probe_demo
from dtm_jax import metrics, sharding
from dtm_jax import images as images_lib
from dtm_jax.evaluate import common, knn, linear_probe


@dataclasses.dataclass(frozen=True)
class Split:
  """The first examples of a split in the evaluation crop: images f32 [M, H, W, C] (normalised), labels int32 [M]."""
  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)


def load_split(input_cfg: ml_collections.ConfigDict, split: str, num_examples: int, *, image_size: int,
               batch_size: int = 1000) -> Split:
  """Reads the first `num_examples` of `split` through the input pipeline's evaluation view."""
  import input_pipeline  # pylint: disable=g-import-not-at-top  # tools may use TF; dtm_jax never does.
  data = input_pipeline.build_eval(input_cfg, split=split, image_size=image_size, global_batch_size=batch_size)
  images, labels = [], []
  for batch in common.take_batches(data, batch_size, num_examples):
    images.append(batch["image"][batch["valid"]])
    labels.append(batch["label"][batch["valid"]])
  images, labels = np.concatenate(images)[:num_examples], np.concatenate(labels)[:num_examples]
  mean, std = (np.asarray(v, np.float32) for v in images_lib.normalization_of(input_cfg))
  images = (images.astype(np.float32) / 255.0 - mean) / std  # decoded once, normalised once (the pipeline sends uint8)
  if len(labels) < num_examples:
    raise ValueError(f"The {split!r} split has only {len(labels)} examples; ask for at most that many.")
  return Split(images, labels.astype(np.int32))


def padded_batches(arrays: dict[str, np.ndarray], batch_size: int) -> list[dict[str, np.ndarray]]:
  """Batches of `arrays` (same first dimension) plus a "valid" flag; the last batch is padded with valid=False."""
  count = len(next(iter(arrays.values())))
  batch_size = _multiple_of_devices(batch_size)
  out = []
  for start in range(0, count, batch_size):
    stop = min(start + batch_size, count)
    pad = batch_size - (stop - start)
    batch = {k: np.concatenate([v[start:stop], np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in arrays.items()}
    batch["valid"] = np.arange(batch_size) < stop - start
    out.append(batch)
  return out


def _multiple_of_devices(n: int) -> int:
  devices = jax.device_count()
  return max(devices, n // devices * devices)


def encoder_features(encode_fn: common.EncodeFn, params, split: Split, mesh: Mesh,
                     batch_size: int = 500) -> common.FeatureSet:
  """`encode_fn(params, images) -> [B, D]` over the whole split, kept on the devices."""
  batches = padded_batches({"image": split.images, "label": split.labels}, batch_size)
  return common.extract_features(encode_fn, params, batches, mesh)


def feature_set(features: np.ndarray, labels: np.ndarray, mesh: Mesh) -> common.FeatureSet:
  """Host features [M, D] and labels [M] → a FeatureSet split over the devices (padding rows invalid)."""
  count = len(labels)
  rows = -(-count // jax.device_count()) * jax.device_count()
  pad = lambda x: np.concatenate([x, np.zeros((rows - count,) + x.shape[1:], x.dtype)])
  host = {"features": pad(features.astype(np.float32)), "labels": pad(labels.astype(np.int32)),
          "valid": np.arange(rows) < count}
  on_devices = sharding.to_global(host, mesh)
  return common.FeatureSet(on_devices["features"], on_devices["labels"], on_devices["valid"])


def knn_top1(train: common.FeatureSet, test: common.FeatureSet, mesh: Mesh, *, k: int = 20,
             temperature: float = 0.07) -> float:
  """Top-1 (%) of DINO's weighted kNN: the train features are the bank, the test features the queries."""
  bank = common.FeatureSet(jax.jit(knn.l2_normalize)(train.features), train.labels, train.valid)
  votes = knn.knn_votes(bank, test.features, mesh, num_classes=knn.num_classes_of(bank), k=k,
                        temperature=temperature)
  return common.accuracy_from_counts(common.accuracy_counts(votes, test.labels, test.valid))["top1"]


def probe_config(*, seed: int, epochs: int, batch_size: int = 256, num_classes: int = 10) -> ml_collections.ConfigDict:
  """The demo's linear probe (BatchNorm without affine + linear layer), with its own optimizer for these sizes.

  SGD with momentum at lr 1.0, set here so the study does not move when the demo's probe changes: on 5,000
  Fashion-MNIST features LARS at 0.1 (MAE's recipe) is far from converged after 50–200 epochs (raw pixels 69–77%, a
  pretrained student 36–47%), while SGD at lr 0.3–3 converges to within about a point in 100 epochs (raw pixels 76%,
  the same student 67–69%).
  """
  config = linear_probe_demo.get_config()
  config.optimizer.update(name="sgd", base_lr=1.0, lr_reference_batch=256, momentum=0.9, weight_decay=0.0, min_lr=0.0)
  config.seed = seed
  config.epochs = epochs
  config.warmup_epochs = max(1, epochs // 10)
  config.eval_every_epochs = epochs
  config.batch_size = batch_size
  config.num_classes = num_classes
  return config


def probe_top1(train: common.FeatureSet, test: common.FeatureSet, mesh: Mesh, *, seed: int, epochs: int,
               num_classes: int = 10) -> float:
  """Top-1 (%) on `test` of a linear probe trained on `train` (the last epoch's accuracy, not the best)."""
  config = probe_config(seed=seed, epochs=epochs, batch_size=min(256, _multiple_of_devices(train.num_valid // 4)),
                        num_classes=num_classes)
  writer = metrics.MetricsWriter("", enabled=False)
  return linear_probe.train_on_features(config, train, test, mesh, writer)["top1"]


def scores(train: common.FeatureSet, test: common.FeatureSet, mesh: Mesh, *, seed: int,
           probe_epochs: int) -> dict[str, float]:
  return {"knn_top1": knn_top1(train, test, mesh),
          "probe_top1": probe_top1(train, test, mesh, seed=seed, epochs=probe_epochs)}

