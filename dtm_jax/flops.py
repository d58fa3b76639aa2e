"""Analytic FLOP counts of the models and the chips' peak FLOP/s: what MFU and `--mode=compile`'s roofline divide by.

Matmul FLOPs only (2 per multiply-add); norms, softmax and activations are left out (<1%). One module so that the
throughput metrics, the compile report and every mode's program count the same way.
"""
from __future__ import annotations

from typing import Any

# Dense bf16 peak FLOP/s per device, by `device.device_kind` prefix. Unknown kinds give no MFU.
PEAK_BF16_FLOPS = {
    "NVIDIA H200": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12,
    "TPU v6": 918e12,
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5": 459e12,  # what v5p chips report as their device_kind (after "TPU v5 lite": first match wins)
    "TPU v4": 275e12,
    "TPU v3": 123e12,
}


def peak_flops_per_device(device_kind: str) -> float | None:
  for prefix, flops in PEAK_BF16_FLOPS.items():
    if device_kind.startswith(prefix):
      return flops
  return None


def transformer_forward_flops(*, width: int, depth: int, tokens: int, mlp_dim: int, patch_size: int,
                              in_channels: int = 3, out_dim: int = 0, out_tokens: int = 0) -> float:
  """Matmul FLOPs (2 per multiply-add) of one ViT forward on one image.

  Per block: qkv 3TD², attention logits and values 2T²D, output projection TD², MLP 2·T·D·M. Plus the patch
  embedding and an optional output head on `out_tokens` tokens. Norms, softmax and GELU are left out (<1%).
  """
  t, d = tokens, width
  per_block = 4 * t * d * d + 2 * t * t * d + 2 * t * d * mlp_dim
  patches = tokens - 1
  embed = patches * patch_size * patch_size * in_channels * d
  head = out_tokens * d * out_dim
  return 2.0 * (depth * per_block + embed + head)


def morphing_flops(*, tokens: int, dim: int, num_schedules: int, max_iters: int) -> float:
  """Upper bound of the morphing work per image (dtm_jax.morphing): the token Gram matrix, shared by the schedules
  (2·N²·D), each round's slot similarities (≤ (N/2)² entries, a few FLOPs each) and the loss's group means."""
  gram = 2.0 * tokens * tokens * dim
  similarity = num_schedules * max_iters * 4.0 * (tokens // 2) ** 2
  group_means = num_schedules * 2 * 2.0 * tokens * dim
  return gram + similarity + group_means


def transformer_flops(cfg: Any, out_dim: int) -> float:
  """Forward FLOPs per image of a ViT-like module config (student or CLIP tower)."""
  patches = (cfg.image_size // cfg.patch_size) ** 2
  return transformer_forward_flops(
      width=cfg.width, depth=cfg.depth, tokens=patches + 1, mlp_dim=cfg.mlp_dim, patch_size=cfg.patch_size,
      in_channels=cfg.in_channels, out_dim=out_dim, out_tokens=patches)


def mae_student_flops(cfg: Any) -> float:
  """Forward FLOPs per image of the MAE-style student (dtm_jax.models.mae): the patch embedding of every patch, the
  encoder on CLS + the visible patches, the decoder's input projection, its blocks on CLS + every patch and the head
  at every patch."""
  patches, visible = cfg.num_patches, cfg.num_visible
  encoder = transformer_forward_flops(width=cfg.width, depth=cfg.depth, tokens=visible + 1, mlp_dim=cfg.mlp_dim,
                                      patch_size=cfg.patch_size, in_channels=cfg.in_channels)
  hidden_embed = 2.0 * (patches - visible) * cfg.patch_size ** 2 * cfg.in_channels * cfg.width
  decoder = transformer_forward_flops(width=cfg.decoder_width, depth=cfg.decoder_depth, tokens=patches + 1,
                                      mlp_dim=int(cfg.decoder_width * cfg.mlp_ratio), patch_size=0,
                                      out_dim=cfg.out_dim, out_tokens=patches)
  return encoder + hidden_embed + 2.0 * (visible + 1) * cfg.width * cfg.decoder_width + decoder


def encoder_flops(config: Any) -> float:
  """Analytic forward FLOPs per image of the student's encoder (no head)."""
  return transformer_forward_flops(width=config.width, depth=config.depth, tokens=config.num_patches + 1,
                                           mlp_dim=config.mlp_dim, patch_size=config.patch_size,
                                           in_channels=config.in_channels)


def segmenter_forward_flops(vit_config: Any, seg_config: Any) -> float:
  """Analytic forward FLOPs of one crop: the trunk, plus the convolutions of the neck and heads (mmseg's UperNet
  with BEiT's neck: 4× and 2× upsampling, identity, 2× pooling of the trunk's tokens; BatchNorm, pooling and
  resizing neglected)."""
  trunk = encoder_flops(vit_config)
  grid, width, channels = vit_config.grid_size, vit_config.width, seg_config.channels
  sizes = [(grid * 4) ** 2, (grid * 2) ** 2, grid ** 2, (grid // 2) ** 2]  # pixels of each pyramid level
  conv = lambda pixels, c_in, c_out, k: 2.0 * pixels * c_in * c_out * k * k
  neck = 2.0 * width * width * (sizes[1] + sizes[0] + sizes[1])  # 2×2 stride-2 transposed convs: 1 tap per output
  pool = conv(sizes[3], width + len(seg_config.pool_scales) * channels, channels, 3)  # PPM bottleneck
  laterals = sum(conv(p, width, channels, 1) for p in sizes[:3])
  fpn = sum(conv(p, channels, channels, 3) for p in sizes[:3])
  fuse = conv(sizes[0], 4 * channels, channels, 3) + conv(sizes[0], channels, seg_config.num_classes, 1)
  aux = conv(sizes[seg_config.aux_in_index], width, seg_config.aux_channels, 3)
  return trunk + neck + pool + laterals + fpn + fuse + aux
