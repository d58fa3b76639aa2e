"""What the three evaluations share: the restored student, its features, the sharded accuracy loop and results.

Everything runs on global jax.Arrays built from each host's slice of the data (`sharding.to_global`), and counts are
summed on device over the valid examples only, so on several hosts every example is counted exactly once.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from dtm_jax import checkpoint, errors, metrics, sharding
from dtm_jax import images as images_lib
from dtm_jax import preemption as preemption_lib
from dtm_jax.models import convert, functional, vit

PyTree = Any
EncodeFn = Callable[[PyTree, jax.Array], jax.Array]
POOLINGS = ("mean", "cls")


def make_mesh(config: ml_collections.ConfigDict) -> Mesh:
  return sharding.make_mesh(config.mesh.data, config.mesh.fsdp)


# ---------------------------------------------------------------------------------------------------------------------
# Restoring the student.
# ---------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Student:
  """A pretrained student: its config, functional `PretrainViT`, sharded parameters and where they came from."""
  config: vit.ViTConfig
  model: functional.FunctionalModule
  params: PyTree
  checkpoint: str
  step: int | None

  def source(self) -> dict:
    return {"checkpoint": self.checkpoint, "step": self.step}


def _read_metadata(step_dir: epath.Path) -> dict:
  path = step_dir / "metadata" / "metadata"
  if not path.exists():
    raise FileNotFoundError(f"{step_dir} has no metadata item; it was not written by dtm_jax.train, so the student's "
                            "architecture is unknown.")
  return json.loads(path.read_text())


def pretraining_config(step_dir: epath.Path) -> dict:
  """The config of the pretraining run that saved the checkpoint in `step_dir` (as its metadata holds it)."""
  return _read_metadata(step_dir).get("config", {})


def restore_student(pretrained: ml_collections.ConfigDict, mesh: Mesh, *, min_fsdp_size: int = 2 ** 18,
                    model_overrides: Mapping[str, Any] | None = None) -> Student:
  """Only the student, restored straight into its shardings on `mesh`.

  `pretrained.workdir`: a pretraining workdir, its `checkpoints/` directory or one step directory, or a directory
  written by `python -m dtm_jax.models.convert --format=beit`; `pretrained.step`: None for the latest step.
  `model_overrides`: ViTConfig fields to change (dtype, attention_impl, drop_path_rate).
  """
  if not pretrained.get("workdir"):
    raise ValueError("Set --config.pretrained.workdir to the workdir of a pretraining run (or one of its step "
                     "directories, or a converted checkpoint) to say which student to evaluate.")
  overrides = dict(model_overrides or {})
  if (epath.Path(pretrained.workdir) / convert.CONFIG_FILE).exists():
    return _restore_converted(pretrained, mesh, min_fsdp_size, overrides)
  directory, step = checkpoint.find_step_directory(pretrained.workdir, pretrained.get("step"))
  step_dir = directory / str(step)
  config = checkpoint.model_config_from_metadata(_read_metadata(step_dir), vit.ViTConfig, **overrides)
  model, abstract = functional.abstract_split(lambda: vit.PretrainViT(config, rngs=nnx.Rngs(0)))
  shardings = sharding.param_shardings(abstract, mesh, min_fsdp_size)
  target = sharding.with_shardings(abstract, shardings)
  params, _, step = checkpoint.restore_params(step_dir, step, target)
  logging.info("Evaluating the student of %s (step %d).", step_dir, step)
  return Student(config=config, model=model, params=params, checkpoint=str(step_dir), step=step)


def initial_student(config: vit.ViTConfig, mesh: Mesh, *, seed: int, min_fsdp_size: int = 2 ** 18) -> Student:
  """The student of `config` as pretraining with `seed` initialises it (dtm_jax.train): the untrained baseline."""
  model, abstract = functional.abstract_split(lambda: vit.PretrainViT(config, rngs=nnx.Rngs(0)))
  _, host_params = functional.split_module(vit.PretrainViT(config, rngs=nnx.Rngs(seed)))
  params = sharding.put_global(host_params, sharding.param_shardings(abstract, mesh, min_fsdp_size))
  return Student(config=config, model=model, params=params, checkpoint=f"initialisation (seed {seed})", step=0)


def abstract_student(config: vit.ViTConfig, mesh: Mesh, min_fsdp_size: int = 2 ** 18) -> Student:
  """A student of `config` whose params are ShapeDtypeStructs with their shardings (`--mode=compile`)."""
  model, abstract = functional.abstract_split(lambda: vit.PretrainViT(config, rngs=nnx.Rngs(0)))
  shardings = sharding.param_shardings(abstract, mesh, min_fsdp_size)
  params = sharding.with_shardings(abstract, shardings)
  return Student(config=config, model=model, params=params, checkpoint="(shapes only)", step=None)


def student_config_of(config: ml_collections.ConfigDict) -> vit.ViTConfig:
  """The student an evaluation config names in `config.pretrained.architecture` (default ViT-B/16) with the config's
  model overrides: what `--mode=compile` builds (runs read the architecture from the checkpoint), and the trunk of
  a from-scratch segmentation baseline."""
  architecture = dict(config.pretrained.get("architecture") or {"variant": "base"})
  fields = {**architecture, **dict(config.get("model", {}))}
  variant = fields.pop("variant")
  if "dtype" in fields:
    fields["dtype"] = jnp.dtype(fields["dtype"])
  return vit.get_config(variant, **fields)


def abstract_images(batch_size: int, config: vit.ViTConfig, batch_sharding) -> jax.ShapeDtypeStruct:
  """A batch of images as the input pipeline sends them: uint8, normalised on the device (dtm_jax.images)."""
  size = config.image_size
  return jax.ShapeDtypeStruct((batch_size, size, size, config.in_channels), jnp.uint8, sharding=batch_sharding)


def encoder_flops(config: vit.ViTConfig) -> float:
  """Analytic forward FLOPs per image of the student's encoder (no head)."""
  return metrics.transformer_forward_flops(width=config.width, depth=config.depth, tokens=config.num_patches + 1,
                                           mlp_dim=config.mlp_dim, patch_size=config.patch_size,
                                           in_channels=config.in_channels)


