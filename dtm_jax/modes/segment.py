"""Semantic segmentation fine-tuning of a pretrained student: UperNet on four of its blocks (BEiT v2's ADE20K recipe).

The segmenter is the student's trunk at the crop size (relative-position tables resized, the shared table folded into
each block's) with mmseg's UperNet decode head and FCN auxiliary head (`models.segmentation`). AdamW with layer-wise
lr decay, mmseg's poly schedule with linear warm-up, drop path; BatchNorm statistics (SyncBN: over the global batch,
which the jitted step over the sharded batch computes) travel in the train state. Every `eval_every_steps` and at the
end the eval set is segmented by sliding windows (optionally at several scales and flipped) and scored from a
confusion matrix summed on the devices: mIoU, aAcc, mAcc and per-class IoU. Checkpoints at each evaluation and when
stopped (SIGTERM, Ctrl-C, `stop_after_step`); rerunning the same command resumes (weights, optimizer, BatchNorm
statistics, data position, best mIoU). `pretrained.workdir=""` trains the same model from a random initialisation.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import nnx

from dtm_jax import config_checks, flops, optim, sharding, students
from dtm_jax import images as images_lib
from dtm_jax.evaluators import encoding, segmentation_metrics
from dtm_jax.models import functional, segmentation, vit
from dtm_jax.program import Mode, Program
from dtm_jax.runner import loop, resume
from dtm_jax.runtime import checkpoint as checkpoint_lib
from dtm_jax.runtime import metrics

PyTree = Any
RANDOM_INIT = {"checkpoint": "(random initialisation)", "step": None}


@dataclasses.dataclass(frozen=True)
class Segmenter:
  """The segmentation model: its trunk's config, functional view, and the pretrained checkpoint it started from."""
  vit_config: vit.ViTConfig
  model: functional.StatefulModule
  source: dict


def segmenter_config(config: ml_collections.ConfigDict) -> segmentation.SegmenterConfig:
  fields = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in config.segmenter.items()}
  return segmentation.SegmenterConfig(**fields)


def trunk_config(student_config: vit.ViTConfig, config: ml_collections.ConfigDict) -> vit.ViTConfig:
  """The student's architecture at the crop size, with per-block relative-position tables (as fine-tuning)."""
  return vit.finetune_config(student_config, image_size=config.crop_size)


def _constructor(vit_config: vit.ViTConfig, seg_config: segmentation.SegmenterConfig, seed: int = 0):
  return lambda: segmentation.UperNetSegmenter(vit_config, seg_config, rngs=nnx.Rngs(seed))


def init_segmenter(config: ml_collections.ConfigDict, student: students.Student | None,
                   shardings_of: Callable[[PyTree], PyTree]) -> tuple[Segmenter, PyTree, PyTree]:
  """(segmenter, params, batch_stats), born sharded: initialised from `student` under jit, or randomly when None."""
  student_config = student.config if student is not None else students.student_config_of(config)
  vit_config, seg_config = trunk_config(student_config, config), segmenter_config(config)
  model, abstract_params, abstract_stats = functional.abstract_split_stateful(_constructor(vit_config, seg_config))

  def init(student_params):
    segmenter = _constructor(vit_config, seg_config, config.seed)()
    if student is not None:
      segmentation.init_segmenter_from_pretrained(segmenter, student.model.bind(student_params))
    return functional.split_stateful(segmenter)[1:]

  out_shardings = (shardings_of(abstract_params), shardings_of(abstract_stats))
  params, stats = jax.jit(init, out_shardings=out_shardings)(student.params if student is not None else None)
  return Segmenter(vit_config, model, student.source() if student is not None else dict(RANDOM_INIT)), params, stats


