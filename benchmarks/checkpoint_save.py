"""Checkpoint save: bytes and seconds, i.e. what a preemption's grace period must cover (docs/RELIABILITY.md).

Saves the pretraining state of the ViT-B/16 and ViT-L/16 recipes (student parameters, AdamW state, step, metadata)
through the run's own `Checkpointer` (Orbax, the items and options train.py uses, asynchronous saves) into a local
directory. The state is randomly initialised on the CPU and the optimizer state filled with random values, as after
training (a fresh AdamW state is zeros, which Orbax's compression would shrink to almost nothing); the teacher is
never built (it is not in a checkpoint).
For each save it prints the bytes written and two times: `blocking` (until `save` returns: the arrays are copied off
the devices, then the loop could go on) and `total` (until the step is written and committed, what a preempted
process must wait for before it exits). The input-iterator state is timed on the tiny Fashion-MNIST pipeline
(configs/test_tiny.py); a TFDS ImageNet state also holds its shuffle buffer of encoded examples, see
input_pipeline/pipeline.py.

  python benchmarks/checkpoint_save.py [--configs=dtm_vit_b16_in1k,dtm_vit_l16_in1k] [--dir=/tmp/dtm_ckpt_bench]
      [--repeats=2]
Recorded in docs/RELIABILITY.md ("How long a save takes").
"""
import importlib
import os
import platform
import shutil
import sys
import time

if not __package__:
  # Run as a file, this script's folder would come first on sys.path and its name would hide the `input_pipeline`
  # package: look from the repository root instead.
  sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
from absl import app, flags

from dtm_jax import sharding
from dtm_jax.modes import pretrain as train
from dtm_jax.runtime import checkpoint as checkpoint_lib

_CONFIGS = flags.DEFINE_list("configs", ["dtm_vit_b16_in1k", "dtm_vit_l16_in1k"], "Pretraining configs (configs/).")
_DIR = flags.DEFINE_string("dir", "/tmp/dtm_ckpt_bench", "Local directory to save into (emptied first).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Saves per config (the first includes Orbax's one-time set-up).")


def directory_bytes(path) -> int:
  return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def filled_with_random_values(tree, seed: int = 0):
  """Every floating-point leaf replaced by random values: they compress as little as trained moments do."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([jax.random.normal(key, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                            else x for key, x in zip(keys, leaves)])


def time_model_saves(config_name: str, directory: str, repeats: int) -> None:
  config = importlib.import_module(f"configs.{config_name}").get_config()
  mesh = sharding.make_mesh(data=1, fsdp=1, devices=jax.devices()[:1])
  program = train.build_program(config, mesh, abstract_target=True)  # the teacher: shapes only, nothing built
  start = time.perf_counter()
  state = jax.jit(program.init_state, out_shardings=program.state_shardings)()
  state = jax.block_until_ready({**state, "opt_state": filled_with_random_values(state["opt_state"])})
  print(f"{config_name}: state initialised in {time.perf_counter() - start:.1f} s", flush=True)
  array_bytes = {k: sum(x.nbytes for x in jax.tree.leaves(v)) for k, v in state.items()}
  metadata = {"config": config.to_dict(), "config_hash": checkpoint_lib.config_hash(config.to_dict()),
              "model_config": checkpoint_lib.model_config_to_json(program.model_config), "process_count": 1}
  checkpointer = checkpoint_lib.Checkpointer(directory, max_to_keep=1)
  try:
    for step in range(1, repeats + 1):
      start = time.perf_counter()
      checkpointer.save_state(step, state, data_iterator=None, metadata={**metadata, "step": step})
      blocking = time.perf_counter() - start
      checkpointer.wait()
      total = time.perf_counter() - start
      written = directory_bytes(os.path.join(directory, "checkpoints", str(step)))
      print(f"{config_name} save {step}: params {array_bytes['params'] / 1e6:.0f} MB, opt_state "
            f"{array_bytes['opt_state'] / 1e6:.0f} MB in memory; {written / 1e6:.0f} MB written; blocking "
            f"{blocking:.2f} s, total {total:.2f} s ({written / 1e6 / total:.0f} MB/s)", flush=True)
  finally:
    checkpointer.close()


def time_iterator_save(directory: str) -> None:
  """The tiny Fashion-MNIST pretraining pipeline's state, after a few batches."""
  config = importlib.import_module("configs.test_tiny").get_config("source=fashion_mnist")
  data = train.build_pretrain_data(config, train.student_config(config))
  for _ in range(3):
    next(data)
  path = os.path.join(directory, "data_iterator")
  start = time.perf_counter()
  data.save(path)
  seconds = time.perf_counter() - start
  print(f"input iterator (test_tiny, fashion_mnist): {directory_bytes(path) / 1e3:.1f} KB in {seconds:.3f} s",
        flush=True)


def main(argv):
  del argv
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{_cpu_model()}; jax {jax.__version__}; directory {_DIR.value}", flush=True)
  for name in _CONFIGS.value:
    directory = os.path.join(_DIR.value, name)
    shutil.rmtree(directory, ignore_errors=True)
    time_model_saves(name, directory, _REPEATS.value)
    shutil.rmtree(directory, ignore_errors=True)  # the next config's state needs the disk and the memory
  time_iterator_save(os.path.join(_DIR.value, "iterator"))
  shutil.rmtree(_DIR.value, ignore_errors=True)


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")
  except OSError:
    return "unknown CPU"


if __name__ == "__main__":
  app.run(main)
