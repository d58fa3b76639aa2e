"""DTM pretraining: distil a frozen target into a BEiT-style or MAE-style student through dynamically morphed tokens.

One function, `train(config, workdir)`, in sections: checks → mesh → student, target, optimizer → state born sharded
→ resume → input → the jitted step → the loop (logging, evaluation, checkpoints, preemption).

The step is one jitted program per global batch: target forward (bf16, no gradient) → morphing schedules drawn with
`jax.random` → groups from the target tokens → student forward (bf16 compute, fp32 params) on the pipeline's
block-wise mask (`model.kind="beit"`), or on the visible patches of a per-image random mask drawn on the device from
the step's key (`"mae"`, dtm_jax.models.mae; the pipeline's mask is then unused) → DTM loss → gradients (averaged over
`grad_accum_steps` micro-batches by a scan) → optax update. Non-finite loss or gradient norm leaves the parameters
untouched and records the step; the loop stops with an error at the next sync point and no checkpoint of a broken
state is ever written.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dtm_jax import config_checks, flops, losses, morphing, optim, sharding, targets
from dtm_jax import images as images_lib
from dtm_jax.evaluators import knn
from dtm_jax.models import functional, mae, vit
from dtm_jax.program import Mode, Program
from dtm_jax.runner import loop, resume
from dtm_jax.runtime import checkpoint as checkpoint_lib
from dtm_jax.runtime import errors, metrics

PyTree = Any
NONFINITE_LOSS, NONFINITE_GRAD = 1, 2
MODEL_KINDS = ("beit", "mae")
MASKING_STREAM = 2  # the step key's fold-in that draws the MAE-style masks (independent of schedules and dropout)


# ----------------------------------------------------------------------------------------------------------------
# Config → model configs, step counts, checks.
# ----------------------------------------------------------------------------------------------------------------
def student_config(config: ml_collections.ConfigDict) -> vit.ViTConfig:
  """The student a pretraining config describes (`config.model`): a `mae.MAEConfig` when `model.kind="mae"`."""
  return mae.student_config_from_fields(config.model.to_dict())


def num_patches(config: ml_collections.ConfigDict) -> int:
  return (config.model.image_size // config.model.patch_size) ** 2


def total_and_warmup_steps(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """Steps from `total_steps`/`warmup_steps` or from epochs × num_train_examples / batch_size."""
  def steps(name):
    if config.get(f"{name}_steps") is not None:
      return int(config.get(f"{name}_steps"))
    epochs = config.get(f"{name}_epochs")
    if epochs is None:
      raise ValueError(f"Set config.{name}_steps or config.{name}_epochs.")
    if not config.get("num_train_examples"):
      raise ValueError(f"config.{name}_epochs needs config.num_train_examples (images per epoch).")
    return int(round(epochs * config.num_train_examples / config.batch_size))
  return steps("total"), steps("warmup")


# ----------------------------------------------------------------------------------------------------------------
# The step.
# ----------------------------------------------------------------------------------------------------------------
def make_loss_and_grads(*, student: functional.FunctionalModule, target: targets.Target,
                        config: ml_collections.ConfigDict, tokens: int, mesh=None):
  """(params, target_params, batch, step) → (loss, mean number of groups, gradients) for one global batch.

  Schedules are drawn for the whole batch from the step's key, then the batch is cut into `grad_accum_steps`
  micro-batches whose gradients are averaged, so accumulation equals one step on the full batch. With the `mesh`
  the batch is split over, morphing and the DTM loss run on each device's share of the batch (see
  _per_batch_shard).
  """
  dtm = config.dtm
  accum = config.grad_accum_steps
  max_merge = tokens if dtm.max_merge < 0 else dtm.max_merge
  model_cfg = student_config(config)
  is_mae = isinstance(model_cfg, mae.MAEConfig)
  num_visible = model_cfg.num_visible if is_mae else None
  group_size = None if dtm.schedule_group_size == -1 else dtm.schedule_group_size  # None: the whole global batch
  masked_only = dtm.get("loss_positions", "all") == "masked"

  def morphed_loss(pred, target_tokens, mask, num_merge, num_iters):
    scored = mask if masked_only else None
    if not dtm.enabled:  # token-wise distillation: every token its own group, no morphing in the program
      del num_merge, num_iters
      loss = losses.token_wise_loss(pred, target_tokens, kind=dtm.loss, beta=dtm.beta,
                                    normalize_target=dtm.normalize_target, scored=scored)
      return loss, jnp.asarray(tokens, jnp.float32)
    groups = morphing.morph_schedules(target_tokens, num_merge, num_iters, max_iters=dtm.max_iters,
                                      protect_first=dtm.protect_first)
    loss = losses.dtm_loss(pred, target_tokens, groups, kind=dtm.loss, beta=dtm.beta,
                           normalize_target=dtm.normalize_target, weighting=dtm.weighting, scored=scored)
    return loss, jnp.mean(jax.vmap(morphing.num_groups)(groups).astype(jnp.float32))

  if mesh is not None and mesh.size > 1:
    morphed_loss = _per_batch_shard(morphed_loss, mesh)

  def micro_loss(params, target_params, images, masking, num_merge, num_iters, dropout_rng):
    target_tokens = target.tokens(target_params, images)
    if is_mae:
      pred = student.apply(params, images, masking["ids_keep"], masking["ids_restore"], dropout_rng=dropout_rng)
    else:
      pred = student.apply(params, images, masking["mask"], dropout_rng=dropout_rng)
    return morphed_loss(pred, target_tokens, masking["mask"], num_merge, num_iters)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def loss_and_grads(params, target_params, batch, step):
    rng = jax.random.fold_in(jax.random.key(config.seed), step)
    schedule_rng, dropout_rng = jax.random.split(rng)
    images = images_lib.to_model_input(batch["image"], config.input.mean, config.input.std)
    if is_mae:  # drawn for the global batch from the step's key: the same masks on any number of devices
      ids_keep, ids_restore, mask = mae.random_masking(jax.random.fold_in(rng, MASKING_STREAM), images.shape[0],
                                                       tokens, num_visible)
      masking = {"ids_keep": ids_keep, "ids_restore": ids_restore, "mask": mask}
    else:
      masking = {"mask": batch["mask"]}
    if dtm.get("fixed_schedule"):  # the paper's ablation: the same (num_merge, num_iters) every step
      shape = (dtm.num_schedules, images.shape[0])
      num_merge = jnp.full(shape, dtm.fixed_schedule[0], jnp.int32)
      num_iters = jnp.full(shape, dtm.fixed_schedule[1], jnp.int32)
    else:
      num_merge, num_iters = morphing.sample_schedules(
          schedule_rng, images.shape[0], num_schedules=dtm.num_schedules, max_merge=max_merge,
          max_iters=dtm.max_iters, group_size=group_size)
    if accum == 1:
      (loss, groups), grads = grad_fn(params, target_params, images, masking, num_merge, num_iters, dropout_rng)
      return loss, groups, grads

    # Rows i·A + a go to micro-batch a: each device keeps its own rows, so the split moves no data.
    def split(x, axis):
      x = jnp.moveaxis(x, axis, 0)
      x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
      return jnp.moveaxis(x, 1, axis + 1)

    def body(carry, xs):
      img, msk, nm, ni, i = xs
      (l, g), gr = grad_fn(params, target_params, img, msk, nm, ni, jax.random.fold_in(dropout_rng, i))
      acc_grads, acc_loss, acc_groups = carry
      return (jax.tree.map(jnp.add, acc_grads, gr), acc_loss + l, acc_groups + g), None

    micro = (split(images, 0), jax.tree.map(lambda x: split(x, 0), masking), split(num_merge, 1),
             split(num_iters, 1), jnp.arange(accum))
    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, loss, groups), _ = jax.lax.scan(body, (zeros, 0.0, 0.0), micro)
    return loss / accum, groups / accum, jax.tree.map(lambda g: g / accum, grads)

  return loss_and_grads


def _per_batch_shard(morphed_loss, mesh):
  """Runs morphed_loss(pred [B, N, C], target tokens [B, N, D], mask [B, N], num_merge, num_iters [L, B]) →
  (loss, groups) on every device's images and averages the two means over the devices (the shards are equal, so that
  is the mean over the batch).

  Morphing and the loss work image by image, so this is exact. It keeps their gathers, scatters and while loops
  local to a device, and lets the CPU kernels (dtm_jax.kernels), which the SPMD partitioner cannot split, see only
  their device's images instead of the whole batch gathered onto every device.
  """
  batch, schedules = P(sharding.BATCH_AXES), P(None, sharding.BATCH_AXES)

  def per_shard(*args):
    return tuple(jax.lax.pmean(mean, sharding.BATCH_AXES) for mean in morphed_loss(*args))

  return jax.shard_map(per_shard, mesh=mesh, in_specs=(batch, batch, batch, schedules, schedules), out_specs=(P(), P()))


def make_train_step(*, loss_and_grads, tx: optax.GradientTransformation, lr_schedule: optax.Schedule,
                    ema_momentum=None):
  """The pure step: (state, target_params, batch) → (state, metrics). Non-finite updates are not applied.

  With `ema_momentum(step)` the target is the student's EMA, kept in `state["ema_params"]` and updated after each
  optimizer step; the `target_params` argument is then unused.
  """

  def step_fn(state, target_params, batch):
    step, params = state["step"], state["params"]
    if ema_momentum is not None:
      target_params = state["ema_params"]
    loss, groups, grads = loss_and_grads(params, target_params, batch, step)
    grad_norm = optax.global_norm(grads)
    updates, new_opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)

    finite_loss, finite_grad = jnp.isfinite(loss), jnp.isfinite(grad_norm)
    ok = finite_loss & finite_grad
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    code = jnp.where(finite_loss, 0, NONFINITE_LOSS) + jnp.where(finite_grad, 0, NONFINITE_GRAD)
    first_bad = state["nonfinite"]
    nonfinite = jnp.where((first_bad[0] < 0) & ~ok, jnp.stack([step, code]), first_bad)
    new_state = {
        "step": step + 1,
        "params": keep(new_params, params),
        "opt_state": keep(new_opt_state, state["opt_state"]),
        "nonfinite": nonfinite,
    }
    if ema_momentum is not None:
      new_state["ema_params"] = targets.ema_update(state["ema_params"], new_state["params"], ema_momentum(step))
    step_metrics = {
        "loss": loss, "grad_norm": grad_norm, "param_norm": optax.global_norm(params),
        "lr": lr_schedule(step), "num_groups": groups,
    }
    return new_state, step_metrics

  return step_fn


# ----------------------------------------------------------------------------------------------------------------
# The program: student, target, optimizer, shardings and the jitted step, built for a mesh.
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PretrainProgram:
  """The pretraining step as it runs on `mesh`, built without data; `abstract_target=True` also without weights.

  `train()` runs `step`; `--mode=compile` (dtm_jax.aot) compiles the same `step` for `abstract_inputs()`.
  """
  model_config: vit.ViTConfig
  student: functional.FunctionalModule
  target: targets.Target
  init_state: Callable[[], PyTree]  # fresh state, to run under jit with out_shardings=state_shardings
  state_shardings: PyTree
  abstract_state: PyTree  # ShapeDtypeStructs carrying their shardings
  target_shardings: PyTree
  batch_sharding: NamedSharding
  step: Callable  # jitted (state, target_params, batch) -> (state, metrics); donates the state
  flops_per_image: float  # analytic: student forward + backward, target forward, morphing
  batch_size: int
  image_dtype: Any  # of the images the input sends: uint8 (normalised in the step), float32 for synthetic data

  def abstract_inputs(self) -> tuple[PyTree, PyTree, dict]:
    """(state, target params, batch) as ShapeDtypeStructs with the step's shardings."""
    size = self.model_config.image_size
    batch = {"image": jax.ShapeDtypeStruct((self.batch_size, size, size, self.model_config.in_channels),
                                           self.image_dtype, sharding=self.batch_sharding),
             "mask": jax.ShapeDtypeStruct((self.batch_size, self.model_config.num_patches), jnp.bool_,
                                          sharding=self.batch_sharding)}
    target_params = sharding.with_shardings(jax.eval_shape(lambda p: p, self.target.params), self.target_shardings)
    return self.abstract_state, target_params, batch


