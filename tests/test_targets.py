"""Target kinds: shapes, no gradient into teachers, pixel normalisation, the EMA teacher and its update rule."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from dtm_jax import sharding, targets
from dtm_jax.models import functional, vit
from dtm_jax.modes import pretrain as train
from dtm_jax.runner import run as runner
from dtm_jax.runtime import checkpoint as checkpoint_lib

IMAGE, PATCH = 16, 4
TOKENS = (IMAGE // PATCH) ** 2


def target_config(**fields) -> ml_collections.ConfigDict:
  """A `config.target` block with configs/common.py's defaults (built here: that module would load TensorFlow)."""
  config = ml_collections.ConfigDict(dict(
      kind="clip", checkpoint="", init="checkpoint", dtype="float32", variant="test", overrides={}, seed=0,
      head_dtype=None, features="head", step=None, normalize_patches=True, ema_momentum=0.996, ema_momentum_end=1.0))
  config.update(fields)
  return config


def student_config(**overrides) -> vit.ViTConfig:
  return vit.get_config("test", image_size=IMAGE, patch_size=PATCH, out_dim=8, **overrides)


def images(batch=2, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, IMAGE, IMAGE, 3)).astype(np.float32))


def total_abs(tree) -> float:
  return float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(tree)))


# ----- pixels ------------------------------------------------------------------------------------------------------
def test_patchify_cuts_row_major_patches():
  x = images()
  patches = targets.patchify(x, PATCH)
  assert patches.shape == (2, TOKENS, PATCH * PATCH * 3)
  grid = IMAGE // PATCH
  for index in (0, 1, grid, TOKENS - 1):
    row, col = divmod(index, grid)
    window = x[:, row * PATCH:(row + 1) * PATCH, col * PATCH:(col + 1) * PATCH, :]
    np.testing.assert_array_equal(patches[:, index], window.reshape(2, -1))


