"""`--mode=linear_probe`: a linear probe (MAE's protocol, dtm_jax/evaluators/linear_probe.py) of a pretrained
student's frozen features, on features computed once (`config.precompute_features`) or on every augmented training
batch. Checkpointed at each evaluation and when stopped; rerunning the same command resumes after the epoch reached,
with the result of an uninterrupted run.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from etils import epath
from jax.sharding import Mesh

from dtm_jax import config_checks, flops, sharding, students
from dtm_jax import images as images_lib
from dtm_jax.evaluators import encoding
from dtm_jax.evaluators import linear_probe as probe
from dtm_jax.program import Mode, Program
from dtm_jax.runtime import checkpoint as checkpoint_lib
from dtm_jax.runtime import metrics


def programs(config: ml_collections.ConfigDict, mesh: Mesh) -> list[Program]:
  """The probe's programs on `mesh` from abstract inputs (`--mode=compile`): the online step on images, or (with
  precomputed features) the student's encoder over an eval batch and the probe step on a batch of features."""
  student_config = students.student_config_of(config)  # runs read it from the checkpoint
  student = students.abstract_student(student_config, mesh, config.mesh.min_fsdp_size)
  encode = encoding.feature_fn(student, normalization=images_lib.normalization_of(config.input),
                             pooling=config.features.pooling, num_blocks=config.features.num_blocks)
  rep, rows = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  tx, _ = probe.make_optimizer(config.optimizer, total_steps=1000, warmup_steps=10, global_batch_size=config.batch_size)
  train_step = probe.make_train_step(tx, config.bn_momentum)
  width = student_config.width

  def init_state(rng):
    fresh = probe.init_probe(rng, width, config.num_classes)
    return {**fresh, "opt_state": tx.init(fresh["params"])}

  state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
                       jax.eval_shape(init_state, jax.random.key(0)))
  labels = jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=rows)
  encoder_flops = flops.encoder_flops(student_config)
  if not config.precompute_features:  # augmented training batches travel as uint8 (input_pipeline)
    batch = {"image": encoding.abstract_images(config.batch_size, student_config, rows), "label": labels}
    if config.augment and config.input.random_erase_prob:
      batch["erase_box"] = jax.ShapeDtypeStruct((config.batch_size, 4), jnp.int32, sharding=rows)
    key = jax.random.key(0)
    rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep)
    return [Program("probe_step_on_images", probe.make_step_on_images(encode, config.input),
                        (state, student.params, batch, rng, train_step),
                        encoder_flops * config.batch_size)]
  features = jax.ShapeDtypeStruct((config.batch_size, width), jnp.float32, sharding=rows)
  valid = jax.ShapeDtypeStruct((config.batch_size,), jnp.bool_, sharding=rows)
  images = encoding.abstract_images(config.eval_batch_size, student_config, rows)
  return [Program("encode", jax.jit(encode), (student.params, images), encoder_flops * config.eval_batch_size),
          Program("probe_step", jax.jit(train_step, donate_argnums=0), (state, features, labels, valid),
                      6.0 * width * config.num_classes * config.batch_size)]


def run(config: ml_collections.ConfigDict, workdir: epath.Path, mesh) -> dict:
  """`main.py --mode=linear_probe`: restore the student and fit the probe (resumable); returns its accuracy."""
  import input_pipeline  # pylint: disable=g-import-not-at-top  # Only here: dtm_jax itself never loads TensorFlow.

  student = students.restore_student(config.pretrained, mesh, min_fsdp_size=config.mesh.min_fsdp_size,
                                     model_overrides=config.model)
  encode = encoding.feature_fn(student, normalization=images_lib.normalization_of(config.input),
                               pooling=config.features.pooling, num_blocks=config.features.num_blocks)
  image_size = student.config.image_size

  def eval_data(split=None):
    return input_pipeline.build_eval(config.input, split=split, image_size=image_size,
                                     global_batch_size=config.eval_batch_size)

  checkpointer = checkpoint_lib.Checkpointer(workdir, max_to_keep=2)
  # Lines of epochs past the newest checkpoint go: the resumed probe logs them again.
  writer = metrics.MetricsWriter(workdir, resume_step=checkpointer.latest_step() or 0)
  try:
    if config.precompute_features:
      logging.info("Encoding %r and %r once with the frozen student.", config.input.train_split,
                   config.input.eval_split)
      train = encoding.extract_features(encode, student.params, eval_data(config.input.train_split), mesh)
      test = encoding.extract_features(encode, student.params, eval_data(), mesh)
      result = probe.train_on_features(config, train, test, mesh, writer, checkpointer)
    else:
      train_data = input_pipeline.build_finetune_train(config.input, image_size=image_size,
                                                       global_batch_size=config.batch_size, seed=config.seed,
                                                       augment=config.augment)
      result = probe.train_online(config, encode, student.params, train_data, eval_data, mesh, writer,
                                  feature_dim=student.config.width, checkpointer=checkpointer)
  finally:
    writer.close()
  return {**student.source(), **result}


def check_config(c: config_checks.Checker, num_devices: int, check_paths: bool = True) -> None:
  c.boolean("allow_config_change", optional=True)
  config_checks.check_classifier_training(c, num_devices, check_paths)
  c.string("features.pooling", config_checks.POOLINGS)
  c.integer("features.num_blocks", 1)
  c.boolean("precompute_features")
  c.boolean("augment")
  config_checks.check_probe_training(c)


MODE = Mode(
    name="linear_probe",
    summary="Linear probe (BatchNorm + linear layer) of a frozen pretrained student (resumable).",
    check=check_config,
    run=run,
    programs=programs,
    memory_knobs=("model.remat", "mesh.fsdp"),
)
