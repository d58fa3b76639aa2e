"""Top-1/top-5 accuracy of a classifier over evaluation batches, counted on the devices over the valid examples
only (padding excluded), so on several hosts every example is counted exactly once.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from dtm_jax import sharding

PyTree = Any


def accuracy_counts(scores: jax.Array, labels: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
  """Top-1/top-5 hits and the number of valid examples in a batch (padding excluded)."""
  top5 = jax.lax.top_k(scores, min(5, scores.shape[-1]))[1]
  hits = top5 == labels[:, None]
  valid = valid.astype(jnp.int32)
  return {"top1_hits": jnp.sum(hits[:, 0] * valid), "top5_hits": jnp.sum(jnp.any(hits, axis=1) * valid),
          "count": jnp.sum(valid)}


def accuracy_from_counts(counts: Mapping[str, jax.Array]) -> dict[str, float]:
  """Percentages from summed counts."""
  count = int(counts["count"])
  if count == 0:
    raise ValueError("No valid evaluation examples were seen.")
  return {"top1": 100.0 * int(counts["top1_hits"]) / count, "top5": 100.0 * int(counts["top5_hits"]) / count,
          "num_examples": count}


def add_counts(total: dict | None, counts: dict) -> dict:
  return counts if total is None else jax.tree.map(jnp.add, total, counts)


def make_classifier_evaluator(predict_fn: Callable[..., jax.Array], mesh: Mesh):
  """`evaluate(params, batches) -> {"top1", "top5", "num_examples"}` (%) for `predict_fn(params, images) -> [B, C]`.

  Compiled once, evaluated on as many passes of eval batches ({"image", "label", "valid"} per host) as needed.
  """
  step = jax.jit(lambda p, b: accuracy_counts(predict_fn(p, b["image"]), b["label"], b["valid"]))

  def evaluate(params: PyTree, batches: Iterable[dict]) -> dict[str, float]:
    total = None
    for host_batch in batches:
      total = add_counts(total, step(params, sharding.to_global(host_batch, mesh)))
    if total is None:
      raise ValueError("The evaluation data gave no batches; check the split name and the data directory.")
    return accuracy_from_counts(total)

  return evaluate
