"""dtm_jax.morphing: same partitions as the loop reference, one compiled program for every schedule, properties,
and programs built for accelerators free of scatters."""
import functools
import re

import jax
import jax.numpy as jnp
import morphing_reference as reference
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dtm_jax import aot, losses, morphing, platform, sharding

# Token values on this grid keep the test inputs exactly representable in float32, as in the float64 reference.
_GRID = 1.0 / 1024
# A case whose reference run made a decision on two scores closer than this is ill-posed for the comparison: either
# choice is right within rounding. The float32 similarities of these inputs differ from float64 by at most 7.3e-7
# (measured over 1.4M similarities, D = 8…512), so a gap above 2e-6 cannot flip. Such inputs are redrawn; it
# happens mostly with protect_first=False at N = 196, where the order of ~98 unmerged slots decides the next round.
_WELL_POSED_MARGIN = 2e-6
_PATTERNS = ("iid", "smooth", "flat_patch", "constant")


def _smooth_field(rng, side, dim):
  """A bilinear upsampling of a random 2×2…4×4 grid plus a little noise: neighbours alike, so groups get large."""
  coarse_side = int(rng.integers(2, 5))
  coarse = rng.normal(size=(coarse_side, coarse_side, dim))
  position = np.linspace(0, coarse_side - 1, side)
  low = np.minimum(position.astype(int), coarse_side - 2)
  frac = position - low
  rows = coarse[low] * (1 - frac)[:, None, None] + coarse[low + 1] * frac[:, None, None]
  field = rows[:, low] * (1 - frac)[None, :, None] + rows[:, low + 1] * frac[None, :, None]
  return field + 0.1 * rng.normal(size=field.shape)


def _tie_vector(rng, dim):
  """A token repeated to make exact ties: entries in {-1, 0, 1}.

  morph compares slots through sums of token inner products (see dtm_jax.morphing); with such entries those sums
  stay exact in float32 up to groups of all 196 tokens (196² · |v|² < 2²⁴ for |v|² ≈ dim · 2/3 at dim 512), so groups
  of this token have exactly this token's similarities and ties are real ties in float32 as in the reference.
  """
  return rng.integers(-1, 2, size=dim).astype(np.float64)


def _make_tokens(rng, pattern, side, dim):
  """Tokens [side², dim] of a side×side patch grid, with values on _GRID."""
  if pattern == "iid":
    x = rng.normal(size=(side, side, dim))
  elif pattern == "smooth":
    x = _smooth_field(rng, side, dim)
  elif pattern == "flat_patch":  # a constant rectangle on a smooth background: exact ties and one big group
    x = _smooth_field(rng, side, dim)
    height, width = rng.integers(1, side + 1, size=2)
    top, left = rng.integers(0, side - height + 1), rng.integers(0, side - width + 1)
    x[top:top + height, left:left + width] = _tie_vector(rng, dim)
  elif pattern == "constant":  # every score ties in every round
    x = np.broadcast_to(_tie_vector(rng, dim), (side, side, dim))
  else:
    raise ValueError(pattern)
  return (np.round(x.reshape(side * side, dim) / _GRID) * _GRID).astype(np.float32)


def _well_posed_case(rng, pattern, side, dim, num_merge, num_iters, protect_first):
  """Tokens and the reference groups for one case, redrawing inputs that sit on a float32 near-tie."""
  for _ in range(30):
    tokens = _make_tokens(rng, pattern, side, dim)
    groups, margin = reference.morph(tokens, num_merge, num_iters, protect_first)
    if margin >= _WELL_POSED_MARGIN:
      return tokens, groups
  raise AssertionError(f"No well-posed {pattern} input in 30 draws (side {side}, dim {dim}); make the inputs rougher.")


# Every N and every D twice (each pair is a compilation); cases per protect mode: 2 × (24 + 18 + 9) = 102, 204 in all,
# for each way of updating the slot Gram matrix.
@pytest.mark.slow
@pytest.mark.parametrize("implementation", ["cpu_kernel", "pairwise", "scatter", "matmul"])
@pytest.mark.parametrize("side,dim,num_cases", [(4, 8, 24), (4, 64, 24), (7, 8, 18), (7, 512, 18), (14, 64, 9),
                                                (14, 512, 9)])
