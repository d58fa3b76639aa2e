"""`python -m dtm_jax.export`: runs saved as main.py saves them → Hugging Face / timm folders that compute what our
model computes, convert back to the same parameters, and refuse bad input with one line and no output.

The torch tests load the exports with transformers (`from_pretrained`, no missing or unexpected keys) and with timm.
timm 1.0's modules import torchvision at their top, which cannot be installed next to the CPU torch here; the timm
test runs in a subprocess whose `torchvision` is an empty stand-in (only module and class names: timm's Beit never
calls torchvision), then builds the model from the export's config.json with `timm.create_model("local-dir:…")`
and loads model.safetensors with `load_state_dict(strict=True)`.
"""
import json
import os
import subprocess
import sys
import textwrap

import gcs_emulator
import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import tensorflow as tf
from etils import epath
from flax import nnx
from flax.nnx import traversals

from dtm_jax import export
from dtm_jax.models import convert, functional, mae, segmentation, vit
from dtm_jax.runtime import checkpoint
from input_pipeline import transforms

# pylint: disable=redefined-outer-name
LAYOUTS = {"shared+block": {}, "block": dict(shared_rel_pos_bias=False),
           "shared": dict(block_rel_pos_bias=False, abs_pos_emb=True)}
INPUT = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "crop_pct": 0.8, "source": "folder"}


def _config(**overrides):
  return vit.get_config("test", image_size=16, patch_size=4, out_dim=8, **overrides)


def _random(params, seed):
  """Every parameter random (tables and norms too), so no zero table or unit scale hides a wrong mapping."""
  rng = np.random.default_rng(seed)
  flat = traversals.flatten_mapping(params)
  out = {}
  for path, x in flat.items():
    noise = rng.normal(size=x.shape).astype(np.float32)
    name = "/".join(map(str, path))
    if x.ndim >= 2 and "rel_pos_bias" not in name:
      out[path] = noise / np.sqrt(np.prod(x.shape[:-1]))
    elif "scale" in name:
      out[path] = 1.0 + 0.2 * noise
    else:
      out[path] = noise if "rel_pos_bias" in name else 0.1 * noise
  return traversals.unflatten_mapping({path: value.astype(np.float32) for path, value in out.items()})


def _save(workdir, step, params, metadata):
  ckpt = checkpoint.Checkpointer(workdir, async_save=False)
  ckpt.save(step, params=jax.tree.map(jnp.asarray, params), train={"step": np.int32(step)}, data_iterator=None,
            metadata={**metadata, "step": step})
  ckpt.close()


def pretraining_run(workdir, config, seed=0, step=3):
  """(module, params) of a random student saved as a pretraining run."""
  model = vit.PretrainViT(config, rngs=nnx.Rngs(seed))
  graph, params = functional.split_module(model)
  params = _random(params, seed)
  _save(workdir, step, params, {"model_config": checkpoint.model_config_to_json(config), "config": {"input": INPUT}})
  return graph.bind(params), params


def finetuning_run(workdir, pooling, num_classes=5, seed=1):
  config = _config(shared_rel_pos_bias=False)
  graph, params = functional.split_module(vit.ViTClassifier(config, num_classes, pooling=pooling, rngs=nnx.Rngs(0)))
  params = _random(params, seed)
  run_config = {"num_classes": num_classes, "pooling": pooling, "input": INPUT}
  _save(workdir, 7, params, {"model_config": checkpoint.model_config_to_json(config), "config": run_config,
                             "pretrained": {"checkpoint": "x", "step": 3}, "best_top1": 50.0})
  return graph.bind(params), params


