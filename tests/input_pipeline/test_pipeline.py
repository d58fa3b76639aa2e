"""Pipelines on image folders (real JPEG/PNG files, some corrupt) and Fashion-MNIST IDX files."""
import logging
import math
import os

import numpy as np
import pytest
from PIL import Image

import input_pipeline
from dtm_jax import images
from input_pipeline import sources

# Folder fixture: every image is one flat grey level that identifies it, so the id of any
# crop of it can be read back: level = _BASE + _STEP * id.
_BASE, _STEP = 20, 10
_CLASSES = 4
_TRAIN_PER_CLASS, _VAL_PER_CLASS = 3, 2


def _write_image(path, image_id, size):
  level = _BASE + _STEP * image_id
  Image.fromarray(np.full((*size, 3), level, np.uint8)).save(path)


def _write_truncated_jpeg(path):
  full = os.path.join(os.path.dirname(path), "tmp_full.jpg")
  Image.fromarray(np.full((60, 60, 3), 99, np.uint8)).save(full)
  data = open(full, "rb").read()
  os.remove(full)
  with open(path, "wb") as f:
    f.write(data[:len(data) // 3])


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
  """root/{train,val}/class_k/ with JPEGs and PNGs of various sizes, plus broken files.

  Train ids 0..11 (class = id // 3); val ids 12..19 (class = (id - 12) // 2). The corrupt
  files sort last in their folders.
  """
  root = tmp_path_factory.mktemp("images")
  image_id = 0
  for split, per_class in (("train", _TRAIN_PER_CLASS), ("val", _VAL_PER_CLASS)):
    for k in range(_CLASSES):
      folder = root / split / f"class_{k}"
      folder.mkdir(parents=True)
      for j in range(per_class):
        ext = ".png" if image_id % 2 else ".jpg"
        _write_image(str(folder / f"img_{image_id:02d}{ext}"), image_id, (30 + 7 * j, 40))
        image_id += 1
  (root / "train" / "class_1" / "zz_garbage.jpg").write_bytes(b"not an image at all" * 10)
  _write_truncated_jpeg(str(root / "train" / "class_2" / "zz_truncated.jpg"))
  (root / "train" / "class_3" / "notes.txt").write_text("ignored: not an image")
  (root / "val" / "class_0" / "zz_garbage.png").write_bytes(b"\x89PNG broken")
  return str(root)


def _folder_cfg(root, **overrides):
  cfg = input_pipeline.default_config()
  cfg.source, cfg.data_dir, cfg.train_split, cfg.eval_split = "folder", root, "train", "val"
  # Identity colour handling so that pixel values identify images.
  cfg.color_jitter, cfg.mean, cfg.std = 0.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
  cfg.num_masking_patches, cfg.min_num_patches = 6, 4
  cfg.update(overrides)
  return cfg


def _ids(images):
  """Image ids from flat grey images: uint8, or floats in [0, 1]."""
  scale = 1 if images.dtype == np.uint8 else 255
  levels = images.reshape(len(images), -1).astype(np.float64).mean(axis=1) * scale if len(images) else np.zeros(0)
  ids = np.rint((levels - _BASE) / _STEP).astype(int)
  np.testing.assert_allclose(levels, _BASE + _STEP * ids, atol=3)
  return ids


def _pretrain(cfg, seed=0, process_index=0, process_count=1, batch=4):
  return input_pipeline.build_pretrain(cfg, image_size=32, patch_size=8, global_batch_size=batch,
                                       seed=seed, process_index=process_index,
                                       process_count=process_count)


def test_folder_pretraining_batches(image_root):
  it = _pretrain(_folder_cfg(image_root))
  for _ in range(3):
    batch = next(it)
    assert set(batch) == {"image", "mask", "label"}
    # uint8 travels to the devices (a quarter of float32's bytes) and is normalised there (dtm_jax.images).
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["mask"].shape == (4, 16) and batch["mask"].dtype == bool
    assert batch["label"].dtype == np.int32
    np.testing.assert_array_equal(batch["mask"].sum(axis=1), 6)
    np.testing.assert_array_equal(batch["label"], _ids(batch["image"]) // _TRAIN_PER_CLASS)
    normalised = np.asarray(images.to_model_input(batch["image"], (0.0,) * 3, (1.0,) * 3))
    np.testing.assert_allclose(normalised * 255, batch["image"], atol=1e-4)


def test_hosts_read_disjoint_shards_and_corrupt_files_are_counted(image_root):
  cfg = _folder_cfg(image_root)
  paths, _ = sources.FolderSource(image_root, "train").files("train")
  bad = {i for i, p in enumerate(paths) if "zz_" in p}
  seen, corrupt = [], []
  for process in range(2):
    good = [i for i in range(process, len(paths), 2) if i not in bad]
    it = _pretrain(cfg, process_index=process, process_count=2, batch=2)
    epochs = 3
    ids = _ids(np.concatenate([next(it)["image"] for _ in range(epochs * len(good))]))
    # Each epoch is a fresh permutation of the host's readable files.
    for e in range(epochs):
      assert sorted(ids[e * len(good):(e + 1) * len(good)]) == sorted(ids[:len(good)])
    seen.append(set(ids))
    bad_here = len(bad & set(range(process, len(paths), 2)))
    # Distinct unreadable files, not skips: every epoch skips the same files again.
    assert it.num_corrupt() == bad_here
    corrupt.append(bad_here)
  assert seen[0].isdisjoint(seen[1])
  assert seen[0] | seen[1] == set(range(_CLASSES * _TRAIN_PER_CLASS))
  assert sum(corrupt) == 2


def test_corrupt_counter_counts_files_and_names_them_once(image_root, caplog):
  paths, _ = sources.FolderSource(image_root, "train").files("train")
  bad = sorted(os.path.basename(p) for p in paths if "zz_" in p)
  it = _pretrain(_folder_cfg(image_root), batch=2)
  with caplog.at_level(logging.WARNING):
    for _ in range(4 * len(paths)):  # about 8 epochs
      next(it)
  assert it.num_corrupt() == len(bad) == 2
  for name in bad:
    assert caplog.text.count(name) == 1, caplog.text  # named once, not once per epoch


def test_evaluation_covers_every_example_exactly_once(image_root):
  cfg = _folder_cfg(image_root, crop_pct=1.0)
  all_ids, labels, steps, corrupt = [], [], [], 0
  for process in range(2):
    ev = input_pipeline.build_eval(cfg, image_size=16, global_batch_size=4,
                                   process_index=process, process_count=2)
    assert ev.num_examples == _CLASSES * _VAL_PER_CLASS + 1   # Files, the corrupt one too.
    batches = list(ev)
    steps.append(len(batches))
    assert len(batches) == ev.num_batches
    for batch in batches:
      assert batch["image"].shape == (2, 16, 16, 3) and batch["valid"].dtype == bool
      assert batch["image"].dtype == np.uint8  # normalised on the device (dtm_jax.images), padding too
      valid = batch["valid"]
      all_ids += list(_ids(batch["image"][valid]))
      labels += list(batch["label"][valid])
      assert not batch["image"][~valid].any()
    corrupt += ev.num_corrupt()
  first_val = _CLASSES * _TRAIN_PER_CLASS
  assert sorted(all_ids) == list(range(first_val, first_val + _CLASSES * _VAL_PER_CLASS))
  np.testing.assert_array_equal(labels, (np.array(all_ids) - first_val) // _VAL_PER_CLASS)
  assert steps[0] == steps[1] == 3   # 5 and 4 files, 2 per batch.
  assert corrupt == 1


def test_same_seed_same_stream_and_exact_resume(image_root, tmp_path):
  # The default augmentation and normalisation: random crops, flips and colours.
  cfg = _folder_cfg(image_root, color_jitter=0.4, mean=input_pipeline.config.IMAGENET_MEAN,
                    std=input_pipeline.config.IMAGENET_STD)
  first = _pretrain(cfg, seed=3)
  head = [next(first) for _ in range(2)]
  low = (0 - np.array(cfg.mean)) / np.array(cfg.std)
  high = (1 - np.array(cfg.mean)) / np.array(cfg.std)
  normalised = np.asarray(images.to_model_input(head[0]["image"], cfg.mean, cfg.std))
  assert (normalised >= low - 1e-5).all() and (normalised <= high + 1e-5).all() and normalised.std() > 0.1
  # Same seed, one thread instead of AUTOTUNE's parallel decoding: the same stream.
  single_thread = cfg.copy_and_resolve_references()
  single_thread.update(threadpool_size=1, num_parallel_calls=1)
  again = _pretrain(single_thread, seed=3)
  for batch in head:
    expected = next(again)
    for key in batch:
      np.testing.assert_array_equal(batch[key], expected[key])
  other = next(_pretrain(cfg, seed=4))
  assert not np.array_equal(other["image"], head[0]["image"])

  for _ in range(4):   # Past the end of the first epoch (14 files, 12 readable).
    next(first)
  first.save(str(tmp_path / "state"))
  corrupt_at_save = first.num_corrupt()
  expected = next(first)
  resumed = _pretrain(cfg, seed=3)
  resumed.restore(str(tmp_path / "state"))
  assert resumed.num_corrupt() == corrupt_at_save
  batch = next(resumed)
  for key in expected:
    np.testing.assert_array_equal(batch[key], expected[key])
  assert resumed.num_corrupt() == first.num_corrupt()


def test_restore_without_state_is_a_clear_error(image_root, tmp_path):
  with pytest.raises(FileNotFoundError, match="No data-iterator state"):
    _pretrain(_folder_cfg(image_root)).restore(str(tmp_path / "nothing"))


def test_folder_errors_say_what_is_wrong(image_root, tmp_path):
  with pytest.raises(FileNotFoundError, match="holds \\['train', 'val'\\]"):
    _pretrain(_folder_cfg(image_root, train_split="training"))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    _pretrain(_folder_cfg(str(tmp_path / "missing")))
  with pytest.raises(ValueError, match="needs input.data_dir"):
    _pretrain(_folder_cfg(None))
  (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
  with pytest.raises(ValueError, match="No .jpg"):
    _pretrain(_folder_cfg(str(tmp_path / "empty")))
  (tmp_path / "odd" / "train" / "a").mkdir(parents=True)
  (tmp_path / "odd" / "val" / "b").mkdir(parents=True)
  with pytest.raises(ValueError, match="not in the training split"):
    input_pipeline.build_eval(_folder_cfg(str(tmp_path / "odd")), image_size=16,
                              global_batch_size=2, process_index=0, process_count=1)
  broken = tmp_path / "broken" / "train" / "a"
  broken.mkdir(parents=True)
  for i in range(3):
    (broken / f"{i}.jpg").write_bytes(b"\xff\xd8 broken")
  with pytest.raises(ValueError, match="None of the 3 image files"):
    _pretrain(_folder_cfg(str(tmp_path / "broken")))


def test_settings_that_cannot_work_are_clear_errors(image_root):
  cfg = _folder_cfg(image_root)
  with pytest.raises(ValueError, match="num_masking_patches=17"):
    _pretrain(_folder_cfg(image_root, num_masking_patches=17))
  with pytest.raises(ValueError, match="multiple of the 2 processes"):
    _pretrain(cfg, process_index=0, process_count=2, batch=3)
  with pytest.raises(ValueError, match="not a multiple of patch_size"):
    input_pipeline.build_pretrain(cfg, image_size=30, patch_size=8, global_batch_size=2,
                                  seed=0, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="input.source='webdataset'"):
    _pretrain(_folder_cfg(image_root, source="webdataset"))
  # 14 training files (2 of them corrupt) cannot fill one batch of 16: an error, not a stream of repeats.
  with pytest.raises(ValueError, match="gives this process 14 examples .* fewer than one local batch of 16"):
    _pretrain(cfg, batch=16)


# --- Fashion-MNIST from Debian's dataset-fashion-mnist (installed by `make test`).

def _fashion_cfg(**overrides):
  cfg = input_pipeline.default_config()
  cfg.source, cfg.eval_split = "fashion_mnist", "test"
  cfg.num_masking_patches, cfg.min_num_patches = 19, 4
  cfg.update(overrides)
  return cfg


@pytest.fixture(scope="module")
def fashion_test_split():
  """The raw test split, read independently of the pipeline."""
  images = sources._read_idx(os.path.join(sources.FASHION_MNIST_DIR,
                                          "t10k-images-idx3-ubyte.gz"))
  labels = sources._read_idx(os.path.join(sources.FASHION_MNIST_DIR,
                                          "t10k-labels-idx1-ubyte.gz"))
  return images, labels


def test_fashion_mnist_is_fed_as_rgb_with_masks():
  cfg = _fashion_cfg(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
  batch = next(input_pipeline.build_pretrain(cfg, image_size=28, patch_size=4,
                                             global_batch_size=8, seed=0, process_index=0,
                                             process_count=1))
  assert batch["image"].shape == (8, 28, 28, 3) and batch["mask"].shape == (8, 49)
  np.testing.assert_array_equal(batch["mask"].sum(axis=1), 19)
  np.testing.assert_allclose(batch["image"][..., 0], batch["image"][..., 2], atol=1e-6)
  assert set(batch["label"]) <= set(range(10)) and batch["image"].max() > 0.5


def test_fashion_mnist_evaluation_matches_the_idx_files(fashion_test_split):
  images, labels = fashion_test_split
  cfg = _fashion_cfg(crop_pct=1.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
  for process in range(2):
    ev = input_pipeline.build_eval(cfg, image_size=28, global_batch_size=64,
                                   process_index=process, process_count=2)
    assert ev.num_examples == len(labels) and ev.num_batches == math.ceil(len(labels) / 64)
    batch = next(iter(ev))
    expected = np.arange(process, 64, 2)   # Host p holds examples p, p + 2, ...
    np.testing.assert_array_equal(batch["label"], labels[expected])
    np.testing.assert_array_equal(batch["image"][..., 1], images[expected])  # uint8, as stored


def test_fashion_mnist_hosts_permute_disjoint_shards_each_epoch():
  source = sources.FashionMnistSource(sources.FASHION_MNIST_DIR)
  epochs = []
  for process in range(2):
    keys = source.train("test", seed=1, process_index=process, process_count=2).keys
    stream = next(keys.batch(2 * 5000).as_numpy_iterator())
    assert (stream % 2 == process).all()
    epochs.append((stream[:5000], stream[5000:]))
  assert sorted(np.concatenate([epochs[0][0], epochs[1][0]])) == list(range(10000))
  assert sorted(epochs[0][1]) == sorted(epochs[0][0])
  assert not np.array_equal(epochs[0][1], epochs[0][0])   # Reshuffled.


def test_fashion_mnist_finetune_stream_resumes_exactly(tmp_path):
  def build(augment=True):
    return input_pipeline.build_finetune_train(
        _fashion_cfg(train_split="test"), image_size=28, global_batch_size=8, seed=5,
        augment=augment, process_index=0, process_count=1)
  it = build()
  first = next(it)
  for _ in range(2):
    next(it)
  it.save(str(tmp_path / "ft"))
  expected = next(it)
  # Random erasing (on by default) sends its boxes; the devices draw the noise, so images stay uint8.
  assert set(expected) == {"image", "label", "erase_box"} and expected["image"].dtype == np.uint8
  assert expected["erase_box"].shape == (8, 4) and expected["erase_box"].dtype == np.int32
  resumed = build()
  resumed.restore(str(tmp_path / "ft"))
  batch = next(resumed)
  for key in expected:
    np.testing.assert_array_equal(batch[key], expected[key])
  plain = next(build(augment=False))   # Eval-style crops: same examples, no augmentation.
  np.testing.assert_array_equal(plain["label"], first["label"])
  assert set(plain) == {"image", "label"}
  assert not np.array_equal(plain["image"], first["image"])


def test_fashion_mnist_errors_say_what_to_do(tmp_path):
  with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
    input_pipeline.build_eval(_fashion_cfg(data_dir=str(tmp_path)), image_size=28,
                              global_batch_size=8, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="splits 'train' and 'test', not 'validation'"):
    input_pipeline.build_eval(_fashion_cfg(eval_split="validation"), image_size=28,
                              global_batch_size=8, process_index=0, process_count=1)


def test_a_stream_started_at_a_step_equals_the_stream_read_up_to_it_across_epochs():
  """A resume on another process count rebuilds the input at a step (no iterator state fits): for indexed sources
  the position is found by arithmetic, nothing before it is read, and the batches (images, augmentation, masks)
  are those of the stream that read every batch before it."""
  def build(start_step=0):  # 1000 processes: 10 examples per host, an epoch every 5 batches of 2
    return input_pipeline.build_pretrain(_fashion_cfg(train_split="test"), image_size=28, patch_size=4,
                                         global_batch_size=2000, seed=3, process_index=7, process_count=1000,
                                         start_step=start_step)
  stream = build()
  batches = [next(stream) for _ in range(15)]
  assert stream.start_note == ""
  started = build(start_step=12)  # position 24: epoch 2, 4 of its 10 examples done
  assert "epoch 2, 40% through" in started.start_note
  for expected in batches[12:]:
    batch = next(started)
    for key in expected:
      np.testing.assert_array_equal(batch[key], expected[key])


def test_a_folder_stream_started_at_a_step_says_unreadable_files_shift_it(image_root):
  it = input_pipeline.build_pretrain(_folder_cfg(image_root), image_size=32, patch_size=8, global_batch_size=4,
                                     seed=0, process_index=0, process_count=1, start_step=2)
  # From position 8 of the first epoch (14 files, 2 unreadable) through the next two: readable images only.
  ids = _ids(np.concatenate([next(it)["image"] for _ in range(8)]))
  assert set(ids) == set(range(_CLASSES * _TRAIN_PER_CLASS))
  assert it.num_corrupt() <= 2 and "unreadable files" in it.start_note


@pytest.fixture(scope="module")
def two_tone_root(tmp_path_factory):
  """One class of 48×64 images, dark on the left (40) and bright on the right (200): crops differ in mean."""
  root = tmp_path_factory.mktemp("two_tone")
  folder = root / "train" / "class_0"
  folder.mkdir(parents=True)
  image = np.full((48, 64, 3), 40, np.uint8)
  image[:, 32:] = 200
  for i in range(4):
    Image.fromarray(image).save(str(folder / f"img_{i}.png"))
  return str(root)


@pytest.mark.parametrize("jitter_before_crop, whole_image_mean", [(False, False), (True, True)])
def test_colour_jitter_sees_the_crop_or_the_whole_image(two_tone_root, monkeypatch, jitter_before_crop,
                                                        whole_image_mean):
  # A stand-in jitter that replaces every pixel by its input's mean (contrast factor 0) shows what the jitter saw:
  # after the crop (ours), each crop's own mean; before it (the released order), the whole image's mean, 120.
  from input_pipeline import transforms  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(transforms, "color_jitter", lambda image, rng, strength: tf.zeros_like(image) +
                      tf.reduce_mean(image))
  strength = 0.3 + 0.01 * jitter_before_crop  # a setting no other test builds (the pixel stages are cached by it)
  cfg = _folder_cfg(two_tone_root, color_jitter=strength, jitter_before_crop=jitter_before_crop, flip=False,
                    crop_scale_min=0.05)
  batch = np.concatenate([next(_pretrain(cfg, seed=s, batch=4))["image"] for s in range(4)]).astype(float)
  assert np.all(batch.std(axis=(1, 2, 3)) < 1.0)  # flat: every pixel is the mean the jitter saw
  levels = batch.mean(axis=(1, 2, 3))
  if whole_image_mean:
    np.testing.assert_allclose(levels, 120, atol=1)
  else:
    assert levels.max() - levels.min() > 20  # crops of different mixes of the two halves


def test_jitter_order_changes_nothing_without_jitter(image_root):
  read = lambda before: next(_pretrain(_folder_cfg(image_root, flip=False, jitter_before_crop=before), seed=1))
  after, before = read(False), read(True)
  np.testing.assert_array_equal(after["image"], before["image"])
  np.testing.assert_array_equal(after["label"], before["label"])
