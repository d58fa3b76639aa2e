"""Linear probe: separable features reach ~100%, padding is ignored, a stopped probe resumes, and the student's features
are as documented."""
import os
import signal

import eval_testing
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import linear_probe_demo
from dtm_jax import sharding, students
from dtm_jax.evaluators import encoding, linear_probe
from dtm_jax.models import functional, vit
from dtm_jax.runtime import checkpoint, errors, metrics


def probe_config(**overrides):
  config = linear_probe_demo.get_config()
  config.update(num_classes=5, batch_size=64, epochs=12, warmup_epochs=2, eval_every_epochs=4, **overrides)
  return config


def clustered_features(rng, num, num_padding, mesh):
  """5 well-separated Gaussian clusters in 16-d, plus padding rows of huge values and wrong labels."""
  centres = 4.0 * np.random.default_rng(0).normal(size=(5, 16))
  labels = rng.integers(0, 5, num)
  features = centres[labels] + rng.normal(size=(num, 16))
  features = np.concatenate([features, np.full((num_padding, 16), 1e3)]).astype(np.float32)
  labels = np.concatenate([labels, np.zeros(num_padding, int)]).astype(np.int32)
  valid = np.arange(num + num_padding) < num
  rows = sharding.batch_sharding(mesh)
  return encoding.FeatureSet(*(jax.device_put(x, rows) for x in (features, labels, valid)))


# LARS scales each step by 0.001·|w|/|g|: it needs MAE's peak lr (0.1 × 16384 / 256 = 6.4) to move at all.
@pytest.mark.parametrize("optimizer,base_lr", [("lars", 6.4 * 256 / 64), ("sgd", 0.1)])
def test_probe_on_separable_features_reaches_100_percent(mesh, tmp_path, optimizer, base_lr):
  rng = np.random.default_rng(1)
  train = clustered_features(rng, 1000, 24, mesh)
  test = clustered_features(rng, 400, 8, mesh)
  config = probe_config()
  config.optimizer.update(name=optimizer, base_lr=base_lr)
  writer = metrics.MetricsWriter(tmp_path)
  result = linear_probe.train_on_features(config, train, test, mesh, writer)
  writer.close()
  assert result["top1"] >= 99.0 and result["top5"] == 100.0
  assert result["steps"] == 12 * (1000 // 64)
  rows = metrics.read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in rows if "top1" in r] == [4 * 15, 8 * 15, 12 * 15]
  losses = [r["train_loss"] for r in rows]
  assert losses[-1] < 0.5 * losses[0]


