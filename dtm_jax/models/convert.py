"""Converts PyTorch checkpoints into our Flax modules' parameters, saved as an Orbax checkpoint.

Formats (`--format`):
  openai_clip  OpenAI CLIP `.pt`: a TorchScript archive or a state dict; the vision tower lives under `visual.`.
  open_clip    open_clip state dicts (`.pt/.pth/.bin` or `.safetensors`); same vision layout as OpenAI. They do not
               record the activation, so `--activation` is required (gelu for most, quick_gelu for OpenAI-trained).
  hf_clip      Hugging Face CLIPModel / CLIPVisionModelWithProjection weights (`model.safetensors`,
               `pytorch_model.bin`, or their directory); `config.json` beside them supplies heads and activation.
  beit         unilm/timm BEiT-family student weights (BEiT v2, DTM): pretraining (`lm_head`) or fine-tuned (`head`).

Example:
  python -m dtm_jax.models.convert --format=openai_clip --input=ViT-B-16.pt --output=/ckpt/clip_b16

The output directory holds `params/` (ocp.StandardCheckpointer of the pure-dict parameter tree) and
`model_config.json` (module kind and config); `load_converted(directory)` rebuilds the module. Torch is imported only
to read `.pt/.pth/.bin` files.
"""
import argparse
import dataclasses
import io
import json
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from flax.nnx import traversals

from dtm_jax.models import clip, layers, position_resize, vit

FORMATS = ("openai_clip", "open_clip", "hf_clip", "beit")
CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Hugging Face CLIPVisionConfig defaults, for config.json files that omit a field.
_HF_DEFAULTS = {"num_attention_heads": 12, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
_HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}
_MAX_LISTED = 20


class ConversionError(ValueError):
  """The checkpoint cannot be mapped onto our modules; the message says why and what to change."""


@dataclasses.dataclass(frozen=True)
class Converted:
  """A converted checkpoint: which module to build, its config, and its float32 parameters (nested pure dict)."""
  kind: str  # "clip" (CLIPVision), "vit" (PretrainViT) or "vit_classifier" (ViTClassifier).
  config: Any
  params: dict
  module_kwargs: dict = dataclasses.field(default_factory=dict)  # num_classes and pooling of a classifier.


# ----------------------------------------------------------------------------------------------------------------
# Reading checkpoint files.
# ----------------------------------------------------------------------------------------------------------------
def _path(path) -> epath.Path:
  """A local path made absolute (Orbax needs absolute paths), or a cloud path (`gs://…`) as it is."""
  path = epath.Path(path)
  return path if "://" in str(path) else epath.Path(os.path.abspath(path))


def read_checkpoint(path):
  """Flat {name: float32 numpy array} from a `.pt/.pth/.bin` (torch) or `.safetensors` file or HF directory
  (local or `gs://…`)."""
  path = _path(path)
  if path.is_dir():
    found = [path / f for f in _HF_WEIGHT_FILES if (path / f).exists()]
    if not found:
      raise ConversionError(f"Directory {path} holds none of {_HF_WEIGHT_FILES}; pass the weights file itself.")
    path = found[0]
  if not path.exists():
    raise ConversionError(f"Checkpoint file {path} does not exist.")
  # Local files are read by name (memory-mapped where the reader can); cloud files are read into memory first.
  source = os.fspath(path) if "://" not in str(path) else io.BytesIO(path.read_bytes())
  tree = _read_safetensors(source, path) if path.name.endswith(".safetensors") else _read_torch(source, path)
  weights = {name: _to_numpy(value) for name, value in _unwrap(tree, path).items()}
  if weights and all(name.startswith("module.") for name in weights):  # Saved from DistributedDataParallel.
    weights = {name[len("module."):]: value for name, value in weights.items()}
  return weights


def _read_safetensors(source, path):
  try:
    from safetensors.flax import load, load_file  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError(f"Reading {path} needs safetensors: pip install safetensors.") from e
  # Flax arrays, so bfloat16 files load too.
  return load(source.getvalue()) if isinstance(source, io.BytesIO) else load_file(source)


