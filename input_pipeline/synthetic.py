"""Deterministic synthetic pretraining batches (no TensorFlow, no files).

Batch `s` of the *global* stream is a pure function of (seed, s), and each process takes its rows of it, so a run
sees the same global batches whatever the number of processes. That makes it the source for checking that
multi-process training equals single-process training, and for benchmarks on hosts without TensorFlow. Images are
smooth random fields (blocky noise, bilinearly smoothed) so that morphing finds real groups.
"""
from __future__ import annotations

import json

import numpy as np
from etils import epath


def _smooth_images(rng: np.random.Generator, count: int, image_size: int, cells: int = 4) -> np.ndarray:
  coarse = rng.standard_normal((count, cells, cells, 3)).astype(np.float32)
  # Bilinear upsampling of the coarse grid: separable interpolation weights.
  pos = (np.arange(image_size) + 0.5) / image_size * cells - 0.5
  lo = np.clip(np.floor(pos).astype(int), 0, cells - 1)
  hi = np.clip(lo + 1, 0, cells - 1)
  w = np.clip(pos - lo, 0.0, 1.0).astype(np.float32)
  rows = coarse[:, lo] * (1 - w)[None, :, None, None] + coarse[:, hi] * w[None, :, None, None]
  return rows[:, :, lo] * (1 - w)[None, None, :, None] + rows[:, :, hi] * w[None, None, :, None]


class SyntheticPretrain:
  """Infinite iterator of {"image", "mask"} host batches with save/restore of its position.

  start_step: the first global batch. The stream is a function of the step, so starting there is exact on any
  process count (`start_note` says so for the resume warning).
  """

  def __init__(self, *, image_size: int, patch_size: int, global_batch_size: int, seed: int,
               num_masking_patches: int, process_index: int = 0, process_count: int = 1, start_step: int = 0):
    if global_batch_size % process_count:
      raise ValueError(f"global batch {global_batch_size} is not divisible by {process_count} processes.")
    self._image_size = image_size
    self._num_patches = (image_size // patch_size) ** 2
    if not 0 <= num_masking_patches <= self._num_patches:
      raise ValueError(f"num_masking_patches={num_masking_patches} must be in [0, {self._num_patches}].")
    self._num_masked = num_masking_patches
    self._global_batch = global_batch_size
    self._seed = seed
    local = global_batch_size // process_count
    self._rows = slice(process_index * local, (process_index + 1) * local)
    self._step = start_step
    self.start_note = "the global batches are a function of the step alone: nothing repeats or is skipped" \
        if start_step else ""

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self._seed, self._step])
    self._step += 1
    images = _smooth_images(rng, self._global_batch, self._image_size)
    order = rng.random((self._global_batch, self._num_patches)).argsort(axis=1)
    mask = order < self._num_masked
    return {"image": images[self._rows], "mask": mask[self._rows]}

  def save(self, path: str) -> None:
    # epath: the checkpoint (and this file in it) may be in a bucket (gs://…).
    epath.Path(path).write_text(json.dumps({"step": self._step, "seed": self._seed}))

  def restore(self, path: str) -> None:
    state = json.loads(epath.Path(path).read_text())
    if state["seed"] != self._seed:
      raise ValueError(f"Iterator state {path} was saved with seed {state['seed']}, not {self._seed}.")
    self._step = state["step"]

  def num_corrupt(self) -> int:
    return 0
