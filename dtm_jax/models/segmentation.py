"""UperNet semantic segmentation on the student ViT (BEiT's ADE20K protocol) and its training loss.

BEiT's segmentation backbone is the fine-tuning trunk (same parameter paths as `vit.ViTClassifier`, so layer-wise lr
decay and `init_segmenter_from_pretrained` apply unchanged) whose patch tokens after four blocks become a feature
pyramid at ×4, ×2, ×1 and ×½ the token grid (1/4, 1/8, 1/16 and 1/32 of the image for 16-pixel patches; the
Fashion-MNIST demo's 4-pixel patches give 1/1 … 1/8): two ×2 transposed convolutions (with BatchNorm and GELU
between), one, none, and a 2×2 max-pool. mmseg's UPerHead (pyramid pooling on the coarsest level, FPN top-down path,
fusion at 1/4) predicts the classes; an FCN head on the third level adds an auxiliary loss during training.

BatchNorm is mmseg's SyncBN: in training mode it normalises with the statistics of the whole batch the program sees
(a jitted step over a sharded global batch computes exactly that) and updates running statistics held as
`nnx.BatchStat` (carry them with `functional.split_stateful`); in eval mode it uses the running statistics.
Images are NHWC; logits are float32 NHWC.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dtm_jax.models import layers, vit

# mmcv's ConvModule draws its convolution with Kaiming-normal (fan_out, ReLU gain); PyTorch's BatchNorm keeps a
# running average with weight 0.1 for the new batch (Flax's momentum is the weight of the old average).
_CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
_BATCH_NORM_MOMENTUM = 0.9
_BATCH_NORM_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class SegmenterConfig:
  """UperNet + auxiliary FCN head. Defaults are BEiT v2's ADE20K ViT-B/16 recipe (num_classes 150, channels 768)."""
  num_classes: int
  out_indices: tuple[int, ...] = (3, 5, 7, 11)  # blocks (0-based) whose tokens feed the 1/4, 1/8, 1/16, 1/32 levels
  channels: int = 768  # UperNet decode channels
  pool_scales: tuple[int, ...] = (1, 2, 3, 6)
  aux_channels: int = 256
  aux_in_index: int = 2  # pyramid level of the auxiliary head (2: 1/16)
  aux_weight: float = 0.4
  dropout: float = 0.1  # channel dropout (nn.Dropout2d) before each classifier
  ignore_index: int = 255

  def __post_init__(self):
    # Configs may hand over lists; the dataclass stays hashable with tuples.
    object.__setattr__(self, "out_indices", tuple(int(i) for i in self.out_indices))
    object.__setattr__(self, "pool_scales", tuple(int(s) for s in self.pool_scales))
    if self.num_classes < 1:
      raise ValueError(f"num_classes must be positive, got {self.num_classes}.")
    if len(self.out_indices) != 4 or list(self.out_indices) != sorted(set(self.out_indices)):
      raise ValueError(f"out_indices must be 4 increasing block indices (BEiT base: (3, 5, 7, 11)), got "
                       f"{self.out_indices}.")
    if not 0 <= self.aux_in_index < 4:
      raise ValueError(f"aux_in_index must name one of the 4 pyramid levels (0–3), got {self.aux_in_index}.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
    if 0 <= self.ignore_index < self.num_classes:
      raise ValueError(f"ignore_index {self.ignore_index} is a class id (num_classes {self.num_classes}); use 255.")


def resize_bilinear(x, size):
  """x [B, H, W, C] resized to `size` (h, w) as PyTorch's `interpolate(mode="bilinear", align_corners=False)`.

  Without antialiasing, which jax.image.resize would otherwise add when shrinking (mmseg's resize has none).
  """
  size = tuple(size)
  if x.shape[1:3] == size:
    return x
  return jax.image.resize(x, (x.shape[0], *size, x.shape[3]), method="linear", antialias=False)


@functools.lru_cache(maxsize=64)
def _adaptive_pool_matrix(in_size, out_size):
  """[out, in] averaging weights of PyTorch's AdaptiveAvgPool: bin i covers [⌊i·in/out⌋, ⌈(i+1)·in/out⌉)."""
  weights = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    start, end = (i * in_size) // out_size, -(-((i + 1) * in_size) // out_size)
    weights[i, start:end] = 1.0 / (end - start)
  return weights


def adaptive_avg_pool(x, size):
  """x [B, H, W, C] averaged into size × size bins (PyTorch's AdaptiveAvgPool2d), in float32."""
  rows, cols = _adaptive_pool_matrix(x.shape[1], size), _adaptive_pool_matrix(x.shape[2], size)
  return jnp.einsum("ph,qw,bhwc->bpqc", rows, cols, x.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST).astype(x.dtype)


def channel_dropout(x, rate, rng):
  """PyTorch's Dropout2d (mmseg's decode-head dropout): zero whole feature maps of a sample, rescale the rest."""
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0], 1, 1, x.shape[-1]))
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)).astype(x.dtype)


