"""TFDS sources: imagenet2012 through tfds.testing.mock_data, and a small prepared dataset."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

import input_pipeline
from dtm_jax import images

_TRAIN, _VALIDATION = 12, 7


class DtmTestImages(tfds.core.GeneratorBasedBuilder):
  """Flat grey JPEGs whose label is their example id (so any crop names its example)."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(num_classes=_TRAIN + _VALIDATION),
    }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(0, _TRAIN),
            "validation": self._generate_examples(_TRAIN, _VALIDATION)}

  def _generate_examples(self, first, count):
    for i in range(first, first + count):
      yield i, {"image": np.full((24 + i, 40, 3), 10 * i, np.uint8), "label": i}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  DtmTestImages(data_dir=path).download_and_prepare()
  return path


def _cfg(data_dir, **overrides):
  cfg = input_pipeline.default_config()
  cfg.dataset, cfg.data_dir, cfg.shuffle_buffer = "dtm_test_images", data_dir, 4
  cfg.color_jitter, cfg.mean, cfg.std = 0.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
  cfg.num_masking_patches, cfg.min_num_patches = 6, 4
  cfg.update(overrides)
  return cfg


def _pretrain(cfg, seed=0, process_index=0, process_count=1, batch=4):
  return input_pipeline.build_pretrain(cfg, image_size=32, patch_size=8, global_batch_size=batch,
                                       seed=seed, process_index=process_index,
                                       process_count=process_count)


def test_mocked_imagenet_feeds_pretraining_and_evaluation():
  cfg = input_pipeline.default_config()   # imagenet2012, ImageNet normalisation.
  cfg.num_masking_patches, cfg.min_num_patches, cfg.shuffle_buffer = 6, 4, 8
  with tfds.testing.mock_data(num_examples=10):
    batch = next(_pretrain(cfg))
    ev = input_pipeline.build_eval(cfg, image_size=32, global_batch_size=4, process_index=0,
                                   process_count=1)
    batches = list(ev)
  assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8  # normalised on the device
  np.testing.assert_array_equal(batch["mask"].sum(axis=1), 6)
  assert ((0 <= batch["label"]) & (batch["label"] < 1000)).all()
  low = (0 - np.array(cfg.mean)) / np.array(cfg.std)
  normalised = np.asarray(images.to_model_input(batch["image"], cfg.mean, cfg.std))
  assert (normalised >= low - 1e-5).all() and normalised.std() > 0.1
  assert ev.num_examples == 10 and len(batches) == ev.num_batches == 3
  valid = np.concatenate([b["valid"] for b in batches])
  np.testing.assert_array_equal(valid, np.arange(12) < 10)


