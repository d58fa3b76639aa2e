"""The study's scores of frozen features: kNN and linear-probe top-1 with the study's own probe recipe.

The study scores dozens of students on the same few thousand images, so the images are decoded once
(`dtm_jax.evaluators.frozen_features.load_split`) and each student only runs its forward pass; this module fixes
the study's probe optimizer (`probe_config`).
"""
from __future__ import annotations

import ml_collections
from jax.sharding import Mesh

from configs import linear_probe_demo
from dtm_jax.evaluators import encoding, frozen_features


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


def probe_top1(train: encoding.FeatureSet, test: encoding.FeatureSet, mesh: Mesh, *, seed: int, epochs: int,
               num_classes: int = 10) -> float:
  """Top-1 (%) on `test` of a linear probe trained on `train` (the last epoch's accuracy, not the best)."""
  batch_size = min(256, frozen_features.multiple_of_devices(train.num_valid // 4))
  config = probe_config(seed=seed, epochs=epochs, batch_size=batch_size, num_classes=num_classes)
  return frozen_features.probe_top1(train, test, mesh, config)


def scores(train: encoding.FeatureSet, test: encoding.FeatureSet, mesh: Mesh, *, seed: int,
           probe_epochs: int) -> dict[str, float]:
  return {"knn_top1": frozen_features.knn_top1(train, test, mesh),
          "probe_top1": probe_top1(train, test, mesh, seed=seed, epochs=probe_epochs)}