def _batch_norm(features, *, dtype, rngs):
  """BatchNorm with PyTorch's momentum and epsilon; two-pass variance (as `layers.layer_norm`)."""
  return nnx.BatchNorm(features, momentum=_BATCH_NORM_MOMENTUM, epsilon=_BATCH_NORM_EPS, dtype=dtype,
                       use_fast_variance=False, rngs=rngs)


class ConvBNReLU(nnx.Module):
  """mmcv's ConvModule as mmseg's heads use it: convolution without bias (BatchNorm has one) → BatchNorm → ReLU."""

  def __init__(self, in_features, out_features, kernel_size, *, dtype, rngs):
    self.conv = nnx.Conv(in_features, out_features, (kernel_size, kernel_size), padding="SAME", use_bias=False,
                         kernel_init=_CONV_INIT, dtype=dtype, rngs=rngs)
    self.norm = _batch_norm(out_features, dtype=dtype, rngs=rngs)

  def __call__(self, x, *, train):
    return jax.nn.relu(self.norm(self.conv(x), use_running_average=not train))


def _classifier(in_features, num_classes, *, dtype, rngs):
  """mmseg's `conv_seg`: a 1×1 convolution drawn from N(0, 0.01²), bias 0."""
  return nnx.Conv(in_features, num_classes, (1, 1), kernel_init=nnx.initializers.normal(0.01), dtype=dtype,
                  rngs=rngs)


def _symmetric_uniform(bound):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _deconv2x(width, *, dtype, rngs):
  """ConvTranspose2d(kernel 2, stride 2) with PyTorch's default initialisation, U(±1/√fan_in) for kernel and bias
  (fan_in = width·2·2)."""
  bound = 1.0 / np.sqrt(width * 4)
  return nnx.ConvTranspose(width, width, (2, 2), strides=(2, 2), padding="VALID",
                           kernel_init=_symmetric_uniform(bound), bias_init=_symmetric_uniform(bound), dtype=dtype,
                           rngs=rngs)


class Upsample4x(nnx.Module):
  """BEiT's `fpn1`: ×2 transposed conv → BatchNorm → GELU → ×2 transposed conv (1/16 → 1/4)."""

  def __init__(self, width, *, dtype, rngs):
    self.deconv1 = _deconv2x(width, dtype=dtype, rngs=rngs)
    self.norm = _batch_norm(width, dtype=dtype, rngs=rngs)
    self.deconv2 = _deconv2x(width, dtype=dtype, rngs=rngs)

  def __call__(self, x, *, train):
    return self.deconv2(layers.gelu(self.norm(self.deconv1(x), use_running_average=not train)))


