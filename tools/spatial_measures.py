"""The measures of the spatial-consistency analysis (tools/spatial_consistency.py), free of flags and I/O paths.

Neighbour cosine and same-group share over 4-neighbouring patches, object-token masks, and a linear probe on single
tokens; `analyse` runs them for a teacher and a list of morphing schedules and returns a JSON-able dict.
"""
from __future__ import annotations

import ml_collections
import numpy as np

from dtm_jax import sharding
from dtm_jax.evaluators import frozen_features
from tools import study_scores, teachers


# ----------------------------------------------------------------------------------------------------------------
# Measures (numpy / jax, no I/O).
# ----------------------------------------------------------------------------------------------------------------
def neighbour_pairs(grid: int) -> np.ndarray:
  """Index pairs [P, 2] of horizontally and vertically adjacent patches of a row-major grid × grid layout."""
  index = np.arange(grid * grid).reshape(grid, grid)
  horizontal = np.stack([index[:, :-1].ravel(), index[:, 1:].ravel()], axis=1)
  vertical = np.stack([index[:-1, :].ravel(), index[1:, :].ravel()], axis=1)
  return np.concatenate([horizontal, vertical])


def neighbour_cosine(tokens: np.ndarray, pairs: np.ndarray, keep: np.ndarray | None = None) -> float:
  """Mean cosine similarity of the token pairs [P, 2] over images: tokens [M, N, D]; keep bool [M, P] selects pairs."""
  unit = tokens / np.maximum(np.linalg.norm(tokens, axis=-1, keepdims=True), 1e-12)
  cosine = np.sum(unit[:, pairs[:, 0]] * unit[:, pairs[:, 1]], axis=-1)
  return float(cosine.mean() if keep is None else cosine[keep].mean())


def same_group(groups: np.ndarray, pairs: np.ndarray) -> np.ndarray:
  """bool [M, P]: whether the two tokens of each pair are in one group (groups int [M, N])."""
  return groups[:, pairs[:, 0]] == groups[:, pairs[:, 1]]


def same_group_share(groups: np.ndarray, pairs: np.ndarray, keep: np.ndarray | None = None) -> float:
  """Share of the pairs whose two tokens are in one group."""
  same = same_group(groups, pairs)
  return float(same.mean() if keep is None else same[keep].mean())


