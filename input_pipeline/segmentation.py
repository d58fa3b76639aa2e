"""Semantic segmentation input: mmseg's ADE20K training views and test resize, as per-host tf.data pipelines.

Training (`build_segment_train`), per example, every random choice drawn from (seed, host, stream position) as in
the other training streams (so it resumes exactly):
  decode -> reduce_zero_label (once) -> keep-ratio resize into scale x U(ratio_range) (image bilinear, label nearest)
  -> crop_size crop (up to 10 tries for one whose largest class covers < cat_max_ratio of its labelled pixels)
  -> flip -> pad to crop_size (image: the mean colour, 0 once normalised; label: 255) -> photometric distortion.
Evaluation (`build_segment_eval`): keep-ratio resize into scale, shrunk further if it exceeds the canvas (counted and
logged), then padded bottom/right to the square canvas.
Images travel as uint8 (normalised on the device: dtm_jax.images), labels as uint8 with 255 = ignore.

Deviations from mmseg: TF's resize kernels (half-pixel centres) instead of OpenCV's; the photometric distortion works
in float HSV rather than OpenCV's 8-bit HSV; evaluation labels are resized with the image (mmseg scores predictions
upsampled to the original annotation).
"""
import functools

import tensorflow as tf
from absl import logging

# pylint: disable=protected-access   (the shared stages of input_pipeline.pipeline)
from input_pipeline import iterators
from input_pipeline import pipeline
from input_pipeline import segment_sources
from input_pipeline import transforms

IGNORE_LABEL = 255
SHRUNK_KEY = "_shrunk"   # Per evaluation example: the test resize exceeded the canvas.
_CROP_TRIES = 10
# mmseg's PhotoMetricDistortion: each of the four steps applies with probability 1/2; contrast comes second or last.
_BRIGHTNESS_DELTA = 32.0
_CONTRAST_RANGE = (0.5, 1.5)
_SATURATION_RANGE = (0.5, 1.5)
_HUE_DELTA = 18   # OpenCV hue units (2 degrees); the shift is an integer in [-18, 18), as numpy's randint draws.


def build_segment_train(input_cfg, *, crop_size, global_batch_size, seed, process_index=None, process_count=None,
                        start_step=0):
  """Endless batches of this host: {"image": uint8 [b, crop, crop, 3], "label": uint8 [b, crop, crop]}, resumable.

  `input_cfg` is a `segment_config()` block; b = global_batch_size / process_count. start_step: begin at that global
  batch (a resume on another process count; see pipeline.build_pretrain).
  """
  process_index, process_count = pipeline._process(process_index, process_count)
  local_batch = pipeline._local_batch_size(global_batch_size, process_count)
  long_edge, short_edge = _scale(input_cfg)
  ratio_low, ratio_high = map(float, input_cfg.ratio_range)
  if not 0 < ratio_low <= ratio_high:
    raise ValueError(f"input.ratio_range={tuple(input_cfg.ratio_range)} must be (low, high) with 0 < low <= high.")
  fill = _fill(input_cfg)
  pixels = _train_pixels(bool(input_cfg.photometric))

  def view(example, rng):
    ratio_rng, crop_rng, flip_rng, pixel_rng = transforms.split_rng(rng, 4)
    image, label = _decode(example, input_cfg.reduce_zero_label)
    # mmseg's RandomResize: the scale times one ratio, truncated to integers, then a keep-ratio resize into it.
    ratio = tf.random.stateless_uniform([], ratio_rng, ratio_low, ratio_high)
    size = _keep_ratio_size(tf.shape(label), tf.floor(long_edge * ratio), tf.floor(short_edge * ratio))
    image, label = _resize(image, label, size)
    image, label = _random_crop(image, label, crop_rng, crop_size, float(input_cfg.cat_max_ratio))
    if input_cfg.flip:
      image, label = _random_flip(image, label, flip_rng)
    height, width = tf.unstack(tf.shape(label))
    image, label = _pad(image, label, crop_size, fill)
    return {"image": pixels(image, height, width, pixel_rng), "label": label}

  source = segment_sources.get_segment_source(input_cfg)
  batches, examples = pipeline._training_batches(input_cfg, source, view, local_batch=local_batch, seed=seed,
                                                 process_index=process_index, process_count=process_count,
                                                 start_position=start_step * local_batch, example_view=True)
  return pipeline._finish_training(input_cfg, source, batches, examples)


