"""kNN (DINO protocol) against a brute-force NumPy kNN, with the bank split over 8 devices."""
import jax
import numpy as np
import pytest

from dtm_jax import sharding
from dtm_jax.evaluate import common, knn


def numpy_knn_votes(bank, bank_labels, queries, num_classes, k, temperature):
  bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
  queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  votes = np.zeros((len(queries), num_classes))
  for q, query in enumerate(queries):
    similarity = bank @ query
    for j in np.argsort(-similarity)[:k]:
      votes[q, bank_labels[j]] += np.exp(similarity[j] / temperature)
  return votes


def feature_set(features, labels, valid, mesh):
  rows = sharding.batch_sharding(mesh)
  return common.FeatureSet(*(jax.device_put(x, rows) for x in (features, labels, valid)))


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh(data=4, fsdp=2)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_votes_equal_brute_force(mesh, k):
  rng = np.random.default_rng(k)
  num_bank, num_classes = 96, 7
  features = rng.normal(size=(num_bank, 16)).astype(np.float32)
  labels = rng.integers(0, num_classes, num_bank).astype(np.int32)
  valid = np.ones(num_bank, bool)
  valid[-9:] = False  # Padding rows (as at the end of an eval pass) must never be neighbours.
  queries = rng.normal(size=(24, 16)).astype(np.float32)
  bank = feature_set(features, labels, valid, mesh)
  bank = common.FeatureSet(jax.jit(knn.l2_normalize)(bank.features), bank.labels, bank.valid)
  votes = knn.knn_votes(bank, jax.device_put(queries, sharding.batch_sharding(mesh)), mesh,
                        num_classes=num_classes, k=k, temperature=0.07)
  expected = numpy_knn_votes(features[valid], labels[valid], queries, num_classes, k, 0.07)
  np.testing.assert_allclose(np.asarray(votes), expected, rtol=2e-4)
  np.testing.assert_array_equal(np.argmax(votes, axis=1), np.argmax(expected, axis=1))


def test_knn_accuracy_counts_each_valid_query_once(mesh):
  rng = np.random.default_rng(0)
  num_classes, dim = 4, 8
  centres = 5.0 * rng.normal(size=(num_classes, dim))
  bank_labels = np.repeat(np.arange(num_classes), 8).astype(np.int32)
  bank_features = (centres[bank_labels] + rng.normal(size=(32, dim))).astype(np.float32)
  bank = knn.build_bank(lambda params, x: x, None,
                        [{"image": bank_features, "label": bank_labels, "valid": np.ones(32, bool)}], mesh)
  query_labels = rng.integers(0, num_classes, 16).astype(np.int32)
  queries = (centres[query_labels] + rng.normal(size=(16, dim))).astype(np.float32)
  query_labels_wrong = (query_labels + 1) % num_classes
  valid = np.arange(16) < 10
  # The 6 padding queries carry wrong labels: they must not count at all.
  labels = np.where(valid, query_labels, query_labels_wrong).astype(np.int32)
  batches = [{"image": queries[:8], "label": labels[:8], "valid": valid[:8]},
             {"image": queries[8:], "label": labels[8:], "valid": valid[8:]}]
  result = knn.knn_accuracy(lambda params, x: x, None, bank, batches, mesh, k=5)
  expected = numpy_knn_votes(bank_features, bank_labels, queries[valid], num_classes, 5, 0.07)
  assert result["num_examples"] == 10
  assert result["top1"] == pytest.approx(100.0 * np.mean(np.argmax(expected, 1) == query_labels[valid]))
  assert result["top1"] > 50.0  # well-separated clusters


def test_bank_smaller_than_k_is_a_clear_error(mesh):
  bank = feature_set(np.ones((8, 4), np.float32), np.zeros(8, np.int32), np.ones(8, bool), mesh)
  with pytest.raises(ValueError, match="fewer than k"):
    knn.knn_votes(bank, jax.numpy.ones((8, 4)), mesh, num_classes=2, k=20, temperature=0.07)
