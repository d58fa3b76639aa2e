"""Per-image ops against PIL and torchvision's published semantics."""
import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from input_pipeline import randaugment, transforms


def _smooth_image(height, width, seed=0):
  """A smooth random RGB uint8 image (low-frequency content, like photos)."""
  coarse = np.random.default_rng(seed).integers(0, 256, (4, 5, 3), dtype=np.uint8)
  return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))


def _noise_image(height=24, width=20, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _rng(i):
  return tf.constant([7, i], tf.int64)


def _per_seed(fn, num, dtype=tf.float32):
  """fn(rng) for `num` different seeds, traced once."""
  seeds = tf.stack([tf.fill([num], tf.constant(7, tf.int64)), tf.range(num, dtype=tf.int64)], 1)
  return tf.function(lambda: tf.map_fn(fn, seeds, fn_output_signature=dtype))().numpy()


def _torchvision_rrc_window(rng, height, width, scale_min):
  """torchvision's RandomResizedCrop.get_params, written out (reference)."""
  area = height * width
  for _ in range(10):
    target = area * rng.uniform(scale_min, 1.0)
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
    if 0 < w <= width and 0 < h <= height:
      return rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w
  ratio = width / height
  if ratio < 3 / 4:
    w, h = width, round(width / (3 / 4))
  elif ratio > 4 / 3:
    h, w = height, round(height * 4 / 3)
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("height, width, scale_min", [(375, 500, 0.08), (64, 48, 0.2)])
def test_random_resized_crop_window_matches_torchvision_statistics(height, width, scale_min):
  ours = _per_seed(lambda rng: transforms.random_resized_crop_window(
      rng, height, width, scale_min), 600, tf.int32)
  rng = np.random.default_rng(0)
  reference = np.array([_torchvision_rrc_window(rng, height, width, scale_min)
                        for _ in range(3000)])
  top, left, h, w = ours.T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= height).all() and (left + w <= width).all()
  area = h * w / (height * width)
  ref_area = reference[:, 2] * reference[:, 3] / (height * width)
  assert area.min() >= scale_min * 0.9 and area.max() <= 1.0
  assert abs(area.mean() - ref_area.mean()) < 0.03
  log_ratio = np.log(w / h)
  assert np.abs(log_ratio).max() <= math.log(4 / 3) + 0.05
  # Positions spread over the whole valid range.
  slack = height - h
  assert (top[slack > 20] / slack[slack > 20]).std() > 0.2


