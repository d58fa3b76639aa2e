"""Images as they reach the jitted programs: uint8 from the input pipeline, normalised on the device.

Every batch the input pipeline sends (pretraining, fine-tuning, probe and evaluation) travels host → device as uint8
(a quarter of float32's bytes, and of the program's input buffer) and is normalised inside the program, where XLA
fuses it into the patch embedding. Random erasing, which fills a box with normalised noise no 8-bit image holds, runs
here too: the pipeline draws the box (`erase_box`), the device draws the noise. Float images (already normalised:
synthetic data, tools that decode once) pass through unchanged.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

Normalization = tuple[Sequence[float], Sequence[float]]  # (mean, std) per channel of [0, 1] RGB


def normalization_of(input_config) -> Normalization:
  """(mean, std) of an `input` config block, as hashable tuples."""
  return tuple(map(float, input_config.mean)), tuple(map(float, input_config.std))


def to_model_input(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """uint8 [..., C] in [0, 255] → float32 (x/255 − mean)/std per channel; float images unchanged."""
  if images.dtype != jnp.uint8:
    return images
  mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def random_erase(images: jax.Array, boxes: jax.Array, rng: jax.Array) -> jax.Array:
  """timm's RandomErasing (mode "pixel") with boxes drawn by the input pipeline.

  images: normalised float [B, H, W, C]; boxes: int32 [B, 4] = (top, left, height, width), height 0 = not erased.
  Each box is replaced by per-pixel standard normal noise (the noise of a normalised image).
  """
  _, height, width, _ = images.shape
  top, left, box_h, box_w = (boxes[:, i, None, None, None] for i in range(4))
  rows = jnp.arange(height)[None, :, None, None]
  cols = jnp.arange(width)[None, None, :, None]
  in_box = (rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w)
  noise = jax.random.normal(rng, images.shape, jnp.float32)
  return jnp.where(in_box, noise, images).astype(images.dtype)


def training_images(batch: dict, normalization: Normalization, erase_rng: jax.Array) -> jax.Array:
  """The model's float input of a labelled training batch: normalised, then erased where `erase_box` says."""
  images = to_model_input(batch["image"], *normalization)
  if "erase_box" in batch:
    images = random_erase(images, batch["erase_box"], erase_rng)
  return images


def training_batch(host_batch: dict) -> dict:
  """The arrays of a labelled training batch that the devices use (what `images.training_images` reads)."""
  return {k: host_batch[k] for k in ("image", "label", "erase_box") if k in host_batch}
