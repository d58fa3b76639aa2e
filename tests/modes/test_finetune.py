"""Fine-tuning: BEiT layer-wise lr decay, and a run from a restored pretraining checkpoint that learns and resumes."""
import logging

import eval_testing
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from train_testing import as_if_written_by_two_processes, recording_stream_factory

from configs import finetune_demo
from dtm_jax import optim, sharding, students
from dtm_jax.models import functional, vit
from dtm_jax.modes import finetune
from dtm_jax.runner import loop
from dtm_jax.runtime import metrics


def beit_layer_id(torch_name, num_max_layer):
  """unilm/beit optim_factory.get_num_layer_for_vit, on PyTorch parameter names."""
  if torch_name in ("cls_token", "mask_token", "pos_embed"):
    return 0
  if torch_name.startswith("patch_embed"):
    return 0
  if torch_name.startswith("rel_pos_bias"):
    return num_max_layer - 1
  if torch_name.startswith("blocks"):
    return int(torch_name.split(".")[1]) + 1
  return num_max_layer - 1


def beit_scale(path, depth, decay):
  """BEiT's run_class_finetuning: values[i] = decay ** (depth + 1 - i) for i in 0..depth+1."""
  name = optim.path_name(path).replace("shared_rel_pos_bias", "rel_pos_bias.relative_position_bias_table")
  values = [decay ** (depth + 1 - i) for i in range(depth + 2)]
  return values[beit_layer_id(name.replace("/", "."), len(values))]


@pytest.mark.parametrize("model", ["pretrain", "classifier"])
def test_layer_decay_multipliers_match_beit_for_every_parameter(model):
  config = vit.get_config("test", depth=3, image_size=16, patch_size=4, out_dim=8)
  if model == "pretrain":
    constructor = lambda: vit.PretrainViT(config, rngs=nnx.Rngs(0))
  else:
    constructor = lambda: vit.ViTClassifier(vit.finetune_config(config), 10, rngs=nnx.Rngs(0))
  _, params = functional.abstract_split(constructor)
  multipliers = optim.layer_decay_multipliers(params, 3, 0.65)
  checked = jax.tree_util.tree_map_with_path(lambda path, m: (m, beit_scale(path, 3, 0.65)), multipliers)
  pairs = jax.tree.leaves(checked, is_leaf=lambda x: isinstance(x, tuple))
  assert len(pairs) == len(jax.tree.leaves(params))
  for ours, beit in pairs:
    assert ours == pytest.approx(beit, rel=1e-12)
  assert {round(m, 6) for m, _ in pairs} == {round(0.65 ** e, 6) for e in range(5)}  # every layer id occurs


