"""What the student regresses: per-patch target tokens from a frozen teacher or from the image itself.

Kinds (`config.target.kind`):
  clip        frozen CLIP vision tower: projected patch tokens after ln_post (the paper). `checkpoint` is a directory
              written by `python -m dtm_jax.models.convert`; `init="random"` builds a randomly initialised tower of
              the configured size instead (no download; a weak teacher, used only when no weights are at hand).
  checkpoint  frozen student-architecture ViT restored from a pretraining workdir of this project (a model teaches
              the next); targets are its `lm_head` outputs or, with `features="encoder"`, its final patch tokens.
  ema         momentum teacher of the student (BYOL / data2vec style): the EMA copy of the student encodes the
              unmasked image; targets are its final patch tokens (or, with `ema_num_blocks` = K > 1, the average of
              its last K blocks' patch tokens), standardised per token.
              The EMA parameters live in the train state (`ema_params`) and follow `ema_momentum(step)`.
  pixels      per-patch pixels (the normalised input image cut into patches), optionally standardised per patch.
Morphing always computes its groups from these target tokens. Teachers run in `dtype` ("auto" by default: float32 on
TPUs and CPUs, float16 on GPUs; `teacher_dtype`) under stop_gradient; their outputs are returned as float32.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
from flax import nnx

from dtm_jax import flops, platform
from dtm_jax import sharding as sharding_lib
from dtm_jax.models import clip, convert, functional, vit
from dtm_jax.runtime import checkpoint as checkpoint_lib

PyTree = Any
KINDS = ("clip", "checkpoint", "ema", "pixels")


@dataclasses.dataclass(frozen=True)
class Target:
  """A frozen target: `tokens(params, images) -> f32[B, N, out_dim]`; `params` travel as a jit argument."""
  kind: str
  out_dim: int
  params: PyTree
  _apply: Callable[[PyTree, jax.Array], jax.Array]
  description: str
  forward_flops: float = 0.0  # per image, for throughput/MFU reporting
  is_ema: bool = False  # params are the student's EMA, kept in the train state rather than frozen here

  def tokens(self, params: PyTree, images: jax.Array) -> jax.Array:
    return jax.lax.stop_gradient(self._apply(params, images).astype(jnp.float32))


# `target.dtype="auto"` by the platform the program is built for (docs/BENCHMARKS.md "Teacher precision"). TPUs:
# float32, whose matmuls TPUs run as one bfloat16 pass with float32 accumulation by default, so it costs no more than
# bfloat16 (the compiled B/16 step even accesses 3% fewer bytes) and rounds no activation to bfloat16. GPUs: float16,
# the released code's autocast dtype, at bfloat16's tensor-core rate and with 6× fewer tokens regrouped than
# bfloat16 on the semantic teacher. CPUs: float32.
AUTO_DTYPES = {"tpu": "float32", "gpu": "float16", "cpu": "float32"}


def teacher_dtype(name: str):
  """The compute dtype of a teacher: `name`, or the platform's for "auto" (AUTO_DTYPES)."""
  return jnp.dtype(AUTO_DTYPES[platform.current().platform] if name == "auto" else name)


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """[B, H, W, C] → [B, N, p·p·C] in row-major patch order (pixels within a patch row-major, channels last)."""
  b, h, w, c = images.shape
  gh, gw = h // patch_size, w // patch_size
  x = images.reshape(b, gh, patch_size, gw, patch_size, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, patch_size * patch_size * c)


def standardize_tokens(x: jax.Array) -> jax.Array:
  """Each token to zero mean and unit variance over its features (LayerNorm without affine parameters, in f32).

  MAE's normalised pixels and data2vec's teacher outputs: the target's scale no longer depends on the image's
  contrast or on how the teacher's activations drift, so one loss scale (smooth-L1 β) suits every token.
  """
  x = x.astype(jnp.float32)
  return (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-6)


def _pixels_target(cfg: ml_collections.ConfigDict, patch_size: int, in_channels: int) -> Target:
  def apply(params, images):
    del params
    x = patchify(images.astype(jnp.float32), patch_size)
    return standardize_tokens(x) if cfg.get("normalize_patches", True) else x
  return Target("pixels", patch_size * patch_size * in_channels, {}, apply, "normalised patch pixels")


def _module_target(kind: str, module: nnx.Module, description: str) -> Target:
  fm, params = functional.split_module(module)
  cfg = module.config
  images = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.in_channels))
  out_dim = jax.eval_shape(fm.apply, params, images).shape[-1]
  return Target(kind, out_dim, params, fm.apply, description, flops.transformer_flops(cfg, out_dim))


