"""How much the teacher's compute precision moves DTM's targets and groups (issue: teacher precision by evidence).

Runs one converted CLIP teacher (the semantic teacher of tools/train_teacher.py by default) on Fashion-MNIST test
images in float32 and in lower precisions, morphs every image's tokens with the training draw of schedules (one pair
per image, the demo's max_iters) and counts, against the float32 teacher under the same schedules:
  target error  ‖t − t₃₂‖ / ‖t₃₂‖ over all tokens (relative Frobenius norm);
  moved tokens  the fraction of tokens whose group (its set of members) differs from the float32 group;
  moved images  the fraction of images with at least one moved token.
Precisions: bfloat16 (the blocks, ln_post and proj in bf16; the residual stream and LayerNorm statistics stay float32,
as in every tower here), bfloat16 with a float32 head (ln_post and proj in float32: `clip.CLIPVisionConfig.head_dtype`)
and float16 (the blocks in fp16, the nearest thing to the released code's fp16 autocast).

Command (the figures of docs/BENCHMARKS.md "Teacher precision"):
  python -m tools.train_teacher --out=workdirs/teacher_fmnist
  python -m tools.teacher_precision --teacher=workdirs/teacher_fmnist --out=workdirs/teacher_precision.json
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from configs import demo
from dtm_jax import morphing
from dtm_jax.evaluators import frozen_features
from dtm_jax.models import convert, functional
from dtm_jax.runtime import checkpoint as checkpoint_lib

# name → (compute dtype, head dtype): the rows of the table.
PRECISIONS = {"float32": (jnp.float32, None), "bfloat16": (jnp.bfloat16, None),
              "bfloat16, float32 head": (jnp.bfloat16, jnp.float32), "float16": (jnp.float16, None)}


def encode(teacher_dir: str, dtype, head_dtype, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
  """Float32 target tokens [M, N, D] of the teacher run in `dtype` (ln_post and proj in `head_dtype`)."""
  tower = convert.load_converted(teacher_dir, dtype=dtype, head_dtype=head_dtype)
  model, params = functional.split_module(tower)
  fn = jax.jit(lambda p, x: model.apply(p, x).astype(jnp.float32))
  return np.concatenate([np.asarray(fn(params, images[i:i + batch_size]))
                         for i in range(0, len(images), batch_size)])


def same_groups(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """bool [M, N]: token i has the same set of group members under ids `a` and `b` (both int [M, N])."""
  members_a = a[:, :, None] == a[:, None, :]
  members_b = b[:, :, None] == b[:, None, :]
  return np.all(members_a == members_b, axis=-1)


def measure(teacher_dir: str, images: np.ndarray, *, draws: int, max_iters: int, protect_first: bool,
            seed: int) -> dict:
  tokens = {name: encode(teacher_dir, dtype, head, images) for name, (dtype, head) in PRECISIONS.items()}
  reference = tokens["float32"]
  num_tokens = reference.shape[1]
  morph = jax.jit(lambda t, m, k: morphing.morph(t, m, k, max_iters=max_iters, protect_first=protect_first))
  key = jax.random.key(seed)
  schedules = [morphing.sample_schedules(jax.random.fold_in(key, d), len(images), num_schedules=1,
                                         max_merge=num_tokens, max_iters=max_iters, group_size=1)
               for d in range(draws)]
  groups = {name: [np.asarray(morph(jnp.asarray(t), m[0], k[0])) for m, k in schedules] for name, t in tokens.items()}
  rows = {}
  for name, t in tokens.items():
    same = np.stack([same_groups(g, g32) for g, g32 in zip(groups[name], groups["float32"])])  # [draws, M, N]
    rows[name] = dict(
        target_error=float(np.linalg.norm(t - reference) / np.linalg.norm(reference)),
        moved_tokens=float(1 - same.mean()), moved_images=float(np.mean(~same.all(axis=-1))))
  return dict(teacher=teacher_dir, images=len(images), tokens_per_image=num_tokens, draws_per_image=draws,
              max_iters=max_iters, jax=jax.__version__, device=jax.devices()[0].device_kind, rows=rows)


def table(result: dict) -> str:
  lines = [f"{result['images']} images × {result['draws_per_image']} schedule draws, {result['tokens_per_image']} "
           f"tokens each (jax {result['jax']}, {result['device']})",
           "| teacher precision | target error vs float32 | tokens in another group | images with a moved token |",
           "|---|---|---|---|"]
  for name, row in result["rows"].items():
    lines.append(f"| {name} | {row['target_error']:.2e} | {100 * row['moved_tokens']:.2f}% | "
                 f"{100 * row['moved_images']:.1f}% |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m tools.teacher_precision", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--teacher", required=True, help="converted CLIP teacher directory (params/, model_config.json)")
  parser.add_argument("--out", help="where to write the figures as JSON")
  parser.add_argument("--images", type=int, default=2000, help="test images to encode")
  parser.add_argument("--draws", type=int, default=4, help="schedule pairs drawn per image (each counted)")
  parser.add_argument("--seed", type=int, default=0, help="seed of the schedule draws")
  args = parser.parse_args(argv)
  config = demo.get_config()
  teacher = str(checkpoint_lib.absolute_path(args.teacher))
  image_size = convert.load_converted(teacher).config.image_size
  split = frozen_features.load_split(config.input, "test", args.images, image_size=image_size)
  result = measure(teacher, split.images, draws=args.draws, max_iters=config.dtm.max_iters,
                   protect_first=config.dtm.protect_first, seed=args.seed)
  print(table(result))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
