"""dtm_jax.losses: the DTM loss against the loop reference, its analytic gradient, and its argument checks, with the
group sums as CPUs take them and as accelerators do (one-hot matmuls)."""
import functools
import itertools

import jax
import jax.numpy as jnp
import morphing_reference as reference
import numpy as np
import pytest

from dtm_jax import losses, morphing, platform

_BATCH, _TOKENS, _CHANNELS = 2, 16, 8


def _case(seed):
  """Student, target and two schedules' groups (from the reference morph of the target) for a 4×4 patch grid.

  The student is spread wider than the target so that smooth-L1 sees differences on both sides of β = 2.
  """
  rng = np.random.default_rng(seed)
  target = rng.normal(size=(_BATCH, _TOKENS, _CHANNELS)).astype(np.float32)
  student = (3.0 * rng.normal(size=target.shape)).astype(np.float32)
  groups = np.array([[reference.morph(target[b], num_merge, num_iters)[0] for b in range(_BATCH)]
                     for num_merge, num_iters in [(9, 2), (14, 5)]], np.int32)
  assert len(set(groups[0, 0].tolist())) < _TOKENS  # the case really merges
  return student, target, groups


@pytest.fixture(params=["cpu", "tpu"])
def built_for(request):
  """Runs a test with the programs built as for CPUs (the CPU kernel's group sums) and as for TPUs (one-hot
  matmuls, no scatters); either runs on this host's CPU."""
  with platform.building_for(platform=request.param, num_devices=1) as target:
    yield target


@pytest.mark.usefixtures("built_for")
@pytest.mark.parametrize("kind,weighting,normalize_target",
                         list(itertools.product(losses.LOSS_KINDS, losses.WEIGHTINGS, (False, True))))
def test_matches_loop_reference(kind, weighting, normalize_target):
  student, target, groups = _case(0)
  loss = losses.dtm_loss(jnp.asarray(student), jnp.asarray(target), jnp.asarray(groups), kind=kind,
                         normalize_target=normalize_target, weighting=weighting)
  expected = reference.dtm_loss(student, target, groups.tolist(), kind=kind, normalize_target=normalize_target,
                                weighting=weighting)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(float(loss), expected, rtol=2e-5)


@pytest.mark.usefixtures("built_for")
@pytest.mark.parametrize("kind,weighting", list(itertools.product(losses.LOSS_KINDS, losses.WEIGHTINGS)))
def test_scored_positions_match_loop_reference(kind, weighting):
  """dtm.loss_positions="masked": groups span every token, only the scored ones count."""
  student, target, groups = _case(0)
  scored = np.random.default_rng(1).random(student.shape[:2]) < 0.6
  scored[:, 0] = True  # at least one per image
  loss = losses.dtm_loss(jnp.asarray(student), jnp.asarray(target), jnp.asarray(groups), kind=kind,
                         weighting=weighting, scored=jnp.asarray(scored))
  expected = reference.dtm_loss(student, target, groups.tolist(), kind=kind, weighting=weighting,
                                scored=scored.tolist())
  np.testing.assert_allclose(float(loss), expected, rtol=2e-5)
  singletons = np.broadcast_to(np.arange(student.shape[1]), groups.shape)
  token_wise = losses.token_wise_loss(jnp.asarray(student), jnp.asarray(target), kind=kind, scored=jnp.asarray(scored))
  np.testing.assert_allclose(float(token_wise), reference.dtm_loss(student, target, singletons.tolist(), kind=kind,
                                                                   scored=scored.tolist()), rtol=2e-5)


def _per_token_gradient(prediction, target, kind, beta=2.0):
  """d(per-token loss)/d(prediction) for one token's channels."""
  d = prediction - target
  if kind == "smooth_l1":
    return np.where(np.abs(d) < beta, d / beta, np.sign(d)) / len(d)
  if kind == "l1":
    return np.sign(d) / len(d)
  if kind == "l2":
    return 2 * d / len(d)
  p_norm, t_norm = np.linalg.norm(prediction), np.linalg.norm(target)
  return -(target / (p_norm * t_norm) - np.dot(prediction, target) * prediction / (p_norm ** 3 * t_norm))


