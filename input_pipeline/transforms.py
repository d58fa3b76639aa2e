"""Per-image TensorFlow ops: decode with a crop window, resize, colour, flip, the random-erasing box.

Every random op is stateless and takes `rng`, an int64 [2] seed tensor, so a view is a pure
function of (image, rng): that is what makes the streams reproducible and resumable.
Images are float32 RGB in [0, 255] until `to_uint8`; the devices normalise them (dtm_jax/images.py).

The crop is chosen from the stored image's size *before* decoding, so JPEGs are decoded only
inside the crop window (`decode_and_crop_jpeg`); other formats are decoded, then cropped.
Training crops are whole pixels (as torchvision's RandomResizedCrop); the evaluation crop is the
resize-then-centre-crop's exact sub-pixel window (`center_crop`).
"""
import math

import tensorflow as tf

# torchvision's RandomResizedCrop: aspect ratios log-uniform in [3/4, 4/3], 10 tries.
_CROP_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
_CROP_ATTEMPTS = 10
# timm's RandomErasing: area fraction in [0.02, 1/3], aspect log-uniform in [0.3, 1/0.3].
_ERASE_AREA = (0.02, 1 / 3)
_ERASE_LOG_ASPECT = (math.log(0.3), -math.log(0.3))
_ERASE_ATTEMPTS = 10
# ITU-R 601 luma, as PIL and torchvision compute greyscale.
_LUMA = (0.299, 0.587, 0.114)


def split_rng(rng, num):
  """`num` independent seeds derived from `rng`."""
  return tf.unstack(tf.random.experimental.stateless_split(rng, num))


def decode_and_crop(image, window_fn):
  """Decodes (if needed) and crops an image to the window `window_fn(height, width)` picks.

  Args:
    image: encoded bytes (scalar tf.string: JPEG, PNG, GIF or BMP) or uint8 [h, w, 3].
    window_fn: maps the image's int32 height and width to int32 [top, left, crop_h, crop_w].

  Returns:
    uint8 [crop_h, crop_w, 3].
  """
  return _decode_and_crop(image, window_fn)[0]


def _decode_and_crop(image, window_fn):
  """decode_and_crop's crop, and the whole image's int32 [height, width]."""
  if image.dtype != tf.string:
    return _crop(image, window_fn)

  def jpeg():
    shape = tf.image.extract_jpeg_shape(image)
    return tf.image.decode_and_crop_jpeg(image, window_fn(shape[0], shape[1]), channels=3), shape[:2]

  def other_format():
    return _crop(tf.io.decode_image(image, channels=3, expand_animations=False), window_fn)

  cropped, shape = tf.cond(tf.io.is_jpeg(image), jpeg, other_format)
  cropped.set_shape([None, None, 3])
  return cropped, shape


def whole_image_window(height, width):
  """The window of the whole image (decode without cropping)."""
  return tf.stack([0, 0, height, width])


def _crop(image, window_fn):
  shape = tf.shape(image)[:2]
  top, left, height, width = tf.unstack(window_fn(shape[0], shape[1]))
  return image[top:top + height, left:left + width], shape


