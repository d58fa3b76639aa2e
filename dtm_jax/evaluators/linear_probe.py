"""Linear probe of a frozen student (MAE's protocol): BatchNorm without affine + linear classifier.

The student never changes, so its features can be computed once (`config.precompute_features`) and the classifier
trained on them for all epochs in one jitted scan per epoch: minutes on a CPU for small data. Without
precomputation the student encodes every augmented training batch (MAE's ImageNet setting). LARS (MAE) or SGD with
momentum, lr = base_lr × batch / 256, linear warm-up then cosine. With a checkpointer the fit is resumable (the
probe's weights, BatchNorm statistics, optimizer state and the training input's position), one epoch a step of the
one training loop (dtm_jax/runner/loop.py).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from dtm_jax import optim, sharding
from dtm_jax import images as images_lib
from dtm_jax.evaluators import classification, encoding
from dtm_jax.runner import loop, resume
from dtm_jax.runtime import checkpoint as checkpoint_lib
from dtm_jax.runtime import metrics

PyTree = Any


BN_EPSILON = 1e-6


OPTIMIZERS = ("lars", "sgd")


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


def _fit(config: ml_collections.ConfigDict, *, feature_dim: int, steps_per_epoch: int, mesh: Mesh,
         writer: metrics.MetricsWriter, train_epoch: Callable, evaluate: Callable,
         checkpointer: checkpoint_lib.Checkpointer | None = None,
         train_data: checkpoint_lib.SavableIterator | None = None) -> dict:
  """The epoch loop both ways share (dtm_jax.runner.loop, one step = one epoch): `train_epoch(state, epoch,
  train_step) -> (state, mean loss)`, `evaluate(state) -> accuracy` every `config.eval_every_epochs` and at the end.

  With a `checkpointer` it resumes after the newest saved epoch (dtm_jax.runner.resume) and saves the probe (and
  `train_data`'s position) at each evaluation and when a SIGTERM or Ctrl-C stops it after an epoch; every epoch's
  shuffle or batches follow from the epoch number or the saved position, so a resumed run ends as an uninterrupted
  one."""
  if steps_per_epoch <= 0:
    raise ValueError(f"config.batch_size={config.batch_size} exceeds the number of training examples; lower it.")
  total_steps = config.epochs * steps_per_epoch
  tx, schedule = make_optimizer(config.optimizer, total_steps=total_steps, global_batch_size=config.batch_size,
                                warmup_steps=round(config.warmup_epochs * steps_per_epoch))
  train_step = make_train_step(tx, config.bn_momentum)
  def init_state(rng):
    probe = init_probe(rng, feature_dim, config.num_classes)
    return {**probe, "opt_state": tx.init(probe["params"])}

  rep = sharding.replicated(mesh)
  config_dict = config.to_dict()
  best_top1, result, epoch = 0.0, {}, 0
  found = resume.find(checkpointer, config, required=("epoch", "best_top1")) if checkpointer is not None else None
  if found is None:
    state = jax.jit(init_state, out_shardings=rep)(jax.random.key(config.seed))
  else:
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
                            jax.eval_shape(init_state, jax.random.key(config.seed)))
    _, state, metadata, _ = found.restore(abstract, (lambda start: train_data) if train_data is not None else None)
    epoch, best_top1 = metadata["epoch"], metadata["best_top1"]

  def run_epoch(state, batch):
    """One epoch, evaluated every `eval_every_epochs` and at the end: one metrics line per epoch."""
    del batch  # each epoch reads its own batches
    nonlocal epoch, result, best_top1
    epoch += 1
    state, loss = train_epoch(state, epoch, train_step)
    scalars = {"train_loss": loss, "lr": schedule(epoch * steps_per_epoch - 1)}
    if epoch % config.eval_every_epochs == 0 or epoch == config.epochs:
      result = evaluate(state)
      best_top1 = max(best_top1, result["top1"])
      scalars.update(top1=result["top1"], top5=result["top5"])
    return state, scalars

  def save(state, at_epoch):
    checkpointer.save_state(at_epoch * steps_per_epoch, state, data_iterator=train_data,
                            metadata={"step": at_epoch * steps_per_epoch, "epoch": at_epoch, "best_top1": best_top1,
                                      "config": config_dict, "config_hash": checkpoint_lib.config_hash(config_dict)})

  finished = loop.train_loop(
      state, what="Linear probe", step=epoch, total=config.epochs, train_step=run_epoch, next_batch=None,
      log_every=1, writer=writer, save=save if checkpointer is not None else None,
      save_every=config.eval_every_epochs, checkpointer=checkpointer, unit="epoch",
      metrics_step=lambda at_epoch: at_epoch * steps_per_epoch, close_writer=False)
  state = finished.state
  if not result:  # Resumed a probe that had already finished.
    result = evaluate(state)
  writer.flush()
  return {"top1": result["top1"], "top5": result["top5"], "best_top1": best_top1,
          "num_eval_examples": result["num_examples"], "epochs": config.epochs, "steps": total_steps}


def train_on_features(config: ml_collections.ConfigDict, train: encoding.FeatureSet, test: encoding.FeatureSet,
                      mesh: Mesh, writer: metrics.MetricsWriter,
                      checkpointer: checkpoint_lib.Checkpointer | None = None) -> dict:
  """Train the probe on fixed features; each epoch is one jitted scan over the valid rows in a fresh random order
  (the last incomplete batch is dropped). Returns {"top1", "top5", "best_top1", "num_eval_examples", "epochs",
  "steps"}. With a `checkpointer`: resumable (see _fit)."""
  batch_size = config.batch_size
  steps_per_epoch = train.num_valid // batch_size
  rows = sharding.batch_sharding(mesh)
  rng = jax.random.fold_in(jax.random.key(config.seed), 1)

  @functools.partial(jax.jit, static_argnums=3)
  def scan_epoch(state, train, rng, train_step):
    order = jnp.argsort(jnp.where(train.valid, jax.random.uniform(rng, train.valid.shape), 2.0))  # valid first

    def body(state, i):
      index = jax.lax.dynamic_slice(order, (i * batch_size,), (batch_size,))
      features = jax.lax.with_sharding_constraint(train.features[index], rows)
      labels = jax.lax.with_sharding_constraint(train.labels[index], rows)
      return train_step(state, features, labels, jnp.ones_like(labels, jnp.bool_))

    state, losses = jax.lax.scan(body, state, jnp.arange(steps_per_epoch))
    return state, jnp.mean(losses)

  accuracy = jax.jit(lambda state, test: classification.accuracy_counts(probe_logits(state, test.features), test.labels,
                                                                test.valid))
  return _fit(config, feature_dim=train.features.shape[-1], steps_per_epoch=steps_per_epoch, mesh=mesh,
              writer=writer, checkpointer=checkpointer,
              train_epoch=lambda state, epoch, step: scan_epoch(state, train, jax.random.fold_in(rng, epoch), step),
              evaluate=lambda state: classification.accuracy_from_counts(accuracy(state, test)))


def make_step_on_images(encode_fn: encoding.EncodeFn, input_config: ml_collections.ConfigDict):
  """The online probe step, jitted: `(state, student_params, batch, rng, train_step) -> (state, loss)` on the frozen
  student's features of a batch of training images ({"image", "label"[, "erase_box"]}: normalised, and erased with
  `rng`, on the device); `train_step` (from make_train_step) is static."""
  normalization = images_lib.normalization_of(input_config)

  @functools.partial(jax.jit, static_argnums=4, donate_argnums=0)
  def step_on_images(state, student_params, batch, rng, train_step):
    images = images_lib.training_images(batch, normalization, rng)
    features = jax.lax.stop_gradient(encode_fn(student_params, images))
    return train_step(state, features, batch["label"], jnp.ones_like(batch["label"], jnp.bool_))

  return step_on_images


def train_online(config: ml_collections.ConfigDict, encode_fn: encoding.EncodeFn, student_params: PyTree,
                 train_data: Iterator[dict], eval_data: Callable[[], Iterable[dict]], mesh: Mesh,
                 writer: metrics.MetricsWriter, *, feature_dim: int,
                 checkpointer: checkpoint_lib.Checkpointer | None = None) -> dict:
  """Train the probe on the frozen student's features of every training batch (augmented by the input pipeline).
  With a `checkpointer`: resumable, `train_data`'s position included (see _fit)."""
  steps_per_epoch = config.num_train_examples // config.batch_size
  step_on_images = make_step_on_images(encode_fn, config.input)

  erase_rng = jax.random.key(config.seed)

  next_batch = lambda: sharding.to_global(images_lib.training_batch(next(train_data)), mesh)

  def train_epoch(state, epoch, train_step):
    losses = []
    batch = next_batch()
    for i in range(steps_per_epoch):
      rng = jax.random.fold_in(erase_rng, epoch * steps_per_epoch + i)
      state, loss = step_on_images(state, student_params, batch, rng, train_step)
      losses.append(loss)
      if i + 1 < steps_per_epoch:  # double buffering: read the next batch while the devices run this step (never
        batch = next_batch()       # past the epoch's end, where the probe may save its input position)
    return state, jnp.mean(jnp.stack(losses))

  evaluator = classification.make_classifier_evaluator(
      lambda both, images: probe_logits(both["probe"], encode_fn(both["student"], images)), mesh)
  return _fit(config, feature_dim=feature_dim, steps_per_epoch=steps_per_epoch, mesh=mesh, writer=writer,
              checkpointer=checkpointer, train_data=train_data, train_epoch=train_epoch,
              evaluate=lambda state: evaluator({"probe": state, "student": student_params}, eval_data()))
