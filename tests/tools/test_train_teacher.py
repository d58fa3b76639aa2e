"""The semantic teacher of tools/semantic_teacher.py: it learns, it saves as a loadable `clip` target, the pilot's
zero-shot measure reads its class embeddings."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dtm_jax import targets
from dtm_jax.evaluators import frozen_features
from tools import semantic_teacher, spatial_measures, teachers

TINY = dict(image_size=16, width=32, depth=1, num_heads=2, mlp_dim=64, proj_dim=16)


def bright_band_split(count: int, seed: int) -> frozen_features.Split:
  """Class c = which of four horizontal bands of a 16² image is bright: easy, and kept by the teacher's flip."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 4, count).astype(np.int32)
  images = rng.normal(0, 0.3, (count, 16, 16, 3)).astype(np.float32)
  for i, c in enumerate(labels):
    images[i, 4 * c:4 * c + 4] += 2.0
  return frozen_features.Split(images, labels)


def test_augment_flips_and_shifts_with_a_background_border():
  images = jnp.arange(4 * 6 * 6, dtype=jnp.float32).reshape(4, 6, 6, 1) + 1
  out = np.asarray(semantic_teacher.augment(images, jax.random.key(3), background=-5.0, shift=1))
  seen = set()
  for image, original in zip(out, np.asarray(images)):
    matches = []
    for flip in (False, True):
      padded = np.pad(original[:, ::-1] if flip else original, ((1, 1), (1, 1), (0, 0)), constant_values=-5.0)
      matches += [(flip, dy, dx) for dy in range(3) for dx in range(3)
                  if np.array_equal(image, padded[dy:dy + 6, dx:dx + 6])]
    assert matches, "not a flipped and/or shifted copy of its input"
    seen.update(matches)
  assert any(m != (False, 1, 1) for m in seen)  # something moved


@pytest.mark.slow
def test_teacher_learns_and_saves_a_loadable_clip_target_with_class_embeddings(tmp_path):
  config = semantic_teacher.tower_config(**TINY)
  data = bright_band_split(512, seed=0)
  tower, initial = semantic_teacher.init_teacher(config, 4, seed=0)
  before = semantic_teacher.top1(tower, initial, data)
  tower, state = semantic_teacher.train(config, data, num_classes=4, epochs=8, batch_size=32, lr=3e-3, seed=0,
                                     background=0.0, log_every=1000)
  after = semantic_teacher.top1(tower, state, bright_band_split(128, seed=1))
  assert after > max(before, 25.0) + 20, (before, after)

  out = tmp_path / "teacher"
  semantic_teacher.save(out, config, state, {"test_top1": after})
  target_cfg = ml_collections.ConfigDict(dict(kind="clip", checkpoint=str(out), dtype="float32"))
  targets.validate_target_config(target_cfg)
  target = targets.build_target(target_cfg, image_size=16, patch_size=4)
  images = jnp.asarray(data.images[:5])
  tokens = np.asarray(target.tokens(target.params, images))
  assert tokens.shape == (5, 16, 16) and target.out_dim == 16 == teachers.clip_proj_dim(out)
  # The target's tokens are the trained tower's projected patch tokens (ln_post + proj, no CLS).
  np.testing.assert_allclose(tokens, np.asarray(tower.apply(state["tower"], images)), rtol=1e-5, atol=1e-5)

  embeddings = teachers.class_embeddings(ml_collections.ConfigDict({"target": target_cfg}))
  assert embeddings.shape == (4, 16)
  np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
  # The pooled embedding's nearest class embedding is the classifier's prediction.
  pooled = np.asarray(tower.apply(state["tower"], images, include_cls=True))[:, :1]
  keep = np.ones((5, 1), bool)
  predicted = np.asarray(jnp.argmax(semantic_teacher.class_logits(tower, state, images), -1))
  assert spatial_measures.zero_shot_top1(pooled, predicted, keep, embeddings) == 100.0
  random_cfg = ml_collections.ConfigDict({"target": dict(kind="clip", init="random", checkpoint="")})
  assert teachers.class_embeddings(random_cfg) is None


def test_zero_shot_top1_labels_tokens_by_the_nearest_class_and_counts_kept_tokens():
  embeddings = np.eye(3, 4, dtype=np.float32)
  labels = np.array([0, 2])
  tokens = np.zeros((2, 3, 4), np.float32)
  tokens[0] = [[5, 0, 0, 0], [0, 1, 0, 0], [2, 0, 1, 0]]  # right, wrong, right (scale does not matter)
  tokens[1] = [[0, 0, 3, 0], [0, 0, 0.1, 0], [1, 0, 0, 0]]  # right, right, wrong
  keep = np.ones((2, 3), bool)
  assert spatial_measures.zero_shot_top1(tokens, labels, keep, embeddings) == pytest.approx(400 / 6)
  keep[0, 1] = keep[1, 2] = False
  assert spatial_measures.zero_shot_top1(tokens, labels, keep, embeddings) == 100.0
