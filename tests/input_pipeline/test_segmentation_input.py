"""Segmentation input: a generated ADE20K folder, mocked TFDS scene_parse150, Fashion-MNIST canvases."""
import gzip
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import input_pipeline
from input_pipeline import segment_sources, segmentation, sources

# Stored ADE20K label values of the generated maps and what reduce_zero_label, applied once, makes of them.
_REDUCED = {0: 255, 3: 2, 7: 6, 150: 149}
_STORED = tuple(_REDUCED)
_VALIDATION_SIZES = [(48, 64), (64, 48), (32, 96)]


def _label_map(height, width, shift):
  """Vertical stripes, 8 px wide, of the _STORED values, starting at value number `shift`."""
  stripes = (np.arange(width) // 8 + shift) % len(_STORED)
  return np.broadcast_to(np.array(_STORED, np.uint8)[stripes], (height, width)).copy()


def _reduced(label):
  return np.vectorize(_REDUCED.get, otypes=[np.uint8])(label)


def _write_split(root, split, sizes):
  image_dir = os.path.join(root, "ADEChallengeData2016", "images", split)
  label_dir = os.path.join(root, "ADEChallengeData2016", "annotations", split)
  os.makedirs(image_dir)
  os.makedirs(label_dir)
  for i, (height, width) in enumerate(sizes):
    stem = f"ADE_{split}_{i:08d}"
    tf.io.write_file(os.path.join(image_dir, stem + ".jpg"),
                     tf.io.encode_jpeg(np.full((height, width, 3), 40 * i + 20, np.uint8)))
    tf.io.write_file(os.path.join(label_dir, stem + ".png"), tf.io.encode_png(_label_map(height, width, i)[..., None]))


@pytest.fixture(scope="module")
def ade20k_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("ade20k"))
  _write_split(root, "training", [(48, 64), (64, 40), (56, 56), (40, 72)])
  _write_split(root, "validation", _VALIDATION_SIZES)
  return root


def _cfg(**overrides):
  cfg = input_pipeline.segment_config()
  cfg.scale = (128, 48)   # The test's "2048 x 512": the validation images already fit it (factor 1).
  cfg.update(overrides)
  return cfg


def _train(cfg, seed=0, crop_size=32):
  return input_pipeline.build_segment_train(cfg, crop_size=crop_size, global_batch_size=2, seed=seed,
                                            process_index=0, process_count=1)


def _eval(cfg, canvas_size=64, batch=2):
  return input_pipeline.build_segment_eval(cfg, canvas_size=canvas_size, global_batch_size=batch, process_index=0,
                                           process_count=1)


def test_ade20k_folder_training_batches_hold_labels_reduced_once(ade20k_dir):
  it = _train(_cfg(data_dir=ade20k_dir), crop_size=48)
  batches = [next(it) for _ in range(4)]
  images = np.stack([b["image"] for b in batches])
  labels = np.stack([b["label"] for b in batches])
  assert images.shape == (4, 2, 48, 48, 3) and images.dtype == np.uint8
  assert labels.shape == (4, 2, 48, 48) and labels.dtype == np.uint8
  assert set(np.unique(labels)) <= set(_REDUCED.values())   # Unreduced (3, 7, 150) or twice reduced (1, 5, 148): no.
  assert len(set(np.unique(labels)) - {255}) >= 2
  # Stripes are vertical, so a row that is all 255 is padding (an image under 48 px high): the mean colour there.
  fill = [round(255 * m) for m in input_pipeline.segment_config().mean]
  padding_rows = (labels == 255).all(axis=-1)
  assert padding_rows.any() and (images[padding_rows] == fill).all()


