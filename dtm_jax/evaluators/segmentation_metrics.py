"""Semantic-segmentation scores (mmseg's mIoU, aAcc, mAcc) and BEiT's sliding-window inference.

Scores come from one confusion matrix summed over the whole evaluation set (mmseg sums intersections and unions over
all images before dividing), so the jitted part only counts pixels and the division happens once on the host.
"""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dtm_jax.models import segmentation


def confusion_matrix(pred, labels, num_classes, ignore_index=255):
  """int32 [C, C] counts of (ground truth row, predicted column) over the pixels whose label is a class id.

  pred, labels: int [...] of one shape. Pixels labelled `ignore_index` (or anything outside [0, C)) are not counted.
  Sum the matrices of all batches (in int64 on the host: a large evaluation set overflows int32) before `scores`.
  """
  if pred.shape != labels.shape:
    raise ValueError(f"pred {pred.shape} and labels {labels.shape} must have the same shape.")
  labels = labels.astype(jnp.int32)
  valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
  index = jnp.where(valid, labels * num_classes + pred.astype(jnp.int32), 0)
  counts = jnp.zeros(num_classes * num_classes, jnp.int32).at[index.reshape(-1)].add(valid.reshape(-1).astype(
      jnp.int32))
  return counts.reshape(num_classes, num_classes)


def scores(confusion) -> dict:
  """mmseg's metrics of a summed confusion matrix (rows = ground truth).

  IoU of a class = intersection / union, NaN when the class is in neither the ground truth nor the predictions
  (a class only predicted has IoU 0); miou = mean over the non-NaN classes, as mmseg's `np.nanmean`. Accuracy of a
  class = correct / its ground-truth pixels (NaN when absent); macc = their nanmean; aacc = all correct / all pixels.
  """
  confusion = np.asarray(confusion, np.float64)
  intersection = np.diag(confusion)
  label_area, pred_area = confusion.sum(axis=1), confusion.sum(axis=0)
  union = label_area + pred_area - intersection
  with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of no classes is NaN, said once below
    iou = np.where(union > 0, intersection / union, np.nan)
    accuracy = np.where(label_area > 0, intersection / label_area, np.nan)
    result = dict(miou=float(np.nanmean(iou)), macc=float(np.nanmean(accuracy)),
                  aacc=float(intersection.sum() / label_area.sum()) if label_area.sum() else float("nan"),
                  per_class_iou=iou, per_class_acc=accuracy)
  return result


def window_offsets(size: int, window: int, stride: int) -> list[int]:
  """Starts of mmseg's slide-inference windows along one axis: 0, stride, 2·stride, … with the last window moved
  back to end at the border (the windows overlap more there)."""
  if size < window:
    raise ValueError(f"The image side {size} is smaller than the window {window}; pad images to at least the "
                     "window (the evaluation pipeline pads to its canvas).")
  if not 0 < stride <= window:
    raise ValueError(f"stride must be in (0, window={window}], got {stride}.")
  count = -(-(size - window) // stride) + 1
  return [min(i * stride, size - window) for i in range(count)]


def sliding_window_logits(apply_fn: Callable[[jax.Array], jax.Array], images, *, num_classes: int, window: int = 512,
                          stride: int = 341):
  """float32 logits [B, H, W, C] of images [B, H, W, channels] by mmseg's slide inference.

  apply_fn maps window crops [B, window, window, channels] to logits [B, h, w, C] (any h, w: they are upsampled
  bilinearly to the window); each pixel gets the mean over the windows that cover it. Jittable: the window positions
  are static and a `lax.scan` runs one window at a time, so memory holds one window's activations.
  """
  batch, height, width, channels = images.shape
  rows, cols = window_offsets(height, window, stride), window_offsets(width, window, stride)
  offsets = np.array([(y, x) for y in rows for x in cols], np.int32)
  coverage = np.zeros((height, width), np.float32)
  for y, x in offsets:
    coverage[y:y + window, x:x + window] += 1.0

  def add_window(total, offset):
    y, x = offset[0], offset[1]
    crop = jax.lax.dynamic_slice(images, (0, y, x, 0), (batch, window, window, channels))
    logits = apply_fn(crop)
    if logits.ndim != 4 or logits.shape[0] != batch or logits.shape[-1] != num_classes:
      raise ValueError(f"apply_fn must return logits [{batch}, h, w, {num_classes}], got {logits.shape}.")
    logits = segmentation.resize_bilinear(logits.astype(jnp.float32), (window, window))
    current = jax.lax.dynamic_slice(total, (0, y, x, 0), (batch, window, window, num_classes))
    return jax.lax.dynamic_update_slice(total, current + logits, (0, y, x, 0)), None

  total = jnp.zeros((batch, height, width, num_classes), jnp.float32)
  total, _ = jax.lax.scan(add_window, total, offsets)
  return total / coverage[None, :, :, None]


def multi_scale_flip_probs(apply_fn: Callable[[jax.Array], jax.Array], images, *, num_classes: int,
                           scales: Sequence[float] = (1.0,), flip: bool = False, window: int = 512,
                           stride: int = 341):
  """Class probabilities [B, H, W, C] averaged over rescaled (and horizontally flipped) copies of the images, as
  mmseg's aug_test: the softmax of each copy's sliding-window logits, resized back to H × W.

  Each copy is `resize_bilinear` of the whole canvas (padding included) to round(side · scale), grown to at least the
  window by zero padding at the bottom/right (mmseg would slide a smaller crop; our model has one input size).
  Deviation from mmseg: it rescales the original image with cv2 before normalisation; here the normalised canvas is
  rescaled, and a flipped canvas moves its padding to the left.
  """
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"Rescaling needs float images (normalise uint8 ones first), got {images.dtype}.")
  batch, height, width, _ = images.shape
  total = jnp.zeros((batch, height, width, num_classes), jnp.float32)
  for scale in scales:
    size = (max(int(round(height * scale)), 1), max(int(round(width * scale)), 1))
    scaled = segmentation.resize_bilinear(images, size)
    padded = jnp.pad(scaled, ((0, 0), (0, max(window - size[0], 0)), (0, max(window - size[1], 0)), (0, 0)))
    for flipped in ((False, True) if flip else (False,)):
      view = padded[:, :, ::-1] if flipped else padded
      logits = sliding_window_logits(apply_fn, view, num_classes=num_classes, window=window, stride=stride)
      logits = logits[:, :, ::-1] if flipped else logits
      logits = segmentation.resize_bilinear(logits[:, :size[0], :size[1]], (height, width))
      total = total + jax.nn.softmax(logits, axis=-1)
  return total / (len(scales) * (2 if flip else 1))
