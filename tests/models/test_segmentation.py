"""UperNet segmenter, its loss, mmseg's metrics and slide inference, against brute-force and PyTorch references."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dtm_jax.evaluators import segmentation_metrics as seg_metrics
from dtm_jax.models import functional, layers, mae, segmentation, vit

NUM_CLASSES = 5
SEG_CONFIG = segmentation.SegmenterConfig(num_classes=NUM_CLASSES, out_indices=(0, 1, 2, 3), channels=8,
                                          aux_channels=4)


def _vit_config(image_size=32, patch_size=16):
  return vit.get_config("test", depth=4, image_size=image_size, patch_size=patch_size, block_rel_pos_bias=True,
                        shared_rel_pos_bias=False)


def _constructor(image_size=32, seed=0, patch_size=16):
  return lambda: segmentation.UperNetSegmenter(_vit_config(image_size, patch_size), SEG_CONFIG, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def stateful():
  """(functional view, params, batch_stats) of one tiny segmenter at 32×32 shared by the tests."""
  return functional.split_stateful(_constructor()())


def _images(batch=2, size=32, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, size, size, 3)), jnp.float32)


def _labels(shape, seed=0, ignored_fraction=0.3):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, NUM_CLASSES, size=shape)
  labels[rng.random(shape) < ignored_fraction] = 255
  return labels.astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Metrics

def _brute_force_scores(pred, labels, num_classes, ignore_index=255):
  """mmseg's per-class areas counted pixel by pixel, then divided as mmseg's evaluate does."""
  iou, acc = [], []
  correct = total = 0
  for c in range(num_classes):
    in_label = [(t == c) for t, p in zip(labels.ravel(), pred.ravel()) if t != ignore_index]
    in_pred = [(p == c) for t, p in zip(labels.ravel(), pred.ravel()) if t != ignore_index]
    intersect = sum(a and b for a, b in zip(in_label, in_pred))
    union = sum(a or b for a, b in zip(in_label, in_pred))
    iou.append(intersect / union if union else np.nan)
    acc.append(intersect / sum(in_label) if sum(in_label) else np.nan)
    correct += intersect
    total += sum(in_label)
  present_iou, present_acc = [v for v in iou if not np.isnan(v)], [v for v in acc if not np.isnan(v)]
  return dict(miou=sum(present_iou) / len(present_iou), macc=sum(present_acc) / len(present_acc),
              aacc=correct / total, per_class_iou=np.array(iou))


def test_scores_match_a_brute_force_reference_with_ignored_pixels_and_absent_classes():
  rng = np.random.default_rng(0)
  num_classes = 7
  labels = rng.integers(0, 4, size=(3, 9, 11))  # classes 4, 5, 6 never in the ground truth
  labels[rng.random(labels.shape) < 0.25] = 255
  pred = rng.integers(0, 6, size=labels.shape)  # class 5 only predicted (IoU 0), class 6 nowhere (NaN)
  confusion = np.asarray(jax.jit(seg_metrics.confusion_matrix, static_argnums=2)(pred, labels, num_classes))
  expected_confusion = np.array([[np.sum((labels == t) & (pred == p)) for p in range(num_classes)]
                                 for t in range(num_classes)])
  np.testing.assert_array_equal(confusion, expected_confusion)
  result, expected = seg_metrics.scores(confusion), _brute_force_scores(pred, labels, num_classes)
  np.testing.assert_allclose(result["per_class_iou"], expected["per_class_iou"])
  assert np.isnan(result["per_class_iou"][6]) and result["per_class_iou"][5] == 0.0
  for key in ("miou", "macc", "aacc"):
    assert result[key] == pytest.approx(expected[key], rel=1e-12), key


def test_predictions_on_ignored_pixels_do_not_count():
  labels = _labels((2, 8, 8))
  pred = np.random.default_rng(1).integers(0, NUM_CLASSES, size=labels.shape)
  other_pred = np.where(labels == 255, (pred + 1) % NUM_CLASSES, pred)
  np.testing.assert_array_equal(seg_metrics.confusion_matrix(pred, labels, NUM_CLASSES),
                                seg_metrics.confusion_matrix(other_pred, labels, NUM_CLASSES))


# ---------------------------------------------------------------------------------------------------------------
# Resizing and pooling as PyTorch computes them

# The tests marked `torch` import it themselves, so the others run without it.


@pytest.mark.torch
@pytest.mark.parametrize("size", [(20, 28), (3, 4), (1, 1), (13, 9)])
def test_resize_bilinear_matches_torch(size, torch):  # pylint: disable=redefined-outer-name
  F = torch.nn.functional  # pylint: disable=invalid-name
  x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
  expected = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=size, mode="bilinear",
                           align_corners=False).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(segmentation.resize_bilinear(jnp.asarray(x), size), expected, atol=1e-5)


@pytest.mark.torch
@pytest.mark.parametrize("in_size,out_size", [(2, 6), (7, 3), (16, 6), (5, 1)])
def test_adaptive_avg_pool_matches_torch(in_size, out_size, torch):  # pylint: disable=redefined-outer-name
  F = torch.nn.functional  # pylint: disable=invalid-name
  x = np.random.default_rng(0).normal(size=(2, in_size, in_size + 1, 3)).astype(np.float32)
  expected = F.adaptive_avg_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), out_size).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(segmentation.adaptive_avg_pool(jnp.asarray(x), out_size), expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Sliding-window inference

def _mmseg_slide(apply_fn, images, num_classes, window, stride):
  """mmseg's slide_inference loop, written from its description: windows at i·stride clamped to the border."""
  torch = pytest.importorskip("torch")  # pylint: disable=redefined-outer-name
  F = torch.nn.functional  # pylint: disable=invalid-name
  batch, height, width, _ = images.shape
  preds = np.zeros((batch, height, width, num_classes), np.float64)
  count = np.zeros((height, width))
  for h_idx in range(max(height - window + stride - 1, 0) // stride + 1):
    for w_idx in range(max(width - window + stride - 1, 0) // stride + 1):
      y2, x2 = min(h_idx * stride + window, height), min(w_idx * stride + window, width)
      y1, x1 = max(y2 - window, 0), max(x2 - window, 0)
      logits = apply_fn(images[:, y1:y2, x1:x2])
      logits = F.interpolate(torch.from_numpy(np.array(logits)).permute(0, 3, 1, 2), size=(window, window),
                             mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
      preds[:, y1:y2, x1:x2] += logits
      count[y1:y2, x1:x2] += 1
  return preds / count[None, :, :, None]


def _position_dependent_fn(num_classes):
  """Quarter-resolution logits that depend on where a pixel sits inside its window, so overlaps differ."""
  weights = jnp.asarray(np.random.default_rng(2).normal(size=(3, num_classes)), jnp.float32)

  def apply_fn(crop):
    batch, size, _, channels = crop.shape
    pooled = crop.reshape(batch, size // 4, 4, size // 4, 4, channels).mean(axis=(2, 4))
    position = jnp.arange(size // 4, dtype=jnp.float32)[:, None, None] * jnp.arange(1, num_classes + 1)
    return pooled @ weights + position
  return apply_fn


@pytest.mark.torch  # _mmseg_slide resizes with torch
def test_sliding_window_averages_overlapping_windows_as_mmseg():
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 40, 56, 3)), jnp.float32)
  apply_fn = _position_dependent_fn(4)
  assert seg_metrics.window_offsets(40, 16, 11) == [0, 11, 22, 24]  # the last window is moved back to the border
  got = jax.jit(functools.partial(seg_metrics.sliding_window_logits, apply_fn, num_classes=4, window=16,
                                  stride=11))(images)
  np.testing.assert_allclose(got, _mmseg_slide(apply_fn, images, 4, 16, 11), rtol=1e-5, atol=1e-5)


def test_sliding_window_of_a_pixelwise_model_is_the_whole_image_prediction():
  weights = jnp.asarray(np.random.default_rng(3).normal(size=(3, 4)), jnp.float32)
  pixelwise = lambda crop: jnp.tanh(crop @ weights)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(1, 37, 30, 3)), jnp.float32)
  got = seg_metrics.sliding_window_logits(pixelwise, images, num_classes=4, window=16, stride=7)
  np.testing.assert_allclose(got, pixelwise(images), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_sliding_window_equals_whole_image_inference_when_the_image_fits_one_window(stateful):
  view, params, stats = stateful
  images = _images(seed=4)
  apply_fn = lambda crop: view.apply(params, stats, crop, train=False)[0][0]
  whole = segmentation.resize_bilinear(apply_fn(images), (32, 32))
  slid = jax.jit(lambda x: seg_metrics.sliding_window_logits(apply_fn, x, num_classes=NUM_CLASSES, window=32,
                                                              stride=21))(images)
  np.testing.assert_allclose(slid, whole, rtol=1e-5, atol=1e-5)


def test_windows_larger_than_the_image_are_refused():
  with pytest.raises(ValueError, match="pad images"):
    seg_metrics.window_offsets(300, 512, 341)


def test_multi_scale_flip_probabilities_are_a_distribution_and_flip_equivariant():
  apply_fn = _position_dependent_fn(4)
  images = jnp.asarray(np.random.default_rng(5).normal(size=(1, 24, 32, 3)), jnp.float32)
  probs = seg_metrics.multi_scale_flip_probs(apply_fn, images, num_classes=4, scales=(0.75, 1.0), flip=True,
                                             window=16, stride=8)
  assert probs.shape == (1, 24, 32, 4)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  # With flip, the prediction of a mirrored image is the mirrored prediction (when no padding is needed).
  mirrored = seg_metrics.multi_scale_flip_probs(apply_fn, images[:, :, ::-1], num_classes=4, scales=(1.0,),
                                                flip=True, window=16, stride=8)
  plain = seg_metrics.multi_scale_flip_probs(apply_fn, images, num_classes=4, scales=(1.0,), flip=True, window=16,
                                             stride=8)
  np.testing.assert_allclose(mirrored[:, :, ::-1], plain, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# The model

@pytest.mark.parametrize("image_size, patch_size", [(32, 16), (64, 16), (96, 16), (32, 4)])
def test_upernet_output_shapes(image_size, patch_size):
  """Logits at 4× the patch grid (1/4 of the image for 16-pixel patches), the auxiliary head's at the grid."""
  view, params, stats = functional.abstract_split_stateful(_constructor(image_size, patch_size=patch_size))
  images = jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32)
  (logits, aux_logits), _ = jax.eval_shape(lambda p, s, x: view.apply(p, s, x, train=True), params, stats, images)
  grid = image_size // patch_size
  assert logits.shape == (2, 4 * grid, 4 * grid, NUM_CLASSES) and logits.dtype == jnp.float32
  assert aux_logits.shape == (2, grid, grid, NUM_CLASSES)


def test_parameters_keep_the_classifier_paths():
  _, params, stats = functional.abstract_split_stateful(_constructor())
  _, classifier_params = functional.abstract_split(lambda: vit.ViTClassifier(_vit_config(), 3, rngs=nnx.Rngs(0)))
  trunk = {k for k in classifier_params if k not in ("fc_norm", "head")}
  assert set(params) == trunk | {"fpn1", "fpn2", "decode_head", "auxiliary_head"}
  assert jax.tree.map(jnp.shape, {k: params[k] for k in trunk}) == jax.tree.map(
      jnp.shape, {k: classifier_params[k] for k in trunk})
  assert set(stats) == {"fpn1", "decode_head", "auxiliary_head"}  # BatchNorm's running statistics


def _loss_fn(view, stats, images, labels, dropout_rng=None):
  def loss_fn(params):
    (logits, aux_logits), new_stats = view.apply(params, stats, images, train=True, dropout_rng=dropout_rng)
    loss, metrics = segmentation.segmentation_loss(logits, aux_logits, labels, SEG_CONFIG)
    return loss, (metrics, new_stats)
  return loss_fn


@pytest.mark.slow
def test_gradients_reach_every_parameter(stateful):
  view, params, stats = stateful
  labels = jnp.asarray(_labels((2, 32, 32)))
  grads, (metrics, _) = jax.jit(jax.grad(_loss_fn(view, stats, _images(), labels), has_aux=True))(params)
  assert np.isfinite(float(metrics["loss"]))
  flat = {"/".join(str(k.key) for k in path): float(jnp.abs(g).sum())
          for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
  # A bias right before BatchNorm cancels in the normalisation: its gradient is zero in PyTorch too.
  before_norm = "fpn1/deconv1/bias"
  assert flat.pop(before_norm) < 1e-6 * max(flat.values())
  assert [name for name, total in flat.items() if not total > 0] == []


def test_batch_norm_updates_running_statistics_in_training_and_uses_them_in_eval(stateful):
  view, params, stats = stateful
  images = _images(seed=6)
  train = jax.jit(lambda s: view.apply(params, s, images, train=True))
  (train_logits, _), stats1 = train(stats)
  (train_logits_again, _), stats2 = train(stats1)
  mean0 = stats["decode_head"]["fpn_bottleneck"]["norm"]["mean"]
  mean1 = stats1["decode_head"]["fpn_bottleneck"]["norm"]["mean"]
  mean2 = stats2["decode_head"]["fpn_bottleneck"]["norm"]["mean"]
  assert float(jnp.abs(mean1 - mean0).max()) > 0
  # PyTorch's momentum 0.1 from zero: m1 = 0.1·μ, then m2 = 0.9·m1 + 0.1·μ = 1.9·m1 (training ignores the stats).
  np.testing.assert_allclose(mean2, 1.9 * mean1, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(train_logits_again, train_logits, rtol=1e-5, atol=1e-6)
  evaluate = jax.jit(lambda s: view.apply(params, s, images, train=False))
  (eval0, _), unchanged = evaluate(stats)
  (eval1, _), _ = evaluate(stats1)
  assert float(jnp.abs(eval1 - eval0).max()) > 1e-4
  np.testing.assert_array_equal(unchanged["decode_head"]["fpn_bottleneck"]["norm"]["var"],
                                stats["decode_head"]["fpn_bottleneck"]["norm"]["var"])


def test_dropout_follows_the_key_and_only_in_training(stateful):
  view, params, stats = stateful
  images = _images(seed=7)
  run = jax.jit(lambda rng, train: view.apply(params, stats, images, train=train, dropout_rng=rng)[0][0],
                static_argnums=1)
  key = jax.random.key(0)
  assert float(jnp.abs(run(key, True) - run(jax.random.key(1), True)).max()) > 0
  np.testing.assert_array_equal(run(key, True), run(key, True))
  np.testing.assert_array_equal(run(key, False), run(jax.random.key(1), False))


# ---------------------------------------------------------------------------------------------------------------
# The loss

@pytest.mark.torch
def test_loss_equals_mmseg_cross_entropy_with_ignored_pixels(torch):  # pylint: disable=redefined-outer-name
  F = torch.nn.functional  # pylint: disable=invalid-name
  rng = np.random.default_rng(8)
  logits = rng.normal(size=(2, 8, 8, NUM_CLASSES)).astype(np.float32)
  aux_logits = rng.normal(size=(2, 2, 2, NUM_CLASSES)).astype(np.float32)
  labels = _labels((2, 32, 32), seed=8)
  loss, metrics = segmentation.segmentation_loss(jnp.asarray(logits), jnp.asarray(aux_logits), jnp.asarray(labels),
                                                 SEG_CONFIG)

  def torch_ce(x):
    up = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(32, 32), mode="bilinear", align_corners=False)
    # mmseg 0.x (BEiT v2): per-pixel losses with ignore_index (0 there), averaged over all pixels
    return float(F.cross_entropy(up, torch.from_numpy(labels.astype(np.int64)), ignore_index=255,
                                 reduction="none").mean())

  assert float(metrics["decode_loss"]) == pytest.approx(torch_ce(logits), rel=1e-5)
  assert float(metrics["aux_loss"]) == pytest.approx(torch_ce(aux_logits), rel=1e-5)
  assert float(loss) == pytest.approx(torch_ce(logits) + 0.4 * torch_ce(aux_logits), rel=1e-5)


def test_loss_does_not_see_ignored_pixels():
  rng = np.random.default_rng(9)
  labels = _labels((1, 16, 16), seed=9)
  labels[:, :, :8] = 255  # the left half is ignored
  logits = rng.normal(size=(1, 16, 16, NUM_CLASSES)).astype(np.float32)
  changed = logits.copy()
  changed[:, :, :7] += 10 * rng.normal(size=changed[:, :, :7].shape)  # upsampling at full size mixes no columns
  loss = lambda x: float(segmentation._pixel_cross_entropy(jnp.asarray(x), jnp.asarray(labels), 255)[0])
  assert loss(changed) == pytest.approx(loss(logits), rel=1e-6)
  all_ignored = np.full_like(labels, 255)
  assert float(segmentation._pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(all_ignored), 255)[0]) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# Starting from a pretrained student

def test_init_segmenter_from_pretrained_copies_the_trunk_only():
  pretrained = vit.PretrainViT(vit.get_config("test", depth=4, image_size=32, patch_size=16), rngs=nnx.Rngs(1))
  rng = np.random.default_rng(10)  # BEiT starts its tables at zero; random ones show where they go
  pretrained.shared_rel_pos_bias.value = jnp.asarray(rng.normal(size=pretrained.shared_rel_pos_bias.shape))
  pretrained.blocks[0].attn.rel_pos_bias.value = jnp.asarray(rng.normal(size=pretrained.shared_rel_pos_bias.shape))
  segmenter = _constructor(seed=2)()
  before = nnx.state(segmenter, nnx.Param).to_pure_dict()
  segmentation.init_segmenter_from_pretrained(segmenter, pretrained)
  after = nnx.state(segmenter, nnx.Param).to_pure_dict()
  src = nnx.state(pretrained, nnx.Param).to_pure_dict()
  np.testing.assert_array_equal(after["patch_embed"]["kernel"], src["patch_embed"]["kernel"])
  np.testing.assert_array_equal(after["blocks"][3]["mlp"]["fc1"]["kernel"], src["blocks"][3]["mlp"]["fc1"]["kernel"])
  # The shared table is folded into each block's table, so the trunk computes what the student's trunk did.
  np.testing.assert_allclose(after["blocks"][0]["attn"]["rel_pos_bias"], src["shared_rel_pos_bias"] +
                             src["blocks"][0]["attn"]["rel_pos_bias"])
  for head in ("fpn1", "fpn2", "decode_head", "auxiliary_head"):
    jax.tree.map(np.testing.assert_array_equal, after[head], before[head])
  # Segmentation crops are larger than the pretraining images: the position tables follow the larger patch grid.
  larger = _constructor(image_size=64)()
  segmentation.init_segmenter_from_pretrained(larger, pretrained)
  table = nnx.state(larger, nnx.Param).to_pure_dict()["blocks"][0]["attn"]["rel_pos_bias"]
  assert table.shape == (layers.num_relative_positions(4), 2) and float(jnp.abs(table).max()) > 0


def test_init_segmenter_from_an_mae_style_student_copies_its_encoder():
  student = mae.MAEStudent(mae.config_from_fields(dict(variant="test", depth=4, image_size=32, patch_size=16,
                                                       decoder_width=16, decoder_depth=1, decoder_num_heads=2)),
                           rngs=nnx.Rngs(1))
  config = vit.finetune_config(student.config, image_size=32)
  segmenter = segmentation.UperNetSegmenter(config, SEG_CONFIG, rngs=nnx.Rngs(2))
  segmentation.init_segmenter_from_pretrained(segmenter, student)
  after, src = (nnx.state(m, nnx.Param).to_pure_dict() for m in (segmenter, student))
  for name in ("patch_embed", "cls_token", "pos_embed", "blocks"):
    jax.tree.map(np.testing.assert_array_equal, after[name], src[name])


def test_config_errors_say_what_to_do():
  with pytest.raises(ValueError, match="4 increasing"):
    segmentation.SegmenterConfig(num_classes=3, out_indices=(0, 1, 1, 2))
  with pytest.raises(ValueError, match="use 255"):
    segmentation.SegmenterConfig(num_classes=3, ignore_index=2)
  with pytest.raises(ValueError, match="at least 2×2"):
    segmentation.UperNetSegmenter(vit.get_config("test", depth=4, image_size=16, patch_size=16), SEG_CONFIG,
                                  rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="beyond depth"):
    segmentation.UperNetSegmenter(vit.get_config("test", image_size=32, patch_size=16), SEG_CONFIG,
                                  rngs=nnx.Rngs(0))