def test_ade20k_folder_evaluation_canvases_padding_and_valid_flags(ade20k_dir):
  cfg = _cfg(data_dir=ade20k_dir)
  ev = _eval(cfg)
  batches = list(ev)
  assert ev.num_examples == 3 and len(batches) == ev.num_batches == 2
  image = np.concatenate([b["image"] for b in batches])
  label = np.concatenate([b["label"] for b in batches])
  np.testing.assert_array_equal(np.concatenate([b["valid"] for b in batches]), [True, True, True, False])
  assert image.shape == (4, 64, 64, 3) and label.shape == (4, 64, 64)
  fill = [round(255 * m) for m in cfg.mean]
  for i, (height, width) in enumerate(_VALIDATION_SIZES[:2]):   # They fit the scale: no resize.
    np.testing.assert_array_equal(label[i, :height, :width], _reduced(_label_map(height, width, i)))
    assert (label[i, height:] == 255).all() and (label[i, :, width:] == 255).all()
    np.testing.assert_array_equal(image[i, height:, :], np.broadcast_to(fill, (64 - height, 64, 3)))
    assert np.abs(image[i, :height, :width].astype(int) - (40 * i + 20)).max() <= 2   # JPEG
  # 32x96 resizes to 43x128 within (128, 48): wider than the canvas, so it is shrunk to 21x64, and counted.
  assert ev.num_shrunk() == 1
  assert (label[2, 21:] == 255).all() and (label[2, :21] != 255).any()
  assert (label[3] == 255).all()   # The example that pads the last batch.


def test_ade20k_training_stream_resumes_exactly(ade20k_dir, tmp_path):
  cfg = _cfg(data_dir=ade20k_dir)
  it = _train(cfg, seed=3)
  for _ in range(3):
    next(it)
  it.save(str(tmp_path))
  expected = [next(it) for _ in range(3)]
  resumed = _train(cfg, seed=3)
  resumed.restore(str(tmp_path))
  for want, got in zip(expected, (next(resumed) for _ in range(3))):
    for key in ("image", "label"):
      np.testing.assert_array_equal(got[key], want[key])


def test_ade20k_folder_errors_name_the_files_and_the_download(tmp_path):
  with pytest.raises(FileNotFoundError, match="ADEChallengeData2016.zip") as error:
    _train(_cfg(data_dir=str(tmp_path)))
  assert os.path.join(str(tmp_path), "ADEChallengeData2016", "images", "training") in str(error.value)
  _write_split(str(tmp_path), "training", [(16, 24), (16, 24)])
  label_dir = tmp_path / "ADEChallengeData2016" / "annotations" / "training"
  (label_dir / "ADE_training_00000001.png").unlink()
  with pytest.raises(FileNotFoundError, match="ADE_training_00000001.jpg"):
    _train(_cfg(data_dir=str(tmp_path)), crop_size=16)
  # A label map of another size would make every example unreadable, and the stream skip them forever.
  tf.io.write_file(str(label_dir / "ADE_training_00000001.png"), tf.io.encode_png(_label_map(16, 24, 0)[..., None]))
  tf.io.write_file(str(label_dir / "ADE_training_00000000.png"), tf.io.encode_png(_label_map(24, 16, 0)[..., None]))
  with pytest.raises(ValueError, match="label map"):
    _train(_cfg(data_dir=str(tmp_path)), crop_size=16)


def test_crop_keeps_the_largest_class_under_cat_max_ratio_when_it_can():
  label = np.where(np.arange(200) < 90, 2, 1).astype(np.uint8)[None].repeat(100, axis=0)  # 45% / 55% of the image
  image = np.zeros((100, 200, 3), np.uint8)

  def largest_share(cat_max_ratio, seed):
    _, crop = segmentation._random_crop(tf.constant(image), tf.constant(label), tf.constant([seed, 0], tf.int64),
                                        100, cat_max_ratio)
    return np.bincount(crop.numpy().ravel()).max() / crop.numpy().size

  unconstrained = [largest_share(1.0, seed) for seed in range(30)]
  assert sum(share >= 0.75 for share in unconstrained) >= 5     # ~36% of the windows are unbalanced...
  assert all(largest_share(0.75, seed) < 0.75 for seed in range(30))   # ...and retries avoid them.


