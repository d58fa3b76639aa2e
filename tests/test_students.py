"""Restoring the student for evaluation: the right step, its weights, sharded, and clear errors."""
import dataclasses
import json

import eval_testing
import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from dtm_jax import students
from dtm_jax.models import convert, functional, vit
from dtm_jax.runtime import checkpoint, errors


@pytest.fixture(scope="module")
def pretraining_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("pretrain")
  return workdir, eval_testing.save_pretraining_checkpoints(workdir, steps=(10, 20, 30))




def pretrained(workdir, step=None):
  return ml_collections.ConfigDict({"workdir": str(workdir), "step": step})


def assert_same_params(restored, saved):
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(saved), strict=True):
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("step,expected", [(None, 30), (20, 20), (10, 10)])
def test_restores_the_requested_step(pretraining_workdir, mesh, step, expected):
  workdir, saved = pretraining_workdir
  student = students.restore_student(pretrained(workdir, step), mesh, min_fsdp_size=1024)
  assert student.step == expected
  assert student.checkpoint.endswith(f"checkpoints/{expected}")
  assert student.source() == {"checkpoint": student.checkpoint, "step": expected}
  assert student.config == eval_testing.tiny_student_config()
  assert_same_params(student.params, saved[expected])
  # Large parameters are split over the fsdp axis, as in training.
  qkv = student.params["blocks"][0]["attn"]["qkv"]["kernel"]
  assert "fsdp" in qkv.sharding.spec


def test_a_step_directory_is_accepted(pretraining_workdir, mesh):
  workdir, saved = pretraining_workdir
  student = students.restore_student(pretrained(workdir / "checkpoints" / "20"), mesh)
  assert student.step == 20
  assert_same_params(student.params, saved[20])


def test_model_overrides_apply(pretraining_workdir, mesh):
  workdir, _ = pretraining_workdir
  student = students.restore_student(pretrained(workdir), mesh, model_overrides={"drop_path_rate": 0.2})
  assert student.config.drop_path_rate == 0.2


def test_missing_step_lists_the_available_ones(pretraining_workdir, mesh):
  workdir, _ = pretraining_workdir
  with pytest.raises(FileNotFoundError, match=r"\[10, 20, 30\]"):
    students.restore_student(pretrained(workdir, 15), mesh)


def test_unset_workdir_says_what_to_set(mesh):
  with pytest.raises(ValueError, match="config.pretrained.workdir"):
    students.restore_student(pretrained(""), mesh)


def test_converted_student(tmp_path, mesh):
  config = eval_testing.tiny_student_config()
  saved = jax.device_get(functional.split_module(vit.PretrainViT(config, rngs=nnx.Rngs(3)))[1])
  convert.save_converted(convert.Converted(kind="vit", config=config, params=saved), tmp_path / "converted")
  student = students.restore_student(pretrained(tmp_path / "converted"), mesh)
  assert student.step is None and student.config == config
  assert_same_params(student.params, saved)
  with pytest.raises(ValueError, match="no steps"):
    students.restore_student(pretrained(tmp_path / "converted", 5), mesh)


@pytest.mark.parametrize("kind, keys", [("fine-tuning", {"best_top1": 70.0, "pretrained": {}}),
                                        ("segmentation", {"best_miou": 20.0, "pretrained": {}}),
                                        ("linear-probe", {"epoch": 3, "best_top1": 50.0})])
def test_a_workdir_of_another_kind_of_run_is_named_as_such(tmp_path, mesh, kind, keys):
  """pretrained.workdir pointing at a fine-tuning (or segmentation, probe) run: one line saying what it is."""
  eval_testing.save_pretraining_checkpoints(tmp_path, steps=(4,))
  path = tmp_path / "checkpoints" / "4" / "metadata" / "metadata"
  path.write_text(json.dumps({**json.loads(path.read_text()), **keys}))
  with pytest.raises(errors.ConfigError, match=f"is a {kind} run .*wants a pretraining run's workdir"):
    students.restore_student(pretrained(tmp_path), mesh)


def test_weights_of_another_architecture_name_the_parameters_and_shapes_that_differ(tmp_path, mesh):
  eval_testing.save_pretraining_checkpoints(tmp_path, steps=(4,), config=eval_testing.tiny_student_config(depth=1))
  path = tmp_path / "checkpoints" / "4" / "metadata" / "metadata"
  metadata = json.loads(path.read_text())
  metadata["model_config"]["depth"] = 2  # says 2 blocks, holds 1
  metadata["model_config"]["mlp_ratio"] = 2.0  # and MLPs half as wide
  path.write_text(json.dumps(metadata))
  with pytest.raises(checkpoint.ParamsMismatchError) as error:
    students.restore_student(pretrained(tmp_path), mesh)
  message = str(error.value)
  assert str(tmp_path / "checkpoints" / "4" / "params") in message
  assert "blocks.0.mlp.fc1.kernel: saved" in message and "missing (blocks.1." in message, message
  assert isinstance(error.value, errors.RunError)  # one line from main.py


def test_an_mae_style_checkpoint_restores_with_its_encoder_as_the_trunk(tmp_path, mesh):
  architecture = eval_testing.tiny_mae_config()
  saved = eval_testing.save_pretraining_checkpoints(tmp_path, steps=(4,), config=architecture)[4]
  student = students.restore_student(pretrained(tmp_path), mesh, model_overrides={"drop_path_rate": 0.1})
  assert student.config == dataclasses.replace(architecture.encoder, drop_path_rate=0.1)
  assert type(student.config) is vit.ViTConfig  # what a classifier or segmenter is built from
  assert student.pretraining_architecture == dataclasses.replace(architecture, drop_path_rate=0.1)
  assert_same_params(student.params, saved)
  images = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
  assert student.model.apply(student.params, images, method="encode").shape == (2, 17, architecture.width)
  untrained = students.initial_student(student.pretraining_architecture, mesh, seed=0)  # compare's baseline
  assert set(untrained.params) == set(saved) and untrained.config == student.config


def test_an_mae_style_architecture_names_its_encoder_for_compile():
  from configs import dtm_mae_vit_b16_in1k, knn_demo  # pylint: disable=g-import-not-at-top
  config = knn_demo.get_config()
  config.pretrained.architecture = dtm_mae_vit_b16_in1k.get_config().model.to_dict()
  trunk = students.student_config_of(config)
  assert type(trunk) is vit.ViTConfig and trunk.abs_pos_emb and not trunk.block_rel_pos_bias
  assert (trunk.width, trunk.depth, trunk.image_size) == (768, 12, 224)
