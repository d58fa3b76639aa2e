"""`--mode=knn`: kNN accuracy (DINO's protocol, dtm_jax/evaluators/knn.py) of a pretrained student's frozen
features, a bank from the training split against queries from the evaluation split.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
from jax.sharding import Mesh

from dtm_jax import config_checks, flops, sharding, students
from dtm_jax import images as images_lib
from dtm_jax.evaluators import encoding, knn
from dtm_jax.program import Mode, Program
from dtm_jax.runtime import metrics


def programs(config: ml_collections.ConfigDict, mesh: Mesh) -> list[Program]:
  """kNN's programs on `mesh` from abstract inputs (`--mode=compile`): encoding a batch, and classifying a batch of
  queries against the bank of `knn.num_train_examples` (0: `num_train_examples`, the whole split) entries."""
  student_config = students.student_config_of(config)  # runs read it from the checkpoint
  cfg = config.knn
  student = students.abstract_student(student_config, mesh, config.mesh.min_fsdp_size)
  encode = encoding.feature_fn(student, normalization=images_lib.normalization_of(config.input),
                             pooling=config.features.pooling, num_blocks=config.features.num_blocks)
  rows = sharding.batch_sharding(mesh)
  bank_rows = -(-(cfg.num_train_examples or config.num_train_examples) // cfg.batch_size) * cfg.batch_size
  bank = encoding.FeatureSet(jax.ShapeDtypeStruct((bank_rows, student_config.width), jnp.float32, sharding=rows),
                           jax.ShapeDtypeStruct((bank_rows,), jnp.int32, sharding=rows),
                           jax.ShapeDtypeStruct((bank_rows,), jnp.bool_, sharding=rows))
  batch = {"image": encoding.abstract_images(cfg.batch_size, student_config, rows),
           "label": jax.ShapeDtypeStruct((cfg.batch_size,), jnp.int32, sharding=rows),
           "valid": jax.ShapeDtypeStruct((cfg.batch_size,), jnp.bool_, sharding=rows)}
  encoder_flops = flops.encoder_flops(student_config) * cfg.batch_size
  step = knn.make_knn_step(encode, mesh, num_classes=config.num_classes, k=cfg.k, temperature=cfg.temperature)
  return [Program("encode", jax.jit(encode), (student.params, batch["image"]), encoder_flops),
          Program("knn_step", step, (student.params, bank, batch),
                      encoder_flops + 2.0 * cfg.batch_size * bank_rows * student_config.width)]


def run(config: ml_collections.ConfigDict, workdir: epath.Path, mesh) -> dict:
  """`main.py --mode=knn`: kNN accuracy of a pretrained student (and TensorBoard)."""
  student = students.restore_student(config.pretrained, mesh, min_fsdp_size=config.mesh.min_fsdp_size,
                                     model_overrides=config.model)
  encode = encoding.feature_fn(student, normalization=images_lib.normalization_of(config.input),
                               pooling=config.features.pooling, num_blocks=config.features.num_blocks)
  result = knn.knn_evaluate(encode, student.params, config.knn, mesh, input_config=config.input,
                            image_size=student.config.image_size)
  writer = metrics.MetricsWriter(workdir)
  writer.write_scalars(student.step or 0, result)
  writer.close()
  return {**student.source(), **result, "k": config.knn.k, "temperature": config.knn.temperature}


def check_config(c: config_checks.Checker, num_devices: int, check_paths: bool = True) -> None:
  config_checks.check_pretrained(c, check_paths)
  config_checks.check_model_overrides(c)
  config_checks.check_input(c, pretraining=False)
  config_checks.check_knn_scoring(c)
  c.batch("knn.batch_size", num_devices)
  c.integer("knn.num_train_examples", 0)
  c.integer("knn.num_eval_examples", 0)
  c.integer("num_train_examples", 1, optional=True)  # --mode=compile sizes the bank from these
  c.integer("num_classes", 1, optional=True)
  config_checks.check_mesh(c, num_devices)


MODE = Mode(
    name="knn",
    summary="Weighted kNN classification (DINO) with the frozen features of a pretrained student.",
    check=check_config,
    run=run,
    programs=programs,
    memory_knobs=("model.remat", "mesh.fsdp"),
)
