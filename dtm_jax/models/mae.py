"""The MAE-style student (docs/METHOD.md §9): a ViT encoder over the visible patches only and a light decoder over
all positions, whose head predicts the teacher's token at every patch.

Why this layout: the encoder's parameters sit at the top level under the names of `vit.PretrainViT`'s trunk
(`patch_embed`, `cls_token`, `pos_embed`, `blocks/<i>`, `norm`), so every evaluation restores it and copies it into a
classifier or segmenter with `vit.init_trunk_from_pretrained`, as it does a BEiT-style student; the decoder lives
under `decoder_*` names and the head is `lm_head` (decoder width → teacher dim), both dropped downstream.
Position embeddings are MAE's fixed 2-D sin-cos tables (CLS at zeros): parameters, so checkpoints and the trunk copy
carry them, behind `stop_gradient` here, so pretraining never changes them.

Masking (`random_masking`) is MAE's: per-image uniform noise, argsort, keep the first `N − round(ratio·N)`; the
shapes are static, so one compilation serves every mask. The encoder sees [B, 1+keep, width]; the decoder restores
the original order with a gather (`jnp.take_along_axis` on the batch-sharded rows: no communication).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dtm_jax.models import layers, vit


@dataclasses.dataclass(frozen=True)
class MAEConfig(vit.ViTConfig):
  """The encoder's `ViTConfig` fields (absolute position embedding, no relative bias, no layer scale) plus MAE's
  masking ratio and decoder (MAE's defaults: 8 blocks of width 512, 16 heads)."""
  abs_pos_emb: bool = True
  block_rel_pos_bias: bool = False
  shared_rel_pos_bias: bool = False
  layer_scale_init: float | None = None
  mask_ratio: float = 0.75
  decoder_width: int = 512
  decoder_depth: int = 8
  decoder_num_heads: int = 16

  def __post_init__(self):
    super().__post_init__()
    if not self.abs_pos_emb or self.block_rel_pos_bias or self.shared_rel_pos_bias:
      raise ValueError("The MAE-style encoder uses the absolute sin-cos position embedding only: abs_pos_emb=True, "
                       "block_rel_pos_bias=False, shared_rel_pos_bias=False.")
    if self.width % 4 or self.decoder_width % 4:
      raise ValueError(f"2-D sin-cos tables need widths divisible by 4; got {self.width} and {self.decoder_width}.")
    if self.decoder_width % self.decoder_num_heads:
      raise ValueError(f"decoder_width {self.decoder_width} is not divisible by decoder_num_heads "
                       f"{self.decoder_num_heads}.")
    if not 0 <= self.num_masked < self.num_patches:
      raise ValueError(f"mask_ratio={self.mask_ratio} must leave at least one of the {self.num_patches} patches "
                       "visible.")

  @property
  def num_masked(self) -> int:
    return int(round(self.mask_ratio * self.num_patches))

  @property
  def num_visible(self) -> int:
    return self.num_patches - self.num_masked

  @property
  def encoder(self) -> vit.ViTConfig:
    """The encoder as a plain `ViTConfig`: the trunk every evaluation builds."""
    return vit.ViTConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(vit.ViTConfig)})


ENCODER_PARAMS = ("patch_embed", "cls_token", "pos_embed", "blocks", "norm")  # named as `vit.PretrainViT`'s trunk
DECODER_FIELDS = ("mask_ratio", "decoder_width", "decoder_depth", "decoder_num_heads")


def config_from_fields(fields: dict) -> MAEConfig:
  """`MAEConfig` from a config block's fields: {"variant": ..., encoder overrides..., mask_ratio, decoder_*}."""
  fields = dict(fields)
  mae_fields = {k: fields.pop(k) for k in DECODER_FIELDS if k in fields}
  encoder = vit.config_from_fields({"abs_pos_emb": True, "block_rel_pos_bias": False, "shared_rel_pos_bias": False,
                                    "layer_scale_init": None, **fields})
  return MAEConfig(**dataclasses.asdict(encoder), **mae_fields)


def sincos_2d(width: int, grid: int) -> np.ndarray:
  """MAE's fixed position table [1 + grid², width]: row 0 (CLS) zeros; each patch gets sin/cos of its row in the
  first half of the channels and of its column in the second, at frequencies 1/10000^(k/(width/4))."""
  quarter = width // 4
  omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
  rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
  def embed(positions):
    angles = positions.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
  table = np.concatenate([embed(rows), embed(cols)], axis=1)
  return np.concatenate([np.zeros((1, width)), table], axis=0).astype(np.float32)


def random_masking(rng, batch_size: int, num_patches: int, num_visible: int):
  """MAE's per-image random masking: (ids_keep int32 [B, keep], ids_restore int32 [B, N], mask bool [B, N], True =
  hidden). ids_keep lists the visible patches in the order the encoder sees them; position p of the shuffled
  sequence [visible..., hidden...] holds patch ids_shuffle[p], and ids_restore inverts that permutation."""
  noise = jax.random.uniform(rng, (batch_size, num_patches))
  ids_shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)
  ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
  return ids_shuffle[:, :num_visible], ids_restore, ids_restore >= num_visible


def gather_visible(tokens, ids_keep):
  """tokens [B, N, C] → the visible ones [B, keep, C], in the order of ids_keep [B, keep]."""
  return jnp.take_along_axis(tokens, ids_keep[..., None], axis=1)


def restore_order(visible, fill, ids_restore):
  """[visible [B, keep, C]..., fill [B, N − keep, C]...] put back in image order [B, N, C] (ids_restore [B, N])."""
  return jnp.take_along_axis(jnp.concatenate([visible, fill], axis=1), ids_restore[..., None], axis=1)


