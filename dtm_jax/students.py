"""The pretrained student an evaluation starts from: restored from a pretraining run's checkpoint (or a converted
BEiT/DTM checkpoint) straight into its shardings, the same student at initialisation (the untrained baseline), or
its shapes only (`--mode=compile`).

An MAE-style run's checkpoint (dtm_jax.models.mae) is restored whole; its encoder is the trunk: `Student.config` is
the encoder's `ViTConfig` and `encode` runs the encoder on every patch. The decoder is never run and fine-tuning and
segmentation copy only the trunk (`vit.init_trunk_from_pretrained`).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import ml_collections
from absl import logging
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from dtm_jax import sharding
from dtm_jax.models import convert, functional, mae, vit
from dtm_jax.runtime import checkpoint, errors

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Student:
  """A pretrained student: its trunk's config, functional student (`PretrainViT` or `mae.MAEStudent`), sharded
  parameters and where they came from. `architecture`: what pretraining built (an `mae.MAEConfig` for an MAE-style
  student; None: `config`)."""
  config: vit.ViTConfig
  model: functional.FunctionalModule
  params: PyTree
  checkpoint: str
  step: int | None
  architecture: vit.ViTConfig | None = None

  @property
  def pretraining_architecture(self) -> vit.ViTConfig:
    return self.architecture or self.config

  def source(self) -> dict:
    return {"checkpoint": self.checkpoint, "step": self.step}


def _read_metadata(step_dir: epath.Path) -> dict:
  path = step_dir / "metadata" / "metadata"
  if not path.exists():
    raise FileNotFoundError(f"{step_dir} has no metadata item; it was not written by a pretraining run, so the "
                            "student's architecture is unknown.")
  return json.loads(path.read_text())


def run_kind(metadata: dict) -> str:
  """Which mode wrote a checkpoint, from what its metadata holds: "pretraining", "fine-tuning", "segmentation" or
  "linear-probe"."""
  if "best_top1" in metadata and "pretrained" in metadata:
    return "fine-tuning"
  if "best_miou" in metadata:
    return "segmentation"
  if "epoch" in metadata:
    return "linear-probe"
  return "pretraining"


def pretraining_config(step_dir: epath.Path) -> dict:
  """The config of the pretraining run that saved the checkpoint in `step_dir` (as its metadata holds it)."""
  return _read_metadata(step_dir).get("config", {})


def restore_student(pretrained: ml_collections.ConfigDict, mesh: Mesh, *, min_fsdp_size: int = 2 ** 18,
                    model_overrides: Mapping[str, Any] | None = None) -> Student:
  """Only the student, restored straight into its shardings on `mesh`.

  `pretrained.workdir`: a pretraining workdir, its `checkpoints/` directory or one step directory, or a directory
  written by `python -m dtm_jax.models.convert --format=beit`; `pretrained.step`: None for the latest step.
  `model_overrides`: ViTConfig fields to change (dtype, attention_impl, drop_path_rate).
  """
  if not pretrained.get("workdir"):
    raise ValueError("Set --config.pretrained.workdir to the workdir of a pretraining run (or one of its step "
                     "directories, or a converted checkpoint) to say which student to evaluate.")
  overrides = dict(model_overrides or {})
  if (epath.Path(pretrained.workdir) / convert.CONFIG_FILE).exists():
    return _restore_converted(pretrained, mesh, min_fsdp_size, overrides)
  directory, step = checkpoint.find_step_directory(pretrained.workdir, pretrained.get("step"))
  step_dir = directory / str(step)
  metadata = _read_metadata(step_dir)
  kind = run_kind(metadata)
  if kind != "pretraining":
    raise errors.ConfigError(
        f"{pretrained.workdir} is a {kind} run (its checkpoint {step_dir}); --config.pretrained.workdir wants a "
        "pretraining run's workdir (or a converted checkpoint).")
  architecture = architecture_of(metadata, **overrides)
  is_mae = isinstance(architecture, mae.MAEConfig)
  model, abstract = functional.abstract_split(lambda: mae.student_model(architecture, rngs=nnx.Rngs(0)))
  shardings = sharding.param_shardings(abstract, mesh, min_fsdp_size)
  target = sharding.with_shardings(abstract, shardings)
  params, _, step = checkpoint.restore_params(step_dir, step, target)
  logging.info("Evaluating the %s student of %s (step %d).", "MAE-style" if is_mae else "BEiT-style", step_dir, step)
  return Student(config=mae.trunk_config(architecture), model=model, params=params, checkpoint=str(step_dir), step=step,
                 architecture=architecture)


def architecture_of(metadata: dict, **overrides) -> vit.ViTConfig:
  """The student a pretraining checkpoint's metadata records: `mae.MAEConfig` or `vit.ViTConfig`."""
  is_mae = mae.is_mae_model_config(metadata.get("model_config", {}))
  return checkpoint.model_config_from_metadata(metadata, mae.MAEConfig if is_mae else vit.ViTConfig, **overrides)


