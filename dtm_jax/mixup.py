"""Mixup and CutMix on device, with label smoothing (the fine-tuning recipe of BEiT v2 / docs/METHOD.md §6).

One mixing coefficient per batch, and every image is mixed with the image at the mirrored batch position (timm's
"batch" mode). Doing it inside the jitted step keeps the input pipeline free of label arithmetic and works on sharded
global batches unchanged. On a batch split over n devices, `num_shards=n` mirrors within each device's shard instead
of across the whole batch, so no image moves between devices (a whole-batch mirror is a collective-permute of the
batch). Targets are probability vectors that sum to one.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class MixConfig:
  """mixup_alpha / cutmix_alpha: Beta(α, α) concentration, 0 turns that kind off; prob: chance a batch is mixed at
  all; switch_prob: chance of CutMix when both kinds are on; label_smoothing: ε of the smoothed one-hot targets."""
  mixup_alpha: float = 0.8
  cutmix_alpha: float = 1.0
  prob: float = 1.0
  switch_prob: float = 0.5
  label_smoothing: float = 0.1

  def __post_init__(self):
    if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
      raise ValueError(f"mixup_alpha={self.mixup_alpha} and cutmix_alpha={self.cutmix_alpha} must be ≥ 0.")
    for name in ("prob", "switch_prob", "label_smoothing"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1].")

  @property
  def enabled(self) -> bool:
    return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  """One-hot targets with ε/C on every class and 1 − ε + ε/C on the true one."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def cutmix_box(rng: jax.Array, height: int, width: int, lam: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A box covering about 1 − lam of the image at a uniform centre, clipped to the image.

  Returns the bool mask [H, W] of the box (True = take the partner's pixels) and the corrected lam, i.e. the exact
  fraction of pixels that stay from the image itself.
  """
  cut_ratio = jnp.sqrt(1.0 - lam)
  cut_h = (height * cut_ratio).astype(jnp.int32)
  cut_w = (width * cut_ratio).astype(jnp.int32)
  rng_y, rng_x = jax.random.split(rng)
  cy = jax.random.randint(rng_y, (), 0, height)
  cx = jax.random.randint(rng_x, (), 0, width)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  lam = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (height * width)
  return box, lam


def mirror(x: jax.Array, num_shards: int = 1) -> jax.Array:
  """Each of the `num_shards` equal blocks of the leading (batch) axis reversed in place; x[::-1] for one block.

  With the batch split over `num_shards` devices, each device's rows stay on it.
  """
  if num_shards < 1 or x.shape[0] % num_shards:
    raise ValueError(f"The batch of {x.shape[0]} must be divisible by num_shards={num_shards} (the devices the batch "
                     "is split over).")
  return x.reshape((num_shards, -1) + x.shape[1:])[:, ::-1].reshape(x.shape)


def mix_batch(rng: jax.Array, images: jax.Array, labels: jax.Array, *, num_classes: int,
              config: MixConfig, num_shards: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mix a batch NHWC with its mirror image (batch reversed, within each of `num_shards` blocks: see `mirror`).

  Returns (mixed images, soft targets [B, num_classes], lam). Mixup blends whole images with lam ~ Beta(α, α); CutMix
  pastes a box from the partner and sets lam to the pixel fraction kept. Targets are
  lam · smooth(y) + (1 − lam) · smooth(y_partner), so each row sums to one.
  """
  targets = smooth_one_hot(labels, num_classes, config.label_smoothing)
  if not config.enabled:
    return images, targets, jnp.ones((), jnp.float32)
  rng_apply, rng_kind, rng_mixup, rng_cutmix, rng_box = jax.random.split(rng, 5)
  partner_images, partner_targets = mirror(images, num_shards), mirror(targets, num_shards)

  def mixup():
    lam = jax.random.beta(rng_mixup, config.mixup_alpha, config.mixup_alpha)
    mixed = lam * images + (1.0 - lam) * partner_images
    return mixed.astype(images.dtype), lam

  def cutmix():
    lam = jax.random.beta(rng_cutmix, config.cutmix_alpha, config.cutmix_alpha)
    box, lam = cutmix_box(rng_box, images.shape[1], images.shape[2], lam)
    return jnp.where(box[None, :, :, None], partner_images, images), lam

  if config.mixup_alpha > 0 and config.cutmix_alpha > 0:
    use_cutmix = jax.random.bernoulli(rng_kind, config.switch_prob)
    mixed, lam = jax.lax.cond(use_cutmix, cutmix, mixup)
  elif config.cutmix_alpha > 0:
    mixed, lam = cutmix()
  else:
    mixed, lam = mixup()
  apply = jax.random.bernoulli(rng_apply, config.prob)
  lam = jnp.where(apply, lam, 1.0).astype(jnp.float32)
  mixed = jnp.where(apply, mixed, images)
  return mixed, lam * targets + (1.0 - lam) * partner_targets, lam
