"""Optax optimisers for pretraining and fine-tuning.

One place builds the learning-rate schedule, the weight-decay mask and the layer-wise lr decay, so pretraining and
fine-tuning cannot drift apart. Gradient accumulation is not an optax wrapper here: the train step scans over
micro-batches and averages gradients inside one jitted program (see `train.py`), which keeps one optimizer update per
global batch and is exactly equal to a step on the full batch.
"""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

PyTree = Any


def scaled_learning_rate(base_lr: float, global_batch_size: int, rule: str, reference_batch: int) -> float:
  """Peak learning rate for a batch size: DTM scales base_lr by sqrt(batch / 2048)."""
  ratio = global_batch_size / reference_batch
  if rule == "sqrt":
    return base_lr * math.sqrt(ratio)
  if rule == "linear":
    return base_lr * ratio
  if rule == "none":
    return base_lr
  raise ValueError(f"Unknown lr scaling rule {rule!r}; use 'sqrt' (DTM), 'linear' or 'none'.")


def warmup_cosine(peak_lr: float, total_steps: int, warmup_steps: int, min_lr: float) -> optax.Schedule:
  """Linear warm-up from 0 to peak_lr, then cosine decay to min_lr at total_steps."""
  if total_steps <= 0:
    raise ValueError(f"total_steps must be positive, got {total_steps}.")
  warmup_steps = min(warmup_steps, total_steps)
  warmup = optax.linear_schedule(0.0, peak_lr, max(warmup_steps, 1))
  decay_steps = max(total_steps - warmup_steps, 1)
  cosine = optax.cosine_decay_schedule(peak_lr, decay_steps, alpha=min_lr / peak_lr if peak_lr else 0.0)
  return optax.join_schedules([warmup, cosine], [warmup_steps])


def warmup_poly(peak_lr: float, total_steps: int, warmup_steps: int, min_lr: float, power: float = 1.0,
                warmup_ratio: float = 1e-6) -> optax.Schedule:
  """mmseg's (mmcv 1.x) "poly" policy with linear warm-up, the semantic-segmentation recipes' schedule.

  The poly lr min_lr + (peak_lr − min_lr)(1 − t/total_steps)^power decays over every step, warm-up included; during
  the first warmup_steps it is scaled by warmup_ratio + (1 − warmup_ratio)·t/warmup_steps (mmcv's "linear" warm-up).
  """
  if total_steps <= 0:
    raise ValueError(f"total_steps must be positive, got {total_steps}.")

  def schedule(step):
    t = jnp.minimum(jnp.asarray(step, jnp.float32), total_steps)
    lr = min_lr + (peak_lr - min_lr) * (1.0 - t / total_steps) ** power
    if warmup_steps > 0:
      lr = lr * jnp.where(t < warmup_steps, warmup_ratio + (1.0 - warmup_ratio) * t / warmup_steps, 1.0)
    return lr

  return schedule


SCHEDULES = ("cosine", "poly")


def path_name(path: Sequence[Any]) -> str:
  """'blocks/3/attn/qkv/kernel' for a pytree key path (works for dict keys, attributes and indices)."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def weight_decay_mask(params: PyTree, no_decay_names: Sequence[str]) -> PyTree:
  """True where weight decay applies: not on biases, norms (any ≤1-D parameter) or the named tokens.

  Faithful to the released code, the mask token and the relative-position tables *are* decayed unless named here.
  """
  patterns = [re.compile(rf"(^|/){re.escape(name)}(/|$)") for name in no_decay_names]

  def decays(path, leaf):
    if jnp.ndim(leaf) <= 1:  # every bias (incl. q/v biases), norm scale and layer scale
      return False
    return not any(p.search(path_name(path)) for p in patterns)

  return jax.tree_util.tree_map_with_path(decays, params)


def beit_layer_id(name: str, num_layers: int) -> int:
  """Layer index used by BEiT's layer-wise lr decay: embeddings 0, block i → i+1, everything else num_layers+1."""
  top = name.split("/", 1)[0]
  if top in ("cls_token", "mask_token", "pos_embed", "patch_embed"):
    return 0
  match = re.match(r"blocks/(\d+)/", name)
  if match:
    return int(match.group(1)) + 1
  return num_layers + 1


def layer_decay_multipliers(params: PyTree, num_layers: int, decay: float) -> PyTree:
  """lr multiplier decay ** (num_layers + 1 - layer_id) for every parameter (1.0 for the head)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: decay ** (num_layers + 1 - beit_layer_id(path_name(path), num_layers)), params)


def scale_by_tree(multipliers: PyTree) -> optax.GradientTransformation:
  """Multiplies each update by a per-parameter constant (layer-wise lr decay)."""
  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * m, updates, multipliers), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(cfg: ml_collections.ConfigDict, params: PyTree, *, total_steps: int, global_batch_size: int,
                   num_layers: int | None = None,
                   warmup_steps: int | None = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with clipping, masked weight decay, warmup+cosine (or poly) and optional layer-wise decay.

  `cfg` fields: base_lr, lr_scaling ('sqrt'|'linear'|'none'), lr_reference_batch, min_lr, b1, b2, eps,
  weight_decay, no_decay_names, grad_clip (0 disables), layer_decay (1.0 disables; needs num_layers), and
  warmup_steps unless the caller passes `warmup_steps` (pretraining derives it from epochs); optional schedule
  ("cosine", the default, or "poly" with poly_power, see `warmup_poly`).
  Returns the transformation and its lr schedule (for logging).
  """
  peak_lr = scaled_learning_rate(cfg.base_lr, global_batch_size, cfg.lr_scaling, cfg.lr_reference_batch)
  warmup_steps = cfg.warmup_steps if warmup_steps is None else warmup_steps
  kind = cfg.get("schedule", "cosine")
  if kind == "cosine":
    schedule = warmup_cosine(peak_lr, total_steps, warmup_steps, cfg.min_lr)
  elif kind == "poly":
    schedule = warmup_poly(peak_lr, total_steps, warmup_steps, cfg.min_lr, cfg.get("poly_power", 1.0))
  else:
    raise ValueError(f"Unknown lr schedule {kind!r}; use one of {SCHEDULES}.")
  parts = []
  if cfg.grad_clip and cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                           mask=weight_decay_mask(params, cfg.no_decay_names)))
  layer_decay = cfg.get("layer_decay", 1.0)
  if layer_decay != 1.0:
    if num_layers is None:
      raise ValueError("layer_decay needs num_layers (the student depth).")
    parts.append(scale_by_tree(layer_decay_multipliers(params, num_layers, layer_decay)))
  return optax.chain(*parts), schedule