def test_pixel_targets_are_standardised_per_patch():
  x = images() * 3.0 + 1.5
  target = targets.build_target(target_config(kind="pixels"), image_size=IMAGE, patch_size=PATCH)
  tokens = target.tokens(target.params, x)
  assert target.out_dim == PATCH * PATCH * 3 and tokens.shape == (2, TOKENS, target.out_dim)
  np.testing.assert_allclose(tokens.mean(-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(tokens.std(-1), 1.0, atol=1e-4)
  raw = targets.build_target(target_config(kind="pixels", normalize_patches=False), image_size=IMAGE,
                             patch_size=PATCH)
  np.testing.assert_array_equal(raw.tokens(raw.params, x), targets.patchify(x, PATCH))


def test_a_flat_patch_standardises_to_zeros_not_nan():
  x = jnp.ones((1, IMAGE, IMAGE, 3)).at[:, :PATCH, :PATCH].set(7.0)
  target = targets.build_target(target_config(kind="pixels"), image_size=IMAGE, patch_size=PATCH)
  tokens = target.tokens(target.params, x)
  assert np.all(np.isfinite(tokens))
  np.testing.assert_allclose(tokens[0, 0], 0.0, atol=1e-6)


# ----- frozen teachers: clip and checkpoint -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def random_clip():
  config = target_config(kind="clip", init="random", variant="test", overrides={"patch_size": PATCH})
  return targets.build_target(config, image_size=IMAGE, patch_size=PATCH)


def test_random_clip_target_gives_projected_patch_tokens(random_clip):
  target = random_clip
  tokens = jax.jit(target.tokens)(target.params, images(3))
  assert tokens.shape == (3, TOKENS, 16) and target.out_dim == 16 and tokens.dtype == jnp.float32
  assert target.forward_flops > 0 and not target.is_ema
  # Different images, different targets: the tower is not a constant.
  assert float(jnp.abs(tokens[0] - tokens[1]).max()) > 1e-3


def test_a_float32_head_takes_the_last_rounding_out_of_a_bfloat16_teacher():
  # target.head_dtype: ln_post and proj in float32 after bfloat16 blocks (the teacher-precision option).
  build = lambda **f: targets.build_target(target_config(init="random", overrides={"patch_size": PATCH}, **f),
                                           image_size=IMAGE, patch_size=PATCH)
  exact, low, head = build(), build(dtype="bfloat16"), build(dtype="bfloat16", head_dtype="float32")
  x = images(4)
  reference = np.asarray(exact.tokens(exact.params, x))
  error = lambda t: float(np.linalg.norm(np.asarray(t.tokens(t.params, x)) - reference) / np.linalg.norm(reference))
  assert head.params is not None and jax.tree.structure(head.params) == jax.tree.structure(low.params)
  assert 0 < error(head) < error(low)
  # The bf16 head rounds its output to bf16; the float32 head's tokens are not representable in bf16.
  tokens = np.asarray(head.tokens(head.params, x))
  assert np.any(tokens != np.asarray(jnp.asarray(tokens, jnp.bfloat16), np.float32))
  low_tokens = np.asarray(low.tokens(low.params, x))
  np.testing.assert_array_equal(low_tokens, np.asarray(jnp.asarray(low_tokens, jnp.bfloat16), np.float32))


def test_no_gradient_flows_into_a_teacher_or_through_it(random_clip):
  target = random_clip
  x = images()

  def loss(apply, params, x):
    return jnp.sum(jnp.square(apply(params, x)))

  grad = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0)
  # The raw tower is differentiable (so the checks below can fail) ...
  assert total_abs(grad(target._apply, target.params, x)[0]) > 0
  # ... but target tokens pass no gradient to the teacher's parameters nor to the images.
  to_params, to_images = grad(target.tokens, target.params, x)
  assert total_abs(to_params) == 0 and total_abs(to_images) == 0


def save_student_checkpoint(workdir, config: vit.ViTConfig, seed=0):
  """A pretraining-style checkpoint (params + metadata) of a fresh student, as dtm_jax.modes.pretrain writes it."""
  _, params = functional.split_module(vit.PretrainViT(config, rngs=nnx.Rngs(seed)))
  checkpointer = checkpoint_lib.Checkpointer(workdir, async_save=False)
  checkpointer.save(7, params=params, train={"step": jnp.int32(7)}, data_iterator=None,
                    metadata={"model_config": checkpoint_lib.model_config_to_json(config)})
  checkpointer.close()
  return params


def test_checkpoint_target_restores_a_run_and_is_frozen(tmp_path):
  config = student_config()
  params = save_student_checkpoint(tmp_path, config)
  fm, _ = functional.abstract_split(lambda: vit.PretrainViT(config, rngs=nnx.Rngs(1)))
  x = images()

  head = targets.build_target(target_config(kind="checkpoint", checkpoint=str(tmp_path), dtype="float32"),
                              image_size=IMAGE, patch_size=PATCH)
  assert head.out_dim == config.out_dim
  np.testing.assert_allclose(jax.jit(head.tokens)(head.params, x), jax.jit(fm.apply)(params, x, None), rtol=1e-5,
                             atol=1e-6)

  encoder = targets.build_target(
      target_config(kind="checkpoint", checkpoint=str(tmp_path), dtype="float32", features="encoder"),
      image_size=IMAGE, patch_size=PATCH)
  assert encoder.out_dim == config.width
  expected = jax.jit(lambda p, x: fm.apply(p, x, method="encode")[:, 1:])(params, x)
  np.testing.assert_allclose(jax.jit(encoder.tokens)(encoder.params, x), expected, rtol=1e-5, atol=1e-6)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(encoder.tokens(p, x))))(encoder.params)
  assert total_abs(grads) == 0


def test_checkpoint_target_rejects_another_image_size(tmp_path):
  save_student_checkpoint(tmp_path, student_config())
  with pytest.raises(ValueError, match="image size"):
    targets.build_target(target_config(kind="checkpoint", checkpoint=str(tmp_path)), image_size=2 * IMAGE,
                         patch_size=PATCH)


