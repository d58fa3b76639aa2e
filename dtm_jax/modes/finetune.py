"""End-to-end fine-tuning of a pretrained student for classification (docs/METHOD.md §6, BEiT v2's recipe).

The classifier is the student's trunk with mean pooling → LayerNorm → linear head (×0.001 at init); the shared
relative-position table is folded into each block's table, so at step 0 the trunk computes what the student did.
AdamW with layer-wise lr decay (BEiT layer ids), drop path, Mixup/CutMix and label smoothing in the jitted step,
RandAugment and random erasing in the input pipeline, warm-up then cosine, optional EMA of the weights. Evaluates
every `eval_every_epochs`, records the best and the last top-1, and checkpoints at each evaluation; rerunning the
same command resumes from the fine-tuning workdir (weights, optimizer, EMA, data position, best so far).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from etils import epath
from flax import nnx

from dtm_jax import config_checks, flops, mixup, optim, sharding, students
from dtm_jax import images as images_lib
from dtm_jax.evaluators import classification
from dtm_jax.models import functional, vit
from dtm_jax.program import Mode, Program
from dtm_jax.runner import loop, resume
from dtm_jax.runtime import checkpoint as checkpoint_lib
from dtm_jax.runtime import metrics

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Classifier:
  """The fine-tuned model: config, functional view, and the pretrained checkpoint it started from."""
  config: vit.ViTConfig
  model: functional.FunctionalModule
  source: dict


def _classifier_constructor(config: vit.ViTConfig, run_config: ml_collections.ConfigDict, seed: int = 0):
  return lambda: vit.ViTClassifier(config, run_config.num_classes, pooling=run_config.pooling, rngs=nnx.Rngs(seed))


def student_overrides(config: ml_collections.ConfigDict) -> dict:
  """`config.model` without `image_size`: the student is restored at the size it was pretrained at, and only the
  classifier takes `config.model.image_size` (`classifier_config`)."""
  return {k: v for k, v in config.model.items() if k != "image_size"}


def classifier_config(student_config: vit.ViTConfig, config: ml_collections.ConfigDict) -> vit.ViTConfig:
  """The classifier fine-tuned from a student: `vit.finetune_config`, at `config.model.image_size` when set (its
  position tables are resized from the student's: `vit.init_classifier_from_pretrained`)."""
  return vit.finetune_config(student_config, image_size=config.model.get("image_size", student_config.image_size))


def classifier_from_student(student: students.Student, config: ml_collections.ConfigDict,
                            shardings_of: Callable[[PyTree], PyTree]) -> tuple[Classifier, PyTree]:
  """A classifier initialised from the student (born sharded: the copy runs under jit)."""
  clf_config = classifier_config(student.config, config)
  model, abstract = functional.abstract_split(_classifier_constructor(clf_config, config))

  def init(student_params):
    classifier = _classifier_constructor(clf_config, config, config.seed)()
    vit.init_classifier_from_pretrained(classifier, student.model.bind(student_params))
    return functional.split_module(classifier)[1]

  params = jax.jit(init, out_shardings=shardings_of(abstract))(student.params)
  return Classifier(clf_config, model, student.source()), params


def make_optimizer(config: ml_collections.ConfigDict, params: PyTree, *, total_steps: int, warmup_steps: int,
                   depth: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with BEiT layer-wise lr decay: block i gets decay^(depth − i), the embeddings decay^(depth + 1)."""
  return optim.make_optimizer(config.optim, params, total_steps=total_steps, global_batch_size=config.batch_size,
                              num_layers=depth, warmup_steps=warmup_steps)


def make_train_step(classifier: functional.FunctionalModule, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, num_classes: int, mix: mixup.MixConfig, ema_decay: float,
                    mix_shards: int = 1, normalization: images_lib.Normalization = ((0.0,), (1.0,))):
  """`step(state, batch, rng) -> (state, metrics)`; state = {"step", "params", "opt_state"[, "ema_params"]}.

  uint8 images are normalised on the device with `normalization` = (mean, std) and erased where the batch's
  "erase_box" says (dtm_jax.images), before mixing.

  `mix_shards`: the devices the batch is split over; Mixup/CutMix pair images within each device's shard.
  """

  def train_step(state, batch, rng):
    mix_rng, drop_rng, erase_rng = jax.random.split(jax.random.fold_in(rng, state["step"]), 3)
    images = images_lib.training_images(batch, normalization, erase_rng)
    images, targets, _ = mixup.mix_batch(mix_rng, images, batch["label"], num_classes=num_classes,
                                         config=mix, num_shards=mix_shards)

    def loss_fn(params):
      logits = classifier.apply(params, images, dropout_rng=drop_rng).astype(jnp.float32)
      return jnp.mean(optax.softmax_cross_entropy(logits, targets))

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
    if "ema_params" in state:
      new_state["ema_params"] = optax.incremental_update(params, state["ema_params"], 1.0 - ema_decay)
    scalars = {"train_loss": loss, "lr": schedule(state["step"]), "grad_norm": optax.global_norm(grads)}
    return new_state, scalars

  return train_step


def _steps(config: ml_collections.ConfigDict) -> tuple[int, int]:
  steps_per_epoch = config.num_train_examples // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"config.batch_size={config.batch_size} exceeds config.num_train_examples="
                     f"{config.num_train_examples}; lower the batch size.")
  return steps_per_epoch, config.epochs * steps_per_epoch


@dataclasses.dataclass(frozen=True)
class FinetuneProgram:
  """The fine-tuning step as it runs on `mesh`, built without data or weights (`--mode=compile` compiles `step`)."""
  model: functional.FunctionalModule
  tx: optax.GradientTransformation
  init_state: Callable[[PyTree], PyTree]  # classifier params -> fresh state (run under jit, out_shardings below)
  state_shardings: PyTree
  abstract_state: PyTree  # ShapeDtypeStructs carrying their shardings
  batch_sharding: Any
  step: Callable  # jitted (state, batch, rng) -> (state, scalars); donates the state
  flops_per_image: float  # analytic: forward + backward of the classifier
  batch_size: int
  image_size: int
  random_erasing: bool  # the input sends "erase_box" with every batch

  def abstract_inputs(self) -> tuple[PyTree, dict, jax.ShapeDtypeStruct]:
    size, rep = self.image_size, self.state_shardings["step"]
    batch = {"image": jax.ShapeDtypeStruct((self.batch_size, size, size, 3), jnp.uint8, sharding=self.batch_sharding),
             "label": jax.ShapeDtypeStruct((self.batch_size,), jnp.int32, sharding=self.batch_sharding)}
    if self.random_erasing:
      batch["erase_box"] = jax.ShapeDtypeStruct((self.batch_size, 4), jnp.int32, sharding=self.batch_sharding)
    return self.abstract_state, batch, jax.ShapeDtypeStruct(jax.random.key(0).shape, jax.random.key(0).dtype,
                                                            sharding=rep)


def build_program(config: ml_collections.ConfigDict, clf_config: vit.ViTConfig, mesh) -> FinetuneProgram:
  """Optimizer, state shardings and the jitted step of fine-tuning a classifier of `clf_config` on `mesh`."""
  steps_per_epoch, total_steps = _steps(config)
  model, abstract_params = functional.abstract_split(_classifier_constructor(clf_config, config))
  tx, schedule = make_optimizer(config, abstract_params, total_steps=total_steps, depth=clf_config.depth,
                                warmup_steps=round(config.warmup_epochs * steps_per_epoch))
  use_ema = config.ema_decay > 0

  def init_state(params):
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            **({"ema_params": params} if use_ema else {})}

  abstract_state = jax.eval_shape(init_state, abstract_params)
  rep = sharding.replicated(mesh)
  state_sh = {k: (rep if k == "step" else sharding.param_shardings(v, mesh, config.mesh.min_fsdp_size))
              for k, v in abstract_state.items()}
  batch_sh = sharding.batch_sharding(mesh)
  step = jax.jit(make_train_step(model, tx, schedule, num_classes=config.num_classes, mix=mixup.MixConfig(**config.mix),
                                 ema_decay=config.ema_decay, mix_shards=mesh.size,  # the batch spans every device
                                 normalization=images_lib.normalization_of(config.input)),
                 in_shardings=(state_sh, batch_sh, rep), out_shardings=(state_sh, rep), donate_argnums=(0,))
  step_flops = 3 * flops.transformer_forward_flops(
      width=clf_config.width, depth=clf_config.depth, tokens=clf_config.num_patches + 1, mlp_dim=clf_config.mlp_dim,
      patch_size=clf_config.patch_size, in_channels=clf_config.in_channels, out_dim=config.num_classes, out_tokens=1)
  return FinetuneProgram(
      model=model, tx=tx, init_state=init_state, state_shardings=state_sh,
      abstract_state=sharding.with_shardings(abstract_state, state_sh),
      batch_sharding=batch_sh, step=step, flops_per_image=step_flops, batch_size=config.batch_size,
      image_size=clf_config.image_size, random_erasing=bool(config.input.random_erase_prob))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       student_fn: Callable[[], students.Student], train_data_fn: Callable[[int], Iterator[dict]],
                       eval_data_fn: Callable[[int], Iterable[dict]], mesh) -> dict:
  """Fine-tune and evaluate; resumes from `<workdir>/checkpoints` when it holds a checkpoint.

  `student_fn()` restores the pretrained student (only called when starting afresh). For the classifier's image
  size, `train_data_fn(size[, start_step])` gives an infinite iterator of labelled host batches {"image", "label"}
  with save/restore (starting at global batch `start_step` when resuming a checkpoint of another process count),
  and `eval_data_fn(size)` one pass of {"image", "label", "valid"}.
  """
  workdir = epath.Path(workdir)
  steps_per_epoch, total_steps = _steps(config)
  eval_every = config.eval_every_epochs * steps_per_epoch
  checkpointer = checkpoint_lib.Checkpointer(workdir, max_to_keep=config.keep_checkpoints)
  shardings_of = lambda tree: sharding.param_shardings(tree, mesh, config.mesh.min_fsdp_size)
  use_ema = config.ema_decay > 0

  # ----- Classifier: from the fine-tuning checkpoint when resuming, else from the pretrained student.
  found = resume.find(checkpointer, config, required=("model_config", "pretrained", "best_top1"))
  if found is None:
    classifier, params = classifier_from_student(student_fn(), config, shardings_of)
  else:
    clf_config = checkpoint_lib.model_config_from_metadata(found.metadata, vit.ViTConfig)
    model, _ = functional.abstract_split(_classifier_constructor(clf_config, config))
    classifier = Classifier(clf_config, model, found.metadata["pretrained"])
  eval_data = lambda: eval_data_fn(classifier.config.image_size)
  data_fn = lambda start_step: train_data_fn(classifier.config.image_size, start_step=start_step)
  program = build_program(config, classifier.config, mesh)

  best_top1 = 0.0
  if found is None:
    state = jax.jit(program.init_state, out_shardings=program.state_shardings)(params)
    train_data = data_fn(0)
    logging.info("Fine-tuning from %s for %d steps (%d epochs).", classifier.source, total_steps, config.epochs)
  else:
    _, state, restored_metadata, train_data = found.restore(program.abstract_state, data_fn)
    best_top1 = restored_metadata["best_top1"]

  # ----- Loop.
  normalization = images_lib.normalization_of(config.input)
  evaluate = classification.make_classifier_evaluator(
      lambda params, images: classifier.model.apply(params, images_lib.to_model_input(images, *normalization)), mesh)
  rng = jax.random.key(config.seed)
  metadata = checkpoint_lib.run_metadata(classifier.config, classifier.source, config)
  step = int(state["step"])
  writer = metrics.MetricsWriter.for_run(workdir, config, step)  # drops lines past the checkpoint (computed again)
  result: dict[str, float] = {}

  def evaluate_and_record(state, step):
    nonlocal result, best_top1
    result = evaluate(state["params"], eval_data())
    if use_ema:
      ema = evaluate(state["ema_params"], eval_data())
      result.update(ema_top1=ema["top1"], ema_top5=ema["top5"])
    best_top1 = max(best_top1, result["top1"])
    writer.write_scalars(step, {k: v for k, v in result.items() if k != "num_examples"} | {
        "best_top1": best_top1, "epoch": step / steps_per_epoch})

  def save(state, step):
    checkpointer.save_state(step, state, data_iterator=train_data,
                            metadata={**metadata, "step": step, "best_top1": best_top1})

  finished = loop.train_loop(
      state, what="Fine-tuning", step=step, total=total_steps, train_step=lambda s, b: program.step(s, b, rng),
      next_batch=lambda: sharding.to_global(images_lib.training_batch(next(train_data)), mesh),
      log_every=config.log_every, writer=writer, save=save, save_every=eval_every, checkpointer=checkpointer,
      evaluate=evaluate_and_record, eval_every=eval_every, stop_after=config.get("stop_after_step"),
      progress_every_secs=config.progress_every_secs)
  state, step = finished.state, finished.step
  if not result:  # Resumed a run that had already finished, or stopped before an evaluation (stop_after_step).
    result = evaluate(state["params"], eval_data())
  return {**classifier.source, "preempted": float(finished.stopped), "top1": result["top1"], "top5": result["top5"],
          "best_top1": max(best_top1, result["top1"]), "last_top1": result["top1"],
          **{k: v for k, v in result.items() if k.startswith("ema_")}, "num_eval_examples": result["num_examples"],
          "epochs": config.epochs, "steps": step}


def run(config: ml_collections.ConfigDict, workdir: epath.Path, mesh) -> dict:
  """`main.py --mode=finetune`: fine-tune the pretrained student; returns the best and last top-1."""
  import input_pipeline  # pylint: disable=g-import-not-at-top  # Only here: dtm_jax itself never loads TensorFlow.

  student_fn = lambda: students.restore_student(config.pretrained, mesh, min_fsdp_size=config.mesh.min_fsdp_size,
                                                model_overrides=student_overrides(config))
  train_data_fn = lambda size, start_step=0: input_pipeline.build_finetune_train(
      config.input, image_size=size, global_batch_size=config.batch_size, seed=config.seed, augment=True,
      start_step=start_step)
  eval_data_fn = lambda size: input_pipeline.build_eval(config.input, image_size=size,
                                                        global_batch_size=config.eval_batch_size)
  return train_and_evaluate(config, workdir, student_fn=student_fn, train_data_fn=train_data_fn,
                            eval_data_fn=eval_data_fn, mesh=mesh)


def check_config(c: config_checks.Checker, num_devices: int, check_paths: bool = True) -> None:
  c.boolean("allow_config_change", optional=True)
  config_checks.check_classifier_training(c, num_devices, check_paths)
  c.string("pooling", config_checks.POOLINGS)
  config_checks.check_optim(c)
  c.number("mix.mixup_alpha", 0.0)
  c.number("mix.cutmix_alpha", 0.0)
  c.number("mix.prob", 0.0, 1.0)
  c.number("mix.switch_prob", 0.0, 1.0)
  c.number("mix.label_smoothing", 0.0, 1.0, max_open=True)
  c.number("ema_decay", 0.0, 1.0, max_open=True)
  c.integer("keep_checkpoints", 1)
  c.integer("log_every", 1)


def programs(config: ml_collections.ConfigDict, mesh) -> list[Program]:
  """The fine-tuning step for the student `config.pretrained.architecture` names (runs read it from the checkpoint)."""
  program = build_program(config, vit.finetune_config(students.student_config_of(config)), mesh)
  return [Program("train_step", program.step, program.abstract_inputs(), program.flops_per_image * config.batch_size)]


MODE = Mode(
    name="finetune",
    summary="End-to-end fine-tuning of a pretrained student for classification (resumable).",
    check=check_config,
    run=run,
    programs=programs,
    memory_knobs=("model.remat", "mesh.fsdp"),
)
