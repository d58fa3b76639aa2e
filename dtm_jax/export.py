"""Exports a trained student to PyTorch: a Hugging Face `transformers` BEiT folder or a timm `beit` checkpoint.

  python -m dtm_jax.export --workdir=<run> --format=hf|timm --output=<dir> [--step=N] [--overwrite]

The workdir (local or gs://) is a pretraining run (the student trunk; `lm_head` goes to `lm_head.safetensors` unless
--no_lm_head; of an MAE-style student, the encoder alone), a fine-tuning run (the classifier with its pooling and
head) or a segmentation run (its backbone, without the UperNet heads). Names come from `convert.beit_export_rules`:
the converter's own mapping, run backwards, so an export converts back (`python -m dtm_jax.models.convert
--format=beit`) to the same parameters.

Relative positions: `hf` keeps the tables as trained (BeitConfig has both a shared and per-block tables); `timm`
folds the shared table into every block's table (exact: both are added to the same logits), the layout of timm's
`beitv2_*` models and of BEiT's fine-tuning code. `--rel_pos=as_trained|per_block` chooses another.
Only numpy and safetensors are needed (no torch); files are written to a temporary name and moved into place.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import uuid

import jax
import numpy as np
from etils import epath
from flax import nnx
from flax.nnx import traversals
from safetensors.numpy import save as safetensors_bytes

from dtm_jax import students
from dtm_jax.models import convert, mae, segmentation, vit
from dtm_jax.runtime import checkpoint, errors

FORMATS = ("hf", "timm")
REL_POS_LAYOUTS = ("as_trained", "per_block")
_DEFAULT_REL_POS = {"hf": "as_trained", "timm": "per_block"}
_LABELS = {"fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                             "Bag", "Ankle boot")}
_HEADS_FILE = "lm_head.safetensors"


class ExportError(errors.RunError, ValueError):
  """A workdir, step, format or output that cannot be exported; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Trained:
  """What a run's checkpoint holds: its kind, the trunk's config, float32 numpy params and the run's settings."""
  kind: str  # "pretraining", "fine-tuning" or "segmentation"
  config: vit.ViTConfig
  params: dict
  step_dir: str
  run_config: dict
  num_classes: int | None = None
  pooling: str | None = None
  out_indices: tuple[int, ...] = ()


def _path(path) -> epath.Path:
  return checkpoint.absolute_path(path)


def load_run(workdir, step=None) -> Trained:
  """The finished checkpoint of `step` (None: the latest) of a pretraining, fine-tuning or segmentation workdir."""
  try:
    directory, step = checkpoint.find_step_directory(workdir, step)
  except (FileNotFoundError, ValueError) as e:
    raise ExportError(f"{e} Export reads a finished checkpoint: pass a run's workdir and a --step it saved.") from None
  step_dir = directory / str(step)
  meta_path = step_dir / "metadata" / "metadata"
  if not meta_path.exists():
    raise ExportError(f"{step_dir} has no metadata item, so the model's architecture is unknown; export a "
                      "checkpoint written by main.py.")
  metadata = json.loads(meta_path.read_text())
  kind, run_config = students.run_kind(metadata), metadata.get("config", {})
  if kind == "linear-probe":
    raise ExportError(f"{workdir} is a linear-probe run, whose checkpoint holds only the probe; export the "
                      "pretraining run it probed (or a fine-tuning run).")
  if "model_config" not in metadata:
    raise ExportError(f"The metadata of {step_dir} records no model_config, so the architecture is unknown; export "
                      "a checkpoint written by main.py.")
  config = students.architecture_of(metadata, dtype="float32", attention_impl=None, remat="none", drop_path_rate=0.0)
  is_mae = isinstance(config, mae.MAEConfig)
  fields = {"config": mae.trunk_config(config)}
  if kind == "pretraining":
    constructor = lambda: mae.student_model(config, rngs=nnx.Rngs(0))
  elif kind == "fine-tuning":
    fields.update(num_classes=int(run_config["num_classes"]), pooling=run_config.get("pooling", "mean"))
    constructor = lambda: vit.ViTClassifier(config, fields["num_classes"], pooling=fields["pooling"],
                                            rngs=nnx.Rngs(0))
  else:
    seg = segmentation.SegmenterConfig(**{k: tuple(v) if isinstance(v, list) else v
                                          for k, v in run_config["segmenter"].items()})
    fields.update(out_indices=seg.out_indices)
    constructor = lambda: segmentation.UperNetSegmenter(config, seg, rngs=nnx.Rngs(0))
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(constructor), nnx.Param))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
  params, _, _ = checkpoint.restore_params(step_dir, step, target)
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), jax.device_get(params))
  if is_mae:  # the encoder is the student's trunk; the decoder and its head stay behind (docs/METHOD.md §9)
    params = {name: value for name, value in params.items() if name in mae.ENCODER_PARAMS}
  return Trained(kind=kind, params=params, step_dir=str(step_dir), run_config=run_config, **fields)