def shuffled_groups(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Groups of the same sizes with random members: each image's group ids permuted over its token positions."""
  return np.stack([g[rng.permutation(len(g))] for g in groups])


def object_tokens(images01: np.ndarray, patch_size: int, ink: float) -> np.ndarray:
  """bool [M, N]: patches where some pixel of the [0, 1] image exceeds `ink`."""
  m, h, w, _ = images01.shape
  patches = images01.max(-1).reshape(m, h // patch_size, patch_size, w // patch_size, patch_size)
  return patches.max(axis=(2, 4)).reshape(m, -1) > ink


def zero_shot_top1(tokens: np.ndarray, labels: np.ndarray, keep: np.ndarray, class_embeddings: np.ndarray) -> float:
  """Top-1 (%) of labelling each kept token [M, N, D] with its most similar class embedding [C, D] (unit rows, so
  the token's norm does not matter), against its image's label: the paper's zero-shot pilot, token by token."""
  predicted = np.einsum("mnd,cd->mnc", tokens, class_embeddings).argmax(-1)
  return float(100.0 * (predicted == labels[:, None])[keep].mean())


# ----------------------------------------------------------------------------------------------------------------
# The analysis.
# ----------------------------------------------------------------------------------------------------------------
def token_probe(train_tokens, train_labels, train_keep, test_tokens, test_labels, test_keep, mesh, *, seed: int,
                epochs: int) -> float:
  """Top-1 (%) of a linear probe classifying single tokens [M, N, D] by their image's label (kept tokens only)."""
  def rows(tokens, labels, keep):
    return frozen_features.feature_set(tokens[keep], np.broadcast_to(labels[:, None], keep.shape)[keep], mesh)
  return study_scores.probe_top1(rows(train_tokens, train_labels, train_keep),
                                    rows(test_tokens, test_labels, test_keep), mesh, seed=seed, epochs=epochs)


def analyse(config: ml_collections.ConfigDict, run_dir: str | None, *, schedules: list[tuple[int, int]],
            split_names: tuple[str, str], train_images: int, test_images: int, object_only: bool, ink: float,
            probe_epochs: int, seed: int) -> dict:
  """The measures of the module docstring for every schedule; returns a JSON-able dict."""
  mesh = sharding.make_mesh(-1, 1)
  target, params = teachers.load(config, run_dir)
  image_size, patch_size = config.model.image_size, config.model.patch_size
  grid = image_size // patch_size
  splits = (frozen_features.load_split(config.input, split_names[0], train_images, image_size=image_size),
            frozen_features.load_split(config.input, split_names[1], test_images, image_size=image_size))
  mean, std = np.asarray(config.input.mean), np.asarray(config.input.std)
  keeps = [object_tokens(s.images * std + mean, patch_size, ink) if object_only else
           np.ones((len(s), grid * grid), bool) for s in splits]
  tokens = [teachers.target_tokens(target, params, s.images) for s in splits]
  pairs = neighbour_pairs(grid)
  test_pair_keep = keeps[1][:, pairs[:, 0]] & keeps[1][:, pairs[:, 1]]
  rng = np.random.default_rng(seed)
  embeddings = teachers.class_embeddings(config)  # only a teacher trained with class embeddings has them
  zero_shot = lambda features: ({} if embeddings is None else
                                {"zero_shot": zero_shot_top1(features[1], splits[1].labels, keeps[1], embeddings)})
  probe = lambda features: token_probe(features[0], splits[0].labels, keeps[0], features[1], splits[1].labels,
                                       keeps[1], mesh, seed=seed, epochs=probe_epochs)
  result = {
      "target": target.description, "tokens": "object" if object_only else "all", "tokens_per_image": grid * grid,
      "kept_tokens_per_image": float(keeps[1].sum(1).mean()), "train_images": train_images,
      "test_images": test_images,
      "neighbour_cosine_per_token": neighbour_cosine(tokens[1], pairs, test_pair_keep),
      "probe_top1_per_token": probe(tokens), "schedules": [],
      **{f"{k}_top1_per_token": v for k, v in zero_shot(tokens).items()},
  }
  for num_merge, num_iters in schedules:
    groups = [teachers.morph_groups(t, num_merge, num_iters, max_iters=max(num_iters, config.dtm.max_iters),
                           protect_first=config.dtm.protect_first) for t in tokens]
    morphed = [teachers.group_means(t, g) for t, g in zip(tokens, groups)]
    control = [teachers.group_means(t, shuffled_groups(g, rng)) for t, g in zip(tokens, groups)]
    result["schedules"].append({
        "num_merge": num_merge, "num_iters": num_iters,
        "groups_per_image": float(np.mean([len(np.unique(g)) for g in groups[1]])),
        "neighbour_cosine_morphed": neighbour_cosine(morphed[1], pairs, test_pair_keep),
        "neighbour_same_group": same_group_share(groups[1], pairs, test_pair_keep),
        "joined_pairs_cosine_before": neighbour_cosine(tokens[1], pairs, test_pair_keep & same_group(groups[1], pairs)),
        "probe_top1_morphed": probe(morphed),
        "probe_top1_random_groups": probe(control),
        **{f"{k}_top1_morphed": v for k, v in zero_shot(morphed).items()},
        **{f"{k}_top1_random_groups": v for k, v in zero_shot(control).items()},
    })
  return result


def table(result: dict) -> str:
  """Markdown table of `analyse`'s result; zero-shot columns when the teacher has class embeddings."""
  zero_shot = "zero_shot_top1_per_token" in result
  extra_head = " zero-shot token top-1 (%) | zero-shot, random groups (%) |" if zero_shot else ""
  lines = [f"Target: {result['target']}; {result['tokens']} tokens ({result['kept_tokens_per_image']:.1f} per image), "
           f"probe fitted on {result['train_images']} images, scored on {result['test_images']}.", "",
           "| schedule (merge:rounds) | groups / image | neighbour cosine | same-group neighbours | their cosine "
           "before | token probe top-1 (%) | random groups, same sizes (%) |" + extra_head,
           "|---|---|---|---|---|---|---|" + ("---|---|" if zero_shot else ""),
           f"| none (per token) | {result['tokens_per_image']} | {result['neighbour_cosine_per_token']:.3f} | 0 | — | "
           f"{result['probe_top1_per_token']:.2f} | — |" +
           (f" {result['zero_shot_top1_per_token']:.2f} | — |" if zero_shot else "")]
  for s in result["schedules"]:
    lines.append(f"| {s['num_merge']}:{s['num_iters']} | {s['groups_per_image']:.1f} | "
                 f"{s['neighbour_cosine_morphed']:.3f} | {s['neighbour_same_group']:.2f} | "
                 f"{s['joined_pairs_cosine_before']:.3f} | {s['probe_top1_morphed']:.2f} | "
                 f"{s['probe_top1_random_groups']:.2f} |" +
                 (f" {s['zero_shot_top1_morphed']:.2f} | {s['zero_shot_top1_random_groups']:.2f} |"
                  if zero_shot else ""))
  return "\n".join(lines) + "\n"
