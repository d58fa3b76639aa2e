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
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from dtm_jax import sharding
from dtm_jax.evaluators import classification, encoding

PyTree = Any


HIGHEST = jax.lax.Precision.HIGHEST


def l2_normalize(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def knn_votes(bank: encoding.FeatureSet, queries: jax.Array, mesh: Mesh, *, num_classes: int, k: int,
              temperature: float) -> jax.Array:
  """Class votes [Q, num_classes] of each query from its k nearest valid bank entries (cosine similarity).

  `bank.features` must already be L2-normalised (see `build_bank`); `queries` are normalised here.
  """
  if bank.features.shape[0] < k:
    raise ValueError(f"The kNN bank has {bank.features.shape[0]} entries, fewer than k={k}; use more bank examples.")
  rows_per_device = bank.features.shape[0] // mesh.size
  local_k = min(k, rows_per_device)

  def vote(bank_features, bank_labels, bank_valid, queries):
    # HIGHEST: full float32 products (TPUs' default rounds them to bfloat16, which reorders close neighbours).
    similarity = jnp.matmul(l2_normalize(queries), bank_features.T, precision=HIGHEST)
    similarity = jnp.where(bank_valid[None, :], similarity, -jnp.inf)
    local_sims, local_index = jax.lax.top_k(similarity, local_k)
    local_labels = bank_labels[local_index]
    sims = jax.lax.all_gather(local_sims, sharding.BATCH_AXES, axis=1, tiled=True)
    labels = jax.lax.all_gather(local_labels, sharding.BATCH_AXES, axis=1, tiled=True)
    top_sims, top_index = jax.lax.top_k(sims, k)
    top_labels = jnp.take_along_axis(labels, top_index, axis=1)
    weights = jnp.exp(top_sims / temperature)  # exp(-inf) = 0: padding never votes.
    return jnp.einsum("qk,qkc->qc", weights, jax.nn.one_hot(top_labels, num_classes), precision=HIGHEST)

  rows = P(sharding.BATCH_AXES)
  # Every device votes from the same gathered candidates, so the output is replicated; JAX cannot prove that.
  return jax.shard_map(vote, mesh=mesh, in_specs=(rows, rows, rows, P()), out_specs=P(), check_vma=False)(
      bank.features, bank.labels, bank.valid, queries)


def build_bank(encode_fn: encoding.EncodeFn, params: PyTree, batches: Iterable[dict],
               mesh: Mesh) -> encoding.FeatureSet:
  """Normalised features of the labelled bank, split over the devices (each keeps the rows it encoded)."""
  return KnnEvaluator(encode_fn, mesh).build_bank(params, batches)


def num_classes_of(bank: encoding.FeatureSet) -> int:
  """Classes a bank can vote for: 1 + its largest valid label (a class absent from the bank never gets votes)."""
  return int(jnp.max(jnp.where(bank.valid, bank.labels, 0))) + 1


def make_knn_step(encode_fn: encoding.EncodeFn, mesh: Mesh, *, num_classes: int, k: int, temperature: float):
  """Jitted `(params, bank, batch) -> accuracy counts` of one batch of queries ({"image", "label", "valid"})."""

  @jax.jit
  def step(params, bank, batch):
    votes = knn_votes(bank, encode_fn(params, batch["image"]), mesh, num_classes=num_classes, k=k,
                      temperature=temperature)
    return classification.accuracy_counts(votes, batch["label"], batch["valid"])

  return step


def knn_accuracy(encode_fn: encoding.EncodeFn, params: PyTree, bank: encoding.FeatureSet, query_batches: Iterable[dict],
                 mesh: Mesh, *, k: int = 20, temperature: float = 0.07) -> dict[str, float]:
  """Top-1/top-5 (%) of kNN classification of each query batch ({"image", "label", "valid"} per host).

  Compiles its step on every call: for repeated evaluations use one `KnnEvaluator`.
  """
  return KnnEvaluator(encode_fn, mesh, k=k, temperature=temperature).accuracy(params, bank, query_batches)


_normalize = jax.jit(l2_normalize)


class KnnEvaluator:
  """kNN with one encoder on one mesh, its programs jitted once and reused by every evaluation.

  The periodic kNN of pretraining (`make_knn_evaluate`) evaluates every `eval.every` steps with the same shapes:
  after the first evaluation nothing is traced or compiled again (a bank with another number of classes compiles
  its step once more).
  """

  def __init__(self, encode_fn: encoding.EncodeFn, mesh: Mesh, *, k: int = 20, temperature: float = 0.07):
    self.encode_fn, self.mesh, self.k, self.temperature = encode_fn, mesh, k, temperature
    self.encode = encoding.jit_encoder(encode_fn, mesh)
    self._steps = {}  # num_classes -> jitted step

  def step(self, num_classes: int):
    """The jitted `(params, bank, batch) -> accuracy counts` for `num_classes` (`make_knn_step`), built once."""
    if num_classes not in self._steps:
      self._steps[num_classes] = make_knn_step(self.encode_fn, self.mesh, num_classes=num_classes, k=self.k,
                                               temperature=self.temperature)
    return self._steps[num_classes]

  def build_bank(self, params: PyTree, batches: Iterable[dict]) -> encoding.FeatureSet:
    """Normalised features of the labelled bank; each device keeps the rows it encoded."""
    bank = encoding.extract_features(self.encode, params, batches, self.mesh)
    return encoding.FeatureSet(_normalize(bank.features), bank.labels, bank.valid)

  def accuracy(self, params: PyTree, bank: encoding.FeatureSet, query_batches: Iterable[dict]) -> dict[str, float]:
    """Top-1/top-5 (%) of each query batch ({"image", "label", "valid"} per host) against `bank`."""
    step = self.step(num_classes_of(bank))
    total = None
    for host_batch in query_batches:
      total = classification.add_counts(total, step(params, bank, sharding.to_global(host_batch, self.mesh)))
    if total is None:
      raise ValueError("The kNN query data gave no batches; check config.input.eval_split and the data directory.")
    return classification.accuracy_from_counts(total)

  def __call__(self, params: PyTree, bank_batches: Iterable[dict], query_batches: Iterable[dict]) -> dict[str, float]:
    """{"knn_top1", "knn_top5"} (%) and the sizes used, {"knn_bank_size", "knn_num_queries"}."""
    bank = self.build_bank(params, bank_batches)
    result = self.accuracy(params, bank, query_batches)
    return {"knn_top1": result["top1"], "knn_top5": result["top5"], "knn_bank_size": bank.num_valid,
            "knn_num_queries": result["num_examples"]}


def make_knn_evaluate(encode_fn: encoding.EncodeFn, cfg: ml_collections.ConfigDict, mesh: Mesh, *,
                      input_config: ml_collections.ConfigDict, image_size: int):
  """`evaluate(params) -> {"knn_top1", "knn_top5", "knn_bank_size", "knn_num_queries"}`: kNN accuracy of a bank from
  `input_config.train_split` against queries from its `eval_split`, its programs compiled once for all calls.

  Cheap enough to call from the pretraining loop: the bank and the queries are the first `cfg.num_train_examples`
  and `cfg.num_eval_examples` (0 = the whole split) in the evaluation crop. `encode_fn(params, images) -> [B, D]`.
  cfg fields: k, temperature, batch_size, num_train_examples, num_eval_examples.
  """
  evaluator = KnnEvaluator(encode_fn, mesh, k=cfg.k, temperature=cfg.temperature)

  def batches(split, max_examples):
    import input_pipeline  # pylint: disable=g-import-not-at-top  # Only here: dtm_jax itself never loads TensorFlow.
    data = input_pipeline.build_eval(input_config, split=split, image_size=image_size,
                                     global_batch_size=cfg.batch_size)
    return encoding.take_batches(data, cfg.batch_size, max_examples)

  return lambda params: evaluator(params, batches(input_config.train_split, cfg.num_train_examples),
                                  batches(input_config.eval_split, cfg.num_eval_examples))


def knn_evaluate(encode_fn: encoding.EncodeFn, params: PyTree, cfg: ml_collections.ConfigDict, mesh: Mesh, *,
                 input_config: ml_collections.ConfigDict, image_size: int) -> dict[str, float]:
  """One kNN evaluation (`make_knn_evaluate`); returns {"knn_top1", "knn_top5", "knn_bank_size",
  "knn_num_queries"}."""
  return make_knn_evaluate(encode_fn, cfg, mesh, input_config=input_config, image_size=image_size)(params)
