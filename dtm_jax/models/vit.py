"""The BEiT-style student ViT (docs/METHOD.md §4): pretraining model and fine-tuning classifier.

Images are NHWC; the patch grid is row-major; a mask is bool [B, N] with True = masked. Masked patch embeddings are
replaced by the learned mask token before CLS is prepended. Parameters are float32; `dtype` is the compute dtype.
"""
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dtm_jax.models import layers, position_resize

# (width, depth, num_heads) per variant; "test" keeps unit tests fast.
VARIANTS = {
    "test": (32, 2, 2),
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}
LAYER_NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Student architecture. Defaults are DTM's ViT-B/16 at 224² (no absolute position embedding)."""
  image_size: int = 224
  patch_size: int = 16
  in_channels: int = 3
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  abs_pos_emb: bool = False
  block_rel_pos_bias: bool = True
  shared_rel_pos_bias: bool = True
  layer_scale_init: float | None = 0.1  # 0 or None: no layer scale.
  drop_path_rate: float = 0.0
  out_dim: int = 512  # lm_head output = the teacher's feature size.
  dtype: Any = jnp.float32  # Compute dtype; parameters stay float32.
  attention_impl: str | None = None  # "xla", "cudnn", "cpu", or None: the platform's (layers.default_attention_impl)
  remat: str = "none"  # Blocks rematerialised in the backward pass: "none", "dots" or "full" (layers.REMAT_POLICIES).

  def __post_init__(self):
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}.")
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}.")
    layers.check_attention_impl(self.attention_impl)
    layers.check_remat(self.remat)

  @property
  def grid_size(self):
    return self.image_size // self.patch_size

  @property
  def num_patches(self):
    return self.grid_size ** 2

  @property
  def mlp_dim(self):
    return int(self.width * self.mlp_ratio)


def get_config(variant, **overrides):
  """`ViTConfig` of a named size ("test", "tiny", "small", "base", "large") with field overrides."""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown ViT variant {variant!r}; choose one of {sorted(VARIANTS)}.")
  width, depth, num_heads = VARIANTS[variant]
  fields = dict(width=width, depth=depth, num_heads=num_heads)
  valid = [f.name for f in dataclasses.fields(ViTConfig)]
  unknown = set(overrides) - set(valid)
  if unknown:
    raise ValueError(f"Unknown ViTConfig fields {sorted(unknown)}; valid: {valid}.")
  return ViTConfig(**{**fields, **overrides})


def config_from_fields(fields: dict) -> ViTConfig:
  """`ViTConfig` from a config block's fields: {"variant": ..., field overrides...}, dtype as a name ("bfloat16")."""
  fields = dict(fields)
  variant = fields.pop("variant")
  if "dtype" in fields:
    fields["dtype"] = jnp.dtype(fields["dtype"])
  return get_config(variant, **fields)


def finetune_config(pretrain_config, **overrides):
  """Classifier config that keeps a pretrained model's function (BEiT v2 recipe).

  The shared relative-position table is folded into per-block tables by `init_classifier_from_pretrained`, so the
  fine-tuned model has per-block tables only (when the pretrained one used any relative bias).
  """
  uses_rel_pos = pretrain_config.block_rel_pos_bias or pretrain_config.shared_rel_pos_bias
  return dataclasses.replace(pretrain_config, block_rel_pos_bias=uses_rel_pos, shared_rel_pos_bias=False,
                             **overrides)


