"""Position tables of a student moved to another patch grid: fine-tuning or segmenting at another image size.

A BEiT relative-position table holds one bias per patch offset, (2W−1)² rows for a W×W grid, plus three CLS rows;
a student trained at 224² (W = 14) attends at 384² (W' = 24) over offsets up to ±23, which the table lacks. Its
offset plane is resampled the way BEiT's fine-tuning code (and timm's `resize_rel_pos_bias_table`) does: the old
offsets are placed on a geometric progression that spans the new range (near offsets keep about their spacing, far
ones stretch), and the new integer offsets are interpolated linearly between them (timm's default; BEiT's own code
interpolated cubically with scipy's since-removed `interp2d`). A smaller grid crops the centre of the plane, so every
offset it still has keeps its bias exactly. The absolute position embedding is resized bicubically, CLS kept
(`clip.resize_pos_embed`, as PyTorch's bicubic interpolation computes it).
"""
import functools
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from dtm_jax.models import clip, layers


def _geometric_offsets(old_grid, new_grid):
  """Where the old table's offsets −(W−1)…W−1 sit on the new offset axis: 0, then gaps 1, q, q², … (both sides),
  with q found by bisection so that the outermost lands at about W'−1 (BEiT's fine-tuning code, timm)."""
  half_old, half_new = old_grid - 1, new_grid - 1
  span = lambda q: (1.0 - q ** half_old) / (1.0 - q)  # 1 + q + … + q^(half_old − 1)
  low, high = 1.01, 1.5
  while high - low > 1e-6:
    q = (low + high) / 2.0
    low, high = (low, q) if span(q) > half_new else (q, high)
  steps = np.cumsum([q ** i for i in range(half_old)])  # positions 1, 1 + q, 1 + q + q², …
  return np.concatenate([-steps[::-1], [0.0], steps])


@functools.lru_cache(maxsize=32)
def _offset_resize_matrix(old_grid, new_grid):
  """[2W'−1, 2W−1] float32 weights taking one axis of the old offset plane to the new one."""
  old_span, new_span = 2 * old_grid - 1, 2 * new_grid - 1
  if new_grid <= old_grid:  # the centre rows of the identity: a crop
    first = old_grid - new_grid
    return np.eye(old_span, dtype=np.float32)[first:first + new_span]
  sources = _geometric_offsets(old_grid, new_grid)
  targets = np.arange(new_span, dtype=np.float64) - (new_grid - 1)
  # Linear interpolation is linear in the values: interpolating each unit vector gives one column of the matrix.
  # Beyond the outermost source offset (by the bisection's tolerance) np.interp holds the edge value, as timm does.
  columns = [np.interp(targets, sources, unit) for unit in np.eye(old_span)]
  return np.stack(columns, axis=1).astype(np.float32)


def resize_rel_pos_table(table, old_grid, new_grid):
  """A BEiT relative-position table [(2W−1)² + 3, heads] of a W×W grid, for a W'×W' grid: [(2W'−1)² + 3, heads].

  The offset plane is resampled (geometric-progression source offsets, linear interpolation: see the module
  docstring) or, for a smaller grid, cropped; the three CLS rows are kept. The same grid returns the table as is.
  """
  if table.ndim != 2 or table.shape[0] != layers.num_relative_positions(old_grid):
    raise ValueError(f"Expected a relative-position table [{layers.num_relative_positions(old_grid)}, heads] for a "
                     f"{old_grid}×{old_grid} patch grid, got {table.shape}.")
  if new_grid == old_grid:
    return table
  if new_grid < 1:
    raise ValueError(f"new_grid={new_grid} must be a positive patch-grid side.")
  old_span, new_span = 2 * old_grid - 1, 2 * new_grid - 1
  plane = table[:old_span * old_span].reshape(old_span, old_span, -1)
  resize = _offset_resize_matrix(old_grid, new_grid)
  plane = jnp.einsum("ri,ijh,cj->rch", resize, plane, resize, precision="highest")
  plane = plane.reshape(new_span * new_span, -1).astype(table.dtype)
  return jnp.concatenate([plane, table[old_span * old_span:]], axis=0)


_REL_POS_KEYS = ("shared_rel_pos_bias", "rel_pos_bias")


def resize_position_params(params, old_grid, new_grid):
  """A student's parameter tree (a nested dict: `nnx.State.to_pure_dict()` or a converted checkpoint) with every
  relative-position table (`shared_rel_pos_bias`, `blocks/<i>/attn/rel_pos_bias`) and the absolute `pos_embed`
  resized from a W×W to a W'×W' patch grid; every other leaf is passed through unchanged."""
  if new_grid == old_grid:
    return params

  def resize(name, value):
    if isinstance(value, Mapping):
      return {k: resize(k, v) for k, v in value.items()}
    if name in _REL_POS_KEYS:
      return resize_rel_pos_table(value, old_grid, new_grid)
    if name == "pos_embed":
      return clip.resize_pos_embed(value, new_grid)
    return value

  return resize(None, params)