def build_segment_eval(input_cfg, *, canvas_size, global_batch_size, process_index=None, process_count=None):
  """One pass over input_cfg.eval_split per iteration: {"image", "label", "valid"} on square canvases.

  image: uint8 [b, canvas, canvas, 3], resized keep-ratio into input_cfg.scale as mmseg's test pipeline (shrunk to
  fit when larger than the canvas), padded bottom/right with the mean colour; label: uint8 [b, canvas, canvas], 255
  on padding; valid: bool [b], False on the examples that pad the last batches (see EvalData).
  """
  process_index, process_count = pipeline._process(process_index, process_count)
  local_batch = pipeline._local_batch_size(global_batch_size, process_count)
  long_edge, short_edge = _scale(input_cfg)
  fill = _fill(input_cfg)
  source = segment_sources.get_segment_source(input_cfg)
  examples, counts = source.evaluation(input_cfg.eval_split, process_index=process_index,
                                       process_count=process_count)

  @pipeline._no_autograph
  def prepare(key):
    image, label = _decode(examples.load(key), input_cfg.reduce_zero_label)
    shape = tf.shape(label)
    size = _keep_ratio_size(shape, long_edge, short_edge)
    shrunk = tf.reduce_max(size) > canvas_size
    size = tf.where(shrunk, _keep_ratio_size(shape, canvas_size, canvas_size), size)
    image, label = _pad(*_resize(image, label, size), canvas_size, fill)
    return {"image": image, "label": label, "valid": tf.constant(True), SHRUNK_KEY: shrunk}

  padding = {"image": tf.tile(tf.constant(fill, tf.uint8)[None, None], [canvas_size, canvas_size, 1]),
             "label": tf.fill([canvas_size, canvas_size], tf.constant(IGNORE_LABEL, tf.uint8)),
             "valid": tf.constant(False), SHRUNK_KEY: tf.constant(False)}
  data, sizes = pipeline._eval_batches(input_cfg, source, examples, counts, prepare, padding, local_batch)
  return SegmentEvalData(data, canvas_size=canvas_size, **sizes)


class SegmentEvalData(iterators.EvalData):
  """EvalData that also counts the images shrunk to fit the canvas (logged after each pass)."""

  def __init__(self, dataset, *, canvas_size, **sizes):
    super().__init__(dataset, **sizes)
    self._canvas_size = canvas_size
    self._num_shrunk = 0

  def __iter__(self):
    shrunk = 0
    for batch in super().__iter__():
      shrunk += int(batch.pop(SHRUNK_KEY).sum())
      yield batch
    self._num_shrunk = shrunk
    if shrunk:
      logging.warning("%d evaluation images of this host exceeded the %d px canvas after the test resize and were "
                      "shrunk to fit (their scores are not mmseg's); a larger canvas_size avoids it.",
                      shrunk, self._canvas_size)

  def num_shrunk(self):
    """Images of this host shrunk to fit the canvas during the last complete pass."""
    return self._num_shrunk


def reduce_zero_label(label):
  """ADE20K's 0 ("other") -> 255 (ignored), k -> k - 1, 255 stays 255: mmseg's LoadAnnotations(reduce_zero_label)."""
  return tf.where((label == 0) | (label == IGNORE_LABEL), tf.constant(IGNORE_LABEL, label.dtype), label - 1)


def _scale(input_cfg):
  long_edge, short_edge = sorted(map(float, input_cfg.scale), reverse=True)
  if short_edge <= 0:
    raise ValueError(f"input.scale={tuple(input_cfg.scale)} must be two positive sizes (long side, short side).")
  return long_edge, short_edge


def _fill(input_cfg):
  """The padding colour: the mean, which normalises to 0 as mmseg's padding of normalised images does."""
  return tuple(round(255 * m) for m in input_cfg.mean)


def _decode(example, reduce_zero):
  """(uint8 [h, w, 3] image, uint8 [h, w] label map) of an example; label values reduced when asked."""
  image, label = example["image"], example["label"]
  if image.dtype == tf.string:
    image = tf.io.decode_image(image, channels=3, expand_animations=False)
  if label.dtype == tf.string:
    label = tf.io.decode_png(label)[..., 0]   # ADE20K's grey level; the first channel of a colour map.
  image = tf.ensure_shape(image, [None, None, 3])
  label = tf.ensure_shape(label, [None, None])
  same_size = tf.debugging.assert_equal(tf.shape(image)[:2], tf.shape(label),
                                        message="An image and its label map differ in size.")
  with tf.control_dependencies([same_size]):
    label = tf.identity(label)
  return image, reduce_zero_label(label) if reduce_zero else label


def _keep_ratio_size(shape, long_edge, short_edge):
  """mmcv's imrescale: the largest size within (long_edge, short_edge) with the aspect of `shape`; int32 [2]."""
  height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  factor = tf.minimum(long_edge / tf.maximum(height, width), short_edge / tf.minimum(height, width))
  return tf.cast(tf.stack([height, width]) * factor + 0.5, tf.int32)


def _resize(image, label, size):
  image = transforms.to_uint8(tf.image.resize(image, size, method="bilinear"))
  label = tf.image.resize(label[..., None], size, method="nearest")[..., 0]
  return image, label


