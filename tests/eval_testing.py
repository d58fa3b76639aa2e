"""Helpers for the evaluation tests: tiny pretraining checkpoints, learnable labelled data (a stream, padded eval
passes, an image folder), per-host shares of a data set, the worker of the two-process test, valid evaluation configs
and a tiny fine-tuning run."""
import json
import os
import signal

import jax
import numpy as np
from flax import nnx

from configs import finetune_demo, knn_demo, linear_probe_demo
from dtm_jax import sharding, students
from dtm_jax.evaluators import classification, knn
from dtm_jax.models import functional, mae, vit
from dtm_jax.modes import finetune
from dtm_jax.runtime import checkpoint

IMAGE_SIZE = 16
NUM_CLASSES = 4
# Class c is an image tinted by COLOURS[c] under noise: learnable from mean-pooled tokens in a few steps.
COLOURS = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [-1, -1, -1]], np.float32)


def tiny_student_config(**overrides):
  return vit.get_config("test", image_size=IMAGE_SIZE, patch_size=4, out_dim=8, **overrides)


def tiny_mae_config(**overrides):
  """An MAE-style student of tiny_student_config's encoder: 12 of 16 patches hidden, a 1-block decoder."""
  fields = dict(variant="test", image_size=IMAGE_SIZE, patch_size=4, out_dim=8, decoder_width=16, decoder_depth=1,
                decoder_num_heads=2)
  return mae.config_from_fields({**fields, **overrides})


def save_pretraining_checkpoints(workdir, steps, config=None, run_config=None):
  """Random students (BEiT-style, or MAE-style for an `mae.MAEConfig`) saved as a pretraining run would (one per
  step, different weights); returns their params.
  `run_config`: the pretraining config the metadata records (a dict, e.g. {"seed": 3}), as a pretraining run saves
  it."""
  config = config or tiny_student_config()
  saved = {}
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=len(steps), async_save=False)
  init = jax.jit(lambda key: functional.split_module(mae.student_model(config, rngs=nnx.Rngs(key)))[1])
  for step in steps:
    params = init(jax.random.key(step))
    ckpt.save(step, params=params, train={"step": np.int32(step)}, data_iterator=None,
              metadata={"model_config": checkpoint.model_config_to_json(config), "step": step,
                        **({"config": run_config} if run_config is not None else {})})
    saved[step] = jax.device_get(params)
  ckpt.close()
  return saved