# ---------------------------------------------------------------------------------------------------------------------
# The jitted programs.
# ---------------------------------------------------------------------------------------------------------------------
def make_train_step(model: functional.StatefulModule, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    seg_config: segmentation.SegmenterConfig, normalization: images_lib.Normalization):
  """`step(state, batch, rng) -> (state, scalars)`; state = {"step", "params", "batch_stats", "opt_state"}.

  batch: {"image": uint8 [B, crop, crop, 3] (normalised here), "label": uint8 [B, crop, crop], 255 = ignore}.
  """

  def train_step(state, batch, rng):
    drop_rng = jax.random.fold_in(rng, state["step"])
    images = images_lib.to_model_input(batch["image"], *normalization)
    labels = batch["label"].astype(jnp.int32)

    def loss_fn(params):
      (logits, aux_logits), batch_stats = model.apply(params, state["batch_stats"], images, train=True,
                                                      dropout_rng=drop_rng)
      loss, loss_metrics = segmentation.segmentation_loss(logits, aux_logits, labels, seg_config)
      return loss, (loss_metrics, batch_stats)

    (loss, (loss_metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = {"step": state["step"] + 1, "params": params, "batch_stats": batch_stats, "opt_state": opt_state}
    scalars = {**{f"train_{k}": v for k, v in loss_metrics.items()}, "train_loss": loss,
               "lr": schedule(state["step"]), "grad_norm": optax.global_norm(grads)}
    return new_state, scalars

  return train_step


def predict_scores(apply_fn: Callable[[jax.Array], jax.Array], images: jax.Array, *, num_classes: int, window: int,
                   stride: int, scales: Sequence[float] = (1.0,), flip: bool = False) -> jax.Array:
  """[B, H, W, C] class scores of normalised images: the sliding windows' averaged logits, or with several scales or
  flip, mmseg's test-time augmentation (averaged probabilities; `segmentation_metrics.multi_scale_flip_probs`)."""
  if tuple(scales) == (1.0,) and not flip:
    return segmentation_metrics.sliding_window_logits(apply_fn, images, num_classes=num_classes, window=window,
                                                      stride=stride)
  return segmentation_metrics.multi_scale_flip_probs(apply_fn, images, num_classes=num_classes, scales=scales,
                                                     flip=flip, window=window, stride=stride)


def make_eval_step(model: functional.StatefulModule, seg_config: segmentation.SegmenterConfig,
                   normalization: images_lib.Normalization, eval_config: ml_collections.ConfigDict):
  """`eval_step(params, batch_stats, batch) -> int32 [C, C]` confusion counts (rows: ground truth) of a batch
  {"image": uint8 [B, S, S, 3], "label": uint8 [B, S, S] (255 ignored), "valid": bool [B]}; padding images count
  nothing."""

  def eval_step(params, batch_stats, batch):
    images = images_lib.to_model_input(batch["image"], *normalization)
    apply_fn = lambda x: model.apply(params, batch_stats, x, train=False)[0][0]
    scores = predict_scores(apply_fn, images, num_classes=seg_config.num_classes, window=eval_config.window,
                            stride=eval_config.stride, scales=tuple(eval_config.scales), flip=eval_config.flip)
    labels = jnp.where(batch["valid"][:, None, None], batch["label"].astype(jnp.int32), seg_config.ignore_index)
    return segmentation_metrics.confusion_matrix(jnp.argmax(scores, axis=-1), labels, seg_config.num_classes,
                                                 ignore_index=seg_config.ignore_index)

  return eval_step


def evaluate(eval_step: Callable, params: PyTree, batch_stats: PyTree, batches: Iterable[dict], mesh) -> dict:
  """Scores of one pass over the eval batches (per host), from the confusion matrix summed over the eval set.

  The batches' int32 counts are summed on the devices (no host round trip per batch) and folded into an int64 total
  on the host before they could overflow. Returns mIoU, aAcc and mAcc in % (as mmseg prints them), per-class IoU in %
  (NaN for classes absent from both the ground truth and the predictions), and the number of images scored."""
  total, pending, pending_pixels, images, seen = None, None, 0, 0, False
  for host_batch in batches:
    batch = sharding.to_global(host_batch, mesh)
    pixels = int(np.prod(batch["label"].shape))
    if pending is not None and pending_pixels + pixels >= 2 ** 31:
      total = _fold(total, pending)
      pending, pending_pixels = None, 0
    counts = eval_step(params, batch_stats, batch)
    pending = counts if pending is None else pending + counts
    pending_pixels += pixels
    images += int(np.sum(host_batch["valid"]))
    seen = True
  if not seen:
    raise ValueError("The evaluation data gave no batches; check the split name and the data directory.")
  found = segmentation_metrics.scores(_fold(total, pending))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    images = int(np.sum(multihost_utils.process_allgather(np.array(images))))
  return {"miou": 100.0 * float(found["miou"]), "aacc": 100.0 * float(found["aacc"]),
          "macc": 100.0 * float(found["macc"]), "per_class_iou": 100.0 * np.asarray(found["per_class_iou"]),
          "num_eval_images": images}


def _fold(total: np.ndarray | None, counts: jax.Array) -> np.ndarray:
  counts = np.asarray(jax.device_get(counts), np.int64)
  return counts if total is None else total + counts


@dataclasses.dataclass(frozen=True)
class SegmentProgram:
  """The train and eval steps as they run on `mesh`, built without data or weights (`--mode=compile` compiles them)."""
  model: functional.StatefulModule
  tx: optax.GradientTransformation
  init_state: Callable[[PyTree, PyTree], PyTree]  # (params, batch_stats) -> fresh state (jit with state_shardings)
  state_shardings: PyTree
  abstract_state: PyTree  # ShapeDtypeStructs carrying their shardings
  batch_sharding: Any
  step: Callable  # jitted (state, batch, rng) -> (state, scalars); donates the state
  eval_step: Callable  # jitted (params, batch_stats, batch) -> replicated int32 [C, C]
  train_flops_per_image: float  # analytic: forward + backward of a crop
  eval_flops_per_image: float  # analytic: forward over every window of every scale and flip
  batch_size: int
  eval_batch_size: int
  crop_size: int
  canvas_size: int

  def abstract_train_inputs(self) -> tuple[PyTree, dict, jax.ShapeDtypeStruct]:
    size, rows, rep = self.crop_size, self.batch_sharding, self.state_shardings["step"]
    batch = {"image": jax.ShapeDtypeStruct((self.batch_size, size, size, 3), jnp.uint8, sharding=rows),
             "label": jax.ShapeDtypeStruct((self.batch_size, size, size), jnp.uint8, sharding=rows)}
    key = jax.random.key(0)
    return self.abstract_state, batch, jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep)

  def abstract_eval_inputs(self) -> tuple[PyTree, PyTree, dict]:
    size, rows, n = self.canvas_size, self.batch_sharding, self.eval_batch_size
    batch = {"image": jax.ShapeDtypeStruct((n, size, size, 3), jnp.uint8, sharding=rows),
             "label": jax.ShapeDtypeStruct((n, size, size), jnp.uint8, sharding=rows),
             "valid": jax.ShapeDtypeStruct((n,), jnp.bool_, sharding=rows)}
    return self.abstract_state["params"], self.abstract_state["batch_stats"], batch


def build_program(config: ml_collections.ConfigDict, mesh, vit_config: vit.ViTConfig | None = None) -> SegmentProgram:
  """Optimizer, state shardings, and the jitted train and eval steps of a segmenter with trunk `vit_config`
  (default: the one `config.pretrained.architecture` names, as `--mode=compile` assumes) on `mesh`."""
  seg_config = segmenter_config(config)
  vit_config = vit_config or trunk_config(students.student_config_of(config), config)
  model, abstract_params, abstract_stats = functional.abstract_split_stateful(_constructor(vit_config, seg_config))
  tx, schedule = optim.make_optimizer(config.optim, abstract_params, total_steps=config.total_steps,
                                      global_batch_size=config.batch_size, num_layers=vit_config.depth,
                                      warmup_steps=config.warmup_steps)

  def init_state(params, batch_stats):
    return {"step": jnp.zeros((), jnp.int32), "params": params, "batch_stats": batch_stats,
            "opt_state": tx.init(params)}

  abstract_state = jax.eval_shape(init_state, abstract_params, abstract_stats)
  rep = sharding.replicated(mesh)
  state_sh = {k: (rep if k == "step" else sharding.param_shardings(v, mesh, config.mesh.min_fsdp_size))
              for k, v in abstract_state.items()}
  batch_sh = sharding.batch_sharding(mesh)
  normalization = images_lib.normalization_of(config.input)
  step = jax.jit(make_train_step(model, tx, schedule, seg_config, normalization),
                 in_shardings=(state_sh, batch_sh, rep), out_shardings=(state_sh, rep), donate_argnums=(0,))
  eval_step = jax.jit(make_eval_step(model, seg_config, normalization, config.eval),
                      in_shardings=(state_sh["params"], state_sh["batch_stats"], batch_sh), out_shardings=rep)
  forward = flops.segmenter_forward_flops(vit_config, seg_config)
  canvas, window, stride = config.eval.canvas_size, config.eval.window, config.eval.stride
  windows = sum(len(segmentation_metrics.window_offsets(max(round(canvas * s), window), window, stride)) ** 2
                for s in config.eval.scales)
  return SegmentProgram(
      model=model, tx=tx, init_state=init_state, state_shardings=state_sh,
      abstract_state=sharding.with_shardings(abstract_state, state_sh), batch_sharding=batch_sh, step=step,
      eval_step=eval_step, train_flops_per_image=3 * forward,
      eval_flops_per_image=forward * windows * (2 if config.eval.flip else 1), batch_size=config.batch_size,
      eval_batch_size=config.eval_batch_size, crop_size=config.crop_size, canvas_size=canvas)


# ---------------------------------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       student_fn: Callable[[], students.Student] | None,
                       train_data_fn: Callable[[int], Iterator[dict]],
                       eval_data_fn: Callable[[], Iterable[dict]], mesh) -> dict:
  """Train the segmenter and evaluate it; resumes from `<workdir>/checkpoints` when it holds a checkpoint.

  `student_fn()` restores the pretrained student (only called when starting afresh; None: random initialisation).
  `train_data_fn(crop_size[, start_step])` gives an infinite iterator of host batches {"image", "label"} with
  save/restore (starting at global batch `start_step` when resuming a checkpoint of another process count), and
  `eval_data_fn()` one pass of {"image", "label", "valid"} on the eval canvas (the first `eval.num_images` of them
  when that is not 0).
  """
  workdir = epath.Path(workdir)
  total_steps = config.total_steps
  checkpointer = checkpoint_lib.Checkpointer(workdir, max_to_keep=config.keep_checkpoints)
  shardings_of = lambda tree: sharding.param_shardings(tree, mesh, config.mesh.min_fsdp_size)

  # ----- Segmenter: from the segmentation checkpoint when resuming, else from the student (or random).
  found = resume.find(checkpointer, config, required=("model_config", "pretrained", "best_miou"))
  if found is None:
    segmenter, params, batch_stats = init_segmenter(config, student_fn() if student_fn else None, shardings_of)
  else:
    vit_config = checkpoint_lib.model_config_from_metadata(found.metadata, vit.ViTConfig)
    model, _, _ = functional.abstract_split_stateful(_constructor(vit_config, segmenter_config(config)))
    segmenter = Segmenter(vit_config, model, found.metadata["pretrained"])
  data_fn = lambda start_step: train_data_fn(config.crop_size, start_step=start_step)
  program = build_program(config, mesh, segmenter.vit_config)

  best_miou = 0.0
  if found is None:
    state = jax.jit(program.init_state, out_shardings=program.state_shardings)(params, batch_stats)
    train_data = data_fn(0)
    logging.info("Segmentation fine-tuning from %s for %d steps.", segmenter.source, total_steps)
  else:
    _, state, restored_metadata, train_data = found.restore(program.abstract_state, data_fn)
    best_miou = restored_metadata["best_miou"]

  # ----- Loop.
  eval_batches = lambda: encoding.take_batches(eval_data_fn(), config.eval_batch_size, config.eval.num_images)
  run_eval = lambda state: evaluate(program.eval_step, state["params"], state["batch_stats"], eval_batches(), mesh)
  rng = jax.random.key(config.seed)
  metadata = checkpoint_lib.run_metadata(segmenter.vit_config, segmenter.source, config)
  step = int(state["step"])
  writer = metrics.MetricsWriter.for_run(workdir, config, step)  # drops lines past the checkpoint (computed again)
  result: dict[str, Any] = {}

  def evaluate_and_record(state, step):
    nonlocal result, best_miou
    result = run_eval(state)
    best_miou = max(best_miou, result["miou"])
    _write_evaluation(writer, workdir, step, result, best_miou)

  def save(state, step):
    checkpointer.save_state(step, state, data_iterator=train_data,
                            metadata={**metadata, "step": step, "best_miou": best_miou})

  finished = loop.train_loop(
      state, what="Segmentation fine-tuning", step=step, total=total_steps,
      train_step=lambda s, b: program.step(s, b, rng),
      next_batch=lambda: sharding.to_global(images_lib.training_batch(next(train_data)), mesh),
      log_every=config.log_every, writer=writer, save=save, save_every=config.eval_every_steps,
      checkpointer=checkpointer, evaluate=evaluate_and_record, eval_every=config.eval_every_steps,
      stop_after=config.get("stop_after_step"), progress_every_secs=config.progress_every_secs)
  state, step = finished.state, finished.step
  if not result and step == total_steps:  # Resumed a run that had already finished.
    result = run_eval(state)
  summary = {**segmenter.source, "steps": step, "total_steps": total_steps, "preempted": float(finished.stopped),
             "best_miou": max([best_miou] + [result.get("miou", 0.0)])}
  if result:
    summary.update(miou=result["miou"], aacc=result["aacc"], macc=result["macc"],
                   num_eval_images=result["num_eval_images"], per_class_iou=_json_list(result["per_class_iou"]))
  return summary


