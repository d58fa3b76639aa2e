"""BEiT block masks: exact counts, block statistics against a plain sequential loop, speed."""
import math
import time

import numpy as np
import pytest

from input_pipeline import masking


def _sequential_block_masks(rng, num_masks, grid, num_masking_patches, min_num_patches,
                            min_aspect):
  """BEiT's generator written as the obvious per-mask loop, then topped up (the reference)."""
  height, width = grid
  out = np.zeros((num_masks, height * width), bool)
  for i in range(num_masks):
    mask = np.zeros(grid, bool)
    while mask.sum() < num_masking_patches:
      remaining = num_masking_patches - mask.sum()
      placed = False
      for _ in range(10):
        area = min_num_patches + (remaining - min_num_patches) * rng.random()  # random.uniform
        aspect = math.exp(rng.uniform(math.log(min_aspect), -math.log(min_aspect)))
        h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if h < height and w < width:
          top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
          new = h * w - mask[top:top + h, left:left + w].sum()
          if 0 < new <= remaining:
            mask[top:top + h, left:left + w] = True
            placed = True
            break
      if not placed:
        break
    flat = mask.reshape(-1)
    free = np.flatnonzero(~flat)
    flat[rng.choice(free, num_masking_patches - flat.sum(), replace=False)] = True
    out[i] = flat
  return out


def _masked_neighbour_fraction(masks, grid):
  """Mean over masked patches of the fraction of their 4-neighbours that are masked."""
  m = masks.reshape(-1, *grid).astype(float)
  padded = np.pad(m, ((0, 0), (1, 1), (1, 1)))
  neighbours = (padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2]
                + padded[:, 1:-1, 2:])
  inside = np.pad(np.ones_like(m), ((0, 0), (1, 1), (1, 1)))
  degree = (inside[:, :-2, 1:-1] + inside[:, 2:, 1:-1] + inside[:, 1:-1, :-2]
            + inside[:, 1:-1, 2:])
  return float((neighbours / degree)[m > 0].mean())


@pytest.mark.parametrize("grid, count, min_patches", [
    ((14, 14), 75, 16), ((7, 7), 19, 4), ((7, 7), 49, 16), ((4, 6), 1, 16), ((14, 14), 0, 16)])
def test_every_mask_has_exactly_the_target_count(grid, count, min_patches):
  masks = masking.block_masks(np.random.default_rng(0), 300, grid, count, min_patches, 0.3)
  assert masks.shape == (300, grid[0] * grid[1]) and masks.dtype == bool
  np.testing.assert_array_equal(masks.sum(axis=1), count)


def test_masks_are_blocky_like_beit_and_unlike_random_masks():
  grid, n = (14, 14), 2000
  ours = masking.block_masks(np.random.default_rng(1), n, grid, 75, 16, 0.3)
  reference = _sequential_block_masks(np.random.default_rng(2), n, grid, 75, 16, 0.3)
  rng = np.random.default_rng(3)
  scattered = np.stack([rng.permutation(196) < 75 for _ in range(n)])

  ours_fraction = _masked_neighbour_fraction(ours, grid)
  assert abs(ours_fraction - _masked_neighbour_fraction(reference, grid)) < 0.02
  # A random mask's masked patches have ~74/195 masked neighbours; blocks have far more.
  assert ours_fraction > _masked_neighbour_fraction(scattered, grid) + 0.25
  # Same spatial layout as the reference: per-patch masking rates agree everywhere.
  np.testing.assert_allclose(ours.mean(axis=0), reference.mean(axis=0), atol=0.06)
  # Masks differ from one another.
  assert len({m.tobytes() for m in ours}) == n


def test_masks_are_a_function_of_the_generator_state():
  first = masking.block_masks(np.random.default_rng([5, 1]), 16, (14, 14), 75)
  again = masking.block_masks(np.random.default_rng([5, 1]), 16, (14, 14), 75)
  other = masking.block_masks(np.random.default_rng([5, 2]), 16, (14, 14), 75)
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)


def test_generator_is_fast():
  rng = np.random.default_rng(0)
  masking.block_masks(rng, 256, (14, 14), 75)
  start, made = time.perf_counter(), 0
  while time.perf_counter() - start < 0.5:
    masking.block_masks(rng, 256, (14, 14), 75)
    made += 256
  # Loose bound: other tests share the cores (the benchmark reports the real rate).
  assert made / (time.perf_counter() - start) > 5000


@pytest.mark.parametrize("grid, count, min_patches, aspect, message", [
    ((7, 7), 75, 16, 0.3, "num_masking_patches=75"),
    ((7, 7), -1, 16, 0.3, "num_masking_patches=-1"),
    ((7, 7), 19, 50, 0.3, "min_num_patches=50"),
    ((7, 7), 19, 4, 1.5, "min_mask_aspect=1.5"),
])
def test_impossible_settings_are_clear_errors(grid, count, min_patches, aspect, message):
  with pytest.raises(ValueError, match=message):
    masking.block_masks(np.random.default_rng(0), 2, grid, count, min_patches, aspect)