def test_same_partitions_as_loop_reference(side, dim, num_cases, implementation):
  num_tokens = side * side
  for protect_first in (True, False):
    rng = np.random.default_rng([side, dim, int(protect_first)])
    # The first cases pin the edges of the schedule range; the rest are uniform over the default draw.
    schedules = [(0, 7), (num_tokens, 1), (num_tokens, 14)] + [
        (int(rng.integers(0, num_tokens + 1)), int(rng.integers(1, 15))) for _ in range(num_cases - 3)]
    tokens, expected = [], []
    for case, (num_merge, num_iters) in enumerate(schedules):
      case_tokens, case_groups = _well_posed_case(rng, _PATTERNS[case % len(_PATTERNS)], side, dim, num_merge,
                                                  num_iters, protect_first)
      tokens.append(case_tokens)
      expected.append(case_groups)
    num_merge, num_iters = (np.array(column, np.int32) for column in zip(*schedules))

    groups = np.asarray(morphing.morph(jnp.asarray(np.stack(tokens)), num_merge, num_iters,
                                       protect_first=protect_first, implementation=implementation))

    for case, (merge, iters) in enumerate(schedules):
      assert groups[case].tolist() == expected[case], (
          f"case {case}: pattern {_PATTERNS[case % len(_PATTERNS)]}, num_merge {merge}, num_iters {iters}, "
          f"protect_first {protect_first}, implementation {implementation}")


@pytest.fixture(params=["cpu", "tpu"])
def built_for(request):
  """Runs a test with the programs built as for CPUs and as for TPUs, where "auto" morphs by matmuls and group
  sums, sizes and counts are one-hot matmuls (the programs still run on this host's CPU)."""
  with platform.building_for(platform=request.param, num_devices=1) as target:
    expected = ("matmul",) if request.param == "tpu" else ("cpu_kernel", "pairwise")
    assert morphing._resolve_implementation("auto") in expected  # pylint: disable=protected-access
    yield target


@pytest.mark.usefixtures("built_for")
def test_one_compilation_for_any_schedule():
  batch, side, dim = 4, 7, 16
  tokens = jnp.asarray(np.random.default_rng(0).normal(size=(batch, side * side, dim)), jnp.float32)
  traces = []

  @jax.jit
  def morph(tokens, num_merge, num_iters):
    traces.append(1)
    return morphing.morph(tokens, num_merge, num_iters)

  realised = set()
  for seed in range(50):
    num_merge, num_iters = morphing.sample_schedules(jax.random.key(seed), batch, num_schedules=1,
                                                     max_merge=side * side, group_size=1 if seed % 2 else None)
    realised.update(np.asarray(morphing.num_groups(morph(tokens, num_merge[0], num_iters[0]))).tolist())
  assert len(traces) == 1
  assert morph._cache_size() == 1  # pylint: disable=protected-access
  assert len(realised) > 10  # the schedules really changed the result


@pytest.mark.usefixtures("built_for")
def test_one_compilation_of_the_whole_loss_and_its_gradient():
  batch, num_tokens, dim = 4, 49, 16
  rng = np.random.default_rng(1)
  teacher = jnp.asarray(rng.normal(size=(batch, num_tokens, dim)), jnp.float32)
  student = jnp.asarray(rng.normal(size=(batch, num_tokens, dim)), jnp.float32)
  traces = []

  @jax.jit
  def loss_and_grad(schedule_rng, student, teacher):
    traces.append(1)

    def loss_fn(student):
      num_merge, num_iters = morphing.sample_schedules(schedule_rng, batch, max_merge=num_tokens)
      groups = morphing.morph_schedules(teacher, num_merge, num_iters)
      return losses.dtm_loss(student, teacher, groups)
    return jax.value_and_grad(loss_fn)(student)

  values = {float(loss_and_grad(jax.random.key(seed), student, teacher)[0]) for seed in range(50)}
  assert len(traces) == 1
  assert loss_and_grad._cache_size() == 1  # pylint: disable=protected-access
  assert len(values) > 10