def _read_torch(source, path):
  """TorchScript archives (OpenAI's `.pt`) first, then plain `torch.load` restricted to weights."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError(f"Reading {path} needs PyTorch: pip install torch (the CPU build is enough).") from e
  try:
    return torch.jit.load(source, map_location="cpu").state_dict()
  except RuntimeError:
    pass  # Not a TorchScript archive.
  if isinstance(source, io.BytesIO):
    source.seek(0)
  try:
    return torch.load(source, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises several types for files it will not unpickle safely.
    raise ConversionError(
        f"torch.load(weights_only=True) could not read {path}: {e}\nIf you trust the file, re-save only its "
        "weights: torch.save(torch.load(PATH, weights_only=False)['model'], 'weights.pt').") from e


def _is_array(value):
  return hasattr(value, "shape") and hasattr(value, "dtype")


def _unwrap(tree, path):
  """Descends through `state_dict` / `model` / `module` wrappers to the flat name → tensor mapping."""
  while isinstance(tree, Mapping) and not any(_is_array(v) for v in tree.values()):
    inner = next((tree[k] for k in ("state_dict", "model", "module") if isinstance(tree.get(k), Mapping)), None)
    if inner is None:
      raise ConversionError(f"{path} holds no tensors at its top level and no state_dict/model/module entry; "
                            f"top-level keys: {sorted(tree)[:_MAX_LISTED]}.")
    tree = inner
  if not isinstance(tree, Mapping):
    raise ConversionError(f"{path} holds a {type(tree).__name__}, not a state dict.")
  return {name: value for name, value in tree.items() if _is_array(value)}


def _to_numpy(value):
  if hasattr(value, "detach"):  # A torch tensor: go through float32 so fp16/bf16 weights convert too.
    value = value.detach().cpu()
    return (value.float() if value.is_floating_point() else value).numpy()
  value = np.asarray(value)
  return value.astype(np.float32) if jnp.issubdtype(value.dtype, jnp.floating) else value


# ----------------------------------------------------------------------------------------------------------------
# Mapping rules: our parameter path ← checkpoint key(s), with the transform between their layouts.
# ----------------------------------------------------------------------------------------------------------------
def _linear_t(w):
  return w.T  # torch Linear [out, in] → Flax kernel [in, out].


def _conv_t(w):
  return w.transpose(2, 3, 1, 0)  # torch Conv2d [out, in, kh, kw] → Flax [kh, kw, in, out].


def _same(w):
  return w


def _token(w):
  return w.reshape(1, 1, -1)  # [D] or [1, 1, D] → [1, 1, D].


def _positions(w):
  return w.reshape(1, -1, w.shape[-1])  # [1+N, D] or [1, 1+N, D] → [1, 1+N, D].


def _linear_rules(ours, theirs, bias=True):
  rules = [(ours + ("kernel",), (f"{theirs}.weight",), _linear_t)]
  if bias:
    rules.append((ours + ("bias",), (f"{theirs}.bias",), _same))
  return rules


def _norm_rules(ours, theirs):
  return [(ours + ("scale",), (f"{theirs}.weight",), _same), (ours + ("bias",), (f"{theirs}.bias",), _same)]


def _openai_clip_rules(depth):
  """OpenAI / open_clip vision tower (after the `visual.` prefix is removed)."""
  rules = [(("patch_embed", "kernel"), ("conv1.weight",), _conv_t),
           (("cls_token",), ("class_embedding",), _token),
           (("pos_embed",), ("positional_embedding",), _positions),
           (("proj", "kernel"), ("proj",), _same)]  # Already [width, proj_dim].
  rules += _norm_rules(("ln_pre",), "ln_pre") + _norm_rules(("ln_post",), "ln_post")
  for i in range(depth):
    ours, theirs = ("blocks", i), f"transformer.resblocks.{i}"
    rules += [(ours + ("attn", "qkv", "kernel"), (f"{theirs}.attn.in_proj_weight",), _linear_t),
              (ours + ("attn", "qkv", "bias"), (f"{theirs}.attn.in_proj_bias",), _same)]
    rules += _linear_rules(ours + ("attn", "proj"), f"{theirs}.attn.out_proj")
    rules += _norm_rules(ours + ("norm1",), f"{theirs}.ln_1") + _norm_rules(ours + ("norm2",), f"{theirs}.ln_2")
    rules += _linear_rules(ours + ("mlp", "fc1"), f"{theirs}.mlp.c_fc")
    rules += _linear_rules(ours + ("mlp", "fc2"), f"{theirs}.mlp.c_proj")
  return rules


def _hf_clip_rules(depth):
  """Hugging Face CLIP vision tower; q/k/v projections are packed into our single qkv layer."""
  pre = "vision_model"
  rules = [(("patch_embed", "kernel"), (f"{pre}.embeddings.patch_embedding.weight",), _conv_t),
           (("cls_token",), (f"{pre}.embeddings.class_embedding",), _token),
           (("pos_embed",), (f"{pre}.embeddings.position_embedding.weight",), _positions),
           (("proj", "kernel"), ("visual_projection.weight",), _linear_t)]
  rules += _norm_rules(("ln_pre",), f"{pre}.pre_layrnorm") + _norm_rules(("ln_post",), f"{pre}.post_layernorm")
  for i in range(depth):
    ours, theirs = ("blocks", i), f"{pre}.encoder.layers.{i}"
    qkv = tuple(f"{theirs}.self_attn.{x}_proj" for x in "qkv")
    rules += [(ours + ("attn", "qkv", "kernel"), tuple(f"{p}.weight" for p in qkv),
               lambda q, k, v: np.concatenate([q, k, v]).T),
              (ours + ("attn", "qkv", "bias"), tuple(f"{p}.bias" for p in qkv),
               lambda q, k, v: np.concatenate([q, k, v]))]
    rules += _linear_rules(ours + ("attn", "proj"), f"{theirs}.self_attn.out_proj")
    rules += _norm_rules(ours + ("norm1",), f"{theirs}.layer_norm1")
    rules += _norm_rules(ours + ("norm2",), f"{theirs}.layer_norm2")
    rules += _linear_rules(ours + ("mlp", "fc1"), f"{theirs}.mlp.fc1")
    rules += _linear_rules(ours + ("mlp", "fc2"), f"{theirs}.mlp.fc2")
  return rules


def _beit_rules(config, kind, pooling):
  """unilm/timm BEiT layout (`blocks.N.attn.qkv`, separate q/v biases, `gamma_1/2`)."""
  rules = [(("patch_embed", "kernel"), ("patch_embed.proj.weight",), _conv_t),
           (("patch_embed", "bias"), ("patch_embed.proj.bias",), _same),
           (("cls_token",), ("cls_token",), _token)]
  if config.abs_pos_emb:
    rules.append((("pos_embed",), ("pos_embed",), _positions))
  if config.shared_rel_pos_bias:
    rules.append((("shared_rel_pos_bias",), ("rel_pos_bias.relative_position_bias_table",), _same))
  for i in range(config.depth):
    ours, theirs = ("blocks", i), f"blocks.{i}"
    rules += [(ours + ("attn", "qkv", "kernel"), (f"{theirs}.attn.qkv.weight",), _linear_t),
              (ours + ("attn", "q_bias"), (f"{theirs}.attn.q_bias",), _same),
              (ours + ("attn", "v_bias"), (f"{theirs}.attn.v_bias",), _same)]
    if config.block_rel_pos_bias:
      rules.append((ours + ("attn", "rel_pos_bias"), (f"{theirs}.attn.relative_position_bias_table",), _same))
    if config.layer_scale_init:
      rules += [(ours + ("attn_layer_scale",), (f"{theirs}.gamma_1",), _same),
                (ours + ("mlp_layer_scale",), (f"{theirs}.gamma_2",), _same)]
    rules += _linear_rules(ours + ("attn", "proj"), f"{theirs}.attn.proj")
    rules += _norm_rules(ours + ("norm1",), f"{theirs}.norm1") + _norm_rules(ours + ("norm2",), f"{theirs}.norm2")
    rules += _linear_rules(ours + ("mlp", "fc1"), f"{theirs}.mlp.fc1")
    rules += _linear_rules(ours + ("mlp", "fc2"), f"{theirs}.mlp.fc2")
  if kind == "vit":
    rules += [(("mask_token",), ("mask_token",), _token)]
    rules += _norm_rules(("norm",), "norm") + _linear_rules(("lm_head",), "lm_head")
  else:
    final_norm = "fc_norm" if pooling == "mean" else "norm"
    rules += _norm_rules((final_norm,), final_norm) + _linear_rules(("head",), "head")
  return rules


# Our layout → PyTorch's: the inverse of each transform above (dtm_jax/export.py runs the rules backwards).
_INVERSES = {_linear_t: _linear_t, _conv_t: lambda w: w.transpose(3, 2, 0, 1), _same: _same, _token: _same,
             _positions: _same}


def beit_export_rules(config, kind, pooling):
  """[(our parameter path, unilm/timm name, our layout → theirs)]: `_beit_rules` backwards, for the export."""
  return [(ours, keys[0], _INVERSES[fn]) for ours, keys, fn in _beit_rules(config, kind, pooling)]


def _listing(names):
  names = sorted(names)
  more = f" … and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
  return ", ".join(names[:_MAX_LISTED]) + more


def _apply_rules(weights, rules, ignored, source):
  """Runs the rules over every checkpoint key; missing and unknown keys are reported together, by name."""
  needed = {key for _, keys, _ in rules for key in keys}
  missing = [key for key in needed if key not in weights]
  unknown = [key for key in weights if key not in needed and not ignored(key)]
  problems = []
  if missing:
    problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
  if unknown:
    problems.append(f"unknown keys ({len(unknown)}): {_listing(unknown)}")
  if problems:
    raise ConversionError(f"{source} does not match the expected layout: " + "; ".join(problems) +
                          ". Check --format; drop extra entries on purpose with --ignore_keys=REGEX.")
  return {path: np.asarray(fn(*(weights[k] for k in keys)), np.float32) for path, keys, fn in rules}


def _check_shapes(converted_flat, rules, kind, config, module_kwargs):
  """Compares every converted array with the shape our module expects for that config."""
  sources = {path: keys for path, keys, _ in rules}
  abstract = nnx.eval_shape(lambda: _new_module(kind, config, module_kwargs, nnx.Rngs(0)))
  expected = {path: tuple(v.shape) for path, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
  not_filled = sorted("/".join(map(str, p)) for p in set(expected) - set(converted_flat))
  if not_filled:
    raise ConversionError(f"The checkpoint leaves these {kind} parameters unset: {_listing(not_filled)}.")
  mismatches = [f"{'/'.join(map(str, path))} (from {', '.join(sources[path])}): checkpoint "
                f"{tuple(array.shape)} vs model {expected[path]}"
                for path, array in converted_flat.items() if tuple(array.shape) != expected[path]]
  if mismatches:
    raise ConversionError("Shape mismatches (is --num_heads/--image_size right?):\n  " + "\n  ".join(mismatches))


# ----------------------------------------------------------------------------------------------------------------
# Config inference and the per-format converters.
# ----------------------------------------------------------------------------------------------------------------
def _require(weights, key, source, fmt):
  if key not in weights:
    raise ConversionError(f"{source} has no {key!r}, so it is not a {fmt} checkpoint (first keys: "
                          f"{_listing(list(weights)[:10])}). Check --format.")
  return weights[key]


def _count_blocks(weights, pattern):
  indices = {int(m.group(1)) for m in (re.match(pattern, k) for k in weights) if m}
  if not indices or indices != set(range(max(indices) + 1)):
    raise ConversionError(f"Blocks matching {pattern!r} are missing or not numbered 0..depth-1: {sorted(indices)}.")
  return len(indices)


def _clip_vision_keys(weights, prefixes):
  """The vision tower's keys: a full CLIP checkpoint also holds the text tower, which is dropped on purpose."""
  if any(k.startswith(prefixes) for k in weights):
    return {k: v for k, v in weights.items() if k.startswith(prefixes)}
  return weights


