"""RandAugment as timm's "rand-m9-mstd0.5-inc1" (BEiT v2 fine-tuning), in stateless TF ops.

Each of `num_layers` layers picks one of 15 ops uniformly (with replacement) and applies it
with probability 1/2. The magnitude is drawn per layer from N(magnitude, magnitude_std),
clipped to [0, 10]; "inc1" means every op grows stronger as the magnitude grows. Geometric
ops fill with the dataset mean colour (timm's `img_mean`) and resample bilinearly (timm uses
PIL's bicubic; TF's projective transform offers nearest and bilinear only).

Images are float32 RGB in [0, 255] with a static size; results stay in [0, 255].
"""
import functools
import math

import tensorflow as tf

from input_pipeline import transforms

_MAX_LEVEL = 10.0
_APPLY_PROB = 0.5


def rand_augment(image, rng, *, num_layers, magnitude, magnitude_std, fill):
  """Applies `num_layers` random ops to `image`.

  Args:
    image: float32 [h, w, 3] in [0, 255], static shape.
    rng: int64 [2] seed.
    num_layers: ops drawn per image (timm's n).
    magnitude: mean strength in [0, 10] (timm's m).
    magnitude_std: standard deviation of the per-layer strength (timm's mstd).
    fill: RGB colour in [0, 255] for pixels that geometric ops bring in from outside.
  """
  if not num_layers:
    return image
  fill = tf.constant(fill, tf.float32)
  op_rng, apply_rng, level_rng, sign_rng = transforms.split_rng(rng, 4)
  ops = tf.random.stateless_uniform([num_layers], op_rng, 0, len(_OPS), dtype=tf.int32)
  applied = tf.random.stateless_uniform([num_layers], apply_rng) < _APPLY_PROB
  ops = tf.where(applied, ops, len(_OPS))   # The last branch is the identity.
  levels = magnitude + magnitude_std * tf.random.stateless_normal([num_layers], level_rng)
  levels = tf.clip_by_value(levels, 0.0, _MAX_LEVEL) / _MAX_LEVEL
  signs = tf.where(tf.random.stateless_uniform([num_layers], sign_rng) < 0.5, -1.0, 1.0)

  def layer(x, params):
    op, level, sign = params
    branches = [functools.partial(fn, x, level, sign, fill) for fn in _OPS]
    return tf.switch_case(op, branches + [lambda: x])

  # A loop rather than unrolled layers: the 16 branches are traced once, not per layer.
  return tf.foldl(layer, (ops, levels, signs), initializer=image)


# --- The ops. Each is fn(image, level in [0, 1], sign in {-1, 1}, fill) -> image.

def _auto_contrast(image, level, sign, fill):
  del level, sign, fill
  low = tf.reduce_min(image, axis=[0, 1])
  high = tf.reduce_max(image, axis=[0, 1])
  stretch = high > low
  scale = tf.where(stretch, 255.0 / tf.maximum(high - low, 1e-6), 1.0)
  offset = tf.where(stretch, low, 0.0)
  return tf.clip_by_value((image - offset) * scale, 0.0, 255.0)