class ViTTrunk(nnx.Module):
  """Patch embedding, tokens and blocks shared by the pretraining model and the classifier.

  Parameters sit at the top level (`patch_embed`, `cls_token`, `blocks/<i>`, ...) so that both models, the
  converters and layer-wise learning-rate decay see the same paths.
  """

  def __init__(self, config, *, use_mask_token, rngs):
    self.config = config
    init = layers.trunc_normal()
    width = config.width
    self.patch_embed = nnx.Conv(config.in_channels, width, kernel_size=(config.patch_size,) * 2,
                                strides=(config.patch_size,) * 2, padding="VALID", kernel_init=init,
                                dtype=config.dtype, rngs=rngs)
    self.cls_token = nnx.Param(init(rngs.params(), (1, 1, width)))
    self.mask_token = nnx.Param(init(rngs.params(), (1, 1, width))) if use_mask_token else None
    self.pos_embed = (nnx.Param(init(rngs.params(), (1, 1 + config.num_patches, width)))
                      if config.abs_pos_emb else None)
    self.shared_rel_pos_bias = (
        nnx.Param(jnp.zeros((layers.num_relative_positions(config.grid_size), config.num_heads)))
        if config.shared_rel_pos_bias else None)
    # Stochastic depth rises linearly over the blocks. BEiT's `fix_init_weight` divides the residual output
    # projections of block l (1-based) by √(2l): the same as drawing them with std (and cut) 0.02 / √(2l).
    self.blocks = nnx.List([
        layers.Block(width, config.num_heads, config.mlp_dim, qkv_bias="qv", activation="gelu",
                     layer_norm_eps=LAYER_NORM_EPS, layer_scale_init=config.layer_scale_init,
                     rel_pos_grid=config.grid_size if config.block_rel_pos_bias else None,
                     out_init_std=0.02 / math.sqrt(2.0 * layer_id),
                     drop_path_rate=config.drop_path_rate * (layer_id - 1) / max(config.depth - 1, 1),
                     dtype=config.dtype, attention_impl=config.attention_impl, rngs=rngs)
        for layer_id in range(1, config.depth + 1)])

  def _check_images(self, images):
    size, channels = self.config.image_size, self.config.in_channels
    if images.ndim != 4 or images.shape[1:] != (size, size, channels):
      raise ValueError(f"Expected NHWC images [B, {size}, {size}, {channels}], got {images.shape}; "
                       "set ViTConfig.image_size/in_channels to match the data.")

  def _trunk(self, images, mask, dropout_rng):
    """Tokens [B, 1+N, width] after the last block (before any final norm)."""
    return self._trunk_outputs(images, mask, dropout_rng, (self.config.depth - 1,))[0]

  def _trunk_outputs(self, images, mask, dropout_rng, block_indices):
    """Tokens [B, 1+N, width] after each block of `block_indices` (0-based, increasing), as BEiT's segmentation
    backbone takes them; the blocks after the last one named are not run."""
    self._check_images(images)
    cfg = self.config
    x = self.patch_embed(images.astype(cfg.dtype))
    x = x.reshape(x.shape[0], -1, cfg.width).astype(jnp.float32)  # the residual stream is float32 (see layers)
    if mask is not None:
      if mask.shape != x.shape[:2]:
        raise ValueError(f"mask must be bool [B, N] = {x.shape[:2]}, got {mask.shape}.")
      x = jnp.where(mask[..., None], self.mask_token[...], x)
    cls = jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, cfg.width))
    x = jnp.concatenate([cls, x], axis=1)
    if self.pos_embed is not None:
      x = x + self.pos_embed[...]
    shared_bias = None
    if self.shared_rel_pos_bias is not None:
      shared_bias = layers.relative_position_bias(self.shared_rel_pos_bias[...], cfg.grid_size)
    outputs = []
    for i, block in enumerate(self.blocks[:block_indices[-1] + 1]):
      block_rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
      x = layers.run_block(block, x, shared_bias, block_rng, remat=cfg.remat)
      if i in block_indices:
        outputs.append(x)
    return outputs


class PretrainViT(ViTTrunk):
  """Student for masked image modelling: `lm_head` predicts a teacher feature for every patch."""

  def __init__(self, config, *, rngs):
    super().__init__(config, use_mask_token=True, rngs=rngs)
    self.norm = layers.layer_norm(config.width, epsilon=LAYER_NORM_EPS, dtype=config.dtype, rngs=rngs)
    self.lm_head = nnx.Linear(config.width, config.out_dim, kernel_init=layers.trunc_normal(), dtype=config.dtype,
                              rngs=rngs)

  def encode(self, images, mask=None, dropout_rng=None):
    """All tokens [B, 1+N, width] after the final LayerNorm (CLS first)."""
    return layers.per_token(self.norm, self._trunk(images, mask, dropout_rng))

  def __call__(self, images, mask, dropout_rng=None):
    """Predictions [B, N, out_dim] for every patch token (CLS dropped)."""
    return layers.per_token(self.lm_head, self.encode(images, mask, dropout_rng)[:, 1:])


class ViTClassifier(ViTTrunk):
  """Fine-tuning model: mean-pooled patch tokens → `fc_norm` → `head` (BEiT), or final `norm` → CLS → `head`."""

  def __init__(self, config, num_classes, pooling="mean", head_init_scale=0.001, *, rngs):
    if pooling not in ("mean", "cls"):
      raise ValueError(f"pooling={pooling!r} must be 'mean' or 'cls'.")
    super().__init__(config, use_mask_token=False, rngs=rngs)
    self.pooling = pooling
    norm = layers.layer_norm(config.width, epsilon=LAYER_NORM_EPS, dtype=config.dtype, rngs=rngs)
    self.norm, self.fc_norm = (None, norm) if pooling == "mean" else (norm, None)
    # BEiT draws the head like any Linear, then multiplies it by head_init_scale: a near-zero head keeps early
    # fine-tuning gradients from wrecking the pretrained trunk. Drawing with the scaled std is the same thing.
    self.head = nnx.Linear(config.width, num_classes, kernel_init=layers.trunc_normal(0.02 * head_init_scale),
                           dtype=config.dtype, rngs=rngs)

  def __call__(self, images, dropout_rng=None):
    x = self._trunk(images, None, dropout_rng)
    if self.pooling == "mean":
      pooled = self.fc_norm(x[:, 1:].mean(axis=1))
    else:
      pooled = self.norm(x)[:, 0]
    return self.head(pooled)


