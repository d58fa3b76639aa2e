"""Every field of every mode's config checked before anything is created or compiled; all problems listed at once.

`problems(mode, config, num_devices=None)` returns one line per problem, each naming the field as
`config.<path>=<value>` and what it must be; `validate(...)` raises `errors.ConfigError` with all of them.
`num_devices` is the device count the run will have (None: `jax.device_count()`), so `--mode=compile` can check a
config against a TPU slice it is not running on. Every global batch size (training, evaluation, the in-training kNN,
the probe and fine-tuning) must split evenly over the devices.

`parse_flags` is main.py's absl flags parser: an unknown `--config.<field>` becomes "Invalid config: unknown field ..."
instead of ml_collections' bare `AttributeError`.
"""
from __future__ import annotations

import math
import sys
from typing import Callable, Sequence

from dtm_jax import errors

MODES = ("pretrain", "finetune", "linear_probe", "knn", "segment", "compare")
_MISSING = object()
DTYPES = ("float32", "bfloat16", "float16")
POOLINGS = ("mean", "cls")
SOURCES = ("tfds", "folder", "fashion_mnist")
SEGMENT_SOURCES = ("tfds", "ade20k_folder", "fashion_mnist_segmentation")


class _Checker:
  """Collects problems of one config; each check names the field and the rule it breaks."""

  def __init__(self, config):
    self.config = config
    self.problems: list[str] = []

  def get(self, path: str):
    node = self.config
    for key in path.split("."):
      try:
        if key not in node:
          return _MISSING
        node = node[key]
      except TypeError:
        return _MISSING
    return node

  def add(self, path: str, value, rule: str) -> None:
    self.problems.append(f"config.{path}={value!r} {rule}")

  def _value(self, path, optional):
    value = self.get(path)
    if value is _MISSING:
      if not optional:
        self.problems.append(f"config.{path} is missing; add it (see the shipped configs for its meaning).")
      return _MISSING
    if value is None and optional:
      return _MISSING
    return value

  def integer(self, path: str, minimum: int | None = None, maximum: int | None = None, *, optional: bool = False,
              also: Sequence[int] = ()) -> int | None:
    """An int in [minimum, maximum] (or one of `also`)."""
    value = self._value(path, optional)
    if value is _MISSING:
      return None
    if isinstance(value, bool) or not isinstance(value, int):
      self.add(path, value, "must be an integer.")
      return None
    if value in also:
      return value
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
      self.add(path, value, "must be " + _range_words(minimum, maximum, also) + ".")
      return None
    return value

  def number(self, path: str, minimum: float | None = None, maximum: float | None = None, *,
             min_open: bool = False, max_open: bool = False, optional: bool = False) -> float | None:
    """A finite real number in the range (open ends where asked)."""
    value = self._value(path, optional)
    if value is _MISSING:
      return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      self.add(path, value, "must be a finite number.")
      return None
    low_bad = minimum is not None and (value <= minimum if min_open else value < minimum)
    high_bad = maximum is not None and (value >= maximum if max_open else value > maximum)
    if low_bad or high_bad:
      if maximum is None:
        words = f"{'>' if min_open else '≥'} {minimum:g}"
      elif minimum is None:
        words = f"{'<' if max_open else '≤'} {maximum:g}"
      else:
        words = f"in {'(' if min_open else '['}{minimum:g}, {maximum:g}{')' if max_open else ']'}"
      self.add(path, value, f"must be {words}.")
      return None
    return float(value)

  def boolean(self, path: str, *, optional: bool = False) -> bool | None:
    value = self._value(path, optional)
    if value is _MISSING:
      return None
    if not isinstance(value, bool):
      self.add(path, value, "must be True or False.")
      return None
    return value

  def string(self, path: str, choices: Sequence[str] | None = None, *, optional: bool = False,
             nonempty: bool = False) -> str | None:
    value = self._value(path, optional)
    if value is _MISSING:
      return None
    if not isinstance(value, str):
      self.add(path, value, "must be a string" + (f", one of {tuple(choices)}." if choices else "."))
      return None
    if choices is not None and value not in choices:
      self.add(path, value, f"is unknown; choose one of {tuple(choices)}.")
      return None
    if nonempty and not value:
      self.add(path, value, "must not be empty.")
      return None
    return value

  def numbers(self, path: str, length: int, *, positive: bool = False) -> None:
    value = self._value(path, False)
    if value is _MISSING:
      return
    ok = (isinstance(value, (list, tuple)) and len(value) == length and
          all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 or not positive)
              for v in value))
    if not ok:
      self.add(path, value, f"must be {length} {'positive ' if positive else ''}numbers.")

  def batch(self, path: str, num_devices: int, *, per: int = 1, per_name: str = "") -> int | None:
    """A positive global batch size that splits evenly over the devices (× `per`, e.g. accumulation steps)."""
    value = self.integer(path, 1)
    if value is None:
      return None
    if value % (num_devices * per):
      if per_name:
        self.add(path, value, f"must be divisible by devices ({num_devices}) × {per_name} ({per}) = "
                              f"{num_devices * per}.")
      else:
        self.add(path, value, f"must be divisible by the {num_devices} devices (each device takes an equal share); "
                              f"e.g. {_next_multiple(value, num_devices)}.")
      return None
    return value