def test_hosts_read_disjoint_even_splits(data_dir):
  seen = []
  for process in range(2):
    it = _pretrain(_cfg(data_dir), process_index=process, process_count=2, batch=2)
    labels = [int(next(it)["label"][0]) for _ in range(_TRAIN // 2)]   # One epoch.
    assert len(set(labels)) == _TRAIN // 2
    seen.append(set(labels))
  assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(_TRAIN))


def test_images_match_their_labels_and_masks_are_exact(data_dir):
  batch = next(_pretrain(_cfg(data_dir)))
  assert batch["image"].dtype == np.uint8
  levels = batch["image"].reshape(4, -1).mean(axis=1)
  np.testing.assert_allclose(levels, 10 * batch["label"], atol=3)
  np.testing.assert_array_equal(batch["mask"].sum(axis=1), 6)


def test_evaluation_visits_every_example_once_with_padding(data_dir):
  labels, steps = [], []
  for process in range(2):
    ev = input_pipeline.build_eval(_cfg(data_dir), image_size=16, global_batch_size=4,
                                   process_index=process, process_count=2)
    assert ev.num_examples == _VALIDATION
    batches = list(ev)
    steps.append(len(batches))
    for batch in batches:
      labels += list(batch["label"][batch["valid"]])
      assert (batch["label"][~batch["valid"]] == 0).all()
  assert sorted(labels) == list(range(_TRAIN, _TRAIN + _VALIDATION))
  assert steps == [2, 2]   # 4 and 3 examples, 2 per batch.


def test_same_seed_same_stream_and_exact_resume(data_dir, tmp_path):
  cfg = _cfg(data_dir, color_jitter=0.4)
  first = _pretrain(cfg, seed=7)
  head = next(first)
  np.testing.assert_array_equal(next(_pretrain(cfg, seed=7))["image"], head["image"])
  for _ in range(4):   # Into the second epoch of 12 examples.
    next(first)
  first.save(str(tmp_path / "tfds_state"))
  expected = next(first)
  resumed = _pretrain(cfg, seed=7)
  resumed.restore(str(tmp_path / "tfds_state"))
  batch = next(resumed)
  for key in expected:
    np.testing.assert_array_equal(batch[key], expected[key])


def test_tfds_errors_say_what_to_do(data_dir, tmp_path):
  with pytest.raises(ValueError, match="Split 'training' of TFDS dataset 'dtm_test_images'"):
    _pretrain(_cfg(data_dir, train_split="training"))
  with pytest.raises(ValueError, match="input.dataset='no_such_dataset' is not a TFDS dataset"):
    _pretrain(_cfg(data_dir, dataset="no_such_dataset"))
  with pytest.raises(FileNotFoundError, match="not prepared under"):
    _pretrain(_cfg(str(tmp_path / "empty")))


def test_missing_imagenet_says_where_to_put_which_archives(tmp_path):
  cfg = input_pipeline.default_config()
  cfg.data_dir = str(tmp_path)
  manual = tmp_path / "downloads" / "manual"
  evaluate = lambda: input_pipeline.build_eval(cfg, image_size=32, global_batch_size=2,
                                               process_index=0, process_count=1)
  with pytest.raises(FileNotFoundError) as missing:
    evaluate()
  message = str(missing.value)
  assert "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar" in message
  assert str(manual) in message and "download_and_prepare()" in message
  manual.mkdir(parents=True)
  (manual / "ILSVRC2012_img_train.tar").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="Put ILSVRC2012_img_val.tar \\(from"):
    evaluate()
  (manual / "ILSVRC2012_img_val.tar").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="The archives are in"):
    evaluate()


def test_mocked_inaturalist_feeds_finetuning_at_its_configured_size():
  """configs/finetune_inat18.py's input block reads TFDS i_naturalist2018 (image + label of 8,142 species)."""
  from configs import finetune_inat18  # pylint: disable=g-import-not-at-top
  config = finetune_inat18.get_config("384")
  cfg = config.input
  cfg.shuffle_buffer = 8
  with tfds.testing.mock_data(num_examples=10):
    batch = next(input_pipeline.build_finetune_train(cfg, image_size=48, global_batch_size=4, seed=0))
    ev = input_pipeline.build_eval(cfg, image_size=48, global_batch_size=4, process_index=0, process_count=1)
    batches = list(ev)
  assert batch["image"].shape == (4, 48, 48, 3)
  assert ((0 <= batch["label"]) & (batch["label"] < config.num_classes)).all()
  assert ev.num_examples == 10 and batches[0]["image"].shape == (4, 48, 48, 3)
  assert all(((0 <= b["label"]) & (b["label"] < config.num_classes)).all() for b in batches)


def test_a_stream_started_at_a_step_is_a_fresh_pass_with_the_steps_masks(data_dir):
  """TFDS keeps no position to compute: a stream rebuilt at a step (resume on another process count) is a fresh
  shuffle seeded by the step, a whole pass over the shard (nothing skipped), with the masks of its batch numbers."""
  cfg = _cfg(data_dir)
  def build(start_step):
    return input_pipeline.build_pretrain(cfg, image_size=32, patch_size=8, global_batch_size=4, seed=7,
                                         process_index=0, process_count=1, start_step=start_step)
  stream = build(0)
  masks = [next(stream)["mask"] for _ in range(7)]
  started = build(4)
  assert "fresh shuffled pass" in started.start_note
  batches = [next(started) for _ in range(3)]  # 12 examples: one pass
  for batch, expected in zip(batches, masks[4:], strict=True):
    np.testing.assert_array_equal(batch["mask"], expected)
  assert sorted(np.concatenate([b["label"] for b in batches])) == list(range(_TRAIN))
  again = next(build(4))
  np.testing.assert_array_equal(again["image"], batches[0]["image"])  # deterministic: a function of (seed, step)
