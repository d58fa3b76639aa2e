"""BEiT block-wise patch masks, vectorised over a batch of masks.

The student sees an image whose masked patches are replaced by a mask token
(docs/METHOD.md §2). BEiT's generator masks rectangular blocks of patches until the
target count is reached; its released form is a pure-Python loop per mask,
which is far too slow to feed a pod. Here every step of that loop runs for all
masks of a batch at once with numpy, and the result is made exact: BEiT stops
when a block no longer fits and can end a few patches short, while DTM needs
exactly `num_masking_patches` per image, so the shortfall is topped up with
random unmasked patches.

Per mask, the process is the same as BEiT's:
  repeat:
    up to `_ATTEMPTS_PER_BLOCK` times (all against the same mask):
      area   ~ U(min_num_patches, remaining)
      aspect ~ log-uniform in [min_aspect, 1 / min_aspect]
      h, w   = round(sqrt(area * aspect)), round(sqrt(area / aspect))
      block at a uniform position (it must fit strictly inside the grid);
      accept the first block whose newly masked count d has 0 < d <= remaining
    stop when no attempt is accepted or the target is reached
  top up to exactly num_masking_patches with random unmasked patches.
Attempts within one round only read the mask, so they are drawn together and
the first acceptable one is taken, which is exactly the sequential rule.
"""
import math

import numpy as np

# BEiT tries this many blocks before it concludes that no block fits any more.
_ATTEMPTS_PER_BLOCK = 10


def check_mask_params(grid, num_masking_patches, min_num_patches, min_aspect):
  """Raises ValueError when the mask settings cannot work on this patch grid."""
  height, width = grid
  num_patches = height * width
  if height < 1 or width < 1:
    raise ValueError(f"The patch grid {grid} is empty; check image_size and patch_size.")
  if not 0 <= num_masking_patches <= num_patches:
    raise ValueError(
        f"input.num_masking_patches={num_masking_patches} must be in [0, {num_patches}] for a "
        f"{height}x{width} patch grid; lower it (BEiT masks ~40% of the patches, e.g. "
        f"{round(0.4 * num_patches)}).")
  if not 1 <= min_num_patches <= num_patches:
    raise ValueError(
        f"input.min_num_patches={min_num_patches} must be in [1, {num_patches}] for a "
        f"{height}x{width} patch grid.")
  if not 0 < min_aspect <= 1:
    raise ValueError(f"input.min_mask_aspect={min_aspect} must be in (0, 1]; blocks have aspect "
                     "ratios in [min_mask_aspect, 1 / min_mask_aspect].")


def block_masks(rng, num_masks, grid, num_masking_patches, min_num_patches=16, min_aspect=0.3):
  """Draws `num_masks` BEiT block masks with exactly `num_masking_patches` masked patches.

  Args:
    rng: a `np.random.Generator`; the masks are a pure function of its state.
    num_masks: how many masks to draw.
    grid: (height, width) of the patch grid.
    num_masking_patches: masked patches per mask.
    min_num_patches: smallest block area BEiT aims for.
    min_aspect: block aspect ratios are log-uniform in [min_aspect, 1 / min_aspect].

  Returns:
    bool array [num_masks, height * width], row-major over the grid, True = masked.
  """
  check_mask_params(grid, num_masking_patches, min_num_patches, min_aspect)
  height, width = grid
  masks = np.zeros((num_masks, height, width), dtype=bool)
  counts = np.zeros(num_masks, dtype=np.int64)
  active = np.arange(num_masks) if num_masking_patches > 0 else np.arange(0)
  log_aspect_range = (math.log(min_aspect), -math.log(min_aspect))
  rows, cols = np.arange(height), np.arange(width)

  while active.size:
    remaining = num_masking_patches - counts[active]
    shape = (active.size, _ATTEMPTS_PER_BLOCK)
    # Like Python's random.uniform, also when remaining < min_num_patches (then area <= min).
    area = min_num_patches + (remaining[:, None] - min_num_patches) * rng.random(shape)
    aspect = np.exp(rng.uniform(*log_aspect_range, size=shape))
    block_h = np.rint(np.sqrt(area * aspect)).astype(np.int64)
    block_w = np.rint(np.sqrt(area / aspect)).astype(np.int64)
    fits = (block_h >= 1) & (block_w >= 1) & (block_h < height) & (block_w < width)
    block_h, block_w = np.where(fits, block_h, 1), np.where(fits, block_w, 1)
    # Uniform integer positions in [0, height - h] and [0, width - w], both ends included.
    top = np.floor(rng.random(shape) * (height - block_h + 1)).astype(np.int64)
    left = np.floor(rng.random(shape) * (width - block_w + 1)).astype(np.int64)

    # Already-masked patches inside each candidate block, from a summed-area table.
    table = np.zeros((active.size, height + 1, width + 1), dtype=np.int64)
    table[:, 1:, 1:] = masks[active].cumsum(axis=1).cumsum(axis=2)
    batch = np.arange(active.size)[:, None]
    bottom, right = top + block_h, left + block_w
    already = (table[batch, bottom, right] - table[batch, top, right]
               - table[batch, bottom, left] + table[batch, top, left])
    newly = block_h * block_w - already
    accepted = fits & (newly > 0) & (newly <= remaining[:, None])

    placed = accepted.any(axis=1)
    first = accepted.argmax(axis=1)[placed]
    winners = active[placed]
    pick = (np.flatnonzero(placed), first)
    in_rows = (rows >= top[pick][:, None]) & (rows < bottom[pick][:, None])
    in_cols = (cols >= left[pick][:, None]) & (cols < right[pick][:, None])
    masks[winners] |= in_rows[:, :, None] & in_cols[:, None, :]
    counts[winners] += newly[pick]
    active = winners[counts[winners] < num_masking_patches]

  flat = masks.reshape(num_masks, height * width)
  _top_up(rng, flat, num_masking_patches - counts)
  return flat


def _top_up(rng, flat_masks, shortfall):
  """Masks `shortfall[i]` random unmasked patches of mask i, in place."""
  short = np.flatnonzero(shortfall > 0)
  if not short.size:
    return
  # Random keys with masked patches sorted last: the first `shortfall` ranks are unmasked patches.
  keys = rng.random(flat_masks[short].shape) + flat_masks[short]
  ranks = keys.argsort(axis=1).argsort(axis=1)
  flat_masks[short] |= ranks < shortfall[short, None]