class UperHead(nnx.Module):
  """mmseg's UPerHead on four levels of `in_features` channels (finest first); logits at the finest level."""

  def __init__(self, in_features, channels, num_classes, *, pool_scales, dropout, dtype, rngs):
    conv = functools.partial(ConvBNReLU, dtype=dtype, rngs=rngs)
    self.pool_scales = tuple(pool_scales)
    self.dropout = dropout
    self.pool_convs = nnx.List([conv(in_features, channels, 1) for _ in self.pool_scales])
    self.pool_bottleneck = conv(in_features + len(self.pool_scales) * channels, channels, 3)
    self.lateral_convs = nnx.List([conv(in_features, channels, 1) for _ in range(3)])
    self.fpn_convs = nnx.List([conv(channels, channels, 3) for _ in range(3)])
    self.fpn_bottleneck = conv(4 * channels, channels, 3)
    self.classifier = _classifier(channels, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, features, *, train, dropout_rng=None):
    top = features[-1]
    pooled = [resize_bilinear(conv(adaptive_avg_pool(top, scale), train=train), top.shape[1:3])
              for scale, conv in zip(self.pool_scales, self.pool_convs)]
    laterals = [conv(x, train=train) for conv, x in zip(self.lateral_convs, features[:-1])]
    laterals.append(self.pool_bottleneck(jnp.concatenate([top, *pooled], axis=-1), train=train))
    for i in range(len(laterals) - 1, 0, -1):  # top-down: each level adds the (already summed) coarser one
      laterals[i - 1] = laterals[i - 1] + resize_bilinear(laterals[i], laterals[i - 1].shape[1:3])
    outputs = [conv(x, train=train) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
    size = outputs[0].shape[1:3]
    fused = self.fpn_bottleneck(jnp.concatenate([resize_bilinear(x, size) for x in outputs], axis=-1), train=train)
    return self.classifier(channel_dropout(fused, self.dropout, dropout_rng))


class FCNHead(nnx.Module):
  """mmseg's FCNHead as BEiT's auxiliary head: one 3×3 ConvModule (no input concat) → dropout → 1×1 classifier."""

  def __init__(self, in_features, channels, num_classes, *, dropout, dtype, rngs):
    self.dropout = dropout
    self.conv = ConvBNReLU(in_features, channels, 3, dtype=dtype, rngs=rngs)
    self.classifier = _classifier(channels, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x, *, train, dropout_rng=None):
    return self.classifier(channel_dropout(self.conv(x, train=train), self.dropout, dropout_rng))


class UperNetSegmenter(vit.ViTTrunk):
  """The student's trunk (no mask token, no final norm) → BEiT's pyramid adapters → UperNet + auxiliary FCN head.

  Parameters: the trunk's at the top level (`patch_embed`, `cls_token`, `blocks/<i>`, ... as in `ViTClassifier`),
  then `fpn1`, `fpn2` (adapters), `decode_head` and `auxiliary_head`.
  """

  def __init__(self, vit_config, seg_config, *, rngs):
    if seg_config.out_indices[-1] >= vit_config.depth:
      raise ValueError(f"out_indices {seg_config.out_indices} name blocks beyond depth {vit_config.depth}.")
    if vit_config.grid_size < 2:
      raise ValueError(f"image_size {vit_config.image_size} gives a {vit_config.grid_size}×"
                       f"{vit_config.grid_size} patch grid; the coarsest level (½ the grid) needs at least 2×2 "
                       "patches.")
    super().__init__(vit_config, use_mask_token=False, rngs=rngs)
    self.seg_config = seg_config
    width, dtype = vit_config.width, vit_config.dtype
    self.fpn1 = Upsample4x(width, dtype=dtype, rngs=rngs)
    self.fpn2 = _deconv2x(width, dtype=dtype, rngs=rngs)
    self.decode_head = UperHead(width, seg_config.channels, seg_config.num_classes,
                                pool_scales=seg_config.pool_scales, dropout=seg_config.dropout, dtype=dtype,
                                rngs=rngs)
    self.auxiliary_head = FCNHead(width, seg_config.aux_channels, seg_config.num_classes,
                                  dropout=seg_config.dropout, dtype=dtype, rngs=rngs)

  def features(self, images, *, train, dropout_rng=None):
    """The pyramid [B, 4g, 4g, width], [B, 2g, 2g, …], [B, g, g, …], [B, g/2, g/2, …] for a g×g patch grid (for
    16-pixel patches: 1/4, 1/8, 1/16 and 1/32 of the image), in the compute dtype."""
    cfg = self.config
    tokens = self._trunk_outputs(images, None, dropout_rng, self.seg_config.out_indices)
    grid = cfg.grid_size
    maps = [x[:, 1:].reshape(x.shape[0], grid, grid, cfg.width).astype(cfg.dtype) for x in tokens]  # CLS dropped
    return [self.fpn1(maps[0], train=train), self.fpn2(maps[1]), maps[2],
            nnx.max_pool(maps[3], window_shape=(2, 2), strides=(2, 2), padding="VALID")]

  def __call__(self, images, *, train, dropout_rng=None):
    """(logits [B, 4g, 4g, classes] (H/4 for 16-pixel patches), auxiliary logits [B, g, g, classes]), float32.

    train: BatchNorm uses (and updates the running averages with) the batch's statistics; with `dropout_rng`, drop
    path and the heads' dropout are on too (ignored when not training).
    """
    trunk_rng = decode_rng = aux_rng = None
    if train and dropout_rng is not None:
      trunk_rng, decode_rng, aux_rng = jax.random.split(dropout_rng, 3)
    features = self.features(images, train=train, dropout_rng=trunk_rng)
    logits = self.decode_head(features, train=train, dropout_rng=decode_rng)
    aux_logits = self.auxiliary_head(features[self.seg_config.aux_in_index], train=train, dropout_rng=aux_rng)
    return logits.astype(jnp.float32), aux_logits.astype(jnp.float32)


def init_segmenter_from_pretrained(segmenter, pretrained):
  """Copies a pretrained student's trunk into a fresh segmenter (as `vit.init_classifier_from_pretrained` does for
  classifiers); the adapters and heads keep their initialisation. Build the segmenter's ViT config with
  `vit.finetune_config(pretrained.config, image_size=crop_size, drop_path_rate=...)`."""
  vit.init_trunk_from_pretrained(segmenter, pretrained)


def _pixel_cross_entropy(logits, labels, ignore_index):
  """(softmax cross-entropy summed over the non-ignored pixels / all pixels, accuracy on the non-ignored pixels) of
  logits upsampled to the labels. Dividing by every pixel, ignored ones too, is mmseg 0.x's mean (BEiT v2's
  segmentation code): the loss, so the effective learning rate, is the one BEiT v2's recipe was tuned with."""
  logits = resize_bilinear(logits.astype(jnp.float32), labels.shape[1:3])
  valid = labels != ignore_index
  safe_labels = jnp.where(valid, labels, 0).astype(jnp.int32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
  correct = (jnp.argmax(logits, axis=-1) == safe_labels) & valid
  return jnp.where(valid, nll, 0.0).mean(), correct.sum() / jnp.maximum(valid.sum(), 1)


def segmentation_loss(logits, aux_logits, labels, seg_config):
  """(loss, metrics) for logits [B, h, w, C], auxiliary logits [B, h', w', C] and labels int [B, H, W].

  Both heads' logits are upsampled bilinearly (align_corners=False) to the labels; each cross-entropy sums over the
  pixels whose label is not `ignore_index` (labels must otherwise be class ids) and divides by all pixels, as mmseg
  0.x (BEiT v2's segmentation code) does; the auxiliary one is weighted by `aux_weight`.
  """
  decode_loss, accuracy = _pixel_cross_entropy(logits, labels, seg_config.ignore_index)
  aux_loss, _ = _pixel_cross_entropy(aux_logits, labels, seg_config.ignore_index)
  loss = decode_loss + seg_config.aux_weight * aux_loss
  return loss, {"loss": loss, "decode_loss": decode_loss, "aux_loss": aux_loss, "pixel_accuracy": accuracy}