def segmentation_run(workdir, seed=2):
  config = _config(shared_rel_pos_bias=False, depth=4)
  seg = segmentation.SegmenterConfig(num_classes=3, out_indices=(0, 1, 2, 3), channels=8, aux_channels=8)
  module = segmentation.UperNetSegmenter(config, seg, rngs=nnx.Rngs(0))
  graph, params, stats = functional.split_stateful(module)
  params = _random(params, seed)
  run_config = {"segmenter": dict(num_classes=3, out_indices=[0, 1, 2, 3], channels=8, aux_channels=8),
                "input": INPUT}
  _save(workdir, 4, params, {"model_config": checkpoint.model_config_to_json(config), "config": run_config,
                             "pretrained": {"checkpoint": "x", "step": 3}, "best_miou": 1.0})
  return graph.bind(params, stats)


def _images(batch=2, seed=0):
  return np.random.default_rng(seed).normal(size=(batch, 16, 16, 3)).astype(np.float32)


def _nchw(torch, x):
  return torch.from_numpy(x).permute(0, 3, 1, 2)


def _close(got, want, rel=1e-5):
  """‖got − want‖ ≤ rel·‖want‖ (float32 summation orders differ between XLA and torch)."""
  error = np.linalg.norm(np.asarray(got) - np.asarray(want)) / np.linalg.norm(np.asarray(want))
  assert error <= rel, f"relative error {error:.2e} > {rel:.0e}"


def _from_pretrained(cls, directory):
  model, info = cls.from_pretrained(str(directory), output_loading_info=True, attn_implementation="eager")
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  return model.eval()


def _read(path):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  return load_file(str(path))


@pytest.mark.torch
@pytest.mark.parametrize("layout,rel_pos", [("shared+block", "as_trained"), ("shared+block", "per_block"),
                                            ("block", None), ("shared", None)])
def test_hf_student_computes_our_features(tmp_path, layout, rel_pos, torch, transformers):
  model, _ = pretraining_run(tmp_path / "run", _config(**LAYOUTS[layout]))
  out = export.export(tmp_path / "run", "hf", tmp_path / "hf", rel_pos=rel_pos)
  config = json.loads((out / "config.json").read_text())
  folded = rel_pos == "per_block" and model.config.shared_rel_pos_bias
  assert config["use_shared_relative_position_bias"] == (model.config.shared_rel_pos_bias and not folded)
  assert config["use_relative_position_bias"] == (model.config.block_rel_pos_bias or folded)
  hf = _from_pretrained(transformers.BeitModel, out)
  x = _images()
  mask = np.zeros((2, 16), bool)
  mask[0, :5] = mask[1, 9:] = True
  with torch.no_grad():
    features = hf(_nchw(torch, x), bool_masked_pos=torch.from_numpy(mask)).last_hidden_state.numpy()
  _close(features, model.encode(jnp.asarray(x), jnp.asarray(mask)))
  head = _read(out / "lm_head.safetensors")  # the pretraining head beside the trunk, in torch's Linear layout
  _close(features[:, 1:] @ head["lm_head.weight"].T + head["lm_head.bias"], model(jnp.asarray(x), jnp.asarray(mask)))


def mae_pretraining_run(workdir, seed=3, step=5):
  """(module, params) of a random MAE-style student saved as a pretraining run."""
  config = mae.MAEConfig(image_size=16, patch_size=4, width=32, depth=2, num_heads=2, out_dim=8, decoder_width=16,
                         decoder_depth=1, decoder_num_heads=2)
  graph, params = functional.split_module(mae.MAEStudent(config, rngs=nnx.Rngs(seed)))
  params = _random(params, seed)
  _save(workdir, step, params, {"model_config": checkpoint.model_config_to_json(config), "config": {"input": INPUT}})
  return graph.bind(params), params


