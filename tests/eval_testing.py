"""Helpers for the evaluation tests: a tiny pretraining checkpoint and a learnable labelled image stream."""
import json

import jax
import numpy as np
from flax import nnx

from dtm_jax import checkpoint
from dtm_jax.models import functional, vit

IMAGE_SIZE = 16
NUM_CLASSES = 4
# Class c is an image tinted by COLOURS[c] under noise: learnable from mean-pooled tokens in a few steps.
COLOURS = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [-1, -1, -1]], np.float32)


def tiny_student_config(**overrides):
  return vit.get_config("test", image_size=IMAGE_SIZE, patch_size=4, out_dim=8, **overrides)


def save_pretraining_checkpoints(workdir, steps, config=None):
  """Random students saved as a pretraining run would (one per step, different weights); returns their params."""
  config = config or tiny_student_config()
  saved = {}
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=len(steps), async_save=False)
  init = jax.jit(lambda key: functional.split_module(vit.PretrainViT(config, rngs=nnx.Rngs(key)))[1])
  for step in steps:
    params = init(jax.random.key(step))
    ckpt.save(step, params=params, train={"step": np.int32(step)}, data_iterator=None,
              metadata={"model_config": checkpoint.model_config_to_json(config), "step": step})
    saved[step] = jax.device_get(params)
  ckpt.close()
  return saved


def tinted_images(rng, labels, noise=0.6):
  images = rng.normal(scale=noise, size=(len(labels), IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
  return images + COLOURS[labels][:, None, None, :]


class TintedStream:
  """Infinite labelled batches, batch s a function of (seed, s); save/restore its position like the real input."""

  def __init__(self, batch_size, seed=0):
    self.batch_size, self.seed, self.step = batch_size, seed, 0

  def __iter__(self):
    return self

  def __next__(self):
    rng = np.random.default_rng([self.seed, self.step])
    self.step += 1
    labels = rng.integers(0, NUM_CLASSES, self.batch_size).astype(np.int32)
    return {"image": tinted_images(rng, labels), "label": labels}

  def save(self, path):
    with open(path, "w") as f:
      json.dump({"step": self.step}, f)

  def restore(self, path):
    with open(path) as f:
      self.step = json.load(f)["step"]


def tinted_eval_batches(num_examples, batch_size, seed=123):
  """One pass with the last batch padded (valid=False), as input_pipeline.build_eval gives it."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, NUM_CLASSES, num_examples).astype(np.int32)
  images = tinted_images(rng, labels)
  padded = -(-num_examples // batch_size) * batch_size
  valid = np.arange(padded) < num_examples
  images = np.concatenate([images, np.zeros((padded - num_examples,) + images.shape[1:], np.float32)])
  labels = np.concatenate([labels, np.zeros(padded - num_examples, np.int32)])
  return [{"image": images[i:i + batch_size], "label": labels[i:i + batch_size], "valid": valid[i:i + batch_size]}
          for i in range(0, padded, batch_size)]


def write_image_folder(root, *, per_class):
  """`root/<split>/<class>/*.png` of tinted 16×16 images (the folder source of the input pipeline)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for split, count in per_class.items():
    for label in range(NUM_CLASSES):
      folder = root / split / f"class_{label}"
      folder.mkdir(parents=True)
      for i in range(count):
        pixels = 128 + 90 * COLOURS[label] + rng.normal(scale=30, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
  return root