def test_reduce_zero_label_maps_other_to_ignore_and_shifts_classes():
  stored = tf.constant([[0, 1, 150, 255]], tf.uint8)
  np.testing.assert_array_equal(segmentation.reduce_zero_label(stored).numpy(), [[255, 0, 149, 255]])


def _mock_scene_parse150(self, split, **unused_kwargs):
  """Encoded examples, as SkipDecoding reads them: JPEG images and 3-channel PNG instance masks (R = category)."""
  del self, unused_kwargs
  count = 4 if str(split).startswith("train") else 3
  images, annotations = [], []
  for i in range(count):
    category = _label_map(48, 64, i)
    mask = np.stack([category, np.full_like(category, 9), np.zeros_like(category)], axis=-1)   # G: instance ids
    images.append(tf.io.encode_jpeg(np.full((48, 64, 3), 30 * i, np.uint8)).numpy())
    annotations.append(tf.io.encode_png(mask).numpy())
  return tf.data.Dataset.from_tensor_slices({"image": images, "annotation": annotations})


def test_mocked_tfds_scene_parse150_feeds_both_builders():
  cfg = _cfg(source="tfds", train_split="train", eval_split="test", shuffle_buffer=4)
  with tfds.testing.mock_data(as_dataset_fn=_mock_scene_parse150):
    batch = next(_train(cfg))
    ev = _eval(cfg, canvas_size=64, batch=2)
    batches = list(ev)
  assert batch["image"].shape == (2, 32, 32, 3) and batch["label"].shape == (2, 32, 32)
  assert set(np.unique(batch["label"])) <= set(_REDUCED.values())
  assert ev.num_examples == 3 and len(batches) == 2
  label = np.concatenate([b["label"] for b in batches])
  for i in range(3):   # The first channel (the category), reduced once; G (instance ids) is not read.
    np.testing.assert_array_equal(label[i, :48, :64], _reduced(_label_map(48, 64, i)))
  assert (label[:, 48:] == 255).all() and (label[3] == 255).all()


def _test_idx(kind, header):
  """Fashion-MNIST's test images or labels, read with numpy (independently of the pipeline)."""
  with gzip.open(os.path.join(sources.FASHION_MNIST_DIR, f"t10k-{kind}-ubyte.gz")) as f:
    return np.frombuffer(f.read(), np.uint8, offset=header)


def test_fashion_mnist_canvases_label_garment_pixels_with_their_class():
  cfg = _cfg(source="fashion_mnist_segmentation", data_dir=None, train_split="train", eval_split="test",
             reduce_zero_label=False, scale=(56, 56))
  ev = _eval(cfg, canvas_size=56, batch=4)
  first = next(iter(ev))
  assert ev.num_examples == 2_500
  garments = _test_idx("images-idx3", header=16).reshape(-1, 28, 28)[:16]
  classes = _test_idx("labels-idx1", header=8)[:16]
  for canvas in range(4):
    grey = garments[4 * canvas:4 * canvas + 4]
    expected_image = np.block([[grey[0], grey[1]], [grey[2], grey[3]]])
    per_garment = [np.where(g > segment_sources.FOREGROUND_THRESHOLD, c + 1, 0)
                   for g, c in zip(grey, classes[4 * canvas:4 * canvas + 4])]
    expected_label = np.block([[per_garment[0], per_garment[1]], [per_garment[2], per_garment[3]]])
    np.testing.assert_array_equal(first["image"][canvas], np.repeat(expected_image[..., None], 3, axis=-1))
    np.testing.assert_array_equal(first["label"][canvas], expected_label)
  train = next(_train(cfg, crop_size=56))
  assert train["image"].shape == (2, 56, 56, 3)
  assert set(np.unique(train["label"])) <= set(range(segment_sources.FASHION_MNIST_CLASSES)) | {255}
