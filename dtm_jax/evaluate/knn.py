"""k-nearest-neighbour classification of frozen features (DINO's protocol).

Features are L2-normalised; a query's k most cosine-similar bank entries vote for their labels with weight
exp(similarity / T). The bank stays split over the devices: each device finds the k best of its own rows, the
candidates are gathered, and the best k of those decide. So no device ever holds the whole bank or the full
query × bank similarity matrix, which keeps it cheap enough to run during pretraining (every `config.eval.every`
steps on slices of the data).
"""
from __future__ import annotations

from typing import Any, Iterable

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, PartitionSpec as P

from dtm_jax import metrics, sharding
from dtm_jax.evaluate import common

PyTree = Any


def l2_normalize(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def knn_votes(bank: common.FeatureSet, queries: jax.Array, mesh: Mesh, *, num_classes: int, k: int,
              temperature: float) -> jax.Array:
  """Class votes [Q, num_classes] of each query from its k nearest valid bank entries (cosine similarity).

  `bank.features` must already be L2-normalised (see `build_bank`); `queries` are normalised here.
  """
  if bank.features.shape[0] < k:
    raise ValueError(f"The kNN bank has {bank.features.shape[0]} entries, fewer than k={k}; use more bank examples.")
  rows_per_device = bank.features.shape[0] // mesh.size
  local_k = min(k, rows_per_device)

  def vote(bank_features, bank_labels, bank_valid, queries):
    similarity = l2_normalize(queries) @ bank_features.T
    similarity = jnp.where(bank_valid[None, :], similarity, -jnp.inf)
    local_sims, local_index = jax.lax.top_k(similarity, local_k)
    local_labels = bank_labels[local_index]
    sims = jax.lax.all_gather(local_sims, sharding.BATCH_AXES, axis=1, tiled=True)
    labels = jax.lax.all_gather(local_labels, sharding.BATCH_AXES, axis=1, tiled=True)
    top_sims, top_index = jax.lax.top_k(sims, k)
    top_labels = jnp.take_along_axis(labels, top_index, axis=1)
    weights = jnp.exp(top_sims / temperature)  # exp(-inf) = 0: padding never votes.
    return jnp.einsum("qk,qkc->qc", weights, jax.nn.one_hot(top_labels, num_classes))

  rows = P(sharding.BATCH_AXES)
  # Every device votes from the same gathered candidates, so the output is replicated; JAX cannot prove that.
  return jax.shard_map(vote, mesh=mesh, in_specs=(rows, rows, rows, P()), out_specs=P(), check_vma=False)(
      bank.features, bank.labels, bank.valid, queries)


def build_bank(encode_fn: common.EncodeFn, params: PyTree, batches: Iterable[dict], mesh: Mesh) -> common.FeatureSet:
  """Normalised features of the labelled bank, split over the devices."""
  bank = common.extract_features(encode_fn, params, batches, mesh)
  return common.FeatureSet(jax.jit(l2_normalize)(bank.features), bank.labels, bank.valid)


def num_classes_of(bank: common.FeatureSet) -> int:
  """Classes a bank can vote for: 1 + its largest valid label (a class absent from the bank never gets votes)."""
  return int(jnp.max(jnp.where(bank.valid, bank.labels, 0))) + 1


def knn_accuracy(encode_fn: common.EncodeFn, params: PyTree, bank: common.FeatureSet, query_batches: Iterable[dict],
                 mesh: Mesh, *, k: int = 20, temperature: float = 0.07) -> dict[str, float]:
  """Top-1/top-5 (%) of kNN classification of each query batch ({"image", "label", "valid"} per host)."""
  num_classes = num_classes_of(bank)

  @jax.jit
  def step(params, bank, batch):
    votes = knn_votes(bank, encode_fn(params, batch["image"]), mesh, num_classes=num_classes, k=k,
                      temperature=temperature)
    return common.accuracy_counts(votes, batch["label"], batch["valid"])

  total = None
  for host_batch in query_batches:
    total = common.add_counts(total, step(params, bank, sharding.to_global(host_batch, mesh)))
  if total is None:
    raise ValueError("The kNN query data gave no batches; check config.input.eval_split and the data directory.")
  return common.accuracy_from_counts(total)


def knn_evaluate(encode_fn: common.EncodeFn, params: PyTree, cfg: ml_collections.ConfigDict, mesh: Mesh, *,
                 input_config: ml_collections.ConfigDict, image_size: int) -> dict[str, float]:
  """kNN accuracy of a bank from `input_config.train_split` against queries from its `eval_split`.

  Cheap enough to call from the pretraining loop: the bank and the queries are the first `cfg.num_train_examples`
  and `cfg.num_eval_examples` (0 = the whole split) in the evaluation crop. `encode_fn(params, images) -> [B, D]`.
  cfg fields: k, temperature, batch_size, num_train_examples, num_eval_examples.
  Returns {"knn_top1", "knn_top5"} (%) and the sizes used, {"knn_bank_size", "knn_num_queries"}.
  """
  import input_pipeline  # pylint: disable=g-import-not-at-top  # Only here: dtm_jax itself never loads TensorFlow.

  def batches(split, max_examples):
    data = input_pipeline.build_eval(input_config, split=split, image_size=image_size,
                                     global_batch_size=cfg.batch_size)
    return common.take_batches(data, cfg.batch_size, max_examples)

  bank = build_bank(encode_fn, params, batches(input_config.train_split, cfg.num_train_examples), mesh)
  result = knn_accuracy(encode_fn, params, bank, batches(input_config.eval_split, cfg.num_eval_examples), mesh,
                        k=cfg.k, temperature=cfg.temperature)
  return {"knn_top1": result["top1"], "knn_top5": result["top5"], "knn_bank_size": bank.num_valid,
          "knn_num_queries": result["num_examples"]}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """`main.py --mode=knn`: kNN accuracy of a pretrained student; writes results.json and TensorBoard."""
  mesh = common.make_mesh(config)
  student = common.restore_student(config.pretrained, mesh, min_fsdp_size=config.mesh.min_fsdp_size,
                                   model_overrides=config.model)
  encode = common.feature_fn(student, pooling=config.features.pooling, num_blocks=config.features.num_blocks)
  result = knn_evaluate(encode, student.params, config.knn, mesh, input_config=config.input,
                        image_size=student.config.image_size)
  writer = metrics.MetricsWriter(workdir)
  writer.write_scalars(student.step or 0, result)
  writer.close()
  results = {"mode": "knn", **student.source(), **result, "k": config.knn.k, "temperature": config.knn.temperature}
  common.write_results(workdir, results)
  return results
