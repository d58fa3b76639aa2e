"""A run's target tokens outside training: the teacher of a pretraining config, its tokens and their groups.

Frozen kinds (clip, checkpoint, pixels) are built by `dtm_jax.targets` as in training. The EMA teacher exists only
inside a run's train state, so for `kind="ema"` the parameters are read from that run's latest checkpoint
(`<run>/checkpoints/<step>/train` → `ema_params`).
"""
from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from dtm_jax import morphing, targets
from dtm_jax.models import convert, functional, vit
from dtm_jax.modes import pretrain as train
from dtm_jax.runtime import checkpoint as checkpoint_lib

CLASS_EMBEDDINGS_FILE = "class_embeddings.npy"  # written by tools/train_teacher.py

PyTree = Any


def run_config(run_dir: str | epath.Path) -> ml_collections.ConfigDict:
  """The config a pretraining run was started with (its `config.json`)."""
  path = epath.Path(run_dir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist; --run must be the workdir of a pretraining run.")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def _like(template: PyTree, restored: PyTree) -> PyTree:
  """`restored` (a checkpoint read without a target: string keys) in the key types and nesting of `template`."""
  if isinstance(template, dict):
    return {k: _like(v, restored[str(k)] if str(k) in restored else restored[k]) for k, v in template.items()}
  return restored


def ema_params(run_dir: str | epath.Path, abstract_params: PyTree) -> PyTree:
  """The EMA teacher's parameters at the latest checkpoint of an `ema` run."""
  directory, step = checkpoint_lib.find_step_directory(run_dir)  # made absolute there when local (Orbax)
  train_state = ocp.StandardCheckpointer().restore(directory / str(step) / "train")
  if "ema_params" not in train_state:
    raise ValueError(f"The checkpoint {directory / str(step)} holds no EMA teacher; its run did not use "
                     "config.target.kind='ema'.")
  return jax.tree.map(np.asarray, _like(abstract_params, train_state["ema_params"]))


def load(config: ml_collections.ConfigDict, run_dir: str | None = None) -> tuple[targets.Target, PyTree]:
  """(target, params) of `config.target` for the student of `config.model`; `run_dir` is needed for `ema`."""
  model_cfg = train.student_config(config)
  target = targets.build_target(config.target, image_size=model_cfg.image_size, patch_size=model_cfg.patch_size,
                                in_channels=model_cfg.in_channels, student_config=model_cfg)
  if not target.is_ema:
    return target, target.params
  if not run_dir:
    raise ValueError("The 'ema' teacher lives in a run's checkpoint: pass the run's workdir (--run=...).")
  _, abstract = functional.abstract_split(lambda: vit.PretrainViT(model_cfg, rngs=nnx.Rngs(0)))
  return target, ema_params(run_dir, abstract)


def clip_proj_dim(directory: str | epath.Path) -> int:
  """Width of the tokens of a converted or trained CLIP tower (its `model_config.json`), without loading it."""
  path = epath.Path(directory) / convert.CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist; train a teacher with `python -m tools.train_teacher` or convert "
                            "one with `python -m dtm_jax.models.convert`.")
  return int(json.loads(path.read_text())["config"]["proj_dim"])


def class_embeddings(config: ml_collections.ConfigDict) -> np.ndarray | None:
  """Unit class embeddings [classes, D] of a `clip` target trained by tools/train_teacher.py, else None.

  They play CLIP's text embeddings of the class prompts: a target token's zero-shot class is the nearest one."""
  if config.target.kind != "clip" or config.target.get("init", "checkpoint") == "random":
    return None
  path = epath.Path(config.target.checkpoint) / CLASS_EMBEDDINGS_FILE
  if not path.exists():
    return None
  with path.open("rb") as f:
    return np.load(f)


def target_tokens(target: targets.Target, params: PyTree, images: np.ndarray, batch_size: int = 250) -> np.ndarray:
  """Target tokens f32 [M, N, D] of normalised images [M, H, W, C], computed in batches."""
  tokens = jax.jit(target.tokens)
  return np.concatenate([np.asarray(tokens(params, images[i:i + batch_size]))
                         for i in range(0, len(images), batch_size)])


def morph_groups(tokens: np.ndarray, num_merge: int, num_iters: int, *, max_iters: int, protect_first: bool,
                 batch_size: int = 250) -> np.ndarray:
  """Group ids int32 [M, N] of one morphing schedule (the same for every image), as in training."""
  fn = jax.jit(lambda t: morphing.morph(t, num_merge, num_iters, max_iters=max_iters, protect_first=protect_first))
  return np.concatenate([np.asarray(fn(tokens[i:i + batch_size])) for i in range(0, len(tokens), batch_size)])


def group_means(tokens: np.ndarray, groups: np.ndarray) -> np.ndarray:
  """Every token replaced by the mean of its group: what the loss compares after morphing."""
  return np.asarray(jax.jit(morphing.group_mean)(jnp.asarray(tokens), jnp.asarray(groups)))