# Fields a classifier shares with the student it starts from; image_size may differ (position tables are resized).
_STRUCTURE_FIELDS = ("patch_size", "in_channels", "width", "depth", "num_heads", "mlp_ratio", "abs_pos_emb")


def init_classifier_from_pretrained(classifier, pretrained):
  """Copies a pretrained student's weights into a fresh classifier, keeping its function: everything but the mask
  token, `lm_head` and (for mean pooling) the final `norm` (`init_trunk_from_pretrained`)."""
  init_trunk_from_pretrained(classifier, pretrained, also_copy=("norm",) if classifier.pooling == "cls" else ())


def init_trunk_from_pretrained(model, pretrained, *, also_copy=()):
  """Copies a pretrained student's trunk (and the top-level parameters `also_copy`) into a fresh fine-tuning model
  (`ViTClassifier`, `segmentation.UperNetSegmenter`), keeping the trunk's function; the rest keeps its init.

  The mask token and `lm_head` are never copied. When the pretrained
  model has a shared relative-position table that the classifier lacks, each block's table becomes
  per-block + shared, so the attention logits are unchanged (build the classifier from `finetune_config`). A
  classifier of another image_size (fine-tuning at 384² a student trained at 224²) gets the relative-position
  tables and the absolute position embedding resized to its patch grid (`position_resize.resize_position_params`).
  """
  src_cfg, dst_cfg = pretrained.config, model.config
  different = [f for f in _STRUCTURE_FIELDS if getattr(src_cfg, f) != getattr(dst_cfg, f)]
  if bool(src_cfg.layer_scale_init) != bool(dst_cfg.layer_scale_init):
    different.append("layer_scale_init (on/off)")
  if different:
    raise ValueError(f"Classifier and pretrained configs differ in {different}; build the classifier config with "
                     "vit.finetune_config(pretrained.config).")
  if src_cfg.shared_rel_pos_bias and not (dst_cfg.shared_rel_pos_bias or dst_cfg.block_rel_pos_bias):
    raise ValueError("The pretrained model has a shared relative-position bias but the classifier has no "
                     "relative-position tables to hold it; set block_rel_pos_bias=True (vit.finetune_config).")
  if src_cfg.block_rel_pos_bias and not dst_cfg.block_rel_pos_bias:
    raise ValueError("The pretrained model has per-block relative-position tables; the classifier needs "
                     "block_rel_pos_bias=True to keep them.")

  src = nnx.state(pretrained, nnx.Param).to_pure_dict()
  # Resizing is linear in the table, so resizing the per-block and shared tables before folding them equals
  # resizing their sum.
  src = position_resize.resize_position_params(src, src_cfg.grid_size, dst_cfg.grid_size)
  dst_state = nnx.state(model, nnx.Param)
  dst = dst_state.to_pure_dict()
  for name in ("patch_embed", "cls_token", "pos_embed"):
    if name in dst:
      dst[name] = src[name]
  fold_shared = src_cfg.shared_rel_pos_bias and not dst_cfg.shared_rel_pos_bias
  for i, block in dst["blocks"].items():
    src_block = dict(src["blocks"][i])
    src_attn = dict(src_block.pop("attn"))
    table = src_attn.pop("rel_pos_bias", None)
    if dst_cfg.block_rel_pos_bias:
      if table is None:
        table = jnp.zeros_like(block["attn"]["rel_pos_bias"])
      if fold_shared:
        table = table + src["shared_rel_pos_bias"]
      src_attn["rel_pos_bias"] = table
    dst["blocks"][i] = {**src_block, "attn": src_attn}
  if dst_cfg.shared_rel_pos_bias and src_cfg.shared_rel_pos_bias:
    dst["shared_rel_pos_bias"] = src["shared_rel_pos_bias"]
  for name in also_copy:
    dst[name] = src[name]
  nnx.replace_by_pure_dict(dst_state, dst)
  nnx.update(model, dst_state)