def test_checkpoint_target_restores_fsdp_sharded_onto_the_runs_mesh(tmp_path):
  """A teacher saved FSDP-sharded on one topology restores onto the run's mesh with the run's shardings (never with
  the saved ones), whatever the saving mesh was; without a mesh it is restored onto one local device."""
  from dtm_jax import sharding  # pylint: disable=g-import-not-at-top
  config = student_config()
  _, params = functional.split_module(vit.PretrainViT(config, rngs=nnx.Rngs(0)))
  saved_mesh = sharding.make_mesh(data=1, fsdp=8)
  saved = jax.device_put(params, sharding.param_shardings(params, saved_mesh, min_fsdp_size=64))
  assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated for x in jax.tree.leaves(saved))
  checkpointer = checkpoint_lib.Checkpointer(tmp_path, async_save=False)
  checkpointer.save(7, params=saved, train={"step": jnp.int32(7)}, data_iterator=None,
                    metadata={"model_config": checkpoint_lib.model_config_to_json(config)})
  checkpointer.close()

  # The run: another topology (data 2 × fsdp 4, devices in reverse order).
  run_mesh = sharding.make_mesh(data=2, fsdp=4, devices=jax.devices()[::-1])
  target = targets.build_target(target_config(kind="checkpoint", checkpoint=str(tmp_path), dtype="float32"),
                                image_size=IMAGE, patch_size=PATCH, mesh=run_mesh, min_fsdp_size=64)
  expected = sharding.param_shardings(params, run_mesh, min_fsdp_size=64)
  for got, want, value in zip(jax.tree.leaves(target.params), jax.tree.leaves(expected), jax.tree.leaves(params)):
    assert got.sharding == want
    np.testing.assert_array_equal(np.asarray(got), np.asarray(value))
  assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(target.params))

  local = targets.build_target(target_config(kind="checkpoint", checkpoint=str(tmp_path), dtype="float32"),
                               image_size=IMAGE, patch_size=PATCH)
  assert all(x.sharding.device_set == {jax.local_devices()[0]} for x in jax.tree.leaves(local.params))


def test_config_errors_name_the_fix(tmp_path):
  with pytest.raises(ValueError, match="choose one of"):
    targets.validate_target_config(target_config(kind="dino"))
  with pytest.raises(ValueError, match="config.target.checkpoint is empty"):
    targets.validate_target_config(target_config(kind="checkpoint", checkpoint=""))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    targets.validate_target_config(target_config(kind="clip", checkpoint=str(tmp_path / "missing")))
  with pytest.raises(ValueError, match="needs the student config"):
    targets.build_target(target_config(kind="ema"), image_size=IMAGE, patch_size=PATCH)