def random_resized_crop_window(rng, height, width, scale_min):
  """torchvision's RandomResizedCrop window: area in [scale_min, 1] of the image, 10 tries.

  When no try fits, the fallback is torchvision's: a centre crop at the nearest allowed
  aspect ratio. Returns int32 [top, left, crop_h, crop_w].
  """
  area_rng, ratio_rng, top_rng, left_rng = split_rng(rng, 4)
  h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  area = h * w * tf.random.stateless_uniform([_CROP_ATTEMPTS], area_rng, scale_min, 1.0)
  ratio = tf.exp(tf.random.stateless_uniform([_CROP_ATTEMPTS], ratio_rng, *_CROP_LOG_RATIO))
  crop_w = tf.round(tf.sqrt(area * ratio))
  crop_h = tf.round(tf.sqrt(area / ratio))
  fits = (crop_w > 0) & (crop_h > 0) & (crop_w <= w) & (crop_h <= h)
  first = tf.argmax(tf.cast(fits, tf.int32))

  min_ratio, max_ratio = (math.exp(r) for r in _CROP_LOG_RATIO)
  image_ratio = w / h
  fallback_w = tf.where(image_ratio > max_ratio, tf.round(h * max_ratio), w)
  fallback_h = tf.where(image_ratio < min_ratio, tf.round(w / min_ratio), h)

  found = tf.reduce_any(fits)
  crop_h = tf.where(found, tf.gather(crop_h, first), fallback_h)
  crop_w = tf.where(found, tf.gather(crop_w, first), fallback_w)
  # Uniform integer offsets in [0, h - crop_h]; the fallback is centred.
  top = tf.where(found, _uniform_int(top_rng, h - crop_h), tf.floor((h - crop_h) / 2))
  left = tf.where(found, _uniform_int(left_rng, w - crop_w), tf.floor((w - crop_w) / 2))
  return tf.cast(tf.stack([top, left, crop_h, crop_w]), tf.int32)


def _uniform_int(rng, high):
  """A uniform integer in [0, high] (both included), as a float."""
  return tf.minimum(tf.floor(tf.random.stateless_uniform([], rng) * (high + 1)), high)


def center_crop(image, size, crop_pct, antialias):
  """The released evaluation transform, exactly: torchvision's Resize(floor(size / crop_pct), bicubic), then
  CenterCrop(size); float32 [size, size, 3] in [0, 255].

  The crop keeps a window of the image that is rarely a whole number of pixels (24.5 of a 28-px image at 28 px and
  crop_pct 0.875), so the resize-then-crop is one resampling with that scale and a sub-pixel offset (TF's
  ScaleAndTranslate: the Keys cubic kernel as PIL's bicubic, widened when shrinking with `antialias` as PIL always
  does, weights renormalised at the image's edges as PIL's). Only the window plus the kernel's reach is decoded.
  """
  def window(height, width):
    return _center_crop_geometry(height, width, size, crop_pct, antialias)[0]

  cropped, shape = _decode_and_crop(image, window)
  _, scale, translation = _center_crop_geometry(shape[0], shape[1], size, crop_pct, antialias)
  resampled = tf.raw_ops.ScaleAndTranslate(
      images=cropped[None], size=[size, size], scale=scale, translation=translation, kernel_type="keyscubic",
      antialias=antialias)[0]
  return tf.clip_by_value(resampled, 0.0, 255.0)


def _center_crop_geometry(height, width, size, crop_pct, antialias):
  """center_crop's source window (int32 [top, left, crop_h, crop_w]: the crop plus the kernel's reach, within the
  image) and the scale and translation (float32 [2] each, y then x) that map the window onto the output."""
  resize_to = math.floor(size / crop_pct)
  hw = tf.cast(tf.stack([height, width]), tf.float32)
  short = tf.reduce_min(hw)
  # torchvision's Resize(int): the shorter side to resize_to, the longer to int(resize_to * long / short).
  resized = tf.where(hw == short, float(resize_to), tf.floor(resize_to * hw / short))
  scale = resized / hw
  offset = tf.round((resized - size) / 2)  # CenterCrop's int(round((new - size) / 2)), in resized pixels
  reach = 2.0 * (tf.maximum(1.0, 1.0 / scale) if antialias else 1.0) + 1.0  # cubic support, +1 for rounding
  start = tf.maximum(0.0, tf.floor(offset / scale - reach))
  stop = tf.minimum(hw, tf.math.ceil((offset + size) / scale + reach))
  window = tf.cast(tf.concat([start, stop - start], 0), tf.int32)
  return window, scale, start * scale - offset