@pytest.mark.usefixtures("built_for")
@pytest.mark.parametrize("kind,weighting", list(itertools.product(losses.LOSS_KINDS, losses.WEIGHTINGS)))
def test_gradient_is_the_analytic_one(kind, weighting):
  # Group means are a symmetric averaging P, so d loss / d student = Σ_schedules P (w ⊙ per-token gradient at P·s),
  # with w = 1/(L·B·N) per token, or 1/(L·B·groups·size) when every group weighs the same.
  student, target, groups = _case(1)
  num_schedules = len(groups)
  expected = np.zeros(student.shape, np.float64)
  for schedule_groups in groups:
    for b in range(_BATCH):
      ids = schedule_groups[b].tolist()
      morphed_student = reference.group_mean(student[b], ids)
      morphed_target = reference.group_mean(target[b], ids)
      weighted = np.zeros_like(morphed_student)
      for i in range(_TOKENS):
        if weighting == "token":
          weight = 1.0 / (num_schedules * _BATCH * _TOKENS)
        else:
          weight = 1.0 / (num_schedules * _BATCH * len(set(ids)) * ids.count(ids[i]))
        weighted[i] = weight * _per_token_gradient(morphed_student[i], morphed_target[i], kind)
      expected[b] += reference.group_mean(weighted, ids)

  gradient = jax.grad(losses.dtm_loss)(jnp.asarray(student), jnp.asarray(target), jnp.asarray(groups), kind=kind,
                                       weighting=weighting)
  np.testing.assert_allclose(gradient, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("kind,weighting", list(itertools.product(losses.LOSS_KINDS, losses.WEIGHTINGS)))
def test_one_hot_group_sums_give_the_same_loss_and_gradient(kind, weighting):
  # Accelerators take group sums, sizes and counts as one-hot matmuls; CPUs with the kernel (or a scatter-add).
  student, target, groups = (jnp.asarray(a) for a in _case(7))
  groups = groups.at[1, 0].set(jnp.asarray([0, 3, 3, 5, 0, 5, 5, 5, 0, 0, 3, 15, 15, 0, 3, 0]))  # unused ids too
  results = {}
  for target_platform in ("cpu", "tpu"):
    with platform.building_for(platform=target_platform, num_devices=1):
      loss_and_grad = jax.jit(jax.value_and_grad(functools.partial(losses.dtm_loss, kind=kind, weighting=weighting)))
      results[target_platform] = (loss_and_grad(student, target, groups),
                                  jax.jit(jax.vmap(morphing.num_groups))(groups),
                                  jax.jit(morphing.group_mean)(student, groups[1]))
  (cpu_loss, cpu_grad), cpu_counts, cpu_means = results["cpu"]
  (tpu_loss, tpu_grad), tpu_counts, tpu_means = results["tpu"]
  np.testing.assert_allclose(tpu_loss, cpu_loss, rtol=1e-6)
  np.testing.assert_allclose(tpu_grad, cpu_grad, rtol=1e-5, atol=1e-8)
  np.testing.assert_array_equal(tpu_counts, cpu_counts)
  np.testing.assert_allclose(tpu_means, cpu_means, rtol=1e-6, atol=1e-7)


def test_target_and_groups_are_constants():
  student, target, groups = _case(2)
  target_gradient = jax.grad(lambda t: losses.dtm_loss(jnp.asarray(student), t, jnp.asarray(groups)))(
      jnp.asarray(target))
  np.testing.assert_array_equal(target_gradient, np.zeros_like(target))


def test_without_merging_it_is_plain_token_distillation():
  student, target, _ = _case(3)
  identity = np.broadcast_to(np.arange(_TOKENS, dtype=np.int32), (2, _BATCH, _TOKENS))
  d = student.astype(np.float64) - target
  smooth_l1 = np.where(np.abs(d) < 2.0, 0.25 * d * d, np.abs(d) - 1.0).mean()
  for weighting in losses.WEIGHTINGS:  # with singleton groups, both weightings are the plain mean
    loss = losses.dtm_loss(jnp.asarray(student), jnp.asarray(target), jnp.asarray(identity), weighting=weighting)
    np.testing.assert_allclose(float(loss), smooth_l1, rtol=1e-5)


def test_bfloat16_inputs_are_computed_in_float32():
  student, target, groups = _case(4)
  student16, target16 = jnp.asarray(student, jnp.bfloat16), jnp.asarray(target, jnp.bfloat16)
  loss = losses.dtm_loss(student16, target16, jnp.asarray(groups))
  assert loss.dtype == jnp.float32
  expected = reference.dtm_loss(np.asarray(student16, np.float32), np.asarray(target16, np.float32), groups.tolist())
  np.testing.assert_allclose(float(loss), expected, rtol=2e-5)


def test_morphed_tokens_of_a_group_share_one_value():
  student, _, groups = _case(5)
  morphed = np.asarray(morphing.group_mean(jnp.asarray(student), jnp.asarray(groups[1])))
  for b in range(_BATCH):
    for i, j in itertools.combinations(range(_TOKENS), 2):
      if groups[1, b, i] == groups[1, b, j]:
        np.testing.assert_array_equal(morphed[b, i], morphed[b, j])


def test_invalid_arguments_say_what_to_do():
  student, target, groups = (jnp.asarray(a) for a in _case(6))
  with pytest.raises(ValueError, match="smooth_l1"):
    losses.dtm_loss(student, target, groups, kind="huber")
  with pytest.raises(ValueError, match="token"):
    losses.dtm_loss(student, target, groups, weighting="image")
  with pytest.raises(ValueError, match="beta > 0"):
    losses.dtm_loss(student, target, groups, beta=0.0)
  with pytest.raises(ValueError, match=r"\[batch, tokens, channels\]"):
    losses.dtm_loss(student, target[:, :-1], groups)
  with pytest.raises(ValueError, match=r"\[schedules, batch, tokens\]"):
    losses.dtm_loss(student, target, groups[0])


@pytest.mark.slow
@pytest.mark.parametrize("kind", losses.LOSS_KINDS)
@pytest.mark.parametrize("weighting", losses.WEIGHTINGS)
@pytest.mark.parametrize("normalize_target", [False, True])
def test_token_wise_loss_is_the_dtm_loss_of_singleton_groups(kind, weighting, normalize_target):
  """Token-wise distillation (`dtm.enabled=False`) skips morphing: the same loss and gradient as singleton groups."""
  rng = np.random.default_rng(0)
  student = jnp.asarray(rng.normal(size=(3, 9, 5)) * 3, jnp.float32)
  target = jnp.asarray(rng.normal(size=(3, 9, 5)) * 3, jnp.float32)
  singletons = jnp.broadcast_to(jnp.arange(9, dtype=jnp.int32), (2, 3, 9))
  expected = jax.value_and_grad(lambda s: losses.dtm_loss(s, target, singletons, kind=kind, weighting=weighting,
                                                          normalize_target=normalize_target))(student)
  actual = jax.value_and_grad(lambda s: losses.token_wise_loss(s, target, kind=kind,
                                                               normalize_target=normalize_target))(student)
  np.testing.assert_allclose(actual[0], expected[0], rtol=1e-6)
  np.testing.assert_allclose(actual[1], expected[1], rtol=1e-5, atol=1e-7)