def fold_shared_table(trained: Trained) -> Trained:
  """Every block's relative-position table + the shared one (exact); the student then has per-block tables only."""
  config = trained.config
  if not config.shared_rel_pos_bias:
    return trained
  params = dict(trained.params)
  shared = params.pop("shared_rel_pos_bias")
  blocks = {}
  for i, block in params["blocks"].items():
    attn = dict(block["attn"])
    attn["rel_pos_bias"] = attn.get("rel_pos_bias", 0.0) + shared
    blocks[i] = {**block, "attn": attn}
  params["blocks"] = blocks
  folded = dataclasses.replace(config, block_rel_pos_bias=True, shared_rel_pos_bias=False)
  return dataclasses.replace(trained, config=folded, params=params)


def timm_weights(trained: Trained) -> tuple[dict, dict]:
  """(trunk and head, `lm_head.*` of a pretraining student) as flat {unilm/timm name: float32 array}."""
  kind = "vit" if trained.kind == "pretraining" else "vit_classifier"
  flat = {tuple(int(p) if isinstance(p, str) and p.isdigit() else p for p in path): v
          for path, v in traversals.flatten_mapping(trained.params).items()}
  rules = convert.beit_export_rules(trained.config, kind, trained.pooling)
  if kind == "vit":  # an MAE-style encoder has neither mask token nor (BEiT-style) lm_head
    rules = [rule for rule in rules if rule[0][0] not in ("mask_token", "lm_head") or rule[0] in flat]
  if trained.kind == "segmentation":  # the backbone alone: no final norm, no head; the UperNet heads stay behind
    rules = [rule for rule in rules if rule[0][0] not in ("norm", "fc_norm", "head")]
  out = {name: np.ascontiguousarray(to_theirs(flat[ours]), np.float32) for ours, name, to_theirs in rules}
  covered = {ours for ours, _, _ in rules}
  left = [path for path in flat if path not in covered and path[0] not in ("fpn1", "fpn2", "decode_head",
                                                                            "auxiliary_head")]
  if left:
    raise ExportError(f"Parameters with no BEiT name: {sorted('/'.join(map(str, p)) for p in left)}.")
  heads = {k: out.pop(k) for k in list(out) if k.startswith("lm_head.")}
  return out, heads


def _hf_name(name: str) -> str | None:
  """Hugging Face BEiT's name (transformers' classic layout, which 4.x and 5.x both load) of a unilm/timm name."""
  simple = {"cls_token": "embeddings.cls_token", "mask_token": "embeddings.mask_token",
            "pos_embed": "embeddings.position_embeddings",
            "rel_pos_bias.relative_position_bias_table": "encoder.relative_position_bias.relative_position_bias_table"}
  if name in simple:
    return simple[name]
  head, _, leaf = name.rpartition(".")
  tops = {"patch_embed.proj": "embeddings.patch_embeddings.projection", "norm": "layernorm",
          "fc_norm": "pooler.layernorm"}
  if head in tops:
    return f"{tops[head]}.{leaf}"
  _, i, rest = name.split(".", 2)
  block = {"norm1": "layernorm_before", "norm2": "layernorm_after", "gamma_1": "lambda_1", "gamma_2": "lambda_2",
           "attn.relative_position_bias_table":
               "attention.attention.relative_position_bias.relative_position_bias_table",
           "attn.proj": "attention.output.dense", "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense",
           "attn.q_bias": "attention.attention.query.bias", "attn.v_bias": "attention.attention.value.bias"}
  for theirs, ours in block.items():
    if rest == theirs or rest.startswith(theirs + "."):
      return f"encoder.layer.{i}.{ours}{rest[len(theirs):]}"
  return None


def hf_weights(timm: dict, trained: Trained) -> dict:
  """Hugging Face names: q/k/v split from the fused kernel (k has no bias), `beit.` before the trunk of a
  classifier or backbone (as `save_pretrained` writes them), `classifier` for the head."""
  prefix = "" if trained.kind == "pretraining" else "beit."
  out = {}
  for name, value in timm.items():
    if name.startswith("head."):
      out["classifier." + name.split(".", 1)[1]] = value
    elif name.endswith("attn.qkv.weight"):
      i = name.split(".")[1]
      for part, rows in zip(("query", "key", "value"), np.split(value, 3)):
        out[f"{prefix}encoder.layer.{i}.attention.attention.{part}.weight"] = np.ascontiguousarray(rows)
    else:
      hf = _hf_name(name)
      if hf is None:
        raise ExportError(f"{name} has no Hugging Face BEiT name.")
      out[prefix + hf] = value
  return out


