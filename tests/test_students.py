"""Restoring the student for evaluation: the right step, its weights, sharded, and clear errors."""
import eval_testing
import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from dtm_jax import students
from dtm_jax.models import convert, functional, vit


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
