"""kNN (DINO protocol) against a brute-force NumPy kNN, with the bank split over 8 devices."""
import jax
import numpy as np
import pytest

from dtm_jax import sharding
from dtm_jax.evaluators import encoding, knn


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
  return encoding.FeatureSet(*(jax.device_put(x, rows) for x in (features, labels, valid)))




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
  bank = encoding.FeatureSet(jax.jit(knn.l2_normalize)(bank.features), bank.labels, bank.valid)
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


# ---------------------------------------------------------------------------------------------------------------------
# At pod scale: the bank stays where it was encoded, programs are built once, similarities in full float32.
# ---------------------------------------------------------------------------------------------------------------------
COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "all-reduce", "reduce-scatter")


def collectives_in(compiled_text):
  return [name for name in COLLECTIVES if name in compiled_text]


def sharded_batches(mesh, num_batches, batch_size, dim, seed=0):
  rng = np.random.default_rng(seed)
  rows = sharding.batch_sharding(mesh)
  return [{"features": jax.device_put(rng.normal(size=(batch_size, dim)).astype(np.float32), rows),
           "labels": jax.device_put(rng.integers(0, 5, batch_size).astype(np.int32), rows),
           "valid": jax.device_put(np.arange(batch_size) < batch_size - i, rows)}
          for i in range(num_batches)]


def test_bank_building_moves_no_rows_between_devices(mesh):
  """The bank of many batch-sharded batches compiles to a program without any collective: each device keeps the rows
  it encoded (the concatenation of its own shards), which a plain concatenation along the sharded axis does not."""
  pieces = sharded_batches(mesh, num_batches=12, batch_size=32, dim=6)
  compiled = encoding.concatenate_per_device.lower(mesh, pieces).compile().as_text()
  assert not collectives_in(compiled), collectives_in(compiled)
  bank = encoding.concatenate_per_device(mesh, pieces)
  assert bank["features"].shape == (12 * 32, 6)
  assert bank["features"].sharding.is_equivalent_to(sharding.batch_sharding(mesh), 2)
  for key in ("features", "labels", "valid"):
    for shard in bank[key].addressable_shards:
      own = [next(s.data for s in piece[key].addressable_shards if s.device == shard.device) for piece in pieces]
      np.testing.assert_array_equal(np.asarray(shard.data), np.concatenate([np.asarray(x) for x in own]))


def test_extract_features_keeps_every_example_once(mesh):
  """extract_features over padded batches: every valid example's (features, label) exactly once, rows aligned."""
  rng = np.random.default_rng(3)
  features = rng.normal(size=(70, 5)).astype(np.float32)
  labels = np.arange(70).astype(np.int32)  # labels name the examples
  padded = 96
  host = lambda x: np.concatenate([x, np.zeros((padded - len(x),) + x.shape[1:], x.dtype)])
  valid = np.arange(padded) < 70
  batches = [{"image": host(features)[i:i + 16], "label": host(labels)[i:i + 16], "valid": valid[i:i + 16]}
             for i in range(0, padded, 16)]
  result = encoding.extract_features(lambda params, x: 2.0 * x, None, batches, mesh)
  got_valid = np.asarray(result.valid)
  got_labels = np.asarray(result.labels)[got_valid]
  np.testing.assert_array_equal(np.sort(got_labels), labels)
  np.testing.assert_allclose(np.asarray(result.features)[got_valid], 2.0 * features[got_labels], rtol=1e-6)
  assert result.num_valid == 70


def test_extract_features_compiles_the_encoder_once_per_encoder(mesh):
  """The probe encodes its train and test splits with one encoder: traced once (also when passed jitted)."""
  traces = []

  def encode(params, x):
    traces.append(1)
    return x + params

  batches = lambda seed: [{"image": np.full((16, 3), seed, np.float32), "label": np.zeros(16, np.int32),
                           "valid": np.ones(16, bool)}] * 3
  encoding.extract_features(encode, 1.0, batches(0), mesh)
  encoding.extract_features(encode, 1.0, batches(1), mesh)
  assert len(traces) == 1
  jitted = jax.jit(encode)
  encoding.extract_features(jitted, 1.0, batches(2), mesh)
  encoding.extract_features(jitted, 1.0, batches(3), mesh)
  assert len(traces) == 1