def _image_settings(trained: Trained):
  """(mean, std, resize side, crop side) of the run's evaluation view: shorter side to size / crop_pct, centre
  crop (input_pipeline.transforms.center_crop); a segmentation run resizes to its crop size."""
  from input_pipeline import config as input_config  # pylint: disable=g-import-not-at-top  # no TensorFlow
  inputs = {**input_config.default_config().to_dict(), **trained.run_config.get("input", {})}
  mean, std = tuple(inputs["mean"]), tuple(inputs["std"])
  size = trained.config.image_size
  resize = size if trained.kind == "segmentation" else math.floor(size / inputs["crop_pct"])
  return mean, std, resize, size


def _labels(trained: Trained) -> dict:
  names = _LABELS.get(trained.run_config.get("input", {}).get("source"), ())
  if len(names) != trained.num_classes:
    names = [f"LABEL_{i}" for i in range(trained.num_classes)]
  return {str(i): name for i, name in enumerate(names)}


def hf_files(trained: Trained, heads: dict, timm: dict) -> dict:
  """{file name: bytes} of a `from_pretrained` folder: config.json, model.safetensors, preprocessor_config.json."""
  cfg = trained.config
  if cfg.mlp_dim != cfg.width * cfg.mlp_ratio:
    raise ExportError(f"mlp_ratio={cfg.mlp_ratio} gives a fractional MLP width; BeitConfig.intermediate_size must "
                      "be a whole number.")
  architecture = {"pretraining": "BeitModel", "fine-tuning": "BeitForImageClassification",
                  "segmentation": "BeitBackbone"}[trained.kind]
  config = dict(
      architectures=[architecture], model_type="beit", image_size=cfg.image_size, patch_size=cfg.patch_size,
      num_channels=cfg.in_channels, hidden_size=cfg.width, num_hidden_layers=cfg.depth,
      num_attention_heads=cfg.num_heads, intermediate_size=cfg.mlp_dim, hidden_act="gelu",
      layer_norm_eps=vit.LAYER_NORM_EPS, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
      drop_path_rate=0.0, initializer_range=0.02, layer_scale_init_value=float(cfg.layer_scale_init or 0.0),
      use_absolute_position_embeddings=cfg.abs_pos_emb, use_relative_position_bias=cfg.block_rel_pos_bias,
      use_shared_relative_position_bias=cfg.shared_rel_pos_bias, use_mask_token="mask_token" in trained.params,
      use_mean_pooling=trained.pooling == "mean" or trained.kind == "segmentation", torch_dtype="float32")
  if heads:
    config["vocab_size"] = cfg.out_dim  # the lm_head's width (lm_head.safetensors), for BeitForMaskedImageModeling
  if trained.kind == "fine-tuning":
    config["id2label"] = _labels(trained)
    config["label2id"] = {name: int(i) for i, name in config["id2label"].items()}
  if trained.kind == "segmentation":  # BeitBackbone's stages: 0 is the embedding, i + 1 the output of block i
    config.update(out_indices=[i + 1 for i in trained.out_indices], add_fpn=False, reshape_hidden_states=True)
  mean, std, resize, crop = _image_settings(trained)
  # Pipeline's evaluation view: the shorter side to `resize`, keeping the aspect ratio (torchvision's Resize(int));
  # a segmentation run's images go to the crop size whole.
  size = {"height": resize, "width": resize} if trained.kind == "segmentation" else {"shortest_edge": resize}
  processor = dict(image_processor_type="BeitImageProcessor", do_resize=True,
                   size=size, resample=3, do_center_crop=resize != crop,
                   crop_size={"height": crop, "width": crop}, do_rescale=True, rescale_factor=1 / 255,
                   do_normalize=True, image_mean=list(mean), image_std=list(std), do_reduce_labels=False)
  files = {"config.json": _json(config), "preprocessor_config.json": _json(processor),
           "model.safetensors": safetensors_bytes(hf_weights(timm, trained), metadata={"format": "pt"})}
  if heads:
    files[_HEADS_FILE] = safetensors_bytes(heads, metadata={"format": "pt"})
  return files