def _json_list(values: np.ndarray) -> list:
  """Per-class values for JSON: NaN (a class absent from ground truth and predictions) as null."""
  return [None if np.isnan(v) else float(v) for v in np.asarray(values, np.float64)]


def _write_evaluation(writer: metrics.MetricsWriter, workdir: epath.Path, step: int, result: dict,
                      best_miou: float) -> None:
  """mIoU, aAcc, mAcc and the best mIoU to the metrics (logged); per-class IoU to the metrics unlogged and to
  `<workdir>/per_class_iou.json` (the latest evaluation)."""
  writer.write_scalars(step, {"miou": result["miou"], "aacc": result["aacc"], "macc": result["macc"],
                              "best_miou": best_miou})
  per_class = result["per_class_iou"]
  writer.write_scalars(step, {f"iou/{c}": float(v) for c, v in enumerate(per_class) if not np.isnan(v)}, log=False)
  if jax.process_index() == 0:
    (workdir / "per_class_iou.json").write_text(json.dumps({"step": step, "iou": _json_list(per_class)}) + "\n")


def run(config: ml_collections.ConfigDict, workdir: epath.Path, mesh) -> dict:
  """`main.py --mode=segment`: train and evaluate the segmenter; returns mIoU, aAcc and per-class IoU."""
  from input_pipeline import segmentation as segment_input  # pylint: disable=g-import-not-at-top  # TF only here

  student_fn = None
  if config.pretrained.workdir:
    student_fn = lambda: students.restore_student(config.pretrained, mesh, min_fsdp_size=config.mesh.min_fsdp_size,
                                                  model_overrides=config.model)
  train_data_fn = lambda crop, start_step=0: segment_input.build_segment_train(
      config.input, crop_size=crop, global_batch_size=config.batch_size, seed=config.seed, start_step=start_step)
  eval_data = segment_input.build_segment_eval(config.input, canvas_size=config.eval.canvas_size,
                                               global_batch_size=config.eval_batch_size)
  return train_and_evaluate(config, workdir, student_fn=student_fn, train_data_fn=train_data_fn,
                            eval_data_fn=lambda: eval_data, mesh=mesh)