def random_clip_config(cfg: ml_collections.ConfigDict, image_size: int) -> clip.CLIPVisionConfig:
  """CLIP tower of `cfg.variant` ("test", "B/16", …) at the run's image size, with `cfg.overrides` applied."""
  overrides = dict(cfg.get("overrides") or {})
  return clip.get_config(cfg.variant, **{"image_size": image_size, "dtype": teacher_dtype(cfg.dtype),
                                         "head_dtype": _head_dtype(cfg), **overrides})


def _head_dtype(cfg: ml_collections.ConfigDict):
  """The CLIP tower's ln_post/proj dtype: `cfg.head_dtype`, or None (the tower's dtype) when unset."""
  return jnp.dtype(cfg.head_dtype) if cfg.get("head_dtype") else None


def _clip_target(cfg: ml_collections.ConfigDict, image_size: int, abstract: bool) -> Target:
  if abstract:  # the tower of `cfg.variant`, shapes only: a converted checkpoint of that variant has these shapes
    clip_cfg = random_clip_config(cfg, image_size)
    module = nnx.eval_shape(lambda: clip.CLIPVision(clip_cfg, rngs=nnx.Rngs(0)))
    return _module_target("clip", module, f"CLIP tower {cfg.variant} (shapes only)")
  if cfg.get("init", "checkpoint") == "random":
    clip_cfg = random_clip_config(cfg, image_size)
    module = clip.CLIPVision(clip_cfg, rngs=nnx.Rngs(cfg.get("seed", 0)))
    return _module_target("clip", module, f"randomly initialised CLIP tower ({cfg.variant}, width {clip_cfg.width}, "
                          f"depth {clip_cfg.depth}, patch {clip_cfg.patch_size}, seed {cfg.get('seed', 0)})")
  path = epath.Path(cfg.checkpoint)
  module = convert.load_converted(path, dtype=teacher_dtype(cfg.dtype), head_dtype=_head_dtype(cfg),
                                  image_size=image_size)
  return _module_target("clip", module, f"CLIP tower from {path}")


def _restore_targets(abstract_params: PyTree, mesh, min_fsdp_size: int) -> PyTree:
  """ShapeDtypeStructs with the shardings a teacher is restored onto: the run's FSDP shardings on `mesh` (the ones
  build_program gives the target), or one local device without a mesh. Never the saved shardings, which name the
  devices of the run that wrote the checkpoint."""
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract_params)
  else:
    shardings = sharding_lib.param_shardings(abstract_params, mesh, min_fsdp_size)
  return sharding_lib.with_shardings(abstract_params, shardings)


def _checkpoint_target(cfg: ml_collections.ConfigDict, image_size: int, student_config: vit.ViTConfig | None,
                       abstract: bool, mesh=None, min_fsdp_size: int = 2 ** 18) -> Target:
  if abstract:  # shapes only, nothing read: a teacher of the student's architecture
    if student_config is None:
      raise ValueError("The 'checkpoint' target built without reading it needs the student config.")
    model_cfg = dataclasses.replace(student_config, dtype=teacher_dtype(cfg.dtype), drop_path_rate=0.0, remat="none")
    directory, step = cfg.checkpoint, "(shapes of the student's architecture)"
    fm, params = functional.abstract_split(lambda: vit.PretrainViT(model_cfg, rngs=nnx.Rngs(0)))
  else:
    directory, step = checkpoint_lib.find_step_directory(cfg.checkpoint, cfg.get("step"))
    metadata = json.loads((directory / str(step) / "metadata" / "metadata").read_text())
    model_cfg = checkpoint_lib.model_config_from_metadata(metadata, vit.ViTConfig, dtype=teacher_dtype(cfg.dtype),
                                                          drop_path_rate=0.0)
    if model_cfg.image_size != image_size:
      raise ValueError(f"The teacher checkpoint {cfg.checkpoint} was trained at image size "
                       f"{model_cfg.image_size}, but this run uses {image_size}; use the same image size.")
    fm, abstract_params = functional.abstract_split(lambda: vit.PretrainViT(model_cfg, rngs=nnx.Rngs(0)))
    params, _, _ = checkpoint_lib.restore_params(directory, step,
                                                 target=_restore_targets(abstract_params, mesh, min_fsdp_size))
  if cfg.get("features", "head") == "encoder":
    apply = lambda p, images: fm.apply(p, images, method="encode")[:, 1:]
    return Target("checkpoint", model_cfg.width, params, apply, f"encoder tokens of {directory}/{step}",
                  flops.transformer_flops(model_cfg, 0))
  apply = lambda p, images: fm.apply(p, images, None)
  return Target("checkpoint", model_cfg.out_dim, params, apply, f"lm_head outputs of {directory}/{step}",
                flops.transformer_flops(model_cfg, model_cfg.out_dim))


