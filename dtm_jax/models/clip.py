"""CLIP vision tower (docs/METHOD.md §5): the frozen teacher whose projected patch tokens are DTM's targets.

conv (no bias) → prepend CLS → + position embedding → ln_pre → pre-LN blocks → ln_post on all tokens → proj.
Hugging Face's own forward applies `post_layernorm` to the pooled CLS only; here it is applied to every token, as
the targets need. Random initialisation only serves tests; real weights come from `convert.py`.
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dtm_jax.models import layers

# (image_size, patch_size, width, depth, num_heads, mlp_dim, proj_dim) of OpenAI's towers; "test" is tiny.
VARIANTS = {
    "test": (224, 16, 32, 2, 2, 128, 16),
    "B/32": (224, 32, 768, 12, 12, 3072, 512),
    "B/16": (224, 16, 768, 12, 12, 3072, 512),
    "L/14": (224, 14, 1024, 24, 16, 4096, 768),
}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """Vision tower shape. Defaults are OpenAI's ViT-B/16."""
  image_size: int = 224
  patch_size: int = 16
  in_channels: int = 3
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  proj_dim: int = 512
  activation: str = "quick_gelu"  # OpenAI weights; most open_clip (LAION) weights use "gelu".
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32  # Compute dtype; parameters stay float32.
  # ln_post and proj compute dtype (None: `dtype`). float32 keeps the targets' last rounding out of the tokens; its
  # proj then runs at HIGHEST precision, so TPUs too compute it in float32 (their default takes one bf16 pass).
  head_dtype: Any = None
  attention_impl: str | None = None  # "xla", "cudnn", "cpu", or None: the platform's (layers.default_attention_impl)

  def __post_init__(self):
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}.")
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}.")
    if self.activation not in layers.ACTIVATIONS:
      raise ValueError(f"activation={self.activation!r} is not one of {layers.ACTIVATIONS}.")
    layers.check_attention_impl(self.attention_impl)

  @property
  def grid_size(self):
    return self.image_size // self.patch_size


def get_config(variant, **overrides):
  """`CLIPVisionConfig` of a named tower ("test", "B/32", "B/16", "L/14") with field overrides."""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown CLIP variant {variant!r}; choose one of {sorted(VARIANTS)}.")
  names = ("image_size", "patch_size", "width", "depth", "num_heads", "mlp_dim", "proj_dim")
  valid = {f.name for f in dataclasses.fields(CLIPVisionConfig)}
  unknown = set(overrides) - valid
  if unknown:
    raise ValueError(f"Unknown CLIPVisionConfig fields {sorted(unknown)}; valid: {sorted(valid)}.")
  return CLIPVisionConfig(**{**dict(zip(names, VARIANTS[variant])), **overrides})


def _bicubic_matrix(in_size, out_size):
  """[out, in] weights of PyTorch's bicubic resize (a = −0.75, align_corners=False, clamped borders).

  Matching PyTorch keeps resized checkpoints identical to what open_clip and Hugging Face compute.
  """
  a = -0.75
  near = lambda t: ((a + 2) * t - (a + 3)) * t * t + 1  # |t| <= 1
  far = lambda t: ((a * t - 5 * a) * t + 8 * a) * t - 4 * a  # 1 < |t| < 2
  src = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
  base = np.floor(src)
  frac = src - base
  taps = np.stack([far(frac + 1), near(frac), near(1 - frac), far(2 - frac)], axis=1)
  matrix = np.zeros((out_size, in_size))
  for offset in range(4):
    cols = np.clip(base.astype(int) - 1 + offset, 0, in_size - 1)
    np.add.at(matrix, (np.arange(out_size), cols), taps[:, offset])
  return matrix.astype(np.float32)


