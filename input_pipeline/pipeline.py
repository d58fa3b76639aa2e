"""Per-host tf.data pipelines for pretraining, fine-tuning and evaluation.

Training streams (`build_pretrain`, `build_finetune_train`):
  source keys (sharded per host, shuffled, repeated)
  -> enumerate (stream position p)
  -> parallel map: load, decode inside the crop window, augment with seeds from (seed, host, p)
  -> [folder sources: drop unreadable files, count them from the gaps in p]
  -> batch(global_batch / process_count)
  -> [pretraining: BEiT masks from (seed, host, batch number)]
  -> prefetch.
Every random choice is a pure function of those seeds, so with a given seed the stream is
the same on every run, however many threads decode it.

Resume state (`DataIterator.save`). Folder and IDX sources shuffle by a per-epoch
permutation that is recomputed, not stored; TFDS keeps a bounded shuffle buffer of encoded
examples. TFDS and IDX pipelines use tf.data's *symbolic* checkpoints, which store only
positions plus that shuffle buffer: ~shuffle_buffer x 110 KB on ImageNet (1.1 GB at the
default 10,000) and a few KB for IDX files. Folder pipelines must skip corrupt files with
`ignore_errors`, which symbolic checkpoints do not support, so they store the buffered
elements too: about (prefetch + 2) batches of images (144 MB was measured for float32 batches
of 64 at 224 px with prefetch 2; the uint8 batches every pipeline now sends hold a quarter of
that, ~150 MB for 256 per host). For long runs on big folders,
preparing them as a TFDS dataset keeps the state small.
"""
import functools
import math

import jax
import numpy as np
import tensorflow as tf

# JAX owns the accelerators: keep TensorFlow's runtime from claiming any GPU memory.
if tf.config.list_physical_devices("GPU"):
  tf.config.set_visible_devices([], "GPU")

# pylint: disable=g-import-not-at-top,wrong-import-position
from input_pipeline import iterators
from input_pipeline import masking
from input_pipeline import randaugment
from input_pipeline import sources
from input_pipeline import transforms


def build_pretrain(input_cfg, *, image_size, patch_size, global_batch_size, seed,
                   process_index=None, process_count=None, start_step=0):
  """Endless masked pretraining batches of this host: {"image", "mask"} (+ "label").

  image: uint8 [b, image_size, image_size, 3] (normalised on the device: dtm_jax.images); mask: bool [b, N],
  True = masked, exactly `input_cfg.num_masking_patches` per row; b = global_batch_size / process_count.
  start_step: begin at that global batch without reading the ones before (resuming where no iterator state fits,
  e.g. on another process count): exact for Fashion-MNIST and folders without unreadable files, a fresh shuffle for
  TFDS; the iterator's `start_note` says what it repeats or skips.
  """
  process_index, process_count = _process(process_index, process_count)
  local_batch = _local_batch_size(global_batch_size, process_count)
  grid = _patch_grid(image_size, patch_size)
  mask_params = dict(grid=grid, num_masking_patches=input_cfg.num_masking_patches,
                     min_num_patches=input_cfg.min_num_patches,
                     min_aspect=input_cfg.min_mask_aspect)
  masking.check_mask_params(**mask_params)

  jitter_first = bool(input_cfg.get("jitter_before_crop", False))
  pixels = _pretrain_pixels(bool(input_cfg.flip), float(input_cfg.color_jitter), fused=not jitter_first)

  def view(image, rng):
    crop_rng, pixel_rng = transforms.split_rng(rng, 2)
    window = functools.partial(transforms.random_resized_crop_window, crop_rng, scale_min=input_cfg.crop_scale_min)
    if jitter_first:  # the released order: the whole image is jittered and flipped, then cropped
      whole = transforms.decode_and_crop(image, transforms.whole_image_window)
      image = pixels(tf.cast(whole, tf.float32), pixel_rng)
      image = transforms.resize(transforms.decode_and_crop(image, window), image_size, input_cfg.resize_antialias)
      return _uint8_pixels()(image)
    image = transforms.resize(transforms.decode_and_crop(image, window), image_size, input_cfg.resize_antialias)
    return pixels(image, pixel_rng)

  source = sources.get_source(input_cfg)
  batches, examples = _training_batches(input_cfg, source, view, local_batch=local_batch, seed=seed,
                                        process_index=process_index, process_count=process_count,
                                        start_position=start_step * local_batch)

  def draw_masks(batch_number):
    rng = np.random.default_rng([seed, process_index, int(batch_number)])
    return masking.block_masks(rng, local_batch, **mask_params)

  @_no_autograph
  def add_masks(batch_number, batch):
    masks = tf.numpy_function(draw_masks, [batch_number], tf.bool, stateful=False)
    masks.set_shape([local_batch, grid[0] * grid[1]])
    return {**batch, "mask": masks}

  batches = batches.enumerate(start=start_step).map(add_masks, num_parallel_calls=input_cfg.num_parallel_calls)
  return _finish_training(input_cfg, source, batches, examples)


