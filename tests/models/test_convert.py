"""Checkpoint converters end to end: PyTorch files → CLI → Orbax + JSON → load_converted, and their errors."""
import argparse
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from dtm_jax.models import clip, convert, position_resize, vit

# Every test here reads PyTorch files made by torch from tests/torch_reference models: all are marked `torch`, and
# torch, transformers and torch_reference are imported through the fixtures below, so that collecting this file
# needs none of them.
# pylint: disable=redefined-outer-name
pytestmark = pytest.mark.torch


def _run_cli(tmp_path, fmt, source, *flags, output="converted"):
  convert.main([f"--format={fmt}", f"--input={source}", f"--output={tmp_path / output}", *flags])
  return tmp_path / output


def _torch_file(path, tree):
  torch = pytest.importorskip("torch")
  torch.save(_to_torch(tree), path)
  return path


def _to_torch(tree):
  torch = pytest.importorskip("torch")
  if isinstance(tree, dict):
    return {k: _to_torch(v) for k, v in tree.items()}
  return torch.from_numpy(np.ascontiguousarray(tree)) if isinstance(tree, np.ndarray) else tree


def _torchscript_file(path, flat):
  """A TorchScript archive whose state dict is `flat`, the way OpenAI ships CLIP `.pt` files."""
  torch = pytest.importorskip("torch")
  root = torch.nn.Module()
  for name, value in flat.items():
    *parents, leaf = name.split(".")
    module = root
    for part in parents:
      if not hasattr(module, part):
        module.add_module(part, torch.nn.Module())
      module = getattr(module, part)
    module.register_buffer(leaf, torch.from_numpy(np.ascontiguousarray(value)))
  torch.jit.save(torch.jit.script(root), str(path))
  return path


@pytest.fixture(scope="module")
def hf_clip(ref):
  return ref.hf_clip(seed=3)


@pytest.fixture(scope="module")
def hf_beit(ref):
  return ref.hf_beit(seed=4)


def _beit_pretrain_weights(hf_beit, ref):
  weights = ref.beit_to_unilm(ref.numpy_state(hf_beit))
  rng = np.random.default_rng(0)
  weights["lm_head.weight"] = rng.normal(size=(16, 32)).astype(np.float32) / 6
  weights["lm_head.bias"] = rng.normal(size=(16,)).astype(np.float32)
  return weights


def test_hf_clip_directory(tmp_path, hf_clip, ref):
  hf_clip.save_pretrained(tmp_path / "hf")  # model.safetensors + config.json (4 heads, not width // 64).
  out = _run_cli(tmp_path, "hf_clip", tmp_path / "hf")
  metadata = json.loads((out / convert.CONFIG_FILE).read_text())
  assert metadata["kind"] == "clip" and metadata["config"]["num_heads"] == 4
  assert metadata["source"]["format"] == "hf_clip"
  teacher = convert.load_converted(out)
  assert isinstance(teacher, clip.CLIPVision)
  x, x_torch = ref.images(2, 32)
  np.testing.assert_allclose(np.asarray(teacher(jnp.asarray(x))), ref.hf_clip_patch_tokens(hf_clip, x_torch),
                             atol=1e-4, rtol=0)

  resized = convert.load_converted(out, image_size=48)  # A run at another image size.
  x, x_torch = ref.images(1, 48, seed=5)
  np.testing.assert_allclose(np.asarray(resized(jnp.asarray(x))),
                             ref.hf_clip_patch_tokens(hf_clip, x_torch, interpolate_pos_encoding=True),
                             atol=1e-4, rtol=0)

  with pytest.raises(SystemExit, match="contradicts 4"):
    _run_cli(tmp_path, "hf_clip", tmp_path / "hf" / "model.safetensors", "--num_heads=8", output="other")


def test_openai_torchscript_with_text_tower(tmp_path, hf_clip, ref):
  weights = ref.clip_to_openai(ref.numpy_state(hf_clip))
  weights.update({  # The text tower and metadata of a full OpenAI archive are dropped on purpose.
      "transformer.resblocks.0.attn.in_proj_weight": np.zeros((96, 32), np.float32),
      "token_embedding.weight": np.zeros((10, 32), np.float32), "logit_scale": np.array(4.6, np.float32),
      "input_resolution": np.array(32)})
  source = _torchscript_file(tmp_path / "ViT-toy.pt", weights)
  out = _run_cli(tmp_path, "openai_clip", source, "--num_heads=4", "--image_size=48")
  teacher = convert.load_converted(out)
  assert teacher.config.image_size == 48 and teacher.config.activation == "quick_gelu"
  x, x_torch = ref.images(1, 48, seed=1)  # Position embeddings were resized to 48² at conversion.
  want = ref.hf_clip_patch_tokens(hf_clip, x_torch, interpolate_pos_encoding=True)
  np.testing.assert_allclose(np.asarray(teacher(jnp.asarray(x))), want, atol=1e-4, rtol=0)