def build_program(config: ml_collections.ConfigDict, mesh, *, abstract_target: bool = False,
                  on_trace: Callable[[], None] | None = None) -> PretrainProgram:
  """Builds the pretraining step for `mesh` (its shardings, donation, accumulation, morphing and target).

  abstract_target: the target's parameters are shapes only (nothing is read; `--mode=compile`). on_trace: called
  each time the step is traced (train() counts recompilations with it).
  """
  total_steps, warmup_steps = total_and_warmup_steps(config)
  tokens = num_patches(config)
  model_cfg = student_config(config)
  student_fm, abstract_params = functional.abstract_split(lambda: mae.student_model(model_cfg, rngs=nnx.Rngs(0)))
  target = targets.build_target(config.target, image_size=model_cfg.image_size, patch_size=model_cfg.patch_size,
                                in_channels=model_cfg.in_channels, student_config=model_cfg,
                                abstract=abstract_target, mesh=mesh, min_fsdp_size=config.mesh.min_fsdp_size)
  if target.out_dim != model_cfg.out_dim:
    raise ValueError(f"The target gives {target.out_dim}-dim tokens but the student head has "
                     f"config.model.out_dim={model_cfg.out_dim}; set config.model.out_dim={target.out_dim}.")
  tx, lr_schedule = optim.make_optimizer(config.optim, abstract_params, total_steps=total_steps,
                                         global_batch_size=config.batch_size, warmup_steps=warmup_steps)

  # State, born sharded.
  min_fsdp = config.mesh.min_fsdp_size
  param_sh = sharding.param_shardings(abstract_params, mesh, min_fsdp)
  opt_sh = sharding.param_shardings(jax.eval_shape(tx.init, abstract_params), mesh, min_fsdp)
  rep = sharding.replicated(mesh)
  state_sh = {"step": rep, "params": param_sh, "opt_state": opt_sh, "nonfinite": rep}
  if target.is_ema:
    state_sh["ema_params"] = param_sh

  def init_state():
    _, params = functional.split_module(mae.student_model(model_cfg, rngs=nnx.Rngs(config.seed)))
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
             "nonfinite": jnp.full((2,), -1, jnp.int32)}
    if target.is_ema:
      state["ema_params"] = params
    return state

  abstract_state = sharding.with_shardings(jax.eval_shape(init_state), state_sh)
  target_sh = sharding.param_shardings(target.params, mesh, min_fsdp)

  # The jitted step.
  loss_and_grads = make_loss_and_grads(student=student_fm, target=target, config=config, tokens=tokens, mesh=mesh)
  momentum = (lambda step: targets.ema_momentum(config.target, step, total_steps)) if target.is_ema else None
  step_fn = make_train_step(loss_and_grads=loss_and_grads, tx=tx, lr_schedule=lr_schedule, ema_momentum=momentum)

  def traced_step(*args):
    if on_trace is not None:
      on_trace()
    return step_fn(*args)

  batch_sh = sharding.batch_sharding(mesh)
  step = jax.jit(traced_step, in_shardings=(state_sh, target_sh, batch_sh), out_shardings=(state_sh, rep),
                 donate_argnums=(0,))
  student_flops = (flops.mae_student_flops(model_cfg) if isinstance(model_cfg, mae.MAEConfig) else
                   flops.transformer_flops(model_cfg, model_cfg.out_dim))
  flops_per_image = (3 * student_flops + target.forward_flops +
                     morphing_flops(config, tokens, target.out_dim))
  return PretrainProgram(model_config=model_cfg, student=student_fm, target=target, init_state=init_state,
                         state_shardings=state_sh, abstract_state=abstract_state, target_shardings=target_sh,
                         batch_sharding=batch_sh, step=step, flops_per_image=flops_per_image,
                         batch_size=config.batch_size,
                         image_dtype=jnp.float32 if config.input.source == "synthetic" else jnp.uint8)


