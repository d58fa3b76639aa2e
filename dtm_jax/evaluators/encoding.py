"""Frozen features of a student: the jittable encoder (`feature_fn`: pooled tokens of the last block or blocks), and
the features of one pass over evaluation batches kept on the devices (`extract_features` → `FeatureSet`).

Everything runs on global jax.Arrays built from each host's slice of the data (`sharding.to_global`); padding rows
are marked invalid, so on several hosts every example is counted exactly once.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from dtm_jax import images as images_lib
from dtm_jax import sharding, students
from dtm_jax.models import vit

PyTree = Any


EncodeFn = Callable[[PyTree, jax.Array], jax.Array]


POOLINGS = ("mean", "cls")


def abstract_images(batch_size: int, config: vit.ViTConfig, batch_sharding) -> jax.ShapeDtypeStruct:
  """A batch of images as the input pipeline sends them: uint8, normalised on the device (dtm_jax.images)."""
  size = config.image_size
  return jax.ShapeDtypeStruct((batch_size, size, size, config.in_channels), jnp.uint8, sharding=batch_sharding)


def feature_fn(student: students.Student, *, normalization: images_lib.Normalization | None = None,
               pooling: str = "mean",
               num_blocks: int = 1) -> EncodeFn:
  """`encode(params, images) -> [B, width]` float32 features of the frozen student (jittable).

  uint8 images (what the input pipeline sends) are normalised on the device with `normalization` = (mean, std)
  (`images.normalization_of(config.input)`); float images are taken as already normalised.

  Tokens after the final LayerNorm, pooled by `pooling` ("mean" of the patch tokens or the "cls" token). With
  `num_blocks` = k > 1, the outputs of the last k blocks each go through the final LayerNorm and their pooled
  features are averaged (k = 1 is the plain final representation).
  """
  if pooling not in POOLINGS:
    raise ValueError(f"pooling={pooling!r} must be one of {POOLINGS}.")
  depth = student.config.depth
  if not 1 <= num_blocks <= depth:
    raise ValueError(f"num_blocks={num_blocks} must be between 1 and the student depth {depth}.")

  def pool(tokens):
    return tokens[:, 1:].mean(axis=1) if pooling == "mean" else tokens[:, 0]

  def encode(params, images):
    if images.dtype == jnp.uint8:
      if normalization is None:
        raise ValueError("uint8 images need feature_fn(..., normalization=images.normalization_of(config.input)).")
      images = images_lib.to_model_input(images, *normalization)
    module = student.model.bind(params)
    if num_blocks == 1:
      return pool(module.encode(images)).astype(jnp.float32)
    # `nnx.capture` records every method's output; the unused ones are dropped by jit.
    _, intermediates = nnx.capture(module.encode, nnx.Intermediate, method_outputs=nnx.Intermediate)(images)
    blocks = nnx.to_pure_dict(intermediates)["blocks"]
    pooled = [pool(module.norm(blocks[i]["__call__"][0])) for i in range(depth - num_blocks, depth)]
    return jnp.mean(jnp.stack(pooled), axis=0).astype(jnp.float32)

  return encode


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FeatureSet:
  """Features [M, D], labels [M] and valid [M] as global arrays split over the batch axes (padding rows invalid)."""
  features: jax.Array
  labels: jax.Array
  valid: jax.Array

  @property
  def num_valid(self) -> int:
    return int(jnp.sum(self.valid))


def take_batches(batches: Iterable[dict], global_batch_size: int, max_examples: int | None) -> Iterable[dict]:
  """The first ⌈max_examples / global batch⌉ batches (all of them when max_examples is None or 0).

  Every host stops after the same number of batches, so a slice stays consistent across processes.
  """
  limit = -(-max_examples // global_batch_size) if max_examples else None
  for i, batch in enumerate(batches):
    if limit is not None and i >= limit:
      return
    yield batch


@functools.partial(jax.jit, static_argnums=0)
def concatenate_per_device(mesh: Mesh, pieces: list[PyTree]) -> PyTree:
  """Batch-sharded pieces (a list of same-structured trees) → one tree of arrays, concatenated device by device.

  Device d's block of each result is the concatenation of its own blocks of the pieces, so no row moves between
  devices (a plain `jnp.concatenate` along the sharded axis regroups the rows, an all-gather or all-to-all of the
  whole result). The rows come out shard-major: with n shards of b rows per piece, row d·(len(pieces)·b) + p·b + r is
  row d·b + r of piece p. Compiled once per mesh and list of shapes.
  """
  rows = P(sharding.BATCH_AXES)
  return jax.shard_map(lambda local: jax.tree.map(lambda *xs: jnp.concatenate(xs), *local), mesh=mesh,
                       in_specs=rows, out_specs=rows)(pieces)


def jit_encoder(encode_fn: EncodeFn, mesh: Mesh):
  """`encode_fn` jitted with its features split like its images (over the batch axes), ready for the bank."""
  return jax.jit(encode_fn, out_shardings=sharding.batch_sharding(mesh))


def extract_features(encode_fn: EncodeFn, params: PyTree, batches: Iterable[dict], mesh: Mesh) -> FeatureSet:
  """Features of one pass over eval batches ({"image", "label", "valid"} per host), kept on device.

  Every device keeps the features of the examples it encoded (`concatenate_per_device`): the rows of the result
  are the batches' rows in shard-major order, not in input order; each valid example occurs once, its features,
  label and valid flag on the same row. `encode_fn` may be already jitted (its compilation is then reused).
  """
  encode = encode_fn if isinstance(encode_fn, jax.stages.Wrapped) else jit_encoder(encode_fn, mesh)
  pieces = []
  for host_batch in batches:
    batch = sharding.to_global(host_batch, mesh)
    pieces.append((encode(params, batch["image"]), batch["label"], batch["valid"]))
  if not pieces:
    raise ValueError("The evaluation data gave no batches; check the split name and the data directory.")
  return FeatureSet(*concatenate_per_device(mesh, pieces))