def test_multi_batch_bank_knn_equals_brute_force(mesh):
  rng = np.random.default_rng(5)
  num_classes, dim = 5, 12
  centres = 1.5 * rng.normal(size=(num_classes, dim))
  bank_labels = rng.integers(0, num_classes, 83).astype(np.int32)
  bank = (centres[bank_labels] + rng.normal(size=(83, dim))).astype(np.float32)
  query_labels = rng.integers(0, num_classes, 29).astype(np.int32)
  queries = (centres[query_labels] + rng.normal(size=(29, dim))).astype(np.float32)
  import eval_testing  # pylint: disable=g-import-not-at-top
  share = lambda x, y: eval_testing.host_batches(x, y, process_index=0, process_count=1, local_batch=16)
  evaluator = knn.KnnEvaluator(lambda params, x: x, mesh, k=10, temperature=0.07)
  bank_set = evaluator.build_bank(None, share(bank, bank_labels))
  assert bank_set.num_valid == 83
  result = evaluator.accuracy(None, bank_set, share(queries, query_labels))
  expected = numpy_knn_votes(bank, bank_labels, queries, num_classes, 10, 0.07)
  assert result["num_examples"] == 29
  assert result["top1"] == pytest.approx(100.0 * np.mean(np.argmax(expected, 1) == query_labels))
  top5 = np.argsort(-expected, axis=1)[:, :5]
  assert result["top5"] == pytest.approx(100.0 * np.mean(np.any(top5 == query_labels[:, None], axis=1)))


def test_similarities_and_votes_run_at_highest_precision(mesh):
  bank = feature_set(np.ones((64, 8), np.float32), np.zeros(64, np.int32), np.ones(64, bool), mesh)
  queries = jax.device_put(np.ones((16, 8), np.float32), sharding.batch_sharding(mesh))
  lowered = jax.jit(lambda b, q: knn.knn_votes(b, q, mesh, num_classes=3, k=4, temperature=0.07)).lower(bank, queries)
  dots = [line for line in lowered.as_text().splitlines() if "dot_general" in line]
  assert len(dots) >= 2  # query × bank similarities and the weighted votes
  for line in dots:
    assert "precision = [HIGHEST, HIGHEST]" in line, line


class _FakeInputPipeline:
  """`input_pipeline` without TensorFlow: build_eval gives tinted batches of 16×16 images (a bank and queries)."""

  def __init__(self):
    self.calls = []

  def build_eval(self, input_config, *, split, image_size, global_batch_size):
    import eval_testing  # pylint: disable=g-import-not-at-top
    self.calls.append(split)
    assert image_size == eval_testing.IMAGE_SIZE
    return iter(eval_testing.tinted_eval_batches(40 if split == "train" else 20, global_batch_size,
                                                 seed=0 if split == "train" else 1))


def test_periodic_knn_traces_and_compiles_once(mesh, monkeypatch):
  """The in-training kNN builds its programs once: a second evaluation traces and lowers nothing."""
  import sys  # pylint: disable=g-import-not-at-top

  import eval_testing  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from dtm_jax.models import functional, vit  # pylint: disable=g-import-not-at-top
  from dtm_jax.modes import pretrain as train  # pylint: disable=g-import-not-at-top

  fake = _FakeInputPipeline()
  monkeypatch.setitem(sys.modules, "input_pipeline", fake)
  student_config = eval_testing.tiny_student_config()
  model, params = functional.split_module(vit.PretrainViT(student_config, rngs=nnx.Rngs(0)))
  params = jax.device_put(params, sharding.replicated(mesh))
  traces = []

  class CountingStudent:
    def apply(self, *args, **kwargs):
      traces.append(1)
      return model.apply(*args, **kwargs)

  config = ml_collections.ConfigDict({
      "eval": {"every": 1, "k": 5, "temperature": 0.07, "batch_size": 16, "num_train_examples": 0,
               "num_eval_examples": 0},
      "input": {"train_split": "train", "eval_split": "validation", "mean": (0.5,) * 3, "std": (0.25,) * 3},
      "model": {"image_size": student_config.image_size}})
  evaluate = train.make_periodic_evaluator(config, CountingStudent(), mesh)
  lowerings = []  # JAX's tracing, lowering and compilation events

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event.startswith("/jax/core/compile/"):
      lowerings.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    first = evaluate(params)
    assert traces, "the encoder was never traced"
    assert lowerings, "the listener saw no compilation: the check below would prove nothing"
    assert first["knn_bank_size"] == 40 and first["knn_num_queries"] == 20
    traced_once, lowerings[:] = len(traces), []
    second = evaluate(params)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert len(traces) == traced_once, "the second evaluation traced the encoder again"
  assert not lowerings, lowerings
  assert second == first
  assert fake.calls == ["train", "validation"] * 2