# ----- ema ----------------------------------------------------------------------------------------------------------
def test_ema_target_is_the_standardised_final_patch_tokens():
  config = student_config()
  fm, params = functional.split_module(vit.PretrainViT(config, rngs=nnx.Rngs(0)))
  target = targets.build_target(target_config(kind="ema"), image_size=IMAGE, patch_size=PATCH, student_config=config)
  assert target.is_ema and target.params == {} and target.out_dim == config.width
  x = images()
  tokens = target.tokens(params, x)
  final = fm.apply(params, x, method="encode")[:, 1:]
  assert tokens.shape == (2, TOKENS, config.width)
  np.testing.assert_allclose(tokens, targets.standardize_tokens(final), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(tokens.mean(-1), 0.0, atol=1e-5)
  assert total_abs(jax.grad(lambda p: jnp.sum(target.tokens(p, x) * final))(params)) == 0


def test_ema_target_averages_the_last_blocks():
  """K = 2 of a 2-block student: the mean of the standardised outputs of block 1 and block 2 (each through the final
  norm). Block 1's output is computed independently, by a 1-block student holding the same weights."""
  config = student_config()
  _, params = functional.split_module(vit.PretrainViT(config, rngs=nnx.Rngs(0)))
  x = images()
  last_two = targets.build_target(target_config(kind="ema", ema_num_blocks=2), image_size=IMAGE, patch_size=PATCH,
                                  student_config=config)
  final = targets.build_target(target_config(kind="ema"), image_size=IMAGE, patch_size=PATCH, student_config=config)
  shallow_config = dataclasses.replace(config, depth=1)
  shallow, _ = functional.split_module(vit.PretrainViT(shallow_config, rngs=nnx.Rngs(0)))
  shallow_params = {**params, "blocks": {0: params["blocks"][0]}}
  first = targets.standardize_tokens(shallow.apply(shallow_params, x, method="encode")[:, 1:])
  expected = (first + final.tokens(params, x)) / 2
  np.testing.assert_allclose(last_two.tokens(params, x), expected, rtol=1e-4, atol=1e-5)
  assert "last 2 blocks" in last_two.description
  with pytest.raises(ValueError, match="ema_num_blocks"):
    targets.build_target(target_config(kind="ema", ema_num_blocks=3), image_size=IMAGE, patch_size=PATCH,
                         student_config=config)


def test_ema_momentum_follows_a_cosine_from_start_to_end():
  cfg = target_config(ema_momentum=0.99, ema_momentum_end=1.0)
  at = lambda step: float(targets.ema_momentum(cfg, jnp.asarray(step), 100))
  assert at(0) == pytest.approx(0.99)
  assert at(50) == pytest.approx(0.995)
  assert at(100) == pytest.approx(1.0) and at(1000) == pytest.approx(1.0)
  steps = [at(s) for s in range(0, 101, 10)]
  assert steps == sorted(steps) and at(25) < 0.995 - 0.0025  # cosine: slow start, unlike a straight line


def test_ema_update_moves_towards_the_student():
  ema = {"w": jnp.array([1.0, 2.0]), "b": {"c": jnp.array(4.0)}}
  student = {"w": jnp.array([3.0, 0.0]), "b": {"c": jnp.array(0.0)}}
  updated = targets.ema_update(ema, student, jnp.float32(0.75))
  np.testing.assert_allclose(updated["w"], [1.5, 1.5])
  np.testing.assert_allclose(updated["b"]["c"], 3.0)
  assert jax.tree.structure(updated) == jax.tree.structure(ema)


def test_train_step_feeds_the_ema_to_the_target_and_updates_it_after_the_optimizer():
  params = {"w": jnp.array([1.0, -2.0])}
  ema_params = {"w": jnp.array([5.0, 5.0])}
  seen = []

  def loss_and_grads(params, target_params, batch, step):
    del batch, step
    seen.append(target_params)
    return jnp.float32(1.0), jnp.float32(3.0), {"w": jnp.array([1.0, 1.0])}

  tx = optax.sgd(0.5)
  momentum = lambda step: 0.9 - 0.1 * step
  step_fn = train.make_train_step(loss_and_grads=loss_and_grads, tx=tx, lr_schedule=lambda step: 0.5,
                                  ema_momentum=momentum)
  state = {"step": jnp.int32(1), "params": params, "opt_state": tx.init(params),
           "nonfinite": jnp.full((2,), -1, jnp.int32), "ema_params": ema_params}
  new_state, _ = jax.jit(step_fn)(state, {}, {"image": jnp.zeros((1,)), "mask": jnp.zeros((1,))})
  assert len(seen) == 1 and set(seen[0]) == {"w"}  # the EMA params, not the (empty) frozen target params
  new_params = np.array([0.5, -2.5])  # one SGD step
  np.testing.assert_allclose(new_state["params"]["w"], new_params)
  np.testing.assert_allclose(new_state["ema_params"]["w"], 0.8 * np.array([5.0, 5.0]) + 0.2 * new_params,
                             rtol=1e-6)


@pytest.mark.slow
def test_pretraining_from_a_checkpoint_teacher_on_an_fsdp_mesh(tmp_path):
  """The `checkpoint` teacher is restored onto the run's FSDP shardings and goes into the step as it is."""
  from train_testing import tiny_config  # pylint: disable=g-import-not-at-top
  fsdp = {"mesh.data": 1, "mesh.fsdp": 8, "mesh.min_fsdp_size": 16, "total_steps": 2, "checkpoint_every": 2}
  runner.run("pretrain", tiny_config(**fsdp), str(tmp_path / "teacher"))
  config = tiny_config(**fsdp, **{"target.kind": "checkpoint", "target.checkpoint": str(tmp_path / "teacher")})
  mesh = sharding.make_mesh(1, 8)
  program = train.build_program(config, mesh)
  sharded = [leaf for leaf in jax.tree.leaves(program.target.params) if leaf.size >= 16 and
             leaf.sharding.spec != jax.sharding.PartitionSpec()]
  assert sharded and all(leaf.sharding.mesh.shape == mesh.shape for leaf in sharded)
  result = runner.run("pretrain", config, str(tmp_path / "student"))
  assert result["step"] == 2 and np.isfinite(result["loss"])