@pytest.mark.torch
@pytest.mark.parametrize("fmt", ["hf", "timm"])
def test_an_mae_style_student_exports_its_encoder(tmp_path, fmt, torch, transformers):
  """The encoder is the trunk (docs/METHOD.md §9): BEiT with an absolute position embedding, no relative tables, no
  layer scale and no mask token; the decoder and its head are left behind."""
  model, _ = mae_pretraining_run(tmp_path / "run")
  out = export.export(tmp_path / "run", fmt, tmp_path / fmt)
  assert not (out / "lm_head.safetensors").exists()
  weights = _read(out / "model.safetensors")
  assert not [name for name in weights if "decoder" in name or "lm_head" in name or "mask_token" in name]
  if fmt == "timm":
    assert json.loads((out / "config.json").read_text())["model_args"]["use_abs_pos_emb"] is True
    np.testing.assert_array_equal(weights["pos_embed"], np.asarray(model.pos_embed[...]))
    return
  config = json.loads((out / "config.json").read_text())
  assert config["use_absolute_position_embeddings"] and not config["use_mask_token"]
  assert not config["use_relative_position_bias"] and not config["use_shared_relative_position_bias"]
  hf = _from_pretrained(transformers.BeitModel, out)
  x = _images()
  with torch.no_grad():
    features = hf(_nchw(torch, x)).last_hidden_state.numpy()
  _close(features, model.encode(jnp.asarray(x)))