# [batch, dim] of the property tests' tokens per token count: those of the reference test where it has the token
# count, so that the tests share morph's compilations.
_SHAPES = {49: (18, 8), 64: (16, 8), 196: (9, 64), 576: (16, 8)}


def _random_tokens(num_tokens, seed, dtype=jnp.float32):
  batch, dim = _SHAPES[num_tokens]
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, num_tokens, dim)), dtype)


@pytest.mark.slow
@pytest.mark.usefixtures("built_for")
@pytest.mark.parametrize("side", [7, 8, 14, 24])  # N = 49, 64, 196, 576
def test_groups_partition_tokens_into_the_scheduled_number(side):
  num_tokens = side * side
  rng = np.random.default_rng(side)
  tokens = _random_tokens(num_tokens, side)
  batch = tokens.shape[0]
  num_merge = rng.integers(0, num_tokens + 1, size=batch)
  num_iters = rng.integers(1, 15, size=batch)
  for protect_first in (True, False):
    groups = np.asarray(morphing.morph(tokens, num_merge, num_iters, protect_first=protect_first))
    counts = np.asarray(morphing.num_groups(groups))
    for b in range(batch):
      expected = reference.expected_num_groups(num_tokens, int(num_merge[b]), int(num_iters[b]), protect_first)
      # Ids are the final slot positions: exactly 0..G-1, each used, so they partition the tokens into G groups.
      assert sorted(set(groups[b].tolist())) == list(range(expected))
      assert counts[b] == expected


@pytest.mark.usefixtures("built_for")
def test_merge_limits_follow_the_spec():
  tokens = _random_tokens(196, 2)
  everything, one_round, all_rounds = 196, 1, 14
  # With k = 1 at most 97 tokens go (98 without protecting slot 0), whatever num_merge asks.
  assert np.all(morphing.num_groups(morphing.morph(tokens, everything, one_round)) == 196 - 97)
  assert np.all(morphing.num_groups(morphing.morph(tokens, everything, one_round, protect_first=False)) == 196 - 98)
  # Slot 0 is never merged away in faithful mode: token 0 stays alone however much is merged.
  groups = np.asarray(morphing.morph(tokens, everything, all_rounds))
  assert np.all(np.sum(groups == groups[:, :1], axis=1) == 1)


@pytest.mark.usefixtures("built_for")
def test_no_merge_is_identity():
  tokens = _random_tokens(49, 3)
  batch = tokens.shape[0]
  for protect_first in (True, False):
    groups = morphing.morph(tokens, 0, np.arange(batch) % 14 + 1, protect_first=protect_first)
    np.testing.assert_array_equal(groups, np.broadcast_to(np.arange(49), (batch, 49)))


@pytest.mark.usefixtures("built_for")
def test_similarity_is_float32_for_bfloat16_tokens():
  tokens = _random_tokens(49, 4, jnp.bfloat16)
  num_merge, num_iters = np.arange(tokens.shape[0]) * 2, np.arange(tokens.shape[0]) % 14 + 1
  np.testing.assert_array_equal(morphing.morph(tokens, num_merge, num_iters),
                                morphing.morph(tokens.astype(jnp.float32), num_merge, num_iters))


def test_merges_per_round_matches_the_spec_formula():
  for num_tokens in (49, 196):
    merge, iters = np.meshgrid(np.arange(num_tokens + 1), np.arange(1, 15), indexing="ij")
    got = np.asarray(morphing.merges_per_round(merge, iters, num_tokens))
    expected = np.vectorize(lambda m, k: reference.merges_per_round(m, k, num_tokens))(merge, iters)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.usefixtures("built_for")