def timm_files(trained: Trained, heads: dict, timm: dict) -> dict:
  """{file name: bytes} of a timm `local-dir:` folder: model.safetensors (timm names) and config.json."""
  cfg = trained.config
  if trained.kind == "segmentation":
    raise ExportError("timm's Beit always ends in a LayerNorm (`norm` or `fc_norm`), which a segmentation "
                      "backbone does not have; export it with --format=hf (BeitBackbone).")
  global_pool = {"mean": "avg", "cls": "token"}.get(trained.pooling, "")
  model_args = dict(img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.in_channels,
                    embed_dim=cfg.width, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                    use_abs_pos_emb=cfg.abs_pos_emb, use_rel_pos_bias=cfg.block_rel_pos_bias,
                    use_shared_rel_pos_bias=cfg.shared_rel_pos_bias, init_values=cfg.layer_scale_init or None,
                    num_classes=trained.num_classes or 0, global_pool=global_pool)
  mean, std, resize, crop = _image_settings(trained)
  pretrained_cfg = dict(input_size=[cfg.in_channels, crop, crop], interpolation="bicubic",
                        crop_pct=crop / resize, crop_mode="center", mean=list(mean),
                        std=list(std), num_classes=trained.num_classes or 0, first_conv="patch_embed.proj",
                        classifier="head", fixed_input_size=True)
  config = dict(architecture="beit_base_patch16_224", num_classes=trained.num_classes or 0, num_features=cfg.width,
                global_pool=global_pool, model_args=model_args, pretrained_cfg=pretrained_cfg)
  if trained.kind == "fine-tuning":
    config["label_names"] = list(_labels(trained).values())
  timm = dict(timm)
  if "mask_token" in timm:  # timm's Beit has no mask token: it goes with the lm_head (pretraining weights)
    heads = {**heads, "mask_token": timm.pop("mask_token")} if heads else {}
  files = {"config.json": _json(config), "model.safetensors": safetensors_bytes(timm, metadata={"format": "pt"})}
  if heads:
    files[_HEADS_FILE] = safetensors_bytes(heads, metadata={"format": "pt"})
  return files


def _json(value) -> bytes:
  return (json.dumps(value, indent=2) + "\n").encode()


def export(workdir, fmt, output, *, step=None, overwrite=False, lm_head=True, rel_pos=None) -> epath.Path:
  """Writes the export of `workdir`'s checkpoint into `output` (a new directory; `overwrite` replaces one)."""
  if fmt not in FORMATS:
    raise ExportError(f"Unknown format {fmt!r}; choose --format=hf (transformers) or --format=timm.")
  rel_pos = rel_pos or _DEFAULT_REL_POS[fmt]
  if rel_pos not in REL_POS_LAYOUTS:
    raise ExportError(f"Unknown --rel_pos={rel_pos!r}; choose one of {REL_POS_LAYOUTS}.")
  output = _path(output)
  if output.exists() and not overwrite:
    raise ExportError(f"{output} already exists; choose another --output or pass --overwrite to replace it.")
  trained = load_run(workdir, step)
  if rel_pos == "per_block":
    trained = fold_shared_table(trained)
  timm, heads = timm_weights(trained)
  if not lm_head:
    heads = {}
  files = (hf_files if fmt == "hf" else timm_files)(trained, heads, timm)
  files["export.json"] = _json(dict(workdir=str(_path(workdir)), checkpoint=trained.step_dir, kind=trained.kind,
                                    format=fmt, rel_pos=rel_pos, model_config=checkpoint.model_config_to_json(
                                        trained.config)))
  _write_all(files, output, overwrite)
  return output


def _write_all(files: dict, output: epath.Path, overwrite: bool) -> None:
  """All files under a temporary sibling name, then moved into place: a failure leaves no partial export."""
  tmp = output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    tmp.mkdir(parents=True)
    for name, data in files.items():
      (tmp / name).write_bytes(data)
    if output.exists() and overwrite:
      output.rmtree()
    tmp.rename(output)
  finally:
    if tmp.exists():
      tmp.rmtree()


def _parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m dtm_jax.export", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="pretraining, fine-tuning or segmentation run (local or gs://)")
  parser.add_argument("--format", required=True, help=f"one of {FORMATS}")
  parser.add_argument("--output", required=True, help="new directory for the export (local or gs://)")
  parser.add_argument("--step", type=int, help="checkpoint step (default: the latest finished one)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
  parser.add_argument("--no_lm_head", action="store_true", help="leave a pretraining student's lm_head out")
  parser.add_argument("--rel_pos", help="as_trained (hf's default) or per_block (timm's: shared table folded in)")
  return parser.parse_args(argv)


def main(argv=None):
  args = _parse_args(argv)
  try:
    out = export(args.workdir, args.format, args.output, step=args.step, overwrite=args.overwrite,
                 lm_head=not args.no_lm_head, rel_pos=args.rel_pos)
  except errors.RunError as e:
    print(f"Error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  print(f"Wrote the {args.format} export of {args.workdir} to {out}.")


if __name__ == "__main__":
  main()