def tinted_images(rng, labels, noise=0.6):
  images = rng.normal(scale=noise, size=(len(labels), IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
  return images + COLOURS[labels][:, None, None, :]


class TintedStream:
  """Infinite labelled batches, batch s a function of (seed, s); save/restore its position like the real input."""

  def __init__(self, batch_size, seed=0):
    self.batch_size, self.seed, self.step = batch_size, seed, 0

  def __iter__(self):
    return self

  def __next__(self):
    rng = np.random.default_rng([self.seed, self.step])
    self.step += 1
    labels = rng.integers(0, NUM_CLASSES, self.batch_size).astype(np.int32)
    return {"image": tinted_images(rng, labels), "label": labels}

  def save(self, path):
    with open(path, "w") as f:
      json.dump({"step": self.step}, f)

  def restore(self, path):
    with open(path) as f:
      self.step = json.load(f)["step"]


def tinted_eval_batches(num_examples, batch_size, seed=123):
  """One pass with the last batch padded (valid=False), as input_pipeline.build_eval gives it."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, NUM_CLASSES, num_examples).astype(np.int32)
  images = tinted_images(rng, labels)
  padded = -(-num_examples // batch_size) * batch_size
  valid = np.arange(padded) < num_examples
  images = np.concatenate([images, np.zeros((padded - num_examples,) + images.shape[1:], np.float32)])
  labels = np.concatenate([labels, np.zeros(padded - num_examples, np.int32)])
  return [{"image": images[i:i + batch_size], "label": labels[i:i + batch_size], "valid": valid[i:i + batch_size]}
          for i in range(0, padded, batch_size)]


def write_image_folder(root, *, per_class):
  """`root/<split>/<class>/*.png` of tinted 16×16 images (the folder source of the input pipeline)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for split, count in per_class.items():
    for label in range(NUM_CLASSES):
      folder = root / split / f"class_{label}"
      folder.mkdir(parents=True)
      for i in range(count):
        pixels = 128 + 90 * COLOURS[label] + rng.normal(scale=30, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
  return root


def host_batches(features, labels, *, process_index, process_count, local_batch):
  """This host's share (example i → host i % count) of a labelled set, padded to the same batch count everywhere."""
  per_host = -(-len(labels) // process_count)
  num_batches = -(-per_host // local_batch)
  mine = np.arange(process_index, len(labels), process_count)
  size = num_batches * local_batch
  valid = np.arange(size) < len(mine)
  pad = lambda x: np.concatenate([x[mine], np.zeros((size - len(mine),) + x.shape[1:], x.dtype)])
  images, targets = pad(features), pad(labels)
  return [{"image": images[i:i + local_batch], "label": targets[i:i + local_batch], "valid": valid[i:i + local_batch]}
          for i in range(0, size, local_batch)]


def toy_knn_problem():
  """37 bank and 19 query 8-d features of 3 noisy clusters (odd sizes, so every host pads differently)."""
  rng = np.random.default_rng(0)
  centres = 2.0 * rng.normal(size=(3, 8))
  bank_labels = rng.integers(0, 3, 37).astype(np.int32)
  query_labels = rng.integers(0, 3, 19).astype(np.int32)
  bank = (centres[bank_labels] + rng.normal(size=(37, 8))).astype(np.float32)
  queries = (centres[query_labels] + rng.normal(size=(19, 8))).astype(np.float32)
  return bank, bank_labels, queries, query_labels


def multiprocess_eval_worker(port, process_id, num_processes):
  """One process of tests/test_eval_multiprocess.py: kNN and the accuracy loop on this host's share; prints JSON."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)
  from dtm_jax import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(-1, 1)
  bank, bank_labels, queries, query_labels = toy_knn_problem()
  share = lambda x, y: host_batches(x, y, process_index=process_id, process_count=num_processes, local_batch=4)
  identity = lambda params, x: x
  bank_set = knn.build_bank(identity, None, share(bank, bank_labels), mesh)
  result = knn.knn_accuracy(identity, None, bank_set, share(queries, query_labels), mesh, k=5)
  evaluate = classification.make_classifier_evaluator(lambda w, x: x[:, :3] @ w, mesh)
  accuracy = evaluate(np.eye(3, dtype=np.float32), share(queries, query_labels))
  print(json.dumps({"knn": result, "bank_size": bank_set.num_valid, "accuracy": accuracy}), flush=True)


def eval_configs(tmp_path):
  """Valid evaluation configs (each run is refused before it reads the pretrained workdir)."""
  configs = {"finetune": finetune_demo.get_config(), "linear_probe": linear_probe_demo.get_config(),
             "knn": knn_demo.get_config()}
  for config in configs.values():
    config.pretrained.workdir = str(tmp_path / "pretrain")
  configs["finetune"].update(batch_size=16, eval_batch_size=16)
  configs["linear_probe"].update(batch_size=16, eval_batch_size=16)
  configs["knn"].knn.batch_size = 16
  return configs


class InterruptingStream:
  """Labelled batches that send this process SIGINT when batch `interrupt_at` is taken."""

  def __init__(self, batch_size, interrupt_at=None):
    self._stream = TintedStream(batch_size)
    self.interrupt_at, self.first = interrupt_at, None

  @property
  def step(self):
    return self._stream.step

  def __iter__(self):
    return self

  def __next__(self):
    if self._stream.step == self.interrupt_at:
      os.kill(os.getpid(), signal.SIGINT)
    self.first = self._stream.step if self.first is None else self.first
    return next(self._stream)

  def save(self, path):
    self._stream.save(path)

  def restore(self, path):
    self._stream.restore(path)


def tiny_fine_tuning(tmp_path, steps_per_epoch):
  """`run(workdir, stream)`: 2 epochs of fine-tuning a 1-block student saved in tmp_path/pretrain, batches of 16."""
  save_pretraining_checkpoints(tmp_path / "pretrain", steps=(5,), config=tiny_student_config(depth=1))
  mesh = sharding.make_mesh(data=8, fsdp=1)
  config = finetune_demo.get_config()
  config.pretrained.update(workdir=str(tmp_path / "pretrain"), step=5)
  config.update(num_classes=NUM_CLASSES, num_train_examples=16 * steps_per_epoch, batch_size=16,
                eval_batch_size=64, epochs=2, warmup_epochs=0, log_every=1)
  config.mix.prob = 0.0

  def run(workdir, stream):
    return finetune.train_and_evaluate(
        config, str(workdir), student_fn=lambda: students.restore_student(config.pretrained, mesh),
        train_data_fn=lambda size, start_step=0: stream,
        eval_data_fn=lambda size: tinted_eval_batches(64, config.eval_batch_size), mesh=mesh)

  return run
