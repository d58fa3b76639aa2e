"""Fine-tuning: BEiT layer-wise lr decay, and a run from a restored tiny pretraining checkpoint that learns and resumes."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import finetune_demo
from dtm_jax import metrics, optim, sharding
from dtm_jax.evaluate import common, finetune
from dtm_jax.models import functional, vit

import eval_testing


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
BATCH, STEPS_PER_EPOCH = 32, 12


@pytest.fixture(scope="module")
def pretraining_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("pretrain")
  eval_testing.save_pretraining_checkpoints(workdir, steps=(5, 7))
  return workdir


def finetune_config(pretraining_workdir, **overrides):
  config = finetune_demo.get_config()
  config.pretrained.update(workdir=str(pretraining_workdir), step=5)
  config.update(num_classes=eval_testing.NUM_CLASSES, num_train_examples=BATCH * STEPS_PER_EPOCH, batch_size=BATCH,
                eval_batch_size=64, epochs=2, warmup_epochs=0, ema_decay=0.9, log_every=4)
  config.update(overrides)
  config.optim.update(base_lr=2e-3, layer_decay=0.75)
  return config


def run_finetune(config, workdir, mesh, student_fn=None):
  stream = eval_testing.TintedStream(BATCH)
  student_fn = student_fn or (lambda: common.restore_student(config.pretrained, mesh, model_overrides=config.model))
  result = finetune.train_and_evaluate(
      config, str(workdir), student_fn=student_fn, train_data_fn=lambda size: stream,
      eval_data_fn=lambda size: eval_testing.tinted_eval_batches(200, config.eval_batch_size), mesh=mesh)
  return result, stream


def test_finetune_learns_records_best_and_last_and_resumes(pretraining_workdir, tmp_path):
  mesh = sharding.make_mesh(data=4, fsdp=2)
  config = finetune_config(pretraining_workdir)
  result, stream = run_finetune(config, tmp_path, mesh)
  chance = 100.0 / eval_testing.NUM_CLASSES
  assert result["checkpoint"].endswith("checkpoints/5") and result["step"] == 5
  assert result["steps"] == 2 * STEPS_PER_EPOCH and stream.step == 2 * STEPS_PER_EPOCH
  assert result["last_top1"] == result["top1"] > 2 * chance
  assert result["ema_top1"] > chance
  rows = metrics.read_jsonl(tmp_path / "metrics.jsonl")
  evals = [r for r in rows if "top1" in r]
  assert [r["step"] for r in evals] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]  # every epoch
  assert result["best_top1"] == max(r["top1"] for r in evals)
  assert all(np.isfinite(r["train_loss"]) for r in rows if "train_loss" in r)

  # A longer run in the same workdir resumes from its last checkpoint: weights, optimizer and data position.
  def no_restore():
    raise AssertionError("a resumed fine-tuning must not restore the pretrained student again")

  config = finetune_config(pretraining_workdir, epochs=3)
  resumed, stream = run_finetune(config, tmp_path, mesh, student_fn=no_restore)
  assert stream.step == 3 * STEPS_PER_EPOCH  # continued from batch 24, not from 0
  assert resumed["steps"] == 3 * STEPS_PER_EPOCH
  assert resumed["checkpoint"] == result["checkpoint"] and resumed["step"] == 5
  assert resumed["best_top1"] >= result["best_top1"]