def _pick(name, flag, found, default, where):
  """A config value recorded with the checkpoint, else the flag, else the default; a contradicting flag is an error."""
  if found is not None and flag is not None and flag != found:
    raise ConversionError(f"--{name}={flag} contradicts {found!r} recorded in {where}; drop the flag.")
  return next(value for value in (found, flag, default) if value is not None)


def _clip_config(patch_weight, pos_embed, **fields):
  """Patch size, width, channels and image size from the patch kernel [width, C, p, p] and the positions."""
  width, in_channels, patch_size = patch_weight.shape[0], patch_weight.shape[1], patch_weight.shape[-1]
  grid = int(round((pos_embed.reshape(-1, width).shape[0] - 1) ** 0.5))
  return clip.CLIPVisionConfig(image_size=grid * patch_size, patch_size=patch_size, in_channels=in_channels,
                               width=width, **fields)


def _convert_openai_layout(weights, source, fmt, num_heads, activation, image_size, ignored):
  weights = _clip_vision_keys(weights, ("visual.",))
  weights = {k.removeprefix("visual."): v for k, v in weights.items()}
  if fmt == "open_clip" and activation is None:
    raise ConversionError("open_clip checkpoints do not record their activation: pass --activation=gelu (most "
                          "open_clip models) or --activation=quick_gelu (OpenAI-trained and *-quickgelu models).")
  patch = _require(weights, "conv1.weight", source, fmt)
  depth = _count_blocks(weights, r"transformer\.resblocks\.(\d+)\.")
  config = _clip_config(
      patch, _require(weights, "positional_embedding", source, fmt), depth=depth,
      num_heads=num_heads or patch.shape[0] // 64,
      mlp_dim=_require(weights, "transformer.resblocks.0.mlp.c_fc.weight", source, fmt).shape[0],
      proj_dim=_require(weights, "proj", source, fmt).shape[1], activation=activation or "quick_gelu")
  return _finish_clip(weights, _openai_clip_rules(depth), config, image_size, ignored, source)