def test_finetune_optimizer_scales_each_update_by_its_layer():
  """First AdamW step with unit gradients: |update| = peak lr × BEiT multiplier, for every parameter."""
  config = finetune_demo.get_config()
  config.optim.update(weight_decay=0.0, layer_decay=0.5, base_lr=1e-3)
  clf_config = vit.finetune_config(eval_testing.tiny_student_config())
  _, params = functional.split_module(vit.ViTClassifier(clf_config, 4, rngs=nnx.Rngs(0)))
  tx, _ = finetune.make_optimizer(config, params, total_steps=10, warmup_steps=0, depth=clf_config.depth)
  updates, _ = jax.jit(lambda p: tx.update(jax.tree.map(jnp.ones_like, p), tx.init(p), p))(params)
  expected = optim.layer_decay_multipliers(params, clf_config.depth, 0.5)
  for update, multiplier in zip(jax.tree.leaves(updates), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(-np.asarray(update), 1e-3 * multiplier, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# End to end on a learnable toy task, from a restored pretraining checkpoint.
# ---------------------------------------------------------------------------------------------------------------------
BATCH, STEPS_PER_EPOCH, EPOCHS = 32, 8, 2


class Preempted(Exception):
  pass


class PreemptedStream(eval_testing.TintedStream):
  """Stops the run when asked for batch `stop_at`; records which batch it started from."""

  def __init__(self, stop_at=None):
    super().__init__(BATCH)
    self.stop_at, self.first = stop_at, None

  def __next__(self):
    if self.step == self.stop_at:
      raise Preempted
    self.first = self.step if self.first is None else self.first
    return super().__next__()


def finetune_config(pretraining_workdir):
  config = finetune_demo.get_config()
  config.pretrained.update(workdir=str(pretraining_workdir), step=5)
  config.update(num_classes=eval_testing.NUM_CLASSES, num_train_examples=BATCH * STEPS_PER_EPOCH, batch_size=BATCH,
                eval_batch_size=64, epochs=EPOCHS, warmup_epochs=0, ema_decay=0.9, log_every=4)
  config.optim.update(base_lr=2e-3, layer_decay=0.75)
  config.mix.prob = 0.0  # Mixup/CutMix are tested on their own (test_eval_mixup.py); Beta sampling compiles slowly.
  return config


def run_finetune(config, workdir, mesh, stream, student_fn):
  return finetune.train_and_evaluate(
      config, str(workdir), student_fn=student_fn, train_data_fn=lambda image_size, start_step=0: stream,
      eval_data_fn=lambda image_size: eval_testing.tinted_eval_batches(200, config.eval_batch_size), mesh=mesh)


@pytest.mark.slow
def test_finetune_from_a_restored_checkpoint_learns_and_resumes(tmp_path):
  one_block = eval_testing.tiny_student_config(depth=1)  # Keeps the two compilations of the step short.
  eval_testing.save_pretraining_checkpoints(tmp_path / "pretrain", steps=(5, 7), config=one_block)
  mesh = sharding.make_mesh(data=4, fsdp=2)
  config = finetune_config(tmp_path / "pretrain")
  restored = []

  def restore_student():
    restored.append(students.restore_student(config.pretrained, mesh, model_overrides=config.model))
    return restored[-1]

  # Preempted during the second epoch, after the checkpoint that follows the first epoch's evaluation.
  stream = PreemptedStream(stop_at=STEPS_PER_EPOCH + 3)
  with pytest.raises(Preempted):
    run_finetune(config, tmp_path / "finetune", mesh, stream, restore_student)
  assert [s.step for s in restored] == [5]  # the requested pretraining step, not the latest (7)

  # The same command again resumes from that checkpoint: no second restore, data stream continues at batch 8.
  stream = PreemptedStream()
  result = run_finetune(config, tmp_path / "finetune", mesh, stream, restore_student)
  assert len(restored) == 1
  assert stream.first == STEPS_PER_EPOCH and stream.step == EPOCHS * STEPS_PER_EPOCH
  assert result["checkpoint"].endswith("checkpoints/5") and result["step"] == 5
  assert result["steps"] == EPOCHS * STEPS_PER_EPOCH

  chance = 100.0 / eval_testing.NUM_CLASSES
  assert result["last_top1"] == result["top1"] > 2 * chance
  assert result["ema_top1"] > chance
  rows = metrics.read_jsonl(tmp_path / "finetune" / "metrics.jsonl")
  evals = [r for r in rows if "top1" in r]
  assert [r["step"] for r in evals] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]  # every epoch, once
  assert result["best_top1"] == max(r["top1"] for r in evals)
  losses = [r["train_loss"] for r in rows if "train_loss" in r]
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_finetuning_resumes_a_checkpoint_of_another_process_count_at_its_step(tmp_path, caplog):
  """Another slice (issue 17): the input-iterator states of a 2-process job fit no process here, so the step is
  restored without them (none is read) and the input is rebuilt at that step, with one warning."""
  one_block = eval_testing.tiny_student_config(depth=1)
  eval_testing.save_pretraining_checkpoints(tmp_path / "pretrain", steps=(5,), config=one_block)
  mesh = sharding.make_mesh(data=4, fsdp=2)
  config = finetune_config(tmp_path / "pretrain")
  student = lambda: students.restore_student(config.pretrained, mesh, model_overrides=config.model)
  with pytest.raises(Preempted):  # after the checkpoint of step 8 (the first epoch's evaluation)
    run_finetune(config, tmp_path / "finetune", mesh, PreemptedStream(stop_at=STEPS_PER_EPOCH + 3), student)
  as_if_written_by_two_processes(tmp_path / "finetune" / "checkpoints" / str(STEPS_PER_EPOCH))
  starts = []
  train_data_fn = recording_stream_factory(PreemptedStream, starts)

  with caplog.at_level(logging.WARNING):
    result = finetune.train_and_evaluate(
        config, str(tmp_path / "finetune"), student_fn=student, train_data_fn=train_data_fn,
        eval_data_fn=lambda image_size: eval_testing.tinted_eval_batches(200, config.eval_batch_size), mesh=mesh)
  assert starts == [STEPS_PER_EPOCH]  # built once, at the restored step; no iterator state was tried
  warnings = [r.getMessage() for r in caplog.records if "written by 2 processes" in r.getMessage()]
  assert len(warnings) == 1 and f"rebuilt at global batch {STEPS_PER_EPOCH}" in warnings[0], caplog.text
  assert result["steps"] == EPOCHS * STEPS_PER_EPOCH


def test_finetune_step_mixes_images_without_moving_them_between_devices():
  """Mixup/CutMix pair images within each device's shard: the compiled step has no collective-permute (mirroring
  the whole batch made one of the batch), only the gradient reductions."""
  mesh = sharding.make_mesh(data=8, fsdp=1)
  config = finetune_demo.get_config()
  config.update(num_classes=eval_testing.NUM_CLASSES, num_train_examples=BATCH * STEPS_PER_EPOCH, batch_size=BATCH,
                epochs=1, warmup_epochs=0, ema_decay=0.0)
  config.mix.prob = 1.0  # BEiT's recipe (the demo turns mixing off)
  assert mixup_enabled(config)
  clf_config = vit.finetune_config(eval_testing.tiny_student_config(depth=1))
  program = finetune.build_program(config, clf_config, mesh)
  compiled = program.step.lower(*program.abstract_inputs()).compile().as_text()
  assert "collective-permute" not in compiled
  assert "all-to-all" not in compiled


def mixup_enabled(config):
  from dtm_jax import mixup  # pylint: disable=g-import-not-at-top
  mix = mixup.MixConfig(**config.mix)
  return mix.enabled and mix.mixup_alpha > 0 and mix.cutmix_alpha > 0


def test_training_loop_stops_at_a_non_finite_loss_before_evaluating_or_saving(tmp_path):
  """Every mode shares runner.loop.train_loop: a diverged state is never evaluated or saved."""
  from dtm_jax.runtime import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  losses = [1.0, 0.5, float("nan"), float("nan")]
  train_step = lambda state, batch: (state + 1, {"train_loss": jnp.float32(losses[int(state)]),
                                                 "lr": jnp.float32(0.1)})
  evaluated, saved = [], []
  writer = metrics.MetricsWriter(tmp_path, flush_every_secs=0.0)
  with pytest.raises(FloatingPointError, match="non-finite train_loss at step 3; no checkpoint"):
    loop.train_loop(
        jnp.int32(0), what="Fine-tuning", step=0, total=4, train_step=train_step, next_batch=lambda: None,
        eval_every=1, evaluate=lambda state, step: evaluated.append(step), save_every=1,
        save=lambda state, step: saved.append(step),
        checkpointer=checkpoint_lib.Checkpointer(tmp_path, async_save=False), writer=writer, log_every=100)
  assert evaluated == saved == [1, 2]  # the last good state is the last checkpoint


def test_finetuning_from_an_mae_style_checkpoint_starts_from_its_encoder(tmp_path):
  """The classifier's trunk (patch embedding, CLS, position table, blocks) equals the MAE-style encoder; the decoder
  and head are dropped."""
  saved = eval_testing.save_pretraining_checkpoints(tmp_path / "pretrain", steps=(5,),
                                                    config=eval_testing.tiny_mae_config())[5]
  mesh = sharding.make_mesh(data=4, fsdp=2)
  config = finetune_config(tmp_path / "pretrain")
  student = students.restore_student(config.pretrained, mesh, model_overrides=config.model)
  classifier, params = finetune.classifier_from_student(
      student, config, lambda tree: sharding.param_shardings(tree, mesh, config.mesh.min_fsdp_size))
  assert not classifier.config.block_rel_pos_bias and classifier.config.abs_pos_emb
  params = jax.device_get(params)
  for name in ("patch_embed", "cls_token", "pos_embed", "blocks"):
    jax.tree.map(np.testing.assert_array_equal, params[name], saved[name])
  assert not {k for k in params if k.startswith("decoder") or k == "lm_head"}