def _ema_target(cfg: ml_collections.ConfigDict, student_config: vit.ViTConfig) -> Target:
  """data2vec-style targets from the EMA teacher: its last `ema_num_blocks` (K) blocks, each block's patch tokens
  through the final LayerNorm and standardised per token, averaged. K = 1 is the final representation; a larger K
  mixes in earlier, more local layers (data2vec averages the top K)."""
  num_blocks = cfg.get("ema_num_blocks", 1)
  depth = student_config.depth
  if not 1 <= num_blocks <= depth:
    raise ValueError(f"config.target.ema_num_blocks={num_blocks} must be between 1 and the student depth {depth}.")
  teacher_config = dataclasses.replace(student_config, drop_path_rate=0.0, remat="none")
  fm, _ = functional.abstract_split(lambda: vit.PretrainViT(teacher_config, rngs=nnx.Rngs(0)))

  def apply(params, images):
    if num_blocks == 1:
      return standardize_tokens(fm.apply(params, images, method="encode")[:, 1:])
    module = fm.bind(params)
    # `nnx.capture` records every block's output; the blocks below the last K are dropped by jit.
    _, intermediates = nnx.capture(module.encode, nnx.Intermediate, method_outputs=nnx.Intermediate)(images)
    blocks = nnx.to_pure_dict(intermediates)["blocks"]
    outputs = [standardize_tokens(module.norm(blocks[i]["__call__"][0])[:, 1:])
               for i in range(depth - num_blocks, depth)]
    return jnp.mean(jnp.stack(outputs), axis=0)

  which = "final patch tokens" if num_blocks == 1 else f"mean of the last {num_blocks} blocks' patch tokens"
  return Target("ema", student_config.width, {}, apply, f"EMA of the student ({which}, standardised per token)",
                flops.transformer_flops(teacher_config, 0), is_ema=True)


def ema_momentum(cfg: ml_collections.ConfigDict, step: jax.Array, total_steps: int) -> jax.Array:
  """BYOL's schedule: momentum rises from `ema_momentum` to `ema_momentum_end` along a cosine over the run."""
  progress = jnp.clip(step / max(total_steps, 1), 0.0, 1.0)
  start, end = cfg.ema_momentum, cfg.ema_momentum_end
  return end - (end - start) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0


def ema_update(ema_params: PyTree, params: PyTree, momentum: jax.Array) -> PyTree:
  return jax.tree.map(lambda e, p: momentum * e + (1.0 - momentum) * p, ema_params, params)


def build_target(cfg: ml_collections.ConfigDict, *, image_size: int, patch_size: int, in_channels: int = 3,
                 student_config: vit.ViTConfig | None = None, abstract: bool = False, mesh=None,
                 min_fsdp_size: int = 2 ** 18) -> Target:
  """The target described by `config.target` for a student of this image and patch size.

  abstract: parameters are ShapeDtypeStructs and nothing is read (`--mode=compile`): a `clip` target is the tower of
  `cfg.variant` (+ `cfg.overrides`), a `checkpoint` target a teacher of the student's architecture.
  mesh, min_fsdp_size: a `checkpoint` teacher is restored straight onto the run's mesh with the FSDP shardings
  `sharding.param_shardings(params, mesh, min_fsdp_size)` gives (pass the run's mesh and config.mesh.min_fsdp_size);
  without a mesh, onto one local device of each process.
  """
  if cfg.kind == "ema":
    if student_config is None:
      raise ValueError("The 'ema' target needs the student config.")
    return _ema_target(cfg, student_config)
  if cfg.kind == "pixels":
    return _pixels_target(cfg, patch_size, in_channels)
  if cfg.kind == "clip":
    return _clip_target(cfg, image_size, abstract)
  if cfg.kind == "checkpoint":
    return _checkpoint_target(cfg, image_size, student_config, abstract, mesh, min_fsdp_size)
  raise ValueError(f"Unknown target kind {cfg.kind!r}; choose one of {KINDS}.")


def validate_target_config(cfg: ml_collections.ConfigDict, *, check_paths: bool = True) -> None:
  """Cheap checks before anything is built or compiled; check_paths: the teacher checkpoint must be named and exist
  (False for `--mode=compile`, which reads nothing)."""
  if cfg.kind not in KINDS:
    raise ValueError(f"Unknown target kind {cfg.kind!r} (config.target.kind); choose one of {KINDS}.")
  needs_path = (cfg.kind == "clip" and cfg.get("init", "checkpoint") != "random") or cfg.kind == "checkpoint"
  if needs_path and check_paths:
    if not cfg.get("checkpoint"):
      raise ValueError(f"config.target.checkpoint is empty; the {cfg.kind!r} target needs a directory (convert a "
                       "CLIP checkpoint with `python -m dtm_jax.models.convert`, see README).")
    if not epath.Path(cfg.checkpoint).exists():
      raise FileNotFoundError(f"Teacher checkpoint {cfg.checkpoint} (config.target.checkpoint) does not exist.")