def build_finetune_train(input_cfg, *, image_size, global_batch_size, seed, augment=True,
                         process_index=None, process_count=None, start_step=0):
  """Endless labelled batches of this host for fine-tuning: {"image", "label"}.

  augment=True: RandomResizedCrop, flip, RandAugment and random erasing (BEiT v2's recipe).
  augment=False: the evaluation crop (for linear probes), still shuffled and endless.
  start_step: begin at that global batch (a resume on another process count; see build_pretrain).
  image: uint8 (normalised on the device: dtm_jax.images). With random erasing, "erase_box" int32 [4] (top, left,
  height, width; height 0 = none): the device fills it with normalised noise, which no 8-bit image holds.
  """
  process_index, process_count = _process(process_index, process_count)
  local_batch = _local_batch_size(global_batch_size, process_count)
  fill = tuple(round(255 * m) for m in input_cfg.mean)
  eval_view = _eval_view(input_cfg, image_size)
  pixels = _uint8_pixels()
  erase_prob = float(input_cfg.random_erase_prob)

  def view(image, rng):
    if not augment:
      return eval_view(image)
    crop_rng, flip_rng, augment_rng, erase_rng = transforms.split_rng(rng, 4)
    image = transforms.decode_and_crop(image, functools.partial(
        transforms.random_resized_crop_window, crop_rng,
        scale_min=input_cfg.finetune_crop_scale_min))
    image = transforms.resize(image, image_size, input_cfg.resize_antialias)
    if input_cfg.flip:
      image = transforms.random_flip(image, flip_rng)
    image = randaugment.rand_augment(
        image, augment_rng, num_layers=input_cfg.randaug_num_layers,
        magnitude=input_cfg.randaug_magnitude, magnitude_std=input_cfg.randaug_magnitude_std,
        fill=fill)
    out = {"image": pixels(image)}
    if erase_prob:
      out["erase_box"] = transforms.random_erase_box(erase_rng, image_size, image_size, erase_prob)
    return out

  source = sources.get_source(input_cfg)
  _require_labels(source, input_cfg, "fine-tuning")
  batches, examples = _training_batches(input_cfg, source, view, local_batch=local_batch, seed=seed,
                                        process_index=process_index, process_count=process_count,
                                        start_position=start_step * local_batch)
  return _finish_training(input_cfg, source, batches, examples)