def test_random_resized_crop_falls_back_to_a_centre_crop_on_extreme_shapes():
  # A 10 x 400 strip: no window with aspect <= 4/3 covers >= 50% of it.
  window = transforms.random_resized_crop_window(_rng(0), 10, 400, 0.5).numpy()
  np.testing.assert_array_equal(window, [0, (400 - 13) // 2, 10, 13])


def _released_eval_transform(image, size, crop_pct):
  """torchvision's Resize(floor(size / crop_pct), bicubic) + CenterCrop(size) (the released code's evaluation
  transform, and the exported BeitImageProcessor's on square images), written out with PIL: uint8 [size, size, 3]."""
  height, width = image.shape[:2]
  short, long = sorted((height, width))
  resize_to = math.floor(size / crop_pct)
  new_long = int(resize_to * long / short)
  new_h, new_w = (resize_to, new_long) if height <= width else (new_long, resize_to)
  resized = Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC)
  top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
  return np.asarray(resized.crop((left, top, left + size, top + size)), np.float32)


@pytest.mark.parametrize("height, width, size, crop_pct, encoding", [
    (28, 28, 28, 0.875, None),     # the demo's Fashion-MNIST: the crop keeps 24.5 of 28 pixels
    (90, 60, 32, 0.875, None), (40, 70, 24, 1.0, None), (33, 47, 20, 0.9, None),
    (375, 500, 224, 0.875, None),  # ImageNet-sized: only the window around the crop is resampled
    (47, 33, 20, 0.9, "png"), (375, 500, 224, 0.875, "jpeg")])  # a JPEG is decoded only around its crop
def test_eval_crop_equals_resize_then_centre_crop(height, width, size, crop_pct, encoding):
  image = _smooth_image(height, width)
  source = tf.constant(image)
  if encoding == "png":
    source = tf.io.encode_png(image)
  elif encoding == "jpeg":
    source = tf.io.encode_jpeg(image, quality=100)
    image = tf.io.decode_jpeg(source).numpy()  # the reference sees the decoded pixels
  ours = transforms.center_crop(source, size, crop_pct, antialias=True).numpy()
  reference = _released_eval_transform(image, size, crop_pct)
  assert ours.shape == (size, size, 3)
  # Equal up to PIL's two roundings to 8 bits (between its horizontal and vertical passes, and at the end) and a JPEG
  # decoded in a window (pixels move by up to 2 levels). Cropping whole pixels, then resizing (the code before
  # 2026-12-07) was off by up to half a pixel: errors of 4-44 levels max, 0.7-11 mean on these images.
  error = np.abs(ours - reference)
  assert error.max() <= (3.0 if encoding == "jpeg" else 1.5) and error.mean() < 0.4, (error.max(), error.mean())


def test_antialiased_resize_shrinks_like_pil_and_enlarges_like_plain_bicubic():
  image = _noise_image(60, 90)   # High frequencies alias when shrunk without a filter.
  pil = np.asarray(Image.fromarray(image).resize((24, 24), Image.BICUBIC), np.float32)
  smooth = transforms.resize(tf.constant(image), 24, antialias=True).numpy()
  sharp = transforms.resize(tf.constant(image), 24, antialias=False).numpy()
  assert np.abs(smooth - pil).mean() < 3 < np.abs(sharp - pil).mean()
  small = _noise_image(20, 30)
  np.testing.assert_allclose(transforms.resize(tf.constant(small), 48, antialias=True),
                             transforms.resize(tf.constant(small), 48, antialias=False), atol=0.5)


def test_jpeg_and_png_decode_inside_the_window():
  image = _smooth_image(40, 50)
  window = lambda h, w: tf.constant([5, 7, 20, 30])
  png = tf.io.encode_png(image)
  np.testing.assert_array_equal(transforms.decode_and_crop(png, window), image[5:25, 7:37])
  jpeg = tf.io.encode_jpeg(image, quality=95)
  full = tf.io.decode_jpeg(jpeg).numpy()
  cropped = transforms.decode_and_crop(jpeg, window).numpy()
  assert cropped.shape == (20, 30, 3)
  assert np.abs(cropped.astype(int) - full[5:25, 7:37]).max() <= 2


def test_color_jitter_strength_and_range():
  grey = tf.fill([8, 8, 3], 0.5)
  # Contrast and saturation leave a grey image alone: only brightness (x0.6..1.4) acts.
  levels = _per_seed(lambda rng: transforms.color_jitter(grey, rng, 0.4), 200)
  assert np.ptp(levels, axis=(1, 2, 3)).max() < 1e-6
  assert 0.3 - 1e-6 <= levels.min() and levels.max() <= 0.7 + 1e-6
  assert levels.min() < 0.33 and levels.max() > 0.67
  colourful = tf.constant(_noise_image() / 255.0, tf.float32)
  out = transforms.color_jitter(colourful, _rng(1), 0.4).numpy()
  assert out.min() >= 0 and out.max() <= 1 and not np.allclose(out, colourful)
  np.testing.assert_allclose(transforms.color_jitter(colourful, _rng(1), 0.0), colourful,
                             atol=1e-6)


def test_random_erase_boxes_are_timms_boxes():
  boxes = _per_seed(lambda rng: transforms.random_erase_box(rng, 32, 24, 1.0), 200, tf.int32)
  top, left, height, width = boxes.T
  assert (height > 0).mean() > 0.95  # with prob 1 a box is drawn unless none of the 10 tries fits
  drawn = height > 0
  assert (top >= 0).all() and (left >= 0).all() and (top + height <= 32).all() and (left + width <= 24).all()
  fractions = height[drawn] * width[drawn] / (32 * 24)
  assert 0.015 <= fractions.min() and fractions.max() <= 0.36
  aspects = height[drawn] / width[drawn]
  assert aspects.min() < 0.6 and aspects.max() > 1.7  # log-uniform in [0.3, 1/0.3] (rounded to pixels)
  none = _per_seed(lambda rng: transforms.random_erase_box(rng, 32, 24, 0.0), 20, tf.int32)
  assert not none.any()
  half = _per_seed(lambda rng: transforms.random_erase_box(rng, 32, 24, 0.5), 400, tf.int32)
  assert 0.4 < (half[:, 2] > 0).mean() < 0.6


def test_device_random_erase_fills_exactly_the_box_with_normal_noise():
  import jax  # pylint: disable=g-import-not-at-top

  from dtm_jax import images as images_lib  # pylint: disable=g-import-not-at-top
  images = np.full([3, 16, 12, 3], 7.0, np.float32)
  boxes = np.array([[2, 3, 5, 4], [0, 0, 0, 0], [10, 0, 6, 12]], np.int32)
  out = np.asarray(images_lib.random_erase(images, boxes, jax.random.key(0)))
  for image, (top, left, height, width) in zip(out, boxes):
    changed = (image != 7.0).any(axis=-1)
    expected = np.zeros_like(changed)
    expected[top:top + height, left:left + width] = True
    np.testing.assert_array_equal(changed, expected)
  noise = out[2, 10:16]
  assert abs(noise.mean()) < 0.2 and 0.8 < noise.std() < 1.2


# --- RandAugment ops against PIL.

def _op(fn, image, level, sign=1.0, fill=(124, 116, 104)):
  return fn(tf.constant(image, tf.float32), tf.constant(level, tf.float32),
            tf.constant(sign, tf.float32), tf.constant(fill, tf.float32)).numpy()


@pytest.mark.parametrize("name, reference, level, atol", [
    ("_equalize", ImageOps.equalize, 0.0, 0),
    ("_auto_contrast", ImageOps.autocontrast, 0.0, 1),
    ("_invert", ImageOps.invert, 0.0, 0),
    ("_posterize", lambda im: ImageOps.posterize(im, 3), 0.3, 0),
    ("_posterize", lambda im: ImageOps.posterize(im, 1), 0.8, 0),
    ("_posterize", lambda im: Image.new("RGB", im.size), 1.0, 0),   # Old PIL's bits=0.
    ("_solarize", lambda im: ImageOps.solarize(im, 256 - int(256 * 0.7)), 0.7, 0),
    ("_color", lambda im: ImageEnhance.Color(im).enhance(1 + 0.9 * 0.6), 0.6, 1.5),
    ("_contrast", lambda im: ImageEnhance.Contrast(im).enhance(1 + 0.9 * 0.6), 0.6, 1.5),
    ("_brightness", lambda im: ImageEnhance.Brightness(im).enhance(1 + 0.9 * 0.6), 0.6, 1.0),
    ("_sharpness", lambda im: ImageEnhance.Sharpness(im).enhance(1 + 0.9 * 0.6), 0.6, 1.5),
])
def test_randaugment_pixel_ops_match_pil(name, reference, level, atol):
  image = _noise_image()
  image[:4] //= 2   # Uneven histograms for equalize and autocontrast.
  ours = _op(getattr(randaugment, name), image, level)
  expected = np.asarray(reference(Image.fromarray(image)), np.float32)
  np.testing.assert_allclose(ours, expected, atol=atol)


def test_randaugment_translate_moves_pixels_and_fills_with_the_mean_colour():
  image = _noise_image(20, 20)
  level = 5 / (0.45 * 20)   # A 5-pixel shift.
  fill = (124, 116, 104)
  shifted = _op(randaugment._translate_x, image, level, 1.0, fill)
  np.testing.assert_allclose(shifted[:, :15], image[:, 5:], atol=1e-3)
  np.testing.assert_allclose(shifted[:, 15:], np.broadcast_to(fill, (20, 5, 3)), atol=1e-3)
  down = _op(randaugment._translate_y, image, level, -1.0, fill)
  np.testing.assert_allclose(down[5:], image[:15], atol=1e-3)


def test_randaugment_rotate_matches_pil_rotation():
  image = _smooth_image(32, 32)
  fill = (124, 116, 104)
  ours = _op(randaugment._rotate, image, 0.5, 1.0, fill)   # 15 degrees.
  candidates = [np.asarray(Image.fromarray(image).rotate(a, Image.BILINEAR, fillcolor=fill),
                           np.float32) for a in (15, -15)]
  errors = [np.abs(ours - c)[4:-4, 4:-4].mean() for c in candidates]
  assert min(errors) < 2.0 and max(errors) > 5.0


def test_rand_augment_applies_about_three_quarters_of_the_time():
  image = tf.constant(_smooth_image(24, 24), tf.float32)
  augment = lambda rng: randaugment.rand_augment(
      image, rng, num_layers=2, magnitude=9.0, magnitude_std=0.5, fill=(124, 116, 104))
  outs = _per_seed(augment, 120)
  changed = np.mean([not np.array_equal(o, image) for o in outs])
  assert 0.6 < changed < 0.9   # P(at least one of 2 ops applied) = 3/4.
  assert outs.shape == (120, 24, 24, 3) and outs.min() >= 0 and outs.max() <= 255
  np.testing.assert_allclose(augment(tf.constant([7, 3], tf.int64)), outs[3], atol=1e-3)
  untouched = randaugment.rand_augment(image, _rng(0), num_layers=0, magnitude=9.0,
                                       magnitude_std=0.5, fill=(0, 0, 0))
  np.testing.assert_array_equal(untouched, image)