@pytest.mark.torch
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_hf_classifier_computes_our_logits(tmp_path, pooling, torch, transformers):
  model, _ = finetuning_run(tmp_path / "run", pooling)
  out = export.export(tmp_path / "run", "hf", tmp_path / "hf")
  hf = _from_pretrained(transformers.BeitForImageClassification, out)
  assert hf.config.use_mean_pooling == (pooling == "mean") and hf.config.num_labels == 5
  x = _images(3, seed=1)
  with torch.no_grad():
    logits = hf(_nchw(torch, x)).logits.numpy()
  _close(logits, model(jnp.asarray(x)))

  # The processor prepares uint8 images as the run's evaluation view: resize to 16 / 0.8 = 20, centre crop 16,
  # then (x / 255 − mean) / std with the run's mean and std.
  processor = transformers.AutoImageProcessor.from_pretrained(str(out))
  image = np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8)
  pixels = processor(image, return_tensors="np")["pixel_values"][0]
  want = (image[2:18, 2:18] / 255.0 - np.array(INPUT["mean"])) / np.array(INPUT["std"])
  np.testing.assert_allclose(pixels.transpose(1, 2, 0), want, atol=1e-5)
  # A photo-like image that is not square: the shorter side goes to 20 and the longer keeps the aspect ratio, as in
  # our pipeline (input_pipeline.transforms.center_crop), up to PIL's rounding to 8 bits.
  coarse = np.random.default_rng(1).integers(0, 256, (4, 5, 3), dtype=np.uint8)
  photo = np.asarray(PIL.Image.fromarray(coarse).resize((45, 31), PIL.Image.BICUBIC))
  levels = processor(photo, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  levels = (levels * np.array(INPUT["std"]) + np.array(INPUT["mean"])) * 255.0
  ours = transforms.center_crop(tf.constant(photo), 16, INPUT["crop_pct"], antialias=True).numpy()
  error = np.abs(levels - ours)
  assert error.max() <= 1.5 and error.mean() < 0.4, (error.max(), error.mean())


@pytest.mark.torch
def test_hf_backbone_of_a_segmentation_run(tmp_path, torch, transformers):
  module = segmentation_run(tmp_path / "run")
  out = export.export(tmp_path / "run", "hf", tmp_path / "hf")
  hf = _from_pretrained(transformers.BeitBackbone, out)
  x = _images()
  with torch.no_grad():
    maps = hf(_nchw(torch, x)).feature_maps
  ours = module._trunk_outputs(jnp.asarray(x), None, None, (0, 1, 2, 3))  # pylint: disable=protected-access
  assert len(maps) == 4
  for got, tokens in zip(maps, ours):
    want = np.asarray(tokens)[:, 1:].reshape(2, 4, 4, -1)
    _close(got.numpy().transpose(0, 2, 3, 1), want)


_TIMM_SCRIPT = textwrap.dedent('''
    import enum, importlib.abc, importlib.machinery, sys, types
    import numpy as np


    class _Stub(types.ModuleType):
      """torchvision stand-in: any attribute is a fresh empty class (timm only imports names from it)."""

      def __getattr__(self, name):
        if name.startswith("__"):
          raise AttributeError(name)
        if name == "InterpolationMode":
          return enum.Enum(name, {m: m.lower() for m in ("NEAREST", "BILINEAR", "BICUBIC", "BOX", "HAMMING",
                                                          "LANCZOS", "NEAREST_EXACT")})
        return type(name, (), {})


    class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
      def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "torchvision":
          return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

      def create_module(self, spec):
        module = _Stub(spec.name)
        module.__path__ = []
        return module

      def exec_module(self, module):
        pass


    sys.meta_path.insert(0, _Finder())
    import timm, torch
    from safetensors.torch import load_file

    directory, images, result = sys.argv[1:]
    model = timm.create_model("local-dir:" + directory, pretrained=False).eval()
    model.load_state_dict(load_file(directory + "/model.safetensors"), strict=True)
    x = torch.from_numpy(np.load(images)).permute(0, 3, 1, 2)
    with torch.no_grad():
      np.savez(result, features=model.forward_features(x).numpy(), logits=model(x).numpy())
''')


def _run_timm(tmp_path, directory, x):
  np.save(tmp_path / "x.npy", x)
  script = tmp_path / "timm_check.py"
  script.write_text(_TIMM_SCRIPT)
  proc = subprocess.run([sys.executable, str(script), str(directory), str(tmp_path / "x.npy"),
                         str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return np.load(tmp_path / "out.npz")


@pytest.mark.slow  # a subprocess
@pytest.mark.torch
def test_timm_beit_loads_strictly_and_computes_our_outputs(tmp_path, torch):
  del torch  # the subprocess imports it
  student, _ = pretraining_run(tmp_path / "run", _config())  # shared + per-block tables: folded for timm
  classifier, _ = finetuning_run(tmp_path / "ft", "mean")
  x = _images()
  out = export.export(tmp_path / "run", "timm", tmp_path / "timm")
  config = json.loads((out / "config.json").read_text())
  assert config["model_args"]["use_rel_pos_bias"] and not config["model_args"]["use_shared_rel_pos_bias"]
  _close(_run_timm(tmp_path, out, x)["features"], student.encode(jnp.asarray(x)))
  out = export.export(tmp_path / "ft", "timm", tmp_path / "timm_ft")
  _close(_run_timm(tmp_path, out, x)["logits"], classifier(jnp.asarray(x)))


def _flat(params):
  return {k: np.asarray(v) for k, v in traversals.flatten_mapping(params).items()}


@pytest.mark.parametrize("layout", ["shared+block", "block"])
def test_timm_export_converts_back_to_the_same_parameters(tmp_path, layout):
  _, params = pretraining_run(tmp_path / "run", _config(**LAYOUTS[layout]))
  out = export.export(tmp_path / "run", "timm", tmp_path / "timm", rel_pos="as_trained")
  weights = {**_read(out / "model.safetensors"), **_read(out / "lm_head.safetensors")}
  converted = convert.convert_weights(weights, "beit")
  assert converted.kind == "vit" and converted.config.shared_rel_pos_bias == (layout == "shared+block")
  got, want = _flat(converted.params), _flat(params)
  assert got.keys() == want.keys()
  for path, value in want.items():
    np.testing.assert_array_equal(got[path], value, err_msg=str(path))


def test_classifier_converts_back_to_the_same_parameters(tmp_path):
  _, params = finetuning_run(tmp_path / "run", "cls")
  out = export.export(tmp_path / "run", "timm", tmp_path / "timm")
  converted = convert.convert_weights(_read(out / "model.safetensors"), "beit")
  assert converted.kind == "vit_classifier" and converted.module_kwargs == {"num_classes": 5, "pooling": "cls"}
  got, want = _flat(converted.params), _flat(params)
  assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


def test_folding_keeps_the_function(tmp_path):
  model, _ = pretraining_run(tmp_path / "run", _config())
  folded = export.fold_shared_table(export.load_run(tmp_path / "run"))
  assert not folded.config.shared_rel_pos_bias and "shared_rel_pos_bias" not in folded.params
  other = functional.split_module(vit.PretrainViT(folded.config, rngs=nnx.Rngs(0)))[0].bind(folded.params)
  x = jnp.asarray(_images())
  _close(other.encode(x), model.encode(x))


def _cli(capsys, *flags):
  with pytest.raises(SystemExit) as exit_info:
    export.main(list(flags))
  assert exit_info.value.code == 1
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("Error: "), lines
  return lines[0]


def _entries(directory):
  return sorted(os.listdir(directory))


def test_bad_input_gives_one_line_and_no_output(tmp_path, capsys):
  pretraining_run(tmp_path / "run", _config(), step=3)
  segmentation_run(tmp_path / "seg")
  (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
  (tmp_path / "exists").mkdir()
  before = _entries(tmp_path)
  out = f"--output={tmp_path / 'out'}"
  assert "No complete checkpoint" in _cli(capsys, f"--workdir={tmp_path / 'empty'}", "--format=hf", out)
  assert "No checkpoint directory" in _cli(capsys, f"--workdir={tmp_path / 'nowhere'}", "--format=hf", out)
  assert "No checkpoint of step 9" in _cli(capsys, f"--workdir={tmp_path / 'run'}", "--format=hf", out, "--step=9")
  assert "available steps: [3]" in _cli(capsys, f"--workdir={tmp_path / 'run'}", "--format=hf", out, "--step=9")
  assert "Unknown format 'onnx'" in _cli(capsys, f"--workdir={tmp_path / 'run'}", "--format=onnx", out)
  assert "--overwrite" in _cli(capsys, f"--workdir={tmp_path / 'run'}", "--format=hf",
                               f"--output={tmp_path / 'exists'}")
  message = _cli(capsys, f"--workdir={tmp_path / 'seg'}", "--format=timm", out)
  assert "LayerNorm" in message and "--format=hf" in message
  assert _entries(tmp_path) == before and not _entries(tmp_path / "exists")

  export.main([f"--workdir={tmp_path / 'run'}", "--format=hf", f"--output={tmp_path / 'exists'}", "--overwrite",
               "--no_lm_head"])
  assert "model.safetensors" in _entries(tmp_path / "exists") and "lm_head.safetensors" not in _entries(
      tmp_path / "exists")
  assert _entries(tmp_path) == before  # replaced in place, no temporary left beside it


def test_unfinished_step_is_refused(tmp_path, capsys):
  pretraining_run(tmp_path / "run", _config(), step=3)
  os.rename(tmp_path / "run" / "checkpoints" / "3", tmp_path / "run" / "checkpoints" / "3.orbax-checkpoint-tmp-1")
  assert "No complete checkpoint" in _cli(capsys, f"--workdir={tmp_path / 'run'}", "--format=timm",
                                          f"--output={tmp_path / 'out'}")
  assert not (tmp_path / "out").exists()


@pytest.mark.gcs
@pytest.mark.torch
def test_a_run_in_a_bucket_exports_into_a_bucket(gcs, tmp_path, torch, transformers):
  del gcs  # the emulator, with every client pointed at it
  bucket = epath.Path(f"gs://{gcs_emulator.BUCKET}/export_test")
  model, _ = pretraining_run(bucket / "run", _config())
  out = export.export(bucket / "run", "hf", bucket / "hf")
  assert sorted(p.name for p in bucket.iterdir()) == ["hf", "run"]  # no temporary sibling left
  local = tmp_path / "hf"
  local.mkdir()
  for f in out.iterdir():
    (local / f.name).write_bytes(f.read_bytes())
  hf = _from_pretrained(transformers.BeitModel, local)
  x = _images()
  with torch.no_grad():
    features = hf(_nchw(torch, x)).last_hidden_state.numpy()
  _close(features, model.encode(jnp.asarray(x)))