def _hf_config_json(path):
  """The vision part of a Hugging Face `config.json` beside the weights (CLIPModel or vision-only), if any."""
  path = _path(path)
  config_path = (path if path.is_dir() else path.parent) / "config.json"
  if not config_path.exists():
    return None
  config = json.loads(config_path.read_text())
  return config.get("vision_config", config)


def _convert_hf_layout(weights, source, path, num_heads, activation, image_size, ignored):
  weights = _clip_vision_keys(weights, ("vision_model.", "visual_projection."))
  fmt = "hf_clip (CLIPModel or CLIPVisionModelWithProjection)"
  patch = _require(weights, "vision_model.embeddings.patch_embedding.weight", source, fmt)
  depth = _count_blocks(weights, r"vision_model\.encoder\.layers\.(\d+)\.")
  hf = _hf_config_json(path)
  found = {} if hf is None else {k: hf.get(k, default) for k, default in _HF_DEFAULTS.items()}
  where = f"the config.json beside {source}"
  hidden_act = found.get("hidden_act")
  if hidden_act is not None and hidden_act not in _HF_ACTIVATIONS:
    raise ConversionError(f"{where} sets hidden_act={hidden_act!r}; supported: {sorted(_HF_ACTIVATIONS)}.")
  config = _clip_config(
      patch, _require(weights, "vision_model.embeddings.position_embedding.weight", source, fmt), depth=depth,
      num_heads=_pick("num_heads", num_heads, found.get("num_attention_heads"), patch.shape[0] // 64, where),
      mlp_dim=_require(weights, "vision_model.encoder.layers.0.mlp.fc1.weight", source, fmt).shape[0],
      proj_dim=_require(weights, "visual_projection.weight", source, fmt).shape[0],
      activation=_pick("activation", activation, _HF_ACTIVATIONS.get(hidden_act), "quick_gelu", where),
      layer_norm_eps=found.get("layer_norm_eps", _HF_DEFAULTS["layer_norm_eps"]))
  ignored_hf = lambda k: k == "vision_model.embeddings.position_ids" or ignored(k)
  return _finish_clip(weights, _hf_clip_rules(depth), config, image_size, ignored_hf, source)


def _finish_clip(weights, rules, config, image_size, ignored, source):
  flat = _apply_rules(weights, rules, ignored, source)
  _check_shapes(flat, rules, "clip", config, {})
  return _with_image_size(Converted("clip", config, traversals.unflatten_mapping(flat)), image_size)


def _with_image_size(converted, image_size):
  """A conversion for another image size: CLIP's position embedding is resized bicubically (CLS kept); a BEiT
  model's relative-position tables and absolute position embedding go to the new patch grid as in
  `position_resize.resize_position_params`."""
  config = converted.config
  if not image_size or image_size == config.image_size:
    return converted
  if image_size % config.patch_size:
    raise ConversionError(f"Image size {image_size} is not a multiple of the patch size {config.patch_size}.")
  params = jax.tree.map(np.asarray, position_resize.resize_position_params(  # other leaves pass through as they are
      converted.params, config.grid_size, image_size // config.patch_size))
  return dataclasses.replace(converted, config=dataclasses.replace(config, image_size=image_size), params=params)


def _beit_grid(weights, image_size, patch_size):
  """Patch-grid side from the relative-position tables or the absolute position embedding."""
  grids = {}
  for key, value in weights.items():
    if key.endswith("relative_position_bias_table"):
      grids[key] = int(round((np.sqrt(value.shape[0] - 3) + 1) / 2))
    elif key == "pos_embed":
      grids[key] = int(round((value.reshape(-1, value.shape[-1]).shape[0] - 1) ** 0.5))
  sides = set(grids.values())
  if len(sides) > 1:
    raise ConversionError(f"Position tables disagree on the patch grid: {grids}.")
  if not sides:
    if not image_size:
      raise ConversionError("This BEiT checkpoint has no position tables to infer the image size from; pass "
                            "--image_size.")
    return image_size // patch_size
  return sides.pop()  # the trained grid; a different --image_size resizes the tables afterwards (_with_image_size)


def _convert_beit(weights, source, num_heads, image_size, ignored):
  patch = _require(weights, "patch_embed.proj.weight", source, "beit")
  width, in_channels, patch_size = patch.shape[0], patch.shape[1], patch.shape[-1]
  depth = _count_blocks(weights, r"blocks\.(\d+)\.")
  tables = [v for k, v in weights.items() if k.endswith("relative_position_bias_table")]
  heads_found = tables[0].shape[1] if tables else None
  if "lm_head.weight" in weights and "head.weight" in weights:
    raise ConversionError(f"{source} has both lm_head and head; drop one with --ignore_keys.")
  if "lm_head.weight" in weights:
    kind, module_kwargs, out_dim = "vit", {}, weights["lm_head.weight"].shape[0]
  elif "head.weight" in weights:
    pooling = "mean" if "fc_norm.weight" in weights else "cls"
    kind, module_kwargs, out_dim = "vit_classifier", dict(num_classes=weights["head.weight"].shape[0],
                                                          pooling=pooling), vit.ViTConfig.out_dim
  else:
    raise ConversionError(f"{source} has neither lm_head (pretraining) nor head (classifier) weights.")
  config = vit.ViTConfig(
      image_size=_beit_grid(weights, image_size, patch_size) * patch_size, patch_size=patch_size,
      in_channels=in_channels, width=width, depth=depth,
      num_heads=_pick("num_heads", num_heads, heads_found, width // 64, f"{source}'s relative-position tables"),
      mlp_ratio=_require(weights, "blocks.0.mlp.fc1.weight", source, "beit").shape[0] / width,
      abs_pos_emb="pos_embed" in weights,
      block_rel_pos_bias="blocks.0.attn.relative_position_bias_table" in weights,
      shared_rel_pos_bias="rel_pos_bias.relative_position_bias_table" in weights,
      # Only presence matters once weights are loaded; 0.1 marks "layer scale on".
      layer_scale_init=0.1 if "blocks.0.gamma_1" in weights else None,
      out_dim=out_dim)
  ignored_beit = lambda k: k.endswith(("relative_position_index", "attn.k_bias")) or ignored(k)
  rules = _beit_rules(config, kind, module_kwargs.get("pooling"))
  flat = _apply_rules(weights, rules, ignored_beit, source)
  _check_shapes(flat, rules, kind, config, module_kwargs)
  return _with_image_size(Converted(kind, config, traversals.unflatten_mapping(flat), module_kwargs), image_size)


def convert_weights(weights, fmt, *, source="checkpoint", path=None, image_size=None, num_heads=None,
                    activation=None, ignore_keys=None):
  """Maps flat PyTorch-named weights (numpy) onto our module's parameters; see the module docstring for formats.

  image_size: resize the position tables to it (CLIP's position embedding; BEiT's relative-position tables and
  any absolute embedding: dtm_jax/models/position_resize.py); for a BEiT checkpoint without position tables, the
  size it was trained at. num_heads: when the checkpoint does not record it (CLIP default width // 64, OpenAI's rule).
  activation: "gelu" or "quick_gelu" for CLIP. ignore_keys: regex of checkpoint keys to drop on purpose.
  """
  if fmt not in FORMATS:
    raise ConversionError(f"Unknown format {fmt!r}; choose one of {FORMATS}.")
  if activation is not None and activation not in layers.ACTIVATIONS:
    raise ConversionError(f"--activation={activation!r} is not one of {layers.ACTIVATIONS}.")
  pattern = re.compile(ignore_keys) if ignore_keys else None
  ignored = lambda key: bool(pattern and pattern.search(key))
  if fmt in ("openai_clip", "open_clip"):
    return _convert_openai_layout(weights, source, fmt, num_heads, activation, image_size, ignored)
  if fmt == "hf_clip":
    return _convert_hf_layout(weights, source, path or "", num_heads, activation, image_size, ignored)
  if activation is not None:
    raise ConversionError("--activation applies to CLIP formats only; the BEiT student always uses exact GELU.")
  return _convert_beit(weights, source, num_heads, image_size, ignored)


def convert_file(path, fmt, **kwargs):
  """Reads a checkpoint file (or HF directory) and converts it; keyword arguments as in `convert_weights`."""
  return convert_weights(read_checkpoint(path), fmt, source=os.fspath(path), path=os.fspath(path), **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Building modules, saving and loading.
# ----------------------------------------------------------------------------------------------------------------
def _new_module(kind, config, module_kwargs, rngs):
  if kind == "clip":
    return clip.CLIPVision(config, rngs=rngs)
  if kind == "vit":
    return vit.PretrainViT(config, rngs=rngs)
  if kind == "vit_classifier":
    return vit.ViTClassifier(config, **module_kwargs, rngs=rngs)
  raise ConversionError(f"Unknown module kind {kind!r}.")


def _abstract_module(kind, config, module_kwargs):
  return nnx.split(nnx.eval_shape(lambda: _new_module(kind, config, module_kwargs, nnx.Rngs(0))))


def build_module(converted):
  """The module of a conversion, holding its weights (no random initialisation is run)."""
  graphdef, state = _abstract_module(converted.kind, converted.config, converted.module_kwargs)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, converted.params))
  return nnx.merge(graphdef, state)


_CONFIG_CLASSES = {"clip": clip.CLIPVisionConfig, "vit": vit.ViTConfig, "vit_classifier": vit.ViTConfig}


def _config_to_json(config):
  fields = dataclasses.asdict(config)
  fields["dtype"] = jnp.dtype(fields["dtype"]).name
  if fields.get("head_dtype") is not None:
    fields["head_dtype"] = jnp.dtype(fields["head_dtype"]).name
  return fields


def save_converted(converted, directory, source=None):
  """Writes `params/` (Orbax) and `model_config.json` into a new or empty directory."""
  directory = _path(directory)  # local or gs://…
  if (directory / PARAMS_DIR).exists():
    raise ConversionError(f"{directory} already holds a converted checkpoint; choose another --output or delete it.")
  directory.mkdir(parents=True, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory / PARAMS_DIR, converted.params)
  checkpointer.wait_until_finished()
  metadata = dict(kind=converted.kind, config=_config_to_json(converted.config),
                  module_kwargs=converted.module_kwargs, source=source or {})
  (directory / CONFIG_FILE).write_text(json.dumps(metadata, indent=2))


def load_converted(directory, *, dtype=None, head_dtype=None, attention_impl=None, image_size=None):
  """Rebuilds the converted module (CLIPVision, PretrainViT or ViTClassifier) with its weights.

  dtype / attention_impl override the saved compute settings (e.g. bfloat16 and "cudnn" for a frozen teacher);
  head_dtype, a CLIP tower's ln_post and proj dtype; parameters stay float32. image_size resizes the position tables
  for another input size (`_with_image_size`).
  """
  directory = _path(directory)  # local or gs://…
  config_path = directory / CONFIG_FILE
  if not config_path.exists():
    raise ConversionError(f"{config_path} not found; create it with python -m dtm_jax.models.convert.")
  metadata = json.loads(config_path.read_text())
  kind = metadata["kind"]
  if kind not in _CONFIG_CLASSES:
    raise ConversionError(f"{config_path} names an unknown module kind {kind!r}.")
  fields = dict(metadata["config"], dtype=jnp.dtype(dtype or metadata["config"]["dtype"]))
  if attention_impl is not None:
    fields["attention_impl"] = attention_impl
  if head_dtype is not None:
    if kind != "clip":
      raise ConversionError(f"head_dtype applies to CLIP towers; {config_path} holds a {kind!r}.")
    fields["head_dtype"] = jnp.dtype(head_dtype)
  config = _CONFIG_CLASSES[kind](**fields)
  _, state = _abstract_module(kind, config, metadata["module_kwargs"])
  params = ocp.StandardCheckpointer().restore(directory / PARAMS_DIR, state.to_pure_dict())
  return build_module(_with_image_size(Converted(kind, config, params, metadata["module_kwargs"]), image_size))


# ----------------------------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------------------------
def _parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m dtm_jax.models.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--format", required=True, choices=FORMATS)
  parser.add_argument("--input", required=True, help="checkpoint file (or Hugging Face model directory)")
  parser.add_argument("--output", required=True, help="new directory for params/ and model_config.json")
  parser.add_argument("--image_size", type=int, help="resize the position tables to this image size (BEiT: also "
                      "the trained size of a checkpoint without position tables)")
  parser.add_argument("--num_heads", type=int, help="attention heads when the checkpoint does not record them")
  parser.add_argument("--activation", choices=layers.ACTIVATIONS, help="CLIP MLP activation")
  parser.add_argument("--ignore_keys", help="regex of checkpoint keys to drop on purpose")
  return parser.parse_args(argv)


def main(argv=None):
  args = _parse_args(argv)
  try:
    converted = convert_file(args.input, args.format, image_size=args.image_size, num_heads=args.num_heads,
                             activation=args.activation, ignore_keys=args.ignore_keys)
    save_converted(converted, args.output, source=dict(format=args.format, input=str(_path(args.input))))
  except ConversionError as e:
    sys.exit(f"error: {e}")
  count = sum(np.size(x) for x in traversals.flatten_mapping(converted.params).values())
  print(f"Wrote {converted.kind} ({count:,} parameters) to {_path(args.output)}:\n"
        f"  {converted.config}")


if __name__ == "__main__":
  main()