def _random_crop(image, label, rng, crop_size, cat_max_ratio):
  """mmseg's RandomCrop: a crop of at most crop_size; while its largest class (ignoring 255) covers cat_max_ratio or
  more of its labelled pixels, or it holds one class only, another try (10 checks; the 11th window is kept)."""
  shape = tf.shape(label)
  crop_h, crop_w = tf.minimum(shape[0], crop_size), tf.minimum(shape[1], crop_size)
  top_rng, left_rng = transforms.split_rng(rng, 2)
  tops = tf.random.stateless_uniform([_CROP_TRIES + 1], top_rng, 0, shape[0] - crop_h + 1, dtype=tf.int32)
  lefts = tf.random.stateless_uniform([_CROP_TRIES + 1], left_rng, 0, shape[1] - crop_w + 1, dtype=tf.int32)

  def crop(x, i):
    return x[tops[i]:tops[i] + crop_h, lefts[i]:lefts[i] + crop_w]

  def balanced(i):
    pixels = tf.cast(tf.reshape(crop(label, i), [-1]), tf.int32)
    counts = tf.math.bincount(pixels, minlength=256, maxlength=256)[:IGNORE_LABEL]
    largest, total = tf.cast(tf.reduce_max(counts), tf.float32), tf.cast(tf.reduce_sum(counts), tf.float32)
    return (tf.math.count_nonzero(counts) > 1) & (largest < cat_max_ratio * total)

  def next_try(i, unused_done):
    done = balanced(i)
    return i + 1 - tf.cast(done, tf.int32), done   # Stays at the first balanced window.

  choice = tf.constant(0)
  if cat_max_ratio < 1:
    choice, _ = tf.while_loop(lambda i, done: (i < _CROP_TRIES) & ~done, next_try, (choice, tf.constant(False)))
  return crop(image, choice), crop(label, choice)


def _random_flip(image, label, rng):
  flip = tf.random.stateless_uniform([], rng) < 0.5
  return tf.cond(flip, lambda: (image[:, ::-1], label[:, ::-1]), lambda: (image, label))


def _pad(image, label, size, fill):
  """Pads bottom/right to size x size: the image with `fill`, the label with IGNORE_LABEL."""
  shape = tf.shape(label)
  pads = [[0, size - shape[0]], [0, size - shape[1]]]
  label = tf.pad(label, pads, constant_values=IGNORE_LABEL)
  image = tf.stack([tf.pad(image[..., c], pads, constant_values=fill[c]) for c in range(3)], axis=-1)
  return tf.ensure_shape(image, [size, size, 3]), tf.ensure_shape(label, [size, size])


@functools.lru_cache(maxsize=None)
def _train_pixels(photometric):
  """uint8 [s, s, 3] padded crop -> the same with the photometric distortion inside its [height, width] corner."""
  if not photometric:
    return lambda image, height, width, rng: image

  def pixels(image, height, width, rng):
    size = image.shape[0]
    inside = (tf.range(size)[:, None] < height) & (tf.range(size)[None, :] < width)
    distorted = transforms.to_uint8(photometric_distortion(tf.cast(image, tf.float32), rng))
    return tf.where(inside[..., None], distorted, image)
  return pipeline._fused(pixels)


def photometric_distortion(image, rng):
  """mmseg's PhotoMetricDistortion on float RGB in [0, 255] (integer-valued, as uint8 images are).

  Brightness (+U(-32, 32)), then contrast (x U(0.5, 1.5), no re-centring) either now or last, saturation
  (x U(0.5, 1.5)) and hue (an integer shift in [-18, 18) of OpenCV's 180-step hue): each with probability 1/2, each
  clipped to [0, 255] and truncated to integers as mmseg's uint8 steps are. Every choice is computed and selected
  with `where`, so under XLA the whole distortion is one pass.
  """
  apply_rng, order_rng, brightness_rng, contrast_rng, saturation_rng, hue_rng = transforms.split_rng(rng, 6)
  apply_brightness, apply_contrast, apply_saturation, apply_hue = tf.unstack(
      tf.random.stateless_uniform([4], apply_rng) < 0.5)
  contrast_first = tf.random.stateless_uniform([], order_rng) < 0.5
  delta = tf.random.stateless_uniform([], brightness_rng, -_BRIGHTNESS_DELTA, _BRIGHTNESS_DELTA)
  contrast = tf.random.stateless_uniform([], contrast_rng, *_CONTRAST_RANGE)
  saturation = tf.random.stateless_uniform([], saturation_rng, *_SATURATION_RANGE)
  hue_shift = tf.random.stateless_uniform([], hue_rng, -_HUE_DELTA, _HUE_DELTA, dtype=tf.int32)

  def convert(x, alpha=1.0, beta=0.0):
    return tf.floor(tf.clip_by_value(x * alpha + beta, 0.0, 255.0))

  image = tf.where(apply_brightness, convert(image, beta=delta), image)
  image = tf.where(apply_contrast & contrast_first, convert(image, alpha=contrast), image)
  hue, sat, value = tf.unstack(tf.image.rgb_to_hsv(image / 255.0), axis=-1)
  sat = tf.where(apply_saturation, convert(sat * 255.0, alpha=saturation) / 255.0, sat)
  hue = tf.where(apply_hue, tf.math.floormod(hue + tf.cast(hue_shift, tf.float32) / 180.0, 1.0), hue)
  recoloured = tf.round(tf.image.hsv_to_rgb(tf.stack([hue, sat, value], axis=-1)) * 255.0)
  image = tf.where(apply_saturation | apply_hue, recoloured, image)
  return tf.where(apply_contrast & ~contrast_first, convert(image, alpha=contrast), image)
