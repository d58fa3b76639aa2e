"""Linear probe of a frozen student (MAE's protocol): BatchNorm without affine + linear classifier.

The student never changes, so its features can be computed once (`config.precompute_features`) and the classifier
trained on them for all epochs in one jitted scan per epoch: minutes on a CPU for small data. Without
precomputation the student encodes every augmented training batch (MAE's ImageNet setting). LARS (MAE) or SGD with
momentum, lr = base_lr × batch / 256, linear warm-up then cosine.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh
from absl import logging

from dtm_jax import metrics, optim, sharding
from dtm_jax.evaluate import common

PyTree = Any
BN_EPSILON = 1e-6
OPTIMIZERS = ("lars", "sgd")


# ---------------------------------------------------------------------------------------------------------------------
# The probe: BatchNorm (no scale, no shift) then a linear layer.
# ---------------------------------------------------------------------------------------------------------------------
def init_probe(rng: jax.Array, feature_dim: int, num_classes: int) -> dict:
  """{"params": {"kernel", "bias"}, "batch_stats": {"mean", "var"}}; kernel ~ N(0, 0.01²) as in MAE."""
  return {
      "params": {"kernel": 0.01 * jax.random.normal(rng, (feature_dim, num_classes)),
                 "bias": jnp.zeros((num_classes,))},
      "batch_stats": {"mean": jnp.zeros((feature_dim,)), "var": jnp.ones((feature_dim,))},
  }


def normalize_train(features: jax.Array, valid: jax.Array, stats: dict, momentum: float) -> tuple[jax.Array, dict]:
  """Normalise with the statistics of the valid rows of this (global) batch; update the running statistics."""
  weights = valid.astype(jnp.float32)[:, None]
  count = jnp.maximum(jnp.sum(weights), 1.0)
  mean = jnp.sum(features * weights, axis=0) / count
  var = jnp.sum(jnp.square(features - mean) * weights, axis=0) / count
  new_stats = {"mean": momentum * stats["mean"] + (1.0 - momentum) * mean,
               "var": momentum * stats["var"] + (1.0 - momentum) * var}
  return (features - mean) * jax.lax.rsqrt(var + BN_EPSILON), new_stats


def probe_logits(probe: dict, features: jax.Array) -> jax.Array:
  """Evaluation-mode logits (running statistics)."""
  stats, params = probe["batch_stats"], probe["params"]
  normed = (features - stats["mean"]) * jax.lax.rsqrt(stats["var"] + BN_EPSILON)
  return normed @ params["kernel"] + params["bias"]


def make_optimizer(opt_config: ml_collections.ConfigDict, *, total_steps: int, warmup_steps: int,
                   global_batch_size: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """LARS or SGD+momentum; weight decay and LARS's trust ratio skip the bias (MAE's LARS)."""
  peak_lr = optim.scaled_learning_rate(opt_config.base_lr, global_batch_size, "linear", opt_config.lr_reference_batch)
  schedule = optim.warmup_cosine(peak_lr, total_steps, warmup_steps, opt_config.min_lr)
  matrices = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  if opt_config.name == "lars":
    tx = optax.lars(schedule, weight_decay=opt_config.weight_decay, weight_decay_mask=matrices,
                    trust_ratio_mask=matrices, momentum=opt_config.momentum)
  elif opt_config.name == "sgd":
    tx = optax.chain(optax.add_decayed_weights(opt_config.weight_decay, matrices),
                     optax.sgd(schedule, momentum=opt_config.momentum))
  else:
    raise ValueError(f"config.optimizer.name={opt_config.name!r} must be one of {OPTIMIZERS}.")
  return tx, schedule


def make_train_step(tx: optax.GradientTransformation, bn_momentum: float):
  """`step(state, features, labels, valid) -> (state, loss)` with state = probe + {"opt_state"}."""

  def train_step(state, features, labels, valid):
    normed, batch_stats = normalize_train(features, valid, state["batch_stats"], bn_momentum)

    def loss_fn(params):
      logits = normed @ params["kernel"] + params["bias"]
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      return jnp.sum(losses * valid) / jnp.maximum(jnp.sum(valid), 1)

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "batch_stats": batch_stats, "opt_state": opt_state}, loss

  return train_step


# ---------------------------------------------------------------------------------------------------------------------
# Training on precomputed features.
# ---------------------------------------------------------------------------------------------------------------------
def train_on_features(config: ml_collections.ConfigDict, train: common.FeatureSet, test: common.FeatureSet,
                      mesh: Mesh, writer: metrics.MetricsWriter) -> dict:
  """Train the probe for `config.epochs` epochs on fixed features; evaluate every `config.eval_every_epochs`.

  Each epoch visits the valid training rows in a fresh random order (the last incomplete batch is dropped).
  Returns {"top1", "top5", "best_top1", "epochs", "steps"}.
  """
  batch_size = config.batch_size
  steps_per_epoch = train.num_valid // batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"config.batch_size={batch_size} exceeds the {train.num_valid} training examples; lower it.")
  total_steps = config.epochs * steps_per_epoch
  tx, schedule = make_optimizer(config.optimizer, total_steps=total_steps, global_batch_size=batch_size,
                                warmup_steps=config.warmup_epochs * steps_per_epoch)
  train_step = make_train_step(tx, config.bn_momentum)
  rows = sharding.batch_sharding(mesh)

  @jax.jit
  def train_epoch(state, train, rng):
    shuffled = jax.random.uniform(rng, train.valid.shape)
    order = jnp.argsort(jnp.where(train.valid, shuffled, 2.0))  # Valid rows first, in random order.

    def body(state, i):
      index = jax.lax.dynamic_slice(order, (i * batch_size,), (batch_size,))
      features = jax.lax.with_sharding_constraint(train.features[index], rows)
      labels = jax.lax.with_sharding_constraint(train.labels[index], rows)
      return train_step(state, features, labels, jnp.ones_like(labels, jnp.bool_))

    state, losses = jax.lax.scan(body, state, jnp.arange(steps_per_epoch))
    return state, jnp.mean(losses)

  @jax.jit
  def evaluate(state, test):
    return common.accuracy_counts(probe_logits(state, test.features), test.labels, test.valid)

  rng_init, rng_data = jax.random.split(jax.random.key(config.seed))
  probe = init_probe(rng_init, train.features.shape[-1], config.num_classes)
  state = jax.device_put({**probe, "opt_state": tx.init(probe["params"])}, sharding.replicated(mesh))
  best_top1, result = 0.0, {}
  for epoch in range(1, config.epochs + 1):
    state, loss = train_epoch(state, train, jax.random.fold_in(rng_data, epoch))
    step = epoch * steps_per_epoch
    scalars = {"train_loss": loss, "lr": schedule(step - 1)}
    if epoch % config.eval_every_epochs == 0 or epoch == config.epochs:
      result = common.accuracy_from_counts(evaluate(state, test))
      best_top1 = max(best_top1, result["top1"])
      scalars.update(top1=result["top1"], top5=result["top5"])
    writer.write_scalars(step, scalars)
  writer.flush()
  return {"top1": result["top1"], "top5": result["top5"], "best_top1": best_top1, "epochs": config.epochs,
          "steps": total_steps}


# ---------------------------------------------------------------------------------------------------------------------
# Entry point.
# ---------------------------------------------------------------------------------------------------------------------
def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """`main.py --mode=linear_probe`: restore the student, fit the probe, write results.json and TensorBoard."""
  import input_pipeline  # pylint: disable=g-import-not-at-top  # Only here: dtm_jax itself never loads TensorFlow.

  mesh = common.make_mesh(config)
  student = common.restore_student(config.pretrained, mesh, min_fsdp_size=config.mesh.min_fsdp_size,
                                   model_overrides=config.model)
  encode = common.feature_fn(student, pooling=config.features.pooling, num_blocks=config.features.num_blocks)
  image_size = student.config.image_size

  def features_of(split):
    batches = input_pipeline.build_eval(config.input, split=split, image_size=image_size,
                                        global_batch_size=config.eval_batch_size)
    return common.extract_features(encode, student.params, batches, mesh)

  writer = metrics.MetricsWriter(workdir)
  if not config.precompute_features:
    raise NotImplementedError("pending")
  logging.info("Computing the frozen student's features of %r and %r once.", config.train_split, config.eval_split)
  result = train_on_features(config, features_of(config.train_split), features_of(config.eval_split), mesh, writer)
  writer.close()
  results = {"mode": "linear_probe", **student.source(), **result}
  common.write_results(workdir, results)
  return results