def test_open_clip_needs_an_activation(tmp_path, hf_clip, ref):
  weights = {f"module.{k}": v for k, v in ref.clip_to_openai(ref.numpy_state(hf_clip)).items()}
  source = _torch_file(tmp_path / "open_clip.pt", {"epoch": 3, "state_dict": weights})
  with pytest.raises(SystemExit, match="--activation=gelu"):
    _run_cli(tmp_path, "open_clip", source, "--num_heads=4")
  out = _run_cli(tmp_path, "open_clip", source, "--num_heads=4", "--activation=quick_gelu")
  x, x_torch = ref.images(1, 32, seed=2)
  np.testing.assert_allclose(np.asarray(convert.load_converted(out)(jnp.asarray(x))),
                             ref.hf_clip_patch_tokens(hf_clip, x_torch), atol=1e-4, rtol=0)


def test_beit_pretraining_checkpoint(tmp_path, hf_beit, torch, ref):
  weights = _beit_pretrain_weights(hf_beit, ref)
  source = _torch_file(tmp_path / "dtm.pth", {"model": weights})
  out = _run_cli(tmp_path, "beit", source)
  student = convert.load_converted(out)
  assert isinstance(student, vit.PretrainViT)
  assert (student.config.num_heads, student.config.shared_rel_pos_bias, student.config.out_dim) == (2, True, 16)
  x, x_torch = ref.images(2, 32, seed=3)
  mask = np.zeros((2, 16), bool)
  mask[0, :6] = mask[1, 10:] = True
  with torch.no_grad():
    features = hf_beit(x_torch, bool_masked_pos=torch.from_numpy(mask)).last_hidden_state.numpy()
  want = features[:, 1:] @ weights["lm_head.weight"].T + weights["lm_head.bias"]
  np.testing.assert_allclose(np.asarray(student(jnp.asarray(x), jnp.asarray(mask))), want, atol=1e-4, rtol=0)

  bf16 = convert.load_converted(out, dtype=jnp.bfloat16)
  assert bf16.config.dtype == jnp.bfloat16 and bf16.lm_head.kernel[...].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(bf16(jnp.asarray(x), jnp.asarray(mask)), np.float32), want, atol=0.15)
  larger = convert.load_converted(out, image_size=48)  # 4×4 → 6×6 patches: tables resized (position_resize)
  assert larger.config.image_size == 48
  np.testing.assert_allclose(larger.shared_rel_pos_bias[...], position_resize.resize_rel_pos_table(
      student.shared_rel_pos_bias[...], 4, 6), rtol=1e-6)
  assert larger(jnp.asarray(np.zeros((1, 48, 48, 3), np.float32)), jnp.zeros((1, 36), bool)).shape == (1, 36, 16)


def test_beit_classifier_checkpoint(tmp_path, torch, ref):
  torch_model = ref.hf_beit_classifier(seed=5, num_labels=16)
  source = _torch_file(tmp_path / "finetuned.pth", {"model": ref.beit_to_unilm(ref.numpy_state(torch_model))})
  classifier = convert.load_converted(_run_cli(tmp_path, "beit", source))
  assert isinstance(classifier, vit.ViTClassifier) and classifier.pooling == "mean"
  x, x_torch = ref.images(2, 32, seed=4)
  with torch.no_grad():
    want = torch_model(x_torch).logits.numpy()
  np.testing.assert_allclose(np.asarray(classifier(jnp.asarray(x))), want, atol=1e-4, rtol=0)


def test_errors_name_the_problem(tmp_path, hf_beit, ref):
  weights = _beit_pretrain_weights(hf_beit, ref)

  with pytest.raises(SystemExit, match="does not exist"):
    _run_cli(tmp_path, "beit", tmp_path / "missing.pth")

  extra = dict(weights, **{"blocks.0.attn.extra": np.zeros(3, np.float32)})
  with pytest.raises(convert.ConversionError, match=r"unknown keys \(1\): blocks.0.attn.extra"):
    convert.convert_weights(extra, "beit")
  assert convert.convert_weights(extra, "beit", ignore_keys=r"\.extra$").kind == "vit"

  missing = {k: v for k, v in weights.items() if k != "blocks.1.attn.v_bias"}
  with pytest.raises(convert.ConversionError, match=r"missing keys \(1\): blocks.1.attn.v_bias"):
    convert.convert_weights(missing, "beit")

  bad_shape = dict(weights, **{"lm_head.bias": np.zeros(15, np.float32)})
  with pytest.raises(convert.ConversionError, match=r"lm_head/bias \(from lm_head.bias\): checkpoint \(15,\) vs "
                                                     r"model \(16,\)"):
    convert.convert_weights(bad_shape, "beit")

  with pytest.raises(convert.ConversionError, match="not a openai_clip checkpoint"):
    convert.convert_weights(weights, "openai_clip")
  with pytest.raises(convert.ConversionError, match="not a multiple of the patch size"):
    convert.convert_weights(weights, "beit", image_size=60)

  unsafe = _torch_file(tmp_path / "with_args.pth", {"model": weights, "args": argparse.Namespace(lr=1.0)})
  with pytest.raises(SystemExit, match="re-save only its weights"):
    _run_cli(tmp_path, "beit", unsafe)

  source = _torch_file(tmp_path / "ok.pth", weights)
  _run_cli(tmp_path, "beit", source)
  with pytest.raises(SystemExit, match="already holds a converted checkpoint"):
    _run_cli(tmp_path, "beit", source)
  with pytest.raises(convert.ConversionError, match="create it with python -m dtm_jax.models.convert"):
    convert.load_converted(tmp_path / "nothing_here")
  assert not os.path.exists(tmp_path / "nothing_here")
