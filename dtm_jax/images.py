"""Images as they reach the jitted steps: uint8 from the input pipeline, normalised on the device.

Training batches travel host → device as uint8 (a quarter of float32's bytes, and of the step's input buffer) and
are normalised inside the step, where XLA fuses it into the patch embedding. Float images (already normalised:
synthetic data, fine-tuning batches with random erasing, evaluation batches) pass through unchanged.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def to_model_input(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """uint8 [..., C] in [0, 255] → float32 (x/255 − mean)/std per channel; float images unchanged."""
  if images.dtype != jnp.uint8:
    return images
  mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
  return (images.astype(jnp.float32) / 255.0 - mean) / std