def test_group_mean_matches_reference_and_is_idempotent():
  rng = np.random.default_rng(5)
  tokens = _random_tokens(49, 5)
  x = rng.normal(size=(tokens.shape[0], 49, 6)).astype(np.float32)
  groups = morphing.morph(tokens, rng.integers(20, 49, size=tokens.shape[0]), rng.integers(1, 5, size=tokens.shape[0]))
  means = morphing.group_mean(jnp.asarray(x), groups)
  per_group, sizes = morphing.per_group_means(jnp.asarray(x), groups)
  for b in range(3):
    ids = np.asarray(groups[b]).tolist()
    np.testing.assert_allclose(means[b], reference.group_mean(x[b], ids), rtol=1e-6, atol=1e-6)
    assert np.asarray(sizes[b]).tolist() == [ids.count(g) for g in range(49)]
    np.testing.assert_allclose(np.asarray(per_group[b])[ids], means[b], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(morphing.group_mean(means, groups), means, rtol=1e-6, atol=1e-6)


@pytest.mark.usefixtures("built_for")
def test_grouping_is_a_constant_for_gradients():
  tokens = _random_tokens(49, 6)
  num_merge, num_iters = 30, 3

  def through_morph(tokens):
    return jnp.sum(morphing.group_mean(tokens, morphing.morph(tokens, num_merge, num_iters)) ** 2)

  groups = morphing.morph(tokens, num_merge, num_iters)
  np.testing.assert_allclose(jax.grad(through_morph)(tokens),
                             jax.grad(lambda t: jnp.sum(morphing.group_mean(t, groups) ** 2))(tokens), rtol=1e-6)


def test_sample_schedules_ranges_and_sharing():
  num_merge, num_iters = morphing.sample_schedules(jax.random.key(0), 4096, num_schedules=2, group_size=1)
  assert num_merge.shape == num_iters.shape == (2, 4096)
  assert num_merge.dtype == num_iters.dtype == jnp.int32
  assert set(np.unique(num_merge).tolist()) == set(range(197))  # U{0..196}, both ends included
  assert set(np.unique(num_iters).tolist()) == set(range(1, 15))  # U{1..14}
  shared_merge, shared_iters = morphing.sample_schedules(jax.random.key(1), 8, num_schedules=3)
  for shared in (shared_merge, shared_iters):
    assert shared.shape == (3, 8)
    assert np.all(shared == shared[:, :1])  # one draw per schedule, broadcast over the batch
  assert len(set(np.asarray(shared_merge[:, 0]).tolist())) > 1  # schedules differ from one another
  with pytest.raises(ValueError, match="max_iters"):
    morphing.sample_schedules(jax.random.key(0), 2, max_iters=0)


def test_schedule_groups_share_one_draw_each():
  batch, group = 48, 8
  num_merge, num_iters = morphing.sample_schedules(jax.random.key(3), batch, num_schedules=2, group_size=group)
  for drawn in (np.asarray(num_merge), np.asarray(num_iters)):
    assert drawn.shape == (2, batch)
    groups = drawn.reshape(2, batch // group, group)
    assert np.all(groups == groups[:, :, :1])  # each image has its group's schedule
  # B/g independent draws: the groups' values differ (6 groups × 2 schedules of U{0..196}: a repeat of all is ~0).
  assert len(set(np.asarray(num_merge)[0, ::group].tolist())) > 3
  assert len(set(map(tuple, np.asarray(num_merge).T[::group].tolist()))) == batch // group


def test_group_size_one_is_per_image_and_the_whole_batch_is_one_draw():
  key, batch = jax.random.key(5), 24
  per_image = morphing.sample_schedules(key, batch, group_size=1)
  assert len(set(np.asarray(per_image[0])[0].tolist())) > batch // 2  # ≈ one draw per image
  whole = morphing.sample_schedules(key, batch, group_size=batch)
  np.testing.assert_array_equal(whole[0], morphing.sample_schedules(key, batch)[0])  # None: the whole batch
  np.testing.assert_array_equal(whole[1], morphing.sample_schedules(key, batch)[1])
  assert np.all(np.asarray(whole[0]) == np.asarray(whole[0])[:, :1])
  with pytest.raises(ValueError, match="does not split into schedule groups of 5"):
    morphing.sample_schedules(key, batch, group_size=5)


def _morphing_and_loss_step(batch, num_tokens, kind="smooth_l1"):
  """(seed, student, teacher) → value and gradient of a training step's morphing and DTM loss (plus group_mean and
  the logged group counts), all built for the current platform."""

  def step(seed, student, teacher):
    def loss_fn(student):
      num_merge, num_iters = morphing.sample_schedules(jax.random.key(seed), batch, max_merge=num_tokens)
      groups = morphing.morph_schedules(teacher, num_merge, num_iters)
      loss = losses.dtm_loss(student, teacher, groups, kind=kind)
      loss += 1e-3 * jnp.mean(morphing.group_mean(student, groups[0]) ** 2)
      return loss, jax.vmap(morphing.num_groups)(groups)
    return jax.value_and_grad(loss_fn, has_aux=True)(student)

  return step


@pytest.mark.parametrize("target,lowering_platform", [("tpu", "tpu"), ("gpu", "cuda")])
def test_accelerator_programs_have_no_scatter(target, lowering_platform):
  # TPUs run scatters nearly one element at a time and GPUs with (non-deterministic) atomics: the programs built for
  # them morph and take the loss's group sums by matmuls and comparisons only, for every loss kind.
  batch, num_tokens, dim = 4, 49, 16
  tokens = jax.ShapeDtypeStruct((batch, num_tokens, dim), jnp.float32)
  seed = jax.ShapeDtypeStruct((), jnp.int32)
  for kind in losses.LOSS_KINDS:
    with platform.building_for(platform=target, num_devices=1):
      lowered = jax.jit(_morphing_and_loss_step(batch, num_tokens, kind)).trace(seed, tokens, tokens).lower(
          lowering_platforms=(lowering_platform,))
    text = lowered.as_text()
    assert "stablehlo.while" in text and "stablehlo.dot_general" in text  # the rounds are there, as matmuls
    assert "stablehlo.scatter" not in text, kind


@pytest.mark.slow
def test_compiled_tpu_program_has_no_scatter():
  # The TPU compiler's own passes must not bring scatters back either. The optimised HLO names ops as `opcode(`.
  batch, num_tokens, dim = 4, 49, 16
  mesh = jax.sharding.Mesh(np.array(aot.topology("v5e:2x2").devices[:1]), ("data",))
  replicated = NamedSharding(mesh, P())
  tokens = jax.ShapeDtypeStruct((batch, num_tokens, dim), jnp.float32, sharding=replicated)
  schedule = jax.ShapeDtypeStruct((1, batch), jnp.int32, sharding=replicated)
  with platform.building_for(mesh), aot.outside_the_compilation_cache():
    text = jax.jit(_morphing_and_loss_step(batch, num_tokens)).lower(
        jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), tokens, tokens).compile().as_text()
    with_scatter = jax.jit(functools.partial(morphing.morph_schedules, implementation="scatter")).lower(
        tokens, schedule, schedule).compile().as_text()
  assert re.search(r"\swhile\(", text) and re.search(r"\sconvolution\(", text)  # the rounds, as matmuls
  assert not re.search(r"\sscatter\(", text)
  assert re.search(r"\sscatter\(", with_scatter)  # the check sees scatters where there are some


def test_schedule_draw_does_not_depend_on_the_device_count():
  # The same seed and step give the same schedules whether the batch lives on 1 device or is split over 8.
  key = jax.random.fold_in(jax.random.key(0), 7)
  draw = lambda k: morphing.sample_schedules(k, 32, group_size=8, max_merge=49)
  drawn = {}
  for devices in (1, 8):
    mesh = sharding.make_mesh(devices, 1, devices=jax.devices()[:devices])
    spread = NamedSharding(mesh, P(None, mesh.axis_names))
    merge, iters = jax.jit(draw, out_shardings=(spread, spread))(key)
    assert merge.sharding.num_devices == iters.sharding.num_devices == devices
    drawn[devices] = jax.device_get((merge, iters))
  for one, eight in zip(drawn[1], drawn[8]):
    np.testing.assert_array_equal(one, eight)
