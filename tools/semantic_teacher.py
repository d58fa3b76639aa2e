"""The semantic teacher of tools/train_teacher.py, free of flags: a CLIP-style tower and ten class embeddings
trained as CLIP's zero-shot classifier, and how it is saved (a `clip` target directory plus its class embeddings).
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx

from dtm_jax.evaluators import frozen_features
from dtm_jax.models import clip, convert, functional
from dtm_jax.runtime import metrics
from tools.teachers import CLASS_EMBEDDINGS_FILE

INFO_FILE = "teacher.json"


def tower_config(**overrides) -> clip.CLIPVisionConfig:
  """The tower of the study: the demo student's size (28², patch 4, width 96, depth 4, 3 heads), 64-dim projection."""
  fields = dict(image_size=28, patch_size=4, width=96, depth=4, num_heads=3, mlp_dim=384, proj_dim=64,
                dtype=jnp.float32)
  return clip.get_config("test", **{**fields, **overrides})


def _unit(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def init_teacher(config: clip.CLIPVisionConfig, num_classes: int, seed: int):
  """(functional tower, trainable state {"tower", "classes", "log_scale"})."""
  tower, tower_params = functional.split_module(clip.CLIPVision(config, rngs=nnx.Rngs(seed)))
  classes = 0.02 * jax.random.normal(jax.random.key(seed + 1), (num_classes, config.proj_dim), jnp.float32)
  return tower, {"tower": tower_params, "classes": classes, "log_scale": jnp.log(jnp.float32(1 / 0.07))}


def class_logits(tower: functional.FunctionalModule, state, images: jax.Array) -> jax.Array:
  """CLIP's zero-shot logits: exp(s) · cos(pooled image embedding, class embedding), [B, classes]."""
  pooled = tower.apply(state["tower"], images, include_cls=True)[:, 0]
  scale = jnp.exp(jnp.minimum(state["log_scale"], jnp.log(100.0)))
  return scale * _unit(pooled) @ _unit(state["classes"]).T


def augment(images: jax.Array, key: jax.Array, background: float, shift: int = 2) -> jax.Array:
  """Random horizontal flip and a random translation of up to `shift` pixels (the border filled with background)."""
  flip_key, shift_key = jax.random.split(key)
  flip = jax.random.bernoulli(flip_key, 0.5, (images.shape[0], 1, 1, 1))
  images = jnp.where(flip, images[:, :, ::-1], images)
  height, width = images.shape[1:3]
  padded = jnp.pad(images, ((0, 0), (shift, shift), (shift, shift), (0, 0)), constant_values=background)
  offsets = jax.random.randint(shift_key, (images.shape[0], 2), 0, 2 * shift + 1)
  crop = lambda image, offset: jax.lax.dynamic_slice(image, (offset[0], offset[1], 0),
                                                     (height, width, image.shape[-1]))
  return jax.vmap(crop)(padded, offsets)


def make_train_step(tower, tx, background: float):
  def train_step(state, opt_state, images, labels, key):
    def loss_fn(state):
      logits = class_logits(tower, state, augment(images, key, background))
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state)
    updates, opt_state = tx.update(grads, opt_state, state)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return optax.apply_updates(state, updates), opt_state, {"loss": loss, "accuracy": accuracy}
  return jax.jit(train_step, donate_argnums=(0, 1))


def top1(tower, state, split: frozen_features.Split, batch_size: int = 1000) -> float:
  predict = jax.jit(lambda state, images: jnp.argmax(class_logits(tower, state, images), -1))
  correct = sum(int(np.sum(np.asarray(predict(state, split.images[i:i + batch_size])) ==
                           split.labels[i:i + batch_size])) for i in range(0, len(split), batch_size))
  return 100.0 * correct / len(split)


def train(config: clip.CLIPVisionConfig, train_split: frozen_features.Split, *, num_classes: int, epochs: int,
          batch_size: int, lr: float, seed: int, background: float, log_every: int = 50):
  """Trains the tower and the class embeddings on (normalised) labelled images; returns (tower, state)."""
  tower, state = init_teacher(config, num_classes, seed)
  steps_per_epoch = len(train_split) // batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"{len(train_split)} training images do not fill one batch of {batch_size}.")
  total = epochs * steps_per_epoch
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, total // 10), total, end_value=lr * 1e-3)
  no_decay = lambda s: {"tower": jax.tree.map(lambda p: p.ndim > 1, s["tower"]), "classes": False, "log_scale": False}
  tx = optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=0.05, mask=no_decay)
  opt_state = tx.init(state)
  step_fn = make_train_step(tower, tx, background)
  rng = np.random.default_rng(seed)
  key = jax.random.key(seed)
  progress = metrics.Progress(total, every_secs=30.0)
  step = 0
  for epoch in range(epochs):
    order = rng.permutation(len(train_split))
    for i in range(steps_per_epoch):
      index = np.sort(order[i * batch_size:(i + 1) * batch_size])
      state, opt_state, scalars = step_fn(state, opt_state, train_split.images[index], train_split.labels[index],
                                          jax.random.fold_in(key, step))
      step += 1
      if step % log_every == 0 or step == total:
        print(f"step {step}/{total} (epoch {epoch + 1}): loss {float(scalars['loss']):.4f}, batch top-1 "
              f"{100 * float(scalars['accuracy']):.1f}%", flush=True)
      progress(step)
  return tower, state


def save(out, config: clip.CLIPVisionConfig, state, info: dict) -> None:
  """The tower as a converted `clip` checkpoint, its unit class embeddings and `teacher.json`."""
  out = epath.Path(out)
  params = jax.tree.map(np.asarray, state["tower"])
  convert.save_converted(convert.Converted("clip", config, params), out,
                         source={"trained_by": "tools.train_teacher", **info})
  with (out / CLASS_EMBEDDINGS_FILE).open("wb") as f:
    np.save(f, np.asarray(_unit(state["classes"]), np.float32))
  (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