def build_eval(input_cfg, *, split=None, image_size, global_batch_size, process_index=None,
               process_count=None):
  """One pass over `split` (default: input_cfg.eval_split) per iteration; see EvalData.

  Images (uint8, normalised on the device: dtm_jax.images) get the evaluation crop (shorter side
  to image_size / crop_pct, centre crop). Each
  host reads its own examples in order and pads its last batches with valid=False so that
  all hosts run `num_batches` steps.
  """
  split = split or input_cfg.eval_split
  process_index, process_count = _process(process_index, process_count)
  local_batch = _local_batch_size(global_batch_size, process_count)
  source = sources.get_source(input_cfg)
  _require_labels(source, input_cfg, "evaluation")
  examples, counts = source.evaluation(split, process_index=process_index,
                                       process_count=process_count)
  view = _eval_view(input_cfg, image_size)

  @_no_autograph
  def prepare(key):
    example = examples.load(key)
    return {"image": view(example["image"]),
            "label": tf.cast(example["label"], tf.int32), "valid": tf.constant(True)}

  padding = {"image": tf.zeros([image_size, image_size, 3], tf.uint8), "label": tf.constant(0),
             "valid": tf.constant(False)}
  data, sizes = _eval_batches(input_cfg, source, examples, counts, prepare, padding, local_batch)
  return iterators.EvalData(data, **sizes)


def _eval_batches(input_cfg, source, examples, counts, prepare, padding, local_batch):
  """Batches of prepare(key) over this host's examples, then of `padding` up to the largest host's batch count.

  Returns the dataset and EvalData's size arguments.
  """
  data = examples.keys.map(prepare, num_parallel_calls=input_cfg.num_parallel_calls,
                           deterministic=True)
  if source.skips_corrupt:
    data = data.ignore_errors()
  num_batches = math.ceil(counts.largest_host / local_batch)
  data = data.concatenate(tf.data.Dataset.from_tensors(padding).repeat())
  data = data.take(num_batches * local_batch).batch(local_batch, drop_remainder=True)
  data = data.prefetch(input_cfg.prefetch).with_options(_options(input_cfg, symbolic=False))
  return data, dict(num_examples=counts.total, num_batches=num_batches, local_examples=counts.local)


def _no_autograph(fn):
  """The views are plain TF ops; skipping AutoGraph's rewrite saves seconds per build."""
  return tf.autograph.experimental.do_not_convert(fn)


def _eval_view(input_cfg, image_size):
  """image -> the uint8 evaluation crop (shorter side to size / crop_pct, centre crop), normalised on the device."""
  pixels = _uint8_pixels()

  def view(image):
    return pixels(transforms.center_crop(image, image_size, input_cfg.crop_pct, input_cfg.resize_antialias))
  return view


# --- Per-pixel stages on resized [size, size, 3] images in [0, 255]. They run under XLA,
# which fuses them into one pass: TF's CPU kernels take a memory pass per op and broadcast
# over the 3 channels slowly (flip + colour jitter + normalisation of a 224 px image cost
# ~5x more CPU time without it). XLA compiles each stage once per setting and image size in
# a process (a few seconds); the caches below let every pipeline of a process share that.

def _fused(fn):
  return tf.function(fn, jit_compile=True, autograph=False)


@functools.lru_cache(maxsize=None)
def _pretrain_pixels(flip, color_jitter, fused=True):
  """Random flip, colour jitter, rounded to uint8 as PIL-based pipelines (the released code's) do. fused=False for
  whole images, whose many sizes would each compile a fused program."""
  def pixels(image, rng):
    flip_rng, jitter_rng = transforms.split_rng(rng, 2)
    image = image / 255.0
    if flip:
      image = transforms.random_flip(image, flip_rng)
    if color_jitter:
      image = transforms.color_jitter(image, jitter_rng, color_jitter)
    return transforms.to_uint8(image * 255.0)
  return _fused(pixels) if fused else tf.function(pixels, autograph=False)


@functools.lru_cache(maxsize=None)
def _uint8_pixels():
  """Rounded to uint8: fine-tuning and evaluation images are normalised (and erased) on the device."""
  return _fused(transforms.to_uint8)