def _fixed_table(width, grid):
  return nnx.Param(jnp.asarray(sincos_2d(width, grid))[None])


class MAEStudent(vit.ViTTrunk):
  """Encoder on the visible patches, decoder with mask tokens over all positions, `lm_head` to the teacher's dim.

  `self.config` is the encoder's `ViTConfig` (what `vit.init_trunk_from_pretrained` compares); `self.mae_config`
  the whole `MAEConfig`.
  """

  def __init__(self, config: MAEConfig, *, rngs):
    super().__init__(config.encoder, use_mask_token=False, rngs=rngs)
    self.mae_config = config
    self.pos_embed = _fixed_table(config.width, config.grid_size)
    self.norm = layers.layer_norm(config.width, epsilon=vit.LAYER_NORM_EPS, dtype=config.dtype, rngs=rngs)
    init, width = layers.trunc_normal(), config.decoder_width
    self.decoder_embed = nnx.Linear(config.width, width, kernel_init=init, dtype=config.dtype, rngs=rngs)
    self.decoder_mask_token = nnx.Param(init(rngs.params(), (1, 1, width)))
    self.decoder_pos_embed = _fixed_table(width, config.grid_size)
    self.decoder_blocks = nnx.List([
        layers.Block(width, config.decoder_num_heads, int(width * config.mlp_ratio), qkv_bias="qkv",
                     activation="gelu", layer_norm_eps=vit.LAYER_NORM_EPS, dtype=config.dtype,
                     attention_impl=config.attention_impl, rngs=rngs)
        for _ in range(config.decoder_depth)])
    self.decoder_norm = layers.layer_norm(width, epsilon=vit.LAYER_NORM_EPS, dtype=config.dtype, rngs=rngs)
    self.lm_head = nnx.Linear(width, config.out_dim, kernel_init=init, dtype=config.dtype, rngs=rngs)

  def encode(self, images, mask=None, dropout_rng=None):
    """All tokens [B, 1+N, width] of the encoder on every patch, after its final norm: what evaluations use."""
    if mask is not None:
      raise ValueError("The MAE-style encoder drops hidden patches instead of masking them; call encode_visible.")
    return layers.per_token(self.norm, self._trunk(images, None, dropout_rng))

  def encode_visible(self, images, ids_keep, dropout_rng=None):
    """Encoder tokens [B, 1+keep, width] (CLS first) of the patches `ids_keep` [B, keep], in that order."""
    self._check_images(images)
    cfg = self.config
    pos = jax.lax.stop_gradient(self.pos_embed[...])
    x = self.patch_embed(images.astype(cfg.dtype))
    x = x.reshape(x.shape[0], -1, cfg.width).astype(jnp.float32) + pos[:, 1:]
    x = gather_visible(x, ids_keep)
    cls = jnp.broadcast_to(self.cls_token[...] + pos[:, :1], (x.shape[0], 1, cfg.width))
    x = jnp.concatenate([cls, x], axis=1)
    for i, block in enumerate(self.blocks):
      block_rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
      x = layers.run_block(block, x, None, block_rng, remat=cfg.remat)
    return layers.per_token(self.norm, x)

  def decode(self, encoded, ids_restore):
    """Predictions [B, N, out_dim] for every patch, in image order, from the encoder's [B, 1+keep, width]."""
    x = layers.per_token(self.decoder_embed, encoded).astype(jnp.float32)
    batch, hidden = x.shape[0], ids_restore.shape[1] - (x.shape[1] - 1)
    fill = jnp.broadcast_to(self.decoder_mask_token[...], (batch, hidden, x.shape[-1]))
    x = jnp.concatenate([x[:, :1], restore_order(x[:, 1:], fill, ids_restore)], axis=1)
    x = x + jax.lax.stop_gradient(self.decoder_pos_embed[...])
    for block in self.decoder_blocks:
      x = layers.run_block(block, x, None, None, remat=self.config.remat)
    return layers.per_token(self.lm_head, layers.per_token(self.decoder_norm, x[:, 1:]))

  def __call__(self, images, ids_keep, ids_restore, dropout_rng=None):
    """Predictions [B, N, out_dim] at every patch from the visible patches `ids_keep` (see `random_masking`)."""
    return self.decode(self.encode_visible(images, ids_keep, dropout_rng), ids_restore)


def student_config_from_fields(fields: dict) -> vit.ViTConfig:
  """The pretraining student a config's model block describes: an `MAEConfig` for `kind="mae"`, else the BEiT-style
  `vit.ViTConfig` (`kind` defaults to "beit")."""
  fields = dict(fields)
  return config_from_fields(fields) if fields.pop("kind", "beit") == "mae" else vit.config_from_fields(fields)


def trunk_config(config: vit.ViTConfig) -> vit.ViTConfig:
  """The trunk evaluations use: an MAE-style student's encoder, or the BEiT-style student itself."""
  return config.encoder if isinstance(config, MAEConfig) else config


def is_mae_model_config(model_config: dict) -> bool:
  """Whether a checkpoint's saved `model_config` (metadata) is an `MAEConfig` (it has a decoder)."""
  return "decoder_width" in model_config


def student_model(config: vit.ViTConfig, *, rngs) -> nnx.Module:
  """The pretraining student a config describes: `MAEStudent` for an `MAEConfig`, else the BEiT-style
  `vit.PretrainViT`."""
  if isinstance(config, MAEConfig):
    return MAEStudent(config, rngs=rngs)
  return vit.PretrainViT(config, rngs=rngs)