# ----------------------------------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------------------------------
def _check_finite(nonfinite: np.ndarray) -> None:
  step, code = int(nonfinite[0]), int(nonfinite[1])
  if step >= 0:
    what = {NONFINITE_LOSS: "loss", NONFINITE_GRAD: "gradient norm"}.get(code, "loss and gradient norm")
    raise errors.NonFiniteError(f"Non-finite {what} at step {step}; that update was not applied and no checkpoint of "
                                "it was written.")


def run(config: ml_collections.ConfigDict, workdir: epath.Path, mesh) -> dict[str, float]:
  """`main.py --mode=pretrain`: pretrains per `config` in `workdir` on `mesh`, resuming from its latest good
  checkpoint; returns the last metrics. Ctrl-C saves the step reached and raises errors.Interrupted."""
  workdir.mkdir(parents=True, exist_ok=True)
  total_steps, warmup_steps = total_and_warmup_steps(config)
  tokens = num_patches(config)

  logging.info("Mesh %s over %d devices (%d processes); device kind %s.", dict(mesh.shape), jax.device_count(),
               jax.process_count(), jax.devices()[0].device_kind)

  # ----- Student, target, optimizer, state shardings and the jitted step: the program `--mode=compile` builds.
  traces = []  # one entry per trace of the step: more than one means recompilation (a bug; reported at the end)
  program = build_program(config, mesh, on_trace=lambda: traces.append(1))
  model_cfg, target, state_sh, init_state = (program.model_config, program.target, program.state_shardings,
                                             program.init_state)
  logging.info("Target: %s.", target.description)
  num_params = sum(x.size for x in jax.tree.leaves(program.abstract_state["params"]))
  logging.info("Student %s: %.2fM parameters, %d tokens of dim %d.", config.model.variant, num_params / 1e6, tokens,
               model_cfg.width)
  target_params = sharding.put_global(target.params, program.target_shardings)

  # ----- Resume or initialise, and the input at the step reached.
  checkpointer = checkpoint_lib.Checkpointer(workdir, max_to_keep=config.keep_checkpoints,
                                             async_save=config.async_checkpointing)
  config_dict = config.to_dict()
  metadata = {"config": config_dict, "config_hash": checkpoint_lib.config_hash(config_dict),
              "model_config": checkpoint_lib.model_config_to_json(model_cfg), "jax_version": jax.__version__,
              "target": target.description, **checkpoint_lib.layout_metadata()}
  data_fn = lambda start_step: build_pretrain_data(config, model_cfg, start_step=start_step)
  found = resume.find(checkpointer, config, required=("config",))
  if found is None:
    state, data = jax.jit(init_state, out_shardings=state_sh)(), data_fn(0)
    logging.info("Starting from scratch at step 0 of %d.", total_steps)
  else:
    _, state, _, data = found.restore(program.abstract_state, data_fn)
  start_step = int(state["step"])
  checkpoint_lib.assert_processes_agree(start_step, metadata["config_hash"])

  # ----- Loop.
  writer = metrics.MetricsWriter.for_run(workdir, config, start_step)  # drops lines past the checkpoint
  throughput = metrics.Throughput(flops_per_step=program.flops_per_image * config.batch_size,
                                  images_per_step=config.batch_size)
  evaluator = make_periodic_evaluator(config, program.student, mesh)
  evaluated: dict[str, float] = {}

  def train_step(state, batch):
    state, scalars = program.step(state, target_params, batch)
    return state, {**scalars, "nonfinite": state["nonfinite"]}

  def check(fetched, step):
    del step
    _check_finite(fetched.pop("nonfinite"))  # the first bad step since the start, whichever step is read

  def evaluate(state, step):
    evaluated.update(evaluator(state["params"]))
    writer.write_scalars(step, evaluated)
    throughput.start(step)

  config_written = []

  def save(state, step):
    checkpointer.save_state(step, state, data_iterator=data, metadata={**metadata, "step": step})
    if jax.process_index() == 0 and not config_written:  # with this run's first checkpoint, once: config.json
      (workdir / "config.json").write_text(json.dumps(config_dict, indent=2, default=str))  # describes them
      config_written.append(step)

  throughput.start(start_step)
  finished = loop.train_loop(
      state, what="Pretraining", step=start_step, total=total_steps, train_step=train_step,
      next_batch=lambda: sharding.to_global(_pretrain_batch(next(data)), mesh), log_every=config.log_every,
      writer=writer, save=save, save_every=config.checkpoint_every, checkpointer=checkpointer,
      evaluate=evaluate if evaluator else None, eval_every=config.eval.every or None, check=check,
      log_extra=lambda step: {**throughput.measure(step), "corrupt_images": float(data.num_corrupt())},
      stop_after=config.get("stop_after_step"), progress_every_secs=config.progress_every_secs,
      profile_dir=workdir / "profile", profile_start=config.profile.start_step,
      profile_steps=config.profile.num_steps)
  if len(traces) > 1:
    logging.warning("The train step was compiled %d times; expected once.", len(traces))
  return {**finished.last_scalars, **evaluated, "step": finished.step, "preempted": float(finished.stopped),
          "step_compilations": len(traces)}