class _SigtermAfter(metrics.MetricsWriter):
  """Sends this process SIGTERM once it has logged `step` (as a scheduler would, mid-run); the loop sees it after
  its next step (epoch), as it asks for a stop right after each step."""

  def __init__(self, workdir, step):
    super().__init__(workdir, resume_step=0)
    self._step = step

  def write_scalars(self, step, scalars, **kwargs):
    super().write_scalars(step, scalars, **kwargs)
    if step == self._step:
      os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_saves_the_epoch_reached_and_the_rerun_ends_as_an_uninterrupted_probe(mesh, tmp_path):
  rng = np.random.default_rng(1)
  train, test = clustered_features(rng, 1000, 24, mesh), clustered_features(rng, 400, 8, mesh)
  config = probe_config()  # 12 epochs of 15 steps, evaluated every 4

  def run(workdir, writer):
    try:
      return linear_probe.train_on_features(config, train, test, mesh, writer, checkpoint.Checkpointer(workdir))
    finally:
      writer.close()

  reference = run(tmp_path / "reference", metrics.MetricsWriter(tmp_path / "reference"))
  with pytest.raises(errors.Interrupted) as stopped:
    run(tmp_path / "probe", _SigtermAfter(tmp_path / "probe", 5 * 15))  # seen after epoch 6
  assert stopped.value.exit_code == 0 and "after epoch 6 of 12" in str(stopped.value)
  assert checkpoint.Checkpointer(tmp_path / "probe").all_steps() == [4 * 15, 6 * 15]  # an evaluation, then the stop
  resumed = run(tmp_path / "probe", metrics.MetricsWriter(tmp_path / "probe", resume_step=6 * 15))
  assert resumed == pytest.approx(reference)
  logged = [r["step"] for r in metrics.read_jsonl(tmp_path / "probe" / "metrics.jsonl")]
  assert logged == [15 * epoch for epoch in range(1, 13)]  # epochs 7-12 once, after the resume
  for a, b in zip(*(jax.tree.leaves(checkpoint.restore_params(tmp_path / name)[0]) for name in ("probe", "reference"))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_online_probe_stopped_by_sigterm_resumes_at_the_saved_input_position(mesh, tmp_path, student):
  """Without precomputed features the probe's input stream is saved with it: the rerun continues the stream."""
  student, params = student
  encode = encoding.feature_fn(student, pooling="mean")
  config = probe_config()
  config.update(num_classes=eval_testing.NUM_CLASSES, precompute_features=False, num_train_examples=48,
                batch_size=16, eval_batch_size=16, epochs=4, warmup_epochs=1, eval_every_epochs=2)
  config.optimizer.update(name="sgd", base_lr=0.1)

  def run(workdir, writer, stream):
    try:
      return linear_probe.train_online(
          config, encode, params, stream, lambda: eval_testing.tinted_eval_batches(40, 16), mesh, writer,
          feature_dim=student.config.width, checkpointer=checkpoint.Checkpointer(workdir))
    finally:
      writer.close()

  reference = run(tmp_path / "reference", metrics.MetricsWriter(tmp_path / "reference"), eval_testing.TintedStream(16))
  with pytest.raises(errors.Interrupted):
    # Seen after epoch 3.
    run(tmp_path / "probe", _SigtermAfter(tmp_path / "probe", 2 * 3), eval_testing.TintedStream(16))
  assert checkpoint.Checkpointer(tmp_path / "probe").all_steps() == [2 * 3, 3 * 3]
  stream = eval_testing.TintedStream(16)
  resumed = run(tmp_path / "probe", metrics.MetricsWriter(tmp_path / "probe", resume_step=3 * 3), stream)
  assert stream.step == 4 * 3  # restored at batch 9, then one epoch of 3 batches
  assert resumed == pytest.approx(reference)
  for a, b in zip(*(jax.tree.leaves(checkpoint.restore_params(tmp_path / name)[0]) for name in ("probe", "reference"))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_batch_norm_statistics_ignore_padding():
  features = jnp.array([[1.0, 2.0], [3.0, 6.0], [1e6, -1e6]])
  valid = jnp.array([True, True, False])
  stats = {"mean": jnp.zeros(2), "var": jnp.ones(2)}
  normed, new_stats = linear_probe.normalize_train(features, valid, stats, momentum=0.9)
  np.testing.assert_allclose(normed[:2], [[-1, -1], [1, 1]], rtol=1e-5)
  np.testing.assert_allclose(new_stats["mean"], 0.1 * np.array([2.0, 4.0]), rtol=1e-6)
  np.testing.assert_allclose(new_stats["var"], 0.9 + 0.1 * np.array([1.0, 4.0]), rtol=1e-6)


def test_batch_larger_than_the_data_is_a_clear_error(mesh, tmp_path):
  rng = np.random.default_rng(0)
  train = clustered_features(rng, 40, 0, mesh)
  with pytest.raises(ValueError, match="batch_size"):
    linear_probe.train_on_features(probe_config(), train, train, mesh, metrics.MetricsWriter(tmp_path))


@pytest.fixture(scope="module")
def student():
  config = eval_testing.tiny_student_config()
  model, params = functional.split_module(vit.PretrainViT(config, rngs=nnx.Rngs(0)))
  return students.Student(config=config, model=model, params=params, checkpoint="memory", step=0), params


def test_features_pool_the_final_tokens(student):
  student, params = student
  images = jnp.asarray(eval_testing.tinted_images(np.random.default_rng(0), np.arange(4) % 4))
  tokens = student.model.apply(params, images, method="encode")
  mean = encoding.feature_fn(student, pooling="mean")(params, images)
  cls = encoding.feature_fn(student, pooling="cls")(params, images)
  np.testing.assert_allclose(mean, tokens[:, 1:].mean(axis=1), rtol=1e-6)
  np.testing.assert_allclose(cls, tokens[:, 0], rtol=1e-6)


def test_features_of_uint8_images_are_normalised_on_the_device(student):
  """Evaluation batches arrive as uint8: the features equal those of the host-normalised float images."""
  student, params = student
  pixels = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
  on_host = (pixels / 255.0 - np.array(mean)) / np.array(std)
  expected = encoding.feature_fn(student)(params, jnp.asarray(on_host, jnp.float32))
  got = jax.jit(encoding.feature_fn(student, normalization=(mean, std)))(params, jnp.asarray(pixels))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="normalization"):
    encoding.feature_fn(student)(params, jnp.asarray(pixels))


def test_features_average_the_last_blocks(student):
  """Last 2 of 2 blocks = mean of the full model's features and those of its first block alone (+ final norm)."""
  student, params = student
  images = jnp.asarray(eval_testing.tinted_images(np.random.default_rng(0), np.arange(4) % 4))
  one_block = vit.get_config("test", image_size=16, patch_size=4, out_dim=8, depth=1)
  truncated, _ = functional.split_module(vit.PretrainViT(one_block, rngs=nnx.Rngs(0)))
  first_block_params = {**params, "blocks": {0: params["blocks"][0]}}
  first = truncated.apply(first_block_params, images, method="encode")[:, 1:].mean(axis=1)
  last = student.model.apply(params, images, method="encode")[:, 1:].mean(axis=1)
  both = jax.jit(encoding.feature_fn(student, pooling="mean", num_blocks=2))(params, images)
  np.testing.assert_allclose(both, (first + last) / 2, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="num_blocks"):
    encoding.feature_fn(student, num_blocks=3)