def resize_pos_embed(pos_embed, new_grid):
  """Resizes a position embedding [1, 1+N, D] of a square grid to `new_grid` (int or (rows, cols)), bicubically.

  The CLS entry is kept; the grid part is resized as an image, as open_clip and Hugging Face do.
  """
  rows, cols = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
  num_patches = pos_embed.shape[1] - 1
  old = int(round(num_patches ** 0.5))
  if old * old != num_patches:
    raise ValueError(f"Position embedding has {num_patches} patch entries, not a square grid.")
  if (rows, cols) == (old, old):
    return pos_embed
  grid = pos_embed[0, 1:].reshape(old, old, -1)
  grid = jnp.einsum("ri,ijd,cj->rcd", _bicubic_matrix(old, rows), grid, _bicubic_matrix(old, cols),
                    precision="highest")
  return jnp.concatenate([pos_embed[:, :1], grid.reshape(1, rows * cols, -1).astype(pos_embed.dtype)], axis=1)


class CLIPVision(nnx.Module):
  """CLIP image tower returning per-token features for distillation targets."""

  def __init__(self, config, *, rngs):
    self.config = config
    init = layers.trunc_normal()
    self.patch_embed = nnx.Conv(config.in_channels, config.width, kernel_size=(config.patch_size,) * 2,
                                strides=(config.patch_size,) * 2, padding="VALID", use_bias=False,
                                kernel_init=init, dtype=config.dtype, rngs=rngs)
    self.cls_token = nnx.Param(init(rngs.params(), (1, 1, config.width)))
    self.pos_embed = nnx.Param(init(rngs.params(), (1, 1 + config.grid_size ** 2, config.width)))
    norm = lambda dtype: layers.layer_norm(config.width, epsilon=config.layer_norm_eps, dtype=dtype, rngs=rngs)
    self.ln_pre = norm(jnp.float32)  # its output is the residual stream, float32 (see layers)
    self.blocks = nnx.List([
        layers.Block(config.width, config.num_heads, config.mlp_dim, qkv_bias="qkv", activation=config.activation,
                     layer_norm_eps=config.layer_norm_eps, dtype=config.dtype,
                     attention_impl=config.attention_impl, rngs=rngs)
        for _ in range(config.depth)])
    head_dtype = config.dtype if config.head_dtype is None else config.head_dtype
    self.ln_post = norm(head_dtype)
    exact_head = jnp.dtype(head_dtype) == jnp.float32 and config.head_dtype is not None
    self.proj = nnx.Linear(config.width, config.proj_dim, use_bias=False, kernel_init=init, dtype=head_dtype,
                           precision=jax.lax.Precision.HIGHEST if exact_head else None, rngs=rngs)

  def __call__(self, images, *, include_cls=False, project=True, interpolate_pos_encoding=False):
    """Tokens after `ln_post`: [B, N, proj_dim] by default.

    include_cls: keep the CLS token first ([B, 1+N, ...]). project: False returns the width-sized tokens before
    `proj`. interpolate_pos_encoding: accept images of another size by resizing the position embedding.
    """
    cfg = self.config
    if images.ndim != 4 or images.shape[-1] != cfg.in_channels:
      raise ValueError(f"Expected NHWC images with {cfg.in_channels} channels, got {images.shape}.")
    height, width = images.shape[1:3]
    if (height, width) != (cfg.image_size, cfg.image_size) and not interpolate_pos_encoding:
      raise ValueError(f"Images are {height}×{width} but the tower was built for {cfg.image_size}²; pass "
                       "interpolate_pos_encoding=True or convert the checkpoint with --image_size.")
    if height % cfg.patch_size or width % cfg.patch_size:
      raise ValueError(f"Image size {height}×{width} is not a multiple of patch_size {cfg.patch_size}.")
    x = self.patch_embed(images.astype(cfg.dtype))
    x = x.reshape(x.shape[0], -1, cfg.width).astype(jnp.float32)
    cls = jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, cfg.width))
    pos_embed = resize_pos_embed(self.pos_embed[...], (height // cfg.patch_size, width // cfg.patch_size))
    x = jnp.concatenate([cls, x], axis=1) + pos_embed
    x = layers.per_token(self.ln_pre, x)
    for block in self.blocks:
      x = block(x)
    x = layers.per_token(self.ln_post, x)
    if project:
      x = layers.per_token(self.proj, x)
    return x if include_cls else x[:, 1:]