def _training_batches(input_cfg, source, view, *, local_batch, seed, process_index,
                      process_count, start_position=0, example_view=False):
  """Endless batches of {"image": view(image, rng), "label"} (+ the skip count), and the source's Examples; a view
  may return a dict of several outputs, "image" among them. example_view=True: view(example, rng) sees the whole
  example (segmentation crops image and label map together) and its outputs are the batch's.

  start_position: the first stream position (augmentation seeds continue from it); see build_pretrain's start_step.
  """
  if not 0 <= seed < 2**63:
    raise ValueError(f"seed={seed} must be a non-negative 64-bit integer.")
  examples = source.train(input_cfg.train_split, seed=seed, process_index=process_index,
                          process_count=process_count, min_examples=local_batch, start_position=start_position)
  host_rng = tf.constant([seed, process_index], tf.int64)

  @_no_autograph
  def prepare(position, key):
    example = examples.load(key)
    rng = tf.random.experimental.stateless_fold_in(host_rng, position)
    if example_view:
      return position, view(example, rng)
    viewed = view(example["image"], rng)
    out = dict(viewed) if isinstance(viewed, dict) else {"image": viewed}
    if "label" in example:
      out["label"] = tf.cast(example["label"], tf.int32)
    return position, out

  data = examples.keys.enumerate(start=start_position).map(prepare, num_parallel_calls=input_cfg.num_parallel_calls,
                                       deterministic=True)
  if source.skips_corrupt:
    # Unreadable files vanish here; the gaps they leave in the first epoch's positions count them (every epoch
    # visits the same files, so later epochs would only count them again) and say which they were.
    epoch_size = examples.epoch_size if examples.epoch_size is not None else np.iinfo(np.int64).max
    first = tf.fill([iterators.NAMED_SKIPS], tf.constant(-1, tf.int64))
    data = data.ignore_errors().scan((tf.constant(start_position - 1, tf.int64), tf.constant(0, tf.int64), first),
                                     functools.partial(_count_skipped, tf.constant(epoch_size, tf.int64)))
  else:
    data = data.map(lambda position, out: out)
  return data.batch(local_batch, drop_remainder=True), examples


def _count_skipped(epoch_size, state, element):
  """Counts the distinct unreadable files (gaps in the first epoch's positions); keeps the first few positions."""
  last_position, skipped, first = state
  position, out = element
  start = last_position + 1
  gap = tf.range(start, tf.maximum(tf.minimum(position, epoch_size), start), dtype=tf.int64)
  skipped += tf.size(gap, out_type=tf.int64)
  known = tf.boolean_mask(first, first >= 0)
  first = tf.reshape(tf.concat([known, gap, tf.fill([iterators.NAMED_SKIPS], tf.constant(-1, tf.int64))], 0)
                     [:iterators.NAMED_SKIPS], [iterators.NAMED_SKIPS])
  return (position, skipped, first), {**out, iterators.SKIPPED_KEY: skipped, iterators.SKIPPED_POSITIONS_KEY: first}


def _finish_training(input_cfg, source, batches, examples):
  batches = batches.prefetch(input_cfg.prefetch)
  # ignore_errors has no symbolic checkpoint; everything else does (see module docstring).
  options = _options(input_cfg, symbolic=not source.skips_corrupt)
  return iterators.DataIterator(batches.with_options(options), name_skipped=examples.name,
                                start_note=examples.start_note)


def _options(input_cfg, *, symbolic):
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_symbolic_checkpoint = symbolic
  options.threading.max_intra_op_parallelism = 1
  if input_cfg.threadpool_size:
    options.threading.private_threadpool_size = input_cfg.threadpool_size
  return options


def _require_labels(source, input_cfg, purpose):
  if not source.has_labels:
    raise ValueError(f"{purpose.capitalize()} needs labels, and input.dataset="
                     f"{input_cfg.dataset!r} has none.")


def _process(process_index, process_count):
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, {process_count}).")
  return process_index, process_count


def _local_batch_size(global_batch_size, process_count):
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                     f"the {process_count} processes.")
  return global_batch_size // process_count


def _patch_grid(image_size, patch_size):
  if image_size % patch_size:
    raise ValueError(f"image_size={image_size} is not a multiple of patch_size={patch_size}.")
  return image_size // patch_size, image_size // patch_size