def _restore_converted(pretrained, mesh, min_fsdp_size, overrides) -> Student:
  if pretrained.get("step") is not None:
    raise ValueError(f"{pretrained.workdir} is a converted checkpoint, which has no steps; unset "
                     "config.pretrained.step.")
  module = convert.load_converted(pretrained.workdir)
  if not isinstance(module, vit.PretrainViT):
    raise ValueError(f"{pretrained.workdir} holds a converted {type(module).__name__}, not a pretraining student; "
                     "convert the pretraining weights (with lm_head) of a BEiT/DTM checkpoint.")
  config = dataclasses.replace(module.config, **overrides)
  model, abstract = functional.abstract_split(lambda: vit.PretrainViT(config, rngs=nnx.Rngs(0)))
  _, host_params = functional.split_module(module)
  shardings = sharding.param_shardings(abstract, mesh, min_fsdp_size)
  params = sharding.put_global(host_params, shardings)
  logging.info("Evaluating the converted student in %s.", pretrained.workdir)
  return Student(config=config, model=model, params=params, checkpoint=str(pretrained.workdir), step=None)


# ---------------------------------------------------------------------------------------------------------------------
# Features.
# ---------------------------------------------------------------------------------------------------------------------
def feature_fn(student: Student, *, normalization: images_lib.Normalization | None = None, pooling: str = "mean",
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


def training_batch(host_batch: dict) -> dict:
  """The arrays of a labelled training batch that the devices use (what `images.training_images` reads)."""
  return {k: host_batch[k] for k in ("image", "label", "erase_box") if k in host_batch}


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


# ---------------------------------------------------------------------------------------------------------------------
# Accuracy.
# ---------------------------------------------------------------------------------------------------------------------
def accuracy_counts(scores: jax.Array, labels: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
  """Top-1/top-5 hits and the number of valid examples in a batch (padding excluded)."""
  top5 = jax.lax.top_k(scores, min(5, scores.shape[-1]))[1]
  hits = top5 == labels[:, None]
  valid = valid.astype(jnp.int32)
  return {"top1_hits": jnp.sum(hits[:, 0] * valid), "top5_hits": jnp.sum(jnp.any(hits, axis=1) * valid),
          "count": jnp.sum(valid)}


def accuracy_from_counts(counts: Mapping[str, jax.Array]) -> dict[str, float]:
  """Percentages from summed counts."""
  count = int(counts["count"])
  if count == 0:
    raise ValueError("No valid evaluation examples were seen.")
  return {"top1": 100.0 * int(counts["top1_hits"]) / count, "top5": 100.0 * int(counts["top5_hits"]) / count,
          "num_examples": count}


def add_counts(total: dict | None, counts: dict) -> dict:
  return counts if total is None else jax.tree.map(jnp.add, total, counts)


def make_classifier_evaluator(predict_fn: Callable[..., jax.Array], mesh: Mesh):
  """`evaluate(params, batches) -> {"top1", "top5", "num_examples"}` (%) for `predict_fn(params, images) -> [B, C]`.

  Compiled once, evaluated on as many passes of eval batches ({"image", "label", "valid"} per host) as needed.
  """
  step = jax.jit(lambda p, b: accuracy_counts(predict_fn(p, b["image"]), b["label"], b["valid"]))

  def evaluate(params: PyTree, batches: Iterable[dict]) -> dict[str, float]:
    total = None
    for host_batch in batches:
      total = add_counts(total, step(params, sharding.to_global(host_batch, mesh)))
    if total is None:
      raise ValueError("The evaluation data gave no batches; check the split name and the data directory.")
    return accuracy_from_counts(total)

  return evaluate


# ---------------------------------------------------------------------------------------------------------------------
# The training loop of fine-tuning and segmentation.
# ---------------------------------------------------------------------------------------------------------------------
def checkpoint_metadata(model_config: vit.ViTConfig, source: dict, config: ml_collections.ConfigDict) -> dict:
  """What a fine-tuning or segmentation checkpoint records besides its step: the trunk's architecture, the pretrained
  checkpoint it started from, the run's config (and its hash), and the job's layout (a resume on another slice)."""
  return {"model_config": checkpoint.model_config_to_json(model_config), "pretrained": source,
          "config": config.to_dict(), "config_hash": checkpoint.config_hash(config.to_dict()),
          **checkpoint.layout_metadata()}


def _require_finite(scalars: dict, step: int, what: str) -> None:
  bad = sorted(name for name, value in scalars.items() if not np.all(np.isfinite(value)))
  if bad:
    raise FloatingPointError(
        f"{what}: non-finite {', '.join(bad)} at step {step}; no checkpoint of this state was written. Lower the "
        "learning rate or check the input, then rerun the same command to resume from the last checkpoint.")


def run_training_steps(state: PyTree, *, what: str, step: int, total_steps: int, train_step: Callable,
                       next_batch: Callable[[], PyTree], rng: jax.Array, is_eval_step: Callable[[int], bool],
                       evaluate: Callable[[PyTree, int], None], save: Callable[[PyTree, int], None],
                       checkpointer: checkpoint.Checkpointer, writer: metrics.MetricsWriter,
                       progress: metrics.Progress, log_every: int, stop_after: int | None = None) -> tuple[PyTree, int]:
  """Steps `step` → `total_steps` of `train_step(state, batch, rng) -> (state, scalars)`; returns (state, step).

  The scalars are read at log, evaluation and save steps; a non-finite one stops the run with FloatingPointError
  before anything is evaluated or saved, so the last checkpoint stays the last good state.

  Evaluates (`evaluate(state, step)`) and checkpoints (`save(state, step)`) at each `is_eval_step`, and checkpoints
  and stops at a preemption (SIGTERM, Ctrl-C, JAX's preemption notice) or at `stop_after`. Double buffering: the next
  batch (`next_batch()`, already sent to the devices) is read while they run a step, never past a step that saves,
  so a saved input position is exactly the steps taken. Closes `checkpointer` (waits for the last save) and
  `writer`. A preemption before `total_steps` raises `errors.Interrupted` (exit 0 after SIGTERM, 130 after Ctrl-C).
  """
  preemption = preemption_lib.PreemptionFlag().install()
  batch = None  # the next step's batch, when it is already on its way to the devices
  stopped = False
  try:
    while step < total_steps:
      state, scalars = train_step(state, batch if batch is not None else next_batch(), rng)
      step += 1
      evaluating = is_eval_step(step) or step == total_steps
      stopped = preemption.should_stop() or step == stop_after  # every step on every process: all stop together
      batch = None if (evaluating or stopped) else next_batch()
      progress(step, done=scalars)
      logging_step = step % log_every == 0
      if logging_step or evaluating or stopped:  # never evaluate or save a diverged state
        fetched = jax.device_get(scalars)
        _require_finite(fetched, step, what)
        if logging_step:
          writer.write_scalars(step, fetched)
      if evaluating:
        evaluate(state, step)
      if evaluating or stopped:  # a mid-epoch step when stopped: resumable
        writer.flush()  # the lines up to a checkpoint's step survive a kill (they are not computed again)
        save(state, step)
      if stopped:
        logging.warning("Stopped at step %d of %d: its checkpoint is written; rerunning the same command resumes "
                        "from it.", step, total_steps)
        break
  finally:
    preemption.uninstall()
    try:
      checkpointer.close()  # waits for the last save; a failed one raises CheckpointSaveError
    finally:
      writer.close()
  if stopped and step < total_steps and preemption.requested:
    raise errors.Interrupted(
        f"{what} stopped ({'Ctrl-C' if preemption.interrupted else 'SIGTERM'}) at step {step} of {total_steps}; its "
        f"checkpoint is in {checkpointer.directory}. Rerun the same command to resume from it.",
        exit_code=errors.EXIT_INTERRUPTED if preemption.interrupted else 0)
  return state, step


# ---------------------------------------------------------------------------------------------------------------------
# Results.
# ---------------------------------------------------------------------------------------------------------------------
def write_results(workdir: str | epath.Path, results: dict) -> None:
  """`<workdir>/results.json` (process 0) and a clear line on the console."""
  if jax.process_index() == 0:
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True, default=_json_default) + "\n")
  scores = ", ".join(f"{k}={v:.2f}%" for k, v in results.items() if k.endswith(("top1", "top5", "miou", "aacc")))
  line = f"{results.get('mode', 'eval')} of {results.get('checkpoint')} (step {results.get('step')}): {scores}"
  logging.info(line)
  print(line, flush=True)


def _json_default(value):
  if isinstance(value, (np.generic, jax.Array)):
    return np.asarray(value).item()
  return str(value)