def resize(image, size, antialias):
  """Bicubic resize to size x size; float32 in [0, 255].

  antialias=True widens the kernel when shrinking, as PIL (hence torchvision) always does.
  Enlarging gives the same pixels either way (within 0.2/255), so then the cheaper kernel runs.
  """
  shape = tf.shape(image)

  def smooth():
    return tf.image.resize(image, [size, size], method="bicubic", antialias=True)

  def plain():
    return tf.image.resize(image, [size, size], method="bicubic")

  resized = tf.cond(tf.reduce_any(shape[:2] > size), smooth, plain) if antialias else plain()
  return tf.clip_by_value(resized, 0.0, 255.0)


def random_flip(image, rng):
  return tf.image.stateless_random_flip_left_right(image, rng)


def grayscale(image):
  """Luma of an RGB image, shape [h, w, 1]."""
  return tf.tensordot(image, tf.constant(_LUMA), axes=[[-1], [0]])[..., None]


def color_jitter(image, rng, strength):
  """torchvision ColorJitter(strength, strength, strength) on [0, 1] RGB.

  Brightness, contrast and saturation factors are uniform in [1 - s, 1 + s] and the three
  ops run in a random order, each followed by a clip to [0, 1]. Each step computes all three
  and selects one: under XLA that fuses into a single pass (branches would not).
  """
  factor_rng, order_rng = split_rng(rng, 2)
  brightness, contrast, saturation = tf.unstack(
      tf.random.stateless_uniform([3], factor_rng, max(0.0, 1 - strength), 1 + strength))
  order = tf.argsort(tf.random.stateless_uniform([3], order_rng))
  for step in range(3):
    grey = grayscale(image)
    candidates = (image * brightness,
                  _blend(tf.reduce_mean(grey), image, contrast),
                  _blend(grey, image, saturation))
    image = tf.where(order[step] == 0, candidates[0],
                     tf.where(order[step] == 1, candidates[1], candidates[2]))
    image = tf.clip_by_value(image, 0.0, 1.0)
  return image


def _blend(degenerate, image, factor):
  return degenerate + factor * (image - degenerate)


def to_uint8(image255):
  """Float pixels in [0, 255] (resized, jittered) → uint8, rounded to nearest; what travels to the devices."""
  return tf.cast(tf.round(tf.clip_by_value(image255, 0.0, 255.0)), tf.uint8)


def random_erase_box(rng, height, width, prob):
  """The box of timm's RandomErasing(prob, mode="pixel", count=1): int32 [4] = (top, left, height, width).

  With probability `prob`, one box (area 2-33% of the image, aspect log-uniform in [0.3, 1/0.3], first of 10 tries
  that fits); otherwise (or when no try fits) a box of height 0. The device fills the box with normalised noise
  (`dtm_jax.images.random_erase`), so the image itself can travel as uint8.
  """
  apply_rng, area_rng, aspect_rng, top_rng, left_rng = split_rng(rng, 5)
  area = float(height * width) * tf.random.stateless_uniform([_ERASE_ATTEMPTS], area_rng, *_ERASE_AREA)
  aspect = tf.exp(tf.random.stateless_uniform([_ERASE_ATTEMPTS], aspect_rng, *_ERASE_LOG_ASPECT))
  box_h = tf.round(tf.sqrt(area * aspect))
  box_w = tf.round(tf.sqrt(area / aspect))
  fits = (box_h < height) & (box_w < width)
  first = tf.argmax(tf.cast(fits, tf.int32))
  box_h, box_w = tf.gather(box_h, first), tf.gather(box_w, first)
  top = _uniform_int(top_rng, height - box_h)
  left = _uniform_int(left_rng, width - box_w)
  erase = tf.reduce_any(fits) & (tf.random.stateless_uniform([], apply_rng) < prob)
  box = tf.cast(tf.stack([top, left, box_h, box_w]), tf.int32)
  return tf.where(erase, box, tf.zeros_like(box))