def initial_student(config: vit.ViTConfig, mesh: Mesh, *, seed: int, min_fsdp_size: int = 2 ** 18) -> Student:
  """The student of `config` (a `ViTConfig` or `mae.MAEConfig`: a Student's `pretraining_architecture`) as
  pretraining with `seed` initialises it (dtm_jax.modes.pretrain): the untrained baseline."""
  model, abstract = functional.abstract_split(lambda: mae.student_model(config, rngs=nnx.Rngs(0)))
  _, host_params = functional.split_module(mae.student_model(config, rngs=nnx.Rngs(seed)))
  params = sharding.put_global(host_params, sharding.param_shardings(abstract, mesh, min_fsdp_size))
  return Student(config=mae.trunk_config(config), model=model, params=params,
                 checkpoint=f"initialisation (seed {seed})", step=0, architecture=config)


def abstract_student(config: vit.ViTConfig, mesh: Mesh, min_fsdp_size: int = 2 ** 18) -> Student:
  """A student of `config` whose params are ShapeDtypeStructs with their shardings (`--mode=compile`)."""
  model, abstract = functional.abstract_split(lambda: mae.student_model(config, rngs=nnx.Rngs(0)))
  shardings = sharding.param_shardings(abstract, mesh, min_fsdp_size)
  params = sharding.with_shardings(abstract, shardings)
  return Student(config=config, model=model, params=params, checkpoint="(shapes only)", step=None)


def student_config_of(config: ml_collections.ConfigDict) -> vit.ViTConfig:
  """The student an evaluation config names in `config.pretrained.architecture` (default ViT-B/16) with the config's
  model overrides: what `--mode=compile` builds (runs read the architecture from the checkpoint), and the trunk of
  a from-scratch segmentation baseline. An MAE-style pretraining model block (`kind="mae"`) names its encoder."""
  fields = {**dict(config.pretrained.get("architecture") or {"variant": "base"}), **dict(config.get("model", {}))}
  return mae.trunk_config(mae.student_config_from_fields(fields))


def _restore_converted(pretrained, mesh, min_fsdp_size, overrides) -> Student:
  if pretrained.get("step") is not None:
    raise ValueError(f"{pretrained.workdir} is a converted checkpoint, which has no steps; unset "
                     "config.pretrained.step.")
  module = convert.load_converted(pretrained.workdir)
  if not isinstance(module, vit.PretrainViT):
    raise ValueError(f"{pretrained.workdir} holds a converted {type(module).__name__}, not a pretraining student; "
                     "convert the pretraining weights (with lm_head) of a BEiT/DTM checkpoint.")
  config = dataclasses.replace(module.config, **overrides)
  model, abstract = functional.abstract_split(lambda: vit.PretrainViT(config, rngs=nnx.Rngs(0)))
  _, host_params = functional.split_module(module)
  shardings = sharding.param_shardings(abstract, mesh, min_fsdp_size)
  params = sharding.put_global(host_params, shardings)
  logging.info("Evaluating the converted student in %s.", pretrained.workdir)
  return Student(config=config, model=model, params=params, checkpoint=str(pretrained.workdir), step=None)