def check_config(c: config_checks.Checker, num_devices: int, check_paths: bool = True) -> None:
  c.boolean("allow_config_change", optional=True)
  config_checks.check_run_basics(c)
  c.string("pretrained.workdir")  # "" trains from a random initialisation (the from-scratch baseline)
  c.integer("pretrained.step", 0, optional=True)
  config_checks.check_model_overrides(c)
  c.string("input.source", config_checks.SEGMENT_SOURCES)
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
  if indices is not config_checks.MISSING and not (isinstance(indices, (list, tuple)) and len(indices) == 4 and
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
  if scales is not config_checks.MISSING and not (isinstance(scales, (list, tuple)) and scales and
                                     all(isinstance(v, (int, float)) and v > 0 for v in scales)):
    c.add("eval.scales", scales, "must be one or more positive ratios, e.g. (1.0,) or (0.5, 0.75, 1.0, 1.5).")
  c.boolean("eval.flip")
  c.integer("eval.num_images", 0)
  config_checks.check_optim(c)
  c.integer("keep_checkpoints", 1)
  c.integer("log_every", 1)
  c.integer("stop_after_step", 1, optional=True)
  config_checks.check_mesh(c, num_devices)


def _student_depth(c: config_checks.Checker) -> int | None:
  depth = c.get("model.depth")
  if depth is config_checks.MISSING:
    architecture = c.get("pretrained.architecture")
    depth = architecture.get("depth") if hasattr(architecture, "get") else None
    if depth is None and hasattr(architecture, "get") and architecture.get("variant"):
      depth = vit.VARIANTS.get(architecture["variant"], (None, None, None))[1]
  return depth if isinstance(depth, int) else None


def _student_patch_size(c: config_checks.Checker) -> int | None:
  patch = c.get("pretrained.architecture.patch_size")
  return patch if isinstance(patch, int) and not isinstance(patch, bool) else None


def programs(config: ml_collections.ConfigDict, mesh) -> list[Program]:
  """The train step and the sliding-window eval step, for the trunk `config.pretrained.architecture` names."""
  program = build_program(config, mesh)
  return [Program("train_step", program.step, program.abstract_train_inputs(),
                  program.train_flops_per_image * config.batch_size),
          Program("eval_step", program.eval_step, program.abstract_eval_inputs(),
                  program.eval_flops_per_image * config.eval_batch_size)]


MODE = Mode(
    name="segment",
    summary="UperNet semantic segmentation fine-tuning of a pretrained student (resumable).",
    check=check_config,
    run=run,
    programs=programs,
    memory_knobs=("model.remat", "mesh.fsdp"),
)