def build_pretrain_data(config: ml_collections.ConfigDict, model_cfg: vit.ViTConfig, start_step: int = 0):
  """This process's pretraining batches: the configured source, or deterministic synthetic batches.

  start_step: the global batch to begin at when no iterator state can be restored (another process count)."""
  # Imported here so `dtm_jax` stays importable where TensorFlow is absent (benchmarks on GPU hosts).
  if config.input.source == "synthetic":
    from input_pipeline import synthetic  # pylint: disable=g-import-not-at-top
    return synthetic.SyntheticPretrain(
        image_size=model_cfg.image_size, patch_size=model_cfg.patch_size, global_batch_size=config.batch_size,
        seed=config.seed, num_masking_patches=config.input.num_masking_patches,
        process_index=jax.process_index(), process_count=jax.process_count(), start_step=start_step)
  import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline.build_pretrain(config.input, image_size=model_cfg.image_size,
                                       patch_size=model_cfg.patch_size, global_batch_size=config.batch_size,
                                       seed=config.seed, start_step=start_step)


def _pretrain_batch(host_batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {"image": host_batch["image"], "mask": host_batch["mask"]}


def morphing_flops(config: ml_collections.ConfigDict, tokens: int, dim: int) -> float:
  if not config.dtm.enabled:
    return 0.0
  return flops.morphing_flops(tokens=tokens, dim=dim, num_schedules=config.dtm.num_schedules,
                                max_iters=config.dtm.max_iters)


def make_periodic_evaluator(config: ml_collections.ConfigDict, student: functional.FunctionalModule, mesh):
  """kNN on held-out slices during pretraining (config.eval.every > 0), or None. Features: mean-pooled patches.

  Its programs (encoder, bank, vote step) are jitted here once: later evaluations reuse their compilations.
  """
  if not config.eval.every:
    return None

  normalization = images_lib.normalization_of(config.input)

  def encode(params, images):  # uint8 eval crops, normalised here
    images = images_lib.to_model_input(images, *normalization)
    return student.apply(params, images, method="encode")[:, 1:].mean(axis=1)

  return knn.make_knn_evaluate(encode, config.eval, mesh, input_config=config.input,
                               image_size=config.model.image_size)


def check_config(c: config_checks.Checker, num_devices: int, check_paths: bool = True) -> None:
  config_checks.check_run_basics(c)
  variant = c.string("model.variant")
  if variant is not None and variant not in vit.VARIANTS:
    c.add("model.variant", variant, f"is unknown; choose one of {sorted(vit.VARIANTS)}.")
  image_size = c.integer("model.image_size", 1)
  patch_size = c.integer("model.patch_size", 1)
  config_checks.check_model_overrides(c)
  c.string("model.dtype", config_checks.DTYPES)
  c.number("model.drop_path_rate", 0.0, 1.0, max_open=True)
  c.integer("model.out_dim", 1)
  tokens = None
  if image_size and patch_size:
    if image_size % patch_size:
      c.add("model.image_size", image_size, f"is not divisible by patch_size={patch_size}.")
    else:
      tokens = (image_size // patch_size) ** 2
  _check_student_kind(c, tokens)

  # Target.
  try:
    targets.validate_target_config(c.config.target, check_paths=check_paths)
  except (ValueError, FileNotFoundError) as e:
    c.problems.append(str(e))
  c.string("target.dtype", config_checks.DTYPES + ("auto",))
  c.string("target.head_dtype", config_checks.DTYPES, optional=True)
  c.number("target.ema_momentum", 0.0, 1.0, optional=True)
  c.number("target.ema_momentum_end", 0.0, 1.0, optional=True)

  # DTM.
  c.boolean("dtm.enabled")
  c.integer("dtm.num_schedules", 1)
  max_merge = c.integer("dtm.max_merge", 0, also=(-1,))
  max_iters = c.integer("dtm.max_iters", 1)
  group_size = c.integer("dtm.schedule_group_size", 1, also=(-1,))
  c.boolean("dtm.protect_first")
  c.string("dtm.loss", ("smooth_l1", "l1", "l2", "cosine"))
  c.number("dtm.beta", 0.0, min_open=True)
  c.boolean("dtm.normalize_target")
  c.string("dtm.weighting", ("token", "group"))
  c.string("dtm.loss_positions", ("all", "masked"))
  if tokens is not None and max_merge is not None and max_merge > tokens:
    c.add("dtm.max_merge", max_merge, f"exceeds the {tokens} tokens; use at most {tokens} (or -1 for N).")
  fixed = c.get("dtm.fixed_schedule")
  if fixed not in (config_checks.MISSING, None) and fixed != () and tokens is not None and max_iters is not None:
    if not (len(fixed) == 2 and 0 <= fixed[0] <= tokens and 1 <= fixed[1] <= max_iters):
      c.add("dtm.fixed_schedule", fixed, f"must be (num_merge in [0, {tokens}], num_iters in "
                                         f"[1, max_iters={max_iters}]).")

  # Input.
  config_checks.check_input(c, pretraining=True)
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
  batch_size = c.get("batch_size")
  if group_size not in (None, -1) and isinstance(batch_size, int) and batch_size > 0 and batch_size % group_size:
    c.add("dtm.schedule_group_size", group_size, f"does not divide batch_size={batch_size}: every schedule draw "
          "covers this many images; choose a divisor of the batch (the released code's per-GPU batch, 256, is the "
          "default), or -1 for one draw per global batch.")
  c.integer("num_train_examples", 1, optional=True)
  total_steps = c.integer("total_steps", 1, optional=True)
  warmup_steps = c.integer("warmup_steps", 0, optional=True)
  if c.get("total_steps") in (config_checks.MISSING, None):
    c.number("total_epochs", 0.0, min_open=True)
  if c.get("warmup_steps") in (config_checks.MISSING, None):
    c.number("warmup_epochs", 0.0)
  if total_steps is not None and warmup_steps is not None and warmup_steps > total_steps:
    c.add("warmup_steps", warmup_steps, f"must not exceed total_steps={total_steps}.")
  config_checks.check_optim(c)
  config_checks.check_mesh(c, num_devices)

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


def _check_student_kind(c: config_checks.Checker, tokens: int | None) -> None:
  """model.kind and, for the MAE-style student, its masking ratio and decoder (fields the BEiT-style one refuses)."""
  kind = c.string("model.kind", MODEL_KINDS)
  present = [f for f in mae.DECODER_FIELDS if c.get(f"model.{f}") is not config_checks.MISSING]
  if kind == "beit":
    for field in present:
      c.add(f"model.{field}", c.get(f"model.{field}"), "is used by model.kind='mae' only; remove it.")
    return
  if kind != "mae":
    return
  for field in ("abs_pos_emb", "block_rel_pos_bias", "shared_rel_pos_bias"):
    value = c.get(f"model.{field}")
    if value is not config_checks.MISSING and value != (field == "abs_pos_emb"):
      c.add(f"model.{field}", value, f"must be {field == 'abs_pos_emb'} for model.kind='mae' (sin-cos absolute "
                                     "position embedding only).")
  if c.get("model.layer_scale_init") not in (config_checks.MISSING, None, 0, 0.0):
    c.add("model.layer_scale_init", c.get("model.layer_scale_init"),
          "must be 0 (no layer scale) for model.kind='mae'.")
  ratio = c.number("model.mask_ratio", 0.0, 1.0, max_open=True)
  if ratio is not None and tokens is not None and round(ratio * tokens) >= tokens:
    c.add("model.mask_ratio", ratio, f"hides all {tokens} patches; leave at least one visible.")
  width = c.integer("model.decoder_width", 4)
  heads = c.integer("model.decoder_num_heads", 1)
  c.integer("model.decoder_depth", 1)
  if width is not None and width % 4:
    c.add("model.decoder_width", width, "must be divisible by 4 (2-D sin-cos position table).")
  if width is not None and heads is not None and width % heads:
    c.add("model.decoder_num_heads", heads, f"does not divide decoder_width={width}.")
  if c.get("target.kind") == "ema":
    c.add("target.kind", "ema", "is not supported with model.kind='mae' (the EMA teacher is a BEiT-style student).")


def programs(config: ml_collections.ConfigDict, mesh) -> list[Program]:
  """The train step `run` executes, built for `mesh` from abstract inputs (the teacher's weights unread)."""
  program = build_program(config, mesh, abstract_target=True)
  return [Program("train_step", program.step, program.abstract_inputs(), program.flops_per_image * config.batch_size)]


MODE = Mode(
    name="pretrain",
    summary="DTM pretraining of a BEiT-style student from a frozen teacher (resumable).",
    check=check_config,
    run=run,
    programs=programs,
    memory_knobs=("grad_accum_steps", "model.remat", "mesh.fsdp"),
)
