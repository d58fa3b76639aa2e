"""Input pipeline throughput: pretraining images/s per CPU core on ImageNet-like JPEGs.

Writes `--num_images` random smooth 500x375 JPEGs (ImageNet's typical size and quality)
to a temporary image folder and runs the full pretraining pipeline on it: read ->
decode inside the crop window -> bicubic resize to 224 -> flip -> colour jitter ->
normalise -> BEiT mask -> batch. It is timed with a private tf.data pool of 1 and of 2
threads, with antialiased resizing (the default, as PIL) and without. Two figures per run:
  wall:  images/s on the clock, divided by the threads (meaningless if the cores are busy);
  cpu:   images per CPU-second that the process used, all threads counted: the per-core
         rate, which holds on a machine shared with other work.
Also times the mask generator alone (masks/s on one core, batches of 256, 14x14 grid).

Then the colour-jitter order: ours (after the crop) and the released one (`input.jitter_before_crop`), timed
ours / released / ours on one thread. Then the evaluation crop (shorter side to 256, centre 224): ours
(`transforms.center_crop`, the exact sub-pixel window) beside the whole-pixel window of the code before 2026-12-07,
timed ours / whole-pixel / ours on one thread (decode + crop + resize + uint8 per image).

  python benchmarks/input_pipeline.py [--num_images=384] [--seconds=20] [--threads=1 ...]
Recorded in docs/BENCHMARKS.md ("Input pipeline").
"""
import os
import sys
import tempfile
import time

if not __package__:
  # Run as a file, this script's folder would come first on sys.path and its name would hide
  # the `input_pipeline` package: look from the repository root instead.
  sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
from absl import app, flags
from PIL import Image

import input_pipeline
import tensorflow as tf
from input_pipeline import masking, transforms

_NUM_IMAGES = flags.DEFINE_integer("num_images", 384, "JPEGs to generate.")
_SECONDS = flags.DEFINE_float("seconds", 20.0, "Timed seconds per setting.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size (one process).")
_THREADS = flags.DEFINE_multi_integer("threads", [1, 2], "tf.data pool sizes to time.")


def write_jpegs(root, num_images, num_classes=8, seed=0):
  """ImageNet-like files: 500x375 smooth random colour images, JPEG quality 90."""
  rng = np.random.default_rng(seed)
  for i in range(num_images):
    folder = os.path.join(root, "train", f"class_{i % num_classes}")
    os.makedirs(folder, exist_ok=True)
    coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((500, 375), Image.BICUBIC)
    image.save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def time_pipeline(root, threads, antialias, seconds, batch_size, jitter_before_crop=False):
  """Returns (images per wall-second, images per process CPU-second) after a warm-up."""
  cfg = input_pipeline.default_config()
  cfg.source, cfg.data_dir = "folder", root
  cfg.threadpool_size = threads
  cfg.resize_antialias = antialias
  cfg.jitter_before_crop = jitter_before_crop
  it = input_pipeline.build_pretrain(cfg, image_size=224, patch_size=16,
                                     global_batch_size=batch_size, seed=0, process_index=0,
                                     process_count=1)
  for _ in range(5):   # Warm-up: tracing, file cache, autotuning.
    next(it)
  images, wall, cpu = 0, time.perf_counter(), time.process_time()
  while time.perf_counter() - wall < seconds:
    images += len(next(it)["image"])
  return images / (time.perf_counter() - wall), images / (time.process_time() - cpu)


def _whole_pixel_eval_crop(image, size=224, crop_pct=0.875):
  """The evaluation crop before 2026-12-07 (for comparison only): a whole-pixel window, then a resize."""
  def window(height, width):
    short = tf.cast(tf.minimum(height, width), tf.float32)
    side = tf.round(short * size / (size // crop_pct))
    top = tf.round((tf.cast(height, tf.float32) - side) / 2)
    left = tf.round((tf.cast(width, tf.float32) - side) / 2)
    return tf.cast(tf.stack([top, left, side, side]), tf.int32)
  return transforms.resize(transforms.decode_and_crop(image, window), size, antialias=True)


def time_eval_crop(root, crop, seconds, batch_size):
  """Images per process CPU-second of `crop(jpeg bytes)` + uint8, one tf.data thread."""
  files = tf.data.Dataset.list_files(os.path.join(root, "train", "*", "*.jpg"), shuffle=False).cache().repeat()
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  data = files.map(tf.io.read_file).map(lambda image: transforms.to_uint8(crop(image)))
  it = iter(data.batch(batch_size).with_options(options).as_numpy_iterator())
  for _ in range(3):
    next(it)
  images, start = 0, time.process_time()
  while time.process_time() - start < seconds:
    images += len(next(it))
  return images / (time.process_time() - start)


def time_masks(seconds=3.0):
  rng = np.random.default_rng(0)
  made, start = 0, time.process_time()
  while time.process_time() - start < seconds:
    masking.block_masks(rng, 256, (14, 14), 75)
    made += 256
  return made / (time.process_time() - start)


def main(argv):
  del argv
  print(f"CPU cores visible: {os.cpu_count()}; load average {os.getloadavg()[0]:.1f}")
  with tempfile.TemporaryDirectory() as root:
    write_jpegs(root, _NUM_IMAGES.value)
    print("| resize antialias | threads | images/s (wall) | wall images/s/core | "
          "cpu images/s/core |")
    print("|---|---|---|---|---|")
    for antialias in (True, False):
      for threads in _THREADS.value:
        wall, cpu = time_pipeline(root, threads, antialias, _SECONDS.value, _BATCH.value)
        print(f"| {antialias} | {threads} | {wall:.0f} | {wall / threads:.0f} | {cpu:.0f} |",
              flush=True)
    # The released order (jitter and flip the whole image, then crop) beside ours, one thread, side by side.
    print("\n| colour jitter | cpu images/s/core |\n|---|---|")
    for before in (False, True, False):
      _, cpu = time_pipeline(root, 1, True, _SECONDS.value, _BATCH.value, jitter_before_crop=before)
      print(f"| {'before the crop (released order)' if before else 'after the crop (ours)'} | {cpu:.0f} |",
            flush=True)
    print("\n| evaluation crop | cpu images/s/core |\n|---|---|")
    exact = lambda image: transforms.center_crop(image, 224, 0.875, antialias=True)
    for name, crop in (("exact (ours)", exact), ("whole-pixel window", _whole_pixel_eval_crop),
                       ("exact (ours)", exact)):
      print(f"| {name} | {time_eval_crop(root, crop, _SECONDS.value, _BATCH.value):.0f} |", flush=True)
  print(f"Mask generator: {time_masks():.0f} masks/s on one core (14x14 grid, 75 masked).")


if __name__ == "__main__":
  app.run(main)