def _equalize(image, level, sign, fill):
  """PIL's ImageOps.equalize, per channel."""
  del level, sign, fill
  pixels = tf.transpose(tf.reshape(tf.cast(tf.round(image), tf.int32), [-1, 3]))  # [3, n]
  hist = tf.math.bincount(pixels, minlength=256, maxlength=256, axis=-1)           # [3, 256]
  last_nonzero = tf.gather(hist, 255 - tf.argmax(tf.reverse(hist, [1]) > 0, axis=1,
                                                 output_type=tf.int32), batch_dims=1)
  step = (tf.reduce_sum(hist, axis=1) - last_nonzero) // 255                          # [3]
  safe_step = tf.maximum(step, 1)[:, None]
  before = tf.cumsum(hist, axis=1, exclusive=True)
  lut = tf.minimum((before + safe_step // 2) // safe_step, 255)
  lut = tf.where(step[:, None] > 0, lut, tf.range(256)[None, :])
  equalized = tf.gather(lut, pixels, batch_dims=1)
  return tf.reshape(tf.cast(tf.transpose(equalized), tf.float32), tf.shape(image))


def _invert(image, level, sign, fill):
  del level, sign, fill
  return 255.0 - image


def _posterize(image, level, sign, fill):
  """Keeps 4 - floor(4 * level) high bits of every channel."""
  del sign, fill
  drop = 4.0 + tf.floor(4.0 * level)
  quantum = tf.pow(2.0, drop)
  return tf.floor(tf.round(image) / quantum) * quantum


def _solarize(image, level, sign, fill):
  del sign, fill
  threshold = 256.0 - tf.floor(256.0 * level)
  return tf.where(image >= threshold, 255.0 - image, image)


def _solarize_add(image, level, sign, fill):
  del sign, fill
  return tf.where(image < 128.0, tf.minimum(image + tf.floor(110.0 * level), 255.0), image)


def _enhance_factor(level, sign):
  return 1.0 + 0.9 * level * sign


def _color(image, level, sign, fill):
  del fill
  return _blend(transforms.grayscale(image), image, _enhance_factor(level, sign))


def _contrast(image, level, sign, fill):
  del fill
  mean = tf.round(tf.reduce_mean(transforms.grayscale(image)))
  return _blend(mean, image, _enhance_factor(level, sign))


def _brightness(image, level, sign, fill):
  del fill
  return _blend(0.0, image, _enhance_factor(level, sign))


def _sharpness(image, level, sign, fill):
  """PIL's ImageEnhance.Sharpness: blend with a 3x3 smoothing of the interior pixels."""
  del fill
  kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0]
  interior_change = tf.round(smooth) - image[1:-1, 1:-1]
  degenerate = image + tf.pad(interior_change, [[1, 1], [1, 1], [0, 0]])
  return _blend(degenerate, image, _enhance_factor(level, sign))


def _blend(degenerate, image, factor):
  return tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 255.0)


def _rotate(image, level, sign, fill):
  angle = sign * 30.0 * level * math.pi / 180.0
  height, width = float(image.shape[0]), float(image.shape[1])
  cy, cx = (height - 1) / 2, (width - 1) / 2
  cos, sin = tf.cos(angle), tf.sin(angle)
  # Output pixel (x, y) samples input R(angle) (p - c) + c.
  return _affine(image, [cos, sin, cx - cos * cx - sin * cy,
                         -sin, cos, cy + sin * cx - cos * cy], fill)


def _shear_x(image, level, sign, fill):
  return _affine(image, [1.0, sign * 0.3 * level, 0.0, 0.0, 1.0, 0.0], fill)


def _shear_y(image, level, sign, fill):
  return _affine(image, [1.0, 0.0, 0.0, sign * 0.3 * level, 1.0, 0.0], fill)


def _translate_x(image, level, sign, fill):
  shift = sign * 0.45 * level * image.shape[1]
  return _affine(image, [1.0, 0.0, shift, 0.0, 1.0, 0.0], fill)


def _translate_y(image, level, sign, fill):
  shift = sign * 0.45 * level * image.shape[0]
  return _affine(image, [1.0, 0.0, 0.0, 0.0, 1.0, shift], fill)


def _affine(image, coefficients, fill):
  """Output pixel (x, y) takes input (a x + b y + c, d x + e y + f), as PIL's AFFINE."""
  transform = tf.stack([tf.cast(c, tf.float32) for c in coefficients] + [0.0, 0.0])[None]
  # The op fills with one scalar; shifting by the fill colour gives a per-channel fill.
  moved = tf.raw_ops.ImageProjectiveTransformV3(
      images=(image - fill)[None], transforms=transform, output_shape=tf.shape(image)[:2],
      fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")[0]
  return tf.clip_by_value(moved + fill, 0.0, 255.0)


# timm's _RAND_INCREASING_TRANSFORMS, in its order.
_OPS = (_auto_contrast, _equalize, _invert, _rotate, _posterize, _solarize, _solarize_add,
        _color, _contrast, _brightness, _sharpness, _shear_x, _shear_y, _translate_x,
        _translate_y)