def _next_multiple(value: int, n: int) -> int:
  return max(n, -(-value // n) * n)


def _range_words(minimum, maximum, also) -> str:
  if minimum is not None and maximum is None:
    words = "a positive integer" if minimum == 1 else f"an integer ≥ {minimum}"
  elif minimum is None and maximum is not None:
    words = f"an integer ≤ {maximum}"
  else:
    words = f"an integer in [{minimum}, {maximum}]"
  if also:
    words += " (or " + " or ".join(map(str, also)) + ")"
  return words


# ---------------------------------------------------------------------------------------------------------------------
# Blocks shared by the modes.
# ---------------------------------------------------------------------------------------------------------------------
def _mesh(c: _Checker, num_devices: int) -> None:
  data = c.integer("mesh.data", 1, also=(-1,))
  fsdp = c.integer("mesh.fsdp", 1, also=(-1,))
  c.integer("mesh.min_fsdp_size", 0)
  if data is None or fsdp is None:
    return
  if data == -1 and fsdp == -1:
    c.add("mesh.fsdp", fsdp, "and mesh.data=-1: at most one of them may be -1.")
  elif data == -1 and num_devices % fsdp:
    c.add("mesh.fsdp", fsdp, f"must divide the {num_devices} devices.")
  elif fsdp == -1 and num_devices % data:
    c.add("mesh.data", data, f"must divide the {num_devices} devices.")
  elif -1 not in (data, fsdp) and data * fsdp != num_devices:
    c.add("mesh.data", data, f"× mesh.fsdp={fsdp} must equal the {num_devices} devices; set mesh.data=-1 to use all "
                             "devices for data parallelism.")


def _input(c: _Checker, *, pretraining: bool) -> None:
  c.string("input.source", SOURCES + (("synthetic",) if pretraining else ()))
  c.string("input.dataset", optional=True)
  c.string("input.data_dir", optional=True)
  c.string("input.train_split", nonempty=True)
  c.string("input.eval_split", nonempty=True)
  c.integer("input.shuffle_buffer", 1)
  c.number("input.crop_scale_min", 0.0, 1.0, min_open=True)
  c.boolean("input.flip")
  c.number("input.color_jitter", 0.0)
  c.numbers("input.mean", 3)
  c.numbers("input.std", 3, positive=True)
  c.boolean("input.resize_antialias")
  c.integer("input.num_masking_patches", 1)
  c.integer("input.min_num_patches", 1)
  c.number("input.min_mask_aspect", 0.0, 1.0, min_open=True)
  c.number("input.crop_pct", 0.0, 1.0, min_open=True)
  c.number("input.finetune_crop_scale_min", 0.0, 1.0, min_open=True)
  c.integer("input.randaug_num_layers", 0)
  c.number("input.randaug_magnitude", 0.0)
  c.number("input.randaug_magnitude_std", 0.0)
  c.number("input.random_erase_prob", 0.0, 1.0)
  c.integer("input.num_parallel_calls", 1, also=(-1,))
  c.integer("input.prefetch", 0)
  c.integer("input.threadpool_size", 0)


def _optim(c: _Checker, prefix: str = "optim") -> None:
  c.number(f"{prefix}.base_lr", 0.0, min_open=True)
  c.string(f"{prefix}.lr_scaling", ("sqrt", "linear", "none"))
  c.integer(f"{prefix}.lr_reference_batch", 1)
  c.number(f"{prefix}.min_lr", 0.0)
  c.number(f"{prefix}.b1", 0.0, 1.0, max_open=True)
  c.number(f"{prefix}.b2", 0.0, 1.0, max_open=True)
  c.number(f"{prefix}.eps", 0.0, min_open=True)
  c.number(f"{prefix}.weight_decay", 0.0)
  c.number(f"{prefix}.grad_clip", 0.0)
  c.number(f"{prefix}.layer_decay", 0.0, 1.0, min_open=True)
  from dtm_jax import optim  # pylint: disable=g-import-not-at-top
  c.string(f"{prefix}.schedule", optim.SCHEDULES, optional=True)
  c.number(f"{prefix}.poly_power", 0.0, min_open=True, optional=True)


def _model_overrides(c: _Checker) -> None:
  """The optional ViTConfig overrides of the evaluation modes (and pretraining's extra model fields)."""
  model = c.get("model")
  if model is _MISSING:
    return
  for key in model:
    path = f"model.{key}"
    if key == "dtype":
      c.string(path, DTYPES)
    elif key == "drop_path_rate":
      c.number(path, 0.0, 1.0, max_open=True)
    elif key in ("width", "depth", "num_heads", "mlp_dim", "image_size", "patch_size", "out_dim", "in_channels"):
      c.integer(path, 1)
    elif key in ("layer_scale_init",):
      c.number(path, 0.0)
    elif key in ("abs_pos_emb", "block_rel_pos_bias", "shared_rel_pos_bias"):
      c.boolean(path)
    elif key == "attention_impl":
      c.string(path, optional=True)
    elif key == "remat":
      c.string(path, ("none", "dots", "full"))


def _pretrained(c: _Checker, check_paths: bool = True) -> None:
  workdir = c.string("pretrained.workdir")
  if workdir == "" and check_paths:
    c.add("pretrained.workdir", workdir, "is empty; set it to the workdir of a pretraining run (or one of its step "
                                         "directories, or a converted checkpoint).")
  c.integer("pretrained.step", 0, optional=True)


def _run_basics(c: _Checker) -> None:
  seed = c.integer("seed", 0)
  if seed is not None and seed >= 2 ** 63:
    c.add("seed", seed, "must be below 2**63.")
  c.number("progress_every_secs", 0.0, min_open=True, optional=True)
  c.number("metrics_flush_secs", 0.0, optional=True)


# ---------------------------------------------------------------------------------------------------------------------
# The modes.
# ---------------------------------------------------------------------------------------------------------------------
def _pretrain(c: _Checker, num_devices: int, check_paths: bool = True) -> None:
  from dtm_jax import targets  # pylint: disable=g-import-not-at-top
  from dtm_jax.models import vit  # pylint: disable=g-import-not-at-top
  _run_basics(c)
  variant = c.string("model.variant")
  if variant is not None and variant not in vit.VARIANTS:
    c.add("model.variant", variant, f"is unknown; choose one of {sorted(vit.VARIANTS)}.")
  image_size = c.integer("model.image_size", 1)
  patch_size = c.integer("model.patch_size", 1)
  _model_overrides(c)
  c.string("model.dtype", DTYPES)
  c.number("model.drop_path_rate", 0.0, 1.0, max_open=True)
  c.integer("model.out_dim", 1)
  tokens = None
  if image_size and patch_size:
    if image_size % patch_size:
      c.add("model.image_size", image_size, f"is not divisible by patch_size={patch_size}.")
    else:
      tokens = (image_size // patch_size) ** 2

  # Target.
  try:
    targets.validate_target_config(c.config.target, check_paths=check_paths)
  except (ValueError, FileNotFoundError) as e:
    c.problems.append(str(e))
  c.string("target.dtype", DTYPES)
  c.number("target.ema_momentum", 0.0, 1.0, optional=True)
  c.number("target.ema_momentum_end", 0.0, 1.0, optional=True)

  # DTM.
  c.boolean("dtm.enabled")
  c.integer("dtm.num_schedules", 1)
  max_merge = c.integer("dtm.max_merge", 0, also=(-1,))
  max_iters = c.integer("dtm.max_iters", 1)
  c.boolean("dtm.per_image")
  c.boolean("dtm.protect_first")
  c.string("dtm.loss", ("smooth_l1", "l1", "l2", "cosine"))
  c.number("dtm.beta", 0.0, min_open=True)
  c.boolean("dtm.normalize_target")
  c.string("dtm.weighting", ("token", "group"))
  if tokens is not None and max_merge is not None and max_merge > tokens:
    c.add("dtm.max_merge", max_merge, f"exceeds the {tokens} tokens; use at most {tokens} (or -1 for N).")
  fixed = c.get("dtm.fixed_schedule")
  if fixed not in (_MISSING, None) and fixed != () and tokens is not None and max_iters is not None:
    if not (len(fixed) == 2 and 0 <= fixed[0] <= tokens and 1 <= fixed[1] <= max_iters):
      c.add("dtm.fixed_schedule", fixed, f"must be (num_merge in [0, {tokens}], num_iters in "
                                         f"[1, max_iters={max_iters}]).")

  # Input.
  _input(c, pretraining=True)
  masked = c.get("input.num_masking_patches")
  if tokens is not None and isinstance(masked, int) and not isinstance(masked, bool) and masked > tokens:
    c.add("input.num_masking_patches", masked, f"must be in [1, {tokens}] (the {image_size}/{patch_size} grid has "
                                               f"{tokens} patches).")

  # Steps and batch.
  accum = c.integer("grad_accum_steps", 1)
  if accum is not None:
    c.batch("batch_size", num_devices, per=accum, per_name="grad_accum_steps")
  else:
    c.integer("batch_size", 1)
  c.integer("num_train_examples", 1, optional=True)
  total_steps = c.integer("total_steps", 1, optional=True)
  warmup_steps = c.integer("warmup_steps", 0, optional=True)
  if c.get("total_steps") in (_MISSING, None):
    c.number("total_epochs", 0.0, min_open=True)
  if c.get("warmup_steps") in (_MISSING, None):
    c.number("warmup_epochs", 0.0)
  if total_steps is not None and warmup_steps is not None and warmup_steps > total_steps:
    c.add("warmup_steps", warmup_steps, f"must not exceed total_steps={total_steps}.")
  _optim(c)
  _mesh(c, num_devices)

  # Logging, checkpoints, evaluation.
  c.integer("log_every", 1)
  c.integer("checkpoint_every", 1)
  c.integer("keep_checkpoints", 1)
  c.boolean("async_checkpointing")
  c.boolean("allow_config_change")
  c.integer("stop_after_step", 1, optional=True)
  c.integer("profile.start_step", 0)
  c.integer("profile.num_steps", 0)
  every = c.integer("eval.every", 0)
  c.integer("eval.k", 1)
  c.number("eval.temperature", 0.0, min_open=True)
  c.string("eval.train_split", nonempty=True)
  c.string("eval.eval_split", nonempty=True)
  c.integer("eval.num_train_examples", 0)
  c.integer("eval.num_eval_examples", 0)
  if every:  # the in-training kNN runs: its batches are split over the devices too
    c.batch("eval.batch_size", num_devices)
  else:
    c.integer("eval.batch_size", 1)


def _classifier_training(c: _Checker, num_devices: int, check_paths: bool) -> None:
  """What fine-tuning and the linear probe share."""
  _run_basics(c)
  _pretrained(c, check_paths)
  _model_overrides(c)
  _input(c, pretraining=False)
  c.integer("num_classes", 1)
  examples = c.integer("num_train_examples", 1)
  batch = c.batch("batch_size", num_devices)
  c.batch("eval_batch_size", num_devices)
  epochs = c.integer("epochs", 1)
  warmup = c.number("warmup_epochs", 0.0)
  c.integer("eval_every_epochs", 1)
  if epochs is not None and warmup is not None and warmup > epochs:
    c.add("warmup_epochs", warmup, f"must not exceed epochs={epochs}.")
  if examples is not None and batch is not None and batch > examples:
    c.add("batch_size", batch, f"exceeds num_train_examples={examples}; an epoch would have no step.")
  _mesh(c, num_devices)


def _finetune(c: _Checker, num_devices: int, check_paths: bool = True) -> None:
  _classifier_training(c, num_devices, check_paths)
  c.string("pooling", POOLINGS)
  _optim(c)
  c.number("mix.mixup_alpha", 0.0)
  c.number("mix.cutmix_alpha", 0.0)
  c.number("mix.prob", 0.0, 1.0)
  c.number("mix.switch_prob", 0.0, 1.0)
  c.number("mix.label_smoothing", 0.0, 1.0, max_open=True)
  c.number("ema_decay", 0.0, 1.0, max_open=True)
  c.integer("keep_checkpoints", 1)
  c.integer("log_every", 1)


def _linear_probe(c: _Checker, num_devices: int, check_paths: bool = True) -> None:
  _classifier_training(c, num_devices, check_paths)
  c.string("features.pooling", POOLINGS)
  c.integer("features.num_blocks", 1)
  c.boolean("precompute_features")
  c.boolean("augment")
  c.string("optimizer.name", ("lars", "sgd"))
  c.number("optimizer.base_lr", 0.0, min_open=True)
  c.integer("optimizer.lr_reference_batch", 1)
  c.number("optimizer.momentum", 0.0, 1.0, max_open=True)
  c.number("optimizer.weight_decay", 0.0)
  c.number("optimizer.min_lr", 0.0)
  c.number("bn_momentum", 0.0, 1.0, max_open=True)


def _knn_scoring(c: _Checker) -> None:
  """The frozen features and DINO's kNN, shared by --mode=knn and --mode=compare."""
  c.string("features.pooling", POOLINGS)
  c.integer("features.num_blocks", 1)
  c.integer("knn.k", 1)
  c.number("knn.temperature", 0.0, min_open=True)


def _knn(c: _Checker, num_devices: int, check_paths: bool = True) -> None:
  _pretrained(c, check_paths)
  _model_overrides(c)
  _input(c, pretraining=False)
  _knn_scoring(c)
  c.batch("knn.batch_size", num_devices)
  c.integer("knn.num_train_examples", 0)
  c.integer("knn.num_eval_examples", 0)
  c.integer("num_train_examples", 1, optional=True)  # --mode=compile sizes the bank from these
  c.integer("num_classes", 1, optional=True)
  _mesh(c, num_devices)


def _compare(c: _Checker, num_devices: int, check_paths: bool = True) -> None:
  _pretrained(c, check_paths)
  _model_overrides(c)
  _input(c, pretraining=False)
  _run_basics(c)  # seed: the probe's
  c.integer("num_classes", 1)
  _knn_scoring(c)
  c.batch("compare.batch_size", num_devices)
  c.integer("compare.num_train_examples", 0)
  c.integer("compare.num_eval_examples", 0)
  epochs = c.integer("probe.epochs", 1)
  warmup = c.number("probe.warmup_epochs", 0.0)
  if epochs is not None and warmup is not None and warmup > epochs:
    c.add("probe.warmup_epochs", warmup, f"must not exceed probe.epochs={epochs}.")
  c.batch("probe.batch_size", num_devices)
  c.string("probe.optimizer.name", ("lars", "sgd"))
  c.number("probe.optimizer.base_lr", 0.0, min_open=True)
  c.integer("probe.optimizer.lr_reference_batch", 1)
  c.number("probe.optimizer.momentum", 0.0, 1.0, max_open=True)
  c.number("probe.optimizer.weight_decay", 0.0)
  c.number("probe.optimizer.min_lr", 0.0)
  c.number("probe.bn_momentum", 0.0, 1.0, max_open=True)
  _mesh(c, num_devices)


def _segment(c: _Checker, num_devices: int, check_paths: bool = True) -> None:
  _run_basics(c)
  c.string("pretrained.workdir")  # "" trains from a random initialisation (the from-scratch baseline)
  c.integer("pretrained.step", 0, optional=True)
  _model_overrides(c)
  c.string("input.source", SEGMENT_SOURCES)
  c.string("input.dataset", optional=True)
  c.string("input.data_dir", optional=True)
  c.string("input.train_split", nonempty=True)
  c.string("input.eval_split", nonempty=True)
  c.integer("input.shuffle_buffer", 1)
  c.integer("input.num_parallel_calls", 1, also=(-1,))
  c.integer("input.prefetch", 0)
  c.integer("input.threadpool_size", 0)
  c.boolean("input.reduce_zero_label")
  c.numbers("input.scale", 2, positive=True)
  c.numbers("input.ratio_range", 2, positive=True)
  c.number("input.cat_max_ratio", 0.0, 1.0, min_open=True)
  c.boolean("input.photometric")
  c.boolean("input.flip")
  c.numbers("input.mean", 3)
  c.numbers("input.std", 3, positive=True)
  classes = c.integer("segmenter.num_classes", 1, 255)
  indices = c.get("segmenter.out_indices")
  depth = _student_depth(c)
  if indices is not _MISSING and not (isinstance(indices, (list, tuple)) and len(indices) == 4 and
                                      all(isinstance(i, int) and 0 <= i < (depth or 10 ** 9) for i in indices)):
    c.add("segmenter.out_indices", indices, f"must be 4 block indices in [0, {depth or 'depth'}).")
  c.integer("segmenter.channels", 1)
  c.integer("segmenter.aux_channels", 1)
  c.integer("segmenter.aux_in_index", 0, 3)
  c.number("segmenter.aux_weight", 0.0)
  c.number("segmenter.dropout", 0.0, 1.0, max_open=True)
  ignore = c.integer("segmenter.ignore_index", 0, 255)
  if classes is not None and ignore is not None and ignore < classes:
    c.add("segmenter.ignore_index", ignore, f"must not be a class (num_classes={classes}); labels are uint8, use 255.")
  crop = c.integer("crop_size", 1)
  patch = _student_patch_size(c)
  if crop is not None and patch and crop % patch:
    c.add("crop_size", crop, f"must be a multiple of the student's patch size {patch}.")
  c.batch("batch_size", num_devices)
  c.batch("eval_batch_size", num_devices)
  total = c.integer("total_steps", 1)
  warmup = c.integer("warmup_steps", 0)
  if total is not None and warmup is not None and warmup > total:
    c.add("warmup_steps", warmup, f"must not exceed total_steps={total}.")
  c.integer("eval_every_steps", 1)
  window = c.integer("eval.window", 1)
  stride = c.integer("eval.stride", 1)
  canvas = c.integer("eval.canvas_size", 1)
  if crop is not None and window is not None and window != crop:
    c.add("eval.window", window, f"must equal crop_size={crop}: the segmenter is built for crops of that size.")
  if window is not None and stride is not None and stride > window:
    c.add("eval.stride", stride, f"must not exceed eval.window={window} (windows must cover the image).")
  if window is not None and canvas is not None and canvas < window:
    c.add("eval.canvas_size", canvas, f"must be at least eval.window={window}.")
  scales = c.get("eval.scales")
  if scales is not _MISSING and not (isinstance(scales, (list, tuple)) and scales and
                                     all(isinstance(v, (int, float)) and v > 0 for v in scales)):
    c.add("eval.scales", scales, "must be one or more positive ratios, e.g. (1.0,) or (0.5, 0.75, 1.0, 1.5).")
  c.boolean("eval.flip")
  c.integer("eval.num_images", 0)
  _optim(c)
  c.integer("keep_checkpoints", 1)
  c.integer("log_every", 1)
  c.integer("stop_after_step", 1, optional=True)
  _mesh(c, num_devices)


def _student_depth(c: _Checker) -> int | None:
  depth = c.get("model.depth")
  if depth is _MISSING:
    architecture = c.get("pretrained.architecture")
    depth = architecture.get("depth") if hasattr(architecture, "get") else None
    if depth is None and hasattr(architecture, "get") and architecture.get("variant"):
      from dtm_jax.models import vit  # pylint: disable=g-import-not-at-top
      depth = vit.VARIANTS.get(architecture["variant"], (None, None, None))[1]
  return depth if isinstance(depth, int) else None


def _student_patch_size(c: _Checker) -> int | None:
  patch = c.get("pretrained.architecture.patch_size")
  return patch if isinstance(patch, int) and not isinstance(patch, bool) else None


_MODES: dict[str, Callable[..., None]] = {
    "pretrain": _pretrain, "finetune": _finetune, "linear_probe": _linear_probe, "knn": _knn, "segment": _segment,
    "compare": _compare}


def problems(mode: str, config, *, num_devices: int | None = None, check_paths: bool = True) -> list[str]:
  """Every problem of `config` for `mode`, one line each (empty when it can run). check_paths: whether the files
  the run would read (teacher, pretrained workdir) must be named and exist (False for `--mode=compile`)."""
  if mode not in _MODES:
    raise ValueError(f"Unknown mode {mode!r}; one of {MODES}.")
  if num_devices is None:
    import jax  # pylint: disable=g-import-not-at-top
    num_devices = jax.device_count()
  checker = _Checker(config)
  _MODES[mode](checker, num_devices, check_paths)
  return checker.problems


def validate(mode: str, config, *, num_devices: int | None = None, check_paths: bool = True) -> None:
  """Raises errors.ConfigError listing every problem (the field and what to change)."""
  found = problems(mode, config, num_devices=num_devices, check_paths=check_paths)
  if found:
    raise errors.ConfigError("Invalid config:\n  - " + "\n  - ".join(found))


# ---------------------------------------------------------------------------------------------------------------------
# main.py's flags parser.
# ---------------------------------------------------------------------------------------------------------------------
def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with config-override errors (an unknown field, a value of the wrong type) reported as
  one clear line and exit status 2 instead of ml_collections' traceback."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _exit_with(str(e), argv)
  except (AttributeError, KeyError) as e:
    _exit_with(_unknown_field_message(e, argv), argv)
  return []  # unreachable


def _unknown_field_message(error: Exception, argv: list[str]) -> str:
  name = str(error).strip("\"'")
  flags_named = [a for a in argv[1:] if a.startswith("--config.") and
                 a.split("=", 1)[0].rsplit(".", 1)[-1] == name]
  where = f" ({flags_named[0]})" if flags_named else ""
  return (f"Invalid config: unknown field {name!r}{where}. Check its spelling against the config file; only fields "
          "the config defines can be overridden.")


def _exit_with(message: str, argv: Sequence[str]) -> None:
  del argv
  print(f"FATAL Flags parsing error: {message}" if not message.startswith("Invalid config") else message,
        file=sys.stderr, flush=True)
  print("Pass --helpfull to see the flags.", file=sys.stderr, flush=True)
  sys.exit(2)
