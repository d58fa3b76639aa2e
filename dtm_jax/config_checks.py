"""The checker every mode's config checks are written with, and the blocks several modes share.

Each mode checks its own config (`check_config` in `dtm_jax/modes/<mode>.py`, run through `registry.problems` /
`registry.validate` before anything is created or compiled); every problem is one line naming the field as
`config.<path>=<value>` and what it must be, and all of them are reported at once. `num_devices` is the device count
the run will have, so `--mode=compile` can check a config against a TPU slice it is not running on. Every global
batch size (training, evaluation, the in-training kNN, the probe and fine-tuning) must split evenly over the devices.
"""
from __future__ import annotations

import math
from typing import Sequence

from dtm_jax import optim

MISSING = object()
DTYPES = ("float32", "bfloat16", "float16")
POOLINGS = ("mean", "cls")
SOURCES = ("tfds", "folder", "fashion_mnist")
SEGMENT_SOURCES = ("tfds", "ade20k_folder", "fashion_mnist_segmentation")


class Checker:
  """Collects problems of one config; each check names the field and the rule it breaks."""

  def __init__(self, config):
    self.config = config
    self.problems: list[str] = []

  def get(self, path: str):
    node = self.config
    for key in path.split("."):
      try:
        if key not in node:
          return MISSING
        node = node[key]
      except TypeError:
        return MISSING
    return node

  def add(self, path: str, value, rule: str) -> None:
    self.problems.append(f"config.{path}={value!r} {rule}")

  def _value(self, path, optional):
    value = self.get(path)
    if value is MISSING:
      if not optional:
        self.problems.append(f"config.{path} is missing; add it (see the shipped configs for its meaning).")
      return MISSING
    if value is None and optional:
      return MISSING
    return value

  def integer(self, path: str, minimum: int | None = None, maximum: int | None = None, *, optional: bool = False,
              also: Sequence[int] = ()) -> int | None:
    """An int in [minimum, maximum] (or one of `also`)."""
    value = self._value(path, optional)
    if value is MISSING:
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
    if value is MISSING:
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
    if value is MISSING:
      return None
    if not isinstance(value, bool):
      self.add(path, value, "must be True or False.")
      return None
    return value

  def string(self, path: str, choices: Sequence[str] | None = None, *, optional: bool = False,
             nonempty: bool = False) -> str | None:
    value = self._value(path, optional)
    if value is MISSING:
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
    if value is MISSING:
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
def check_mesh(c: Checker, num_devices: int) -> None:
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


def check_input(c: Checker, *, pretraining: bool) -> None:
  c.string("input.source", SOURCES + (("synthetic",) if pretraining else ()))
  c.string("input.dataset", optional=True)
  c.string("input.data_dir", optional=True)
  c.string("input.train_split", nonempty=True)
  c.string("input.eval_split", nonempty=True)
  c.integer("input.shuffle_buffer", 1)
  c.number("input.crop_scale_min", 0.0, 1.0, min_open=True)
  c.boolean("input.flip")
  c.number("input.color_jitter", 0.0)
  c.boolean("input.jitter_before_crop", optional=True)
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


def check_optim(c: Checker, prefix: str = "optim") -> None:
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
  c.string(f"{prefix}.schedule", optim.SCHEDULES, optional=True)
  c.number(f"{prefix}.poly_power", 0.0, min_open=True, optional=True)


def check_model_overrides(c: Checker) -> None:
  """The optional ViTConfig overrides of the evaluation modes (and pretraining's extra model fields)."""
  model = c.get("model")
  if model is MISSING:
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


def check_pretrained(c: Checker, check_paths: bool = True) -> None:
  workdir = c.string("pretrained.workdir")
  if workdir == "" and check_paths:
    c.add("pretrained.workdir", workdir, "is empty; set it to the workdir of a pretraining run (or one of its step "
                                         "directories, or a converted checkpoint).")
  c.integer("pretrained.step", 0, optional=True)


def check_run_basics(c: Checker) -> None:
  seed = c.integer("seed", 0)
  if seed is not None and seed >= 2 ** 63:
    c.add("seed", seed, "must be below 2**63.")
  c.number("progress_every_secs", 0.0, min_open=True, optional=True)
  c.number("metrics_flush_secs", 0.0, optional=True)


# ---------------------------------------------------------------------------------------------------------------------
# The modes.
# ---------------------------------------------------------------------------------------------------------------------


def check_classifier_training(c: Checker, num_devices: int, check_paths: bool) -> None:
  """What fine-tuning and the linear probe share."""
  check_run_basics(c)
  check_pretrained(c, check_paths)
  check_model_overrides(c)
  check_input(c, pretraining=False)
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
  check_mesh(c, num_devices)


def check_knn_scoring(c: Checker) -> None:
  """The frozen features and DINO's kNN, shared by --mode=knn and --mode=compare."""
  c.string("features.pooling", POOLINGS)
  c.integer("features.num_blocks", 1)
  c.integer("knn.k", 1)
  c.number("knn.temperature", 0.0, min_open=True)


def check_probe_training(c: Checker, prefix: str = "") -> None:
  """The linear probe's optimizer and BatchNorm (`--mode=linear_probe`; `--mode=compare` under `probe.`)."""
  c.string(f"{prefix}optimizer.name", ("lars", "sgd"))
  c.number(f"{prefix}optimizer.base_lr", 0.0, min_open=True)
  c.integer(f"{prefix}optimizer.lr_reference_batch", 1)
  c.number(f"{prefix}optimizer.momentum", 0.0, 1.0, max_open=True)
  c.number(f"{prefix}optimizer.weight_decay", 0.0)
  c.number(f"{prefix}optimizer.min_lr", 0.0)
  c.number(f"{prefix}bn_momentum", 0.0, 1.0, max_open=True)
