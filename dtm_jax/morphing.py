"""Dynamic token morphing: random schedules, bipartite token grouping and group means (docs/METHOD.md §2.4, §3).

Morphing groups contextually similar teacher tokens by repeated bipartite matching (ToMe). Everything here has fixed
shapes, so any mix of schedules runs through one compiled program inside the jitted training step.

The rounds never touch the D-dimensional features. A slot's feature is the mean of its members' tokens, so the inner
product of two slot means is a sum of token inner products divided by the two sizes: one token Gram matrix
G = X·Xᵀ ([N, N], computed once per image and shared by every schedule) carries all the information a round needs.
A slot is named by an id (the token it started from), and the state of one image is

  * the Gram matrix of the slots' feature *sums* and their sizes, indexed by id: merging slot s into slot p adds row
    s to row p and column s to column p, so a round costs O(r·N) (or one O(N²) scatter) instead of the O(t²·D)
    similarity matmul of the feature formulation;
  * the current slot order (ids), and for every merged slot the id it went into, from which each token's final
    group is found at the end.

`lax.while_loop` runs rounds until no image has one left (an image whose schedule is done sits the remaining rounds
out unchanged), and the part of the order that is matched shrinks in static steps (N, ¾N, ½N) as the slots merge
away. Neither changes a result, only the work done.

On CPUs the rounds and the loss's group sums run instead as native kernels (dtm_jax.kernels: XLA FFI custom calls
built on first use), the same algorithm and float32 arithmetic image by image in cache-resident memory: XLA:CPU
executes the rounds' small gathers and scatters one after another at tens of µs each, ~2× the cost of the Gram
matmul. Without a C++ compiler the XLA rounds run on CPUs too.

On GPUs and TPUs scatters are slow (TPUs apply their updates nearly one at a time) or non-deterministic (GPU
atomics), so there the rounds hold the slot Gram matrix by slot *position* and do a round's merges and reordering at
once as G' = Pᵀ·G·P for the 0/1 matrix P that sends every slot to its new position (two batched matmuls over the
shrinking slot prefix), and the loss's group sums are one-hot matmuls: the programs contain no scatter, and no
gather either.

Exactness: the cosine of two slots is computed from the slot-mean inner products (sums divided by sizes with a true
division), so slots whose members are equal tokens have exactly the same similarities as one such token whenever the
Gram sums are exact in float32 — ties stay ties, as in the released code on such inputs. Elsewhere the similarities
agree with a float64 computation to ~1e-6, so only decisions between scores closer than that can differ.
"""
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from dtm_jax import kernels, platform, sharding

IMPLEMENTATIONS = ("auto", "cpu_kernel", "pairwise", "scatter", "matmul")
# Images per matmul of the token Gram matrices on CPUs (see token_gram).
_CPU_GRAM_BLOCK = 8
# Smallest squared norm used when normalising: an all-zero feature gets cosine similarity 0 with everything.
_MIN_SQUARED_NORM = 1e-24


def sample_schedules(rng, batch_size, num_schedules=2, max_merge=196, max_iters=14, group_size=None):
  """Draws the random morphing schedules of one step (docs/METHOD.md §2.4).

  num_merge ~ U{0..max_merge} (tokens to remove) and num_iters ~ U{1..max_iters} (rounds), inclusive bounds. Each
  run of `group_size` consecutive images shares one draw: the released code draws once per GPU per step, so its
  8-GPU run averages 8 draws of 256 images each. group_size 1 draws per image; None, one draw for the whole batch.
  The draw depends on the global batch only, never on how it is spread over devices. Set max_merge to the number
  of tokens when it is not 196.

  Returns:
    (num_merge, num_iters), each int32 [num_schedules, batch_size].
  """
  if max_merge < 0 or max_iters < 1:
    raise ValueError(f"Need max_merge >= 0 and max_iters >= 1; got max_merge={max_merge}, max_iters={max_iters}.")
  group_size = batch_size if group_size is None else group_size
  if group_size < 1 or batch_size % group_size:
    raise ValueError(f"A batch of {batch_size} images does not split into schedule groups of {group_size}.")
  merge_rng, iters_rng = jax.random.split(rng)
  draw_shape = (num_schedules, batch_size // group_size)
  num_merge = jax.random.randint(merge_rng, draw_shape, 0, max_merge + 1, dtype=jnp.int32)
  num_iters = jax.random.randint(iters_rng, draw_shape, 1, max_iters + 1, dtype=jnp.int32)
  return jnp.repeat(num_merge, group_size, axis=1), jnp.repeat(num_iters, group_size, axis=1)


def merges_per_round(num_merge, num_iters, num_tokens):
  """Tokens merged away per round, r, as the released code computes it (docs/METHOD.md §2.4).

  r = ceil(num_merge / num_iters), or floor(num_merge / num_iters) when r·num_iters would exceed num_tokens. Every
  round then merges min(r, (slots - protected) // 2), so a schedule may realise fewer merges than it asks for.
  Works elementwise on integer arrays (numpy or jax) and returns int32.
  """
  num_merge = jnp.asarray(num_merge, jnp.int32)
  num_iters = jnp.maximum(jnp.asarray(num_iters, jnp.int32), 1)
  ceil = -(-num_merge // num_iters)
  return jnp.where(ceil * num_iters > num_tokens, num_merge // num_iters, ceil)


def morph(tokens, num_merge, num_iters, *, max_iters=14, protect_first=True, implementation="auto"):
  """Groups similar tokens by iterated bipartite soft matching, exactly as docs/METHOD.md §3 describes.

  Each round splits the ordered slots alternately into A (even positions) and B (odd positions), matches every A
  slot to its most cosine-similar B slot, merges the r best-matched A slots into their partners and reorders the
  slots as [unmerged A, B]. The similarity is computed in float32 whatever the input dtype.

  Ties are broken deterministically: an A slot's partner is the first (lowest B position) maximum, and A slots are
  ranked by a *stable* descending sort of their best score (earlier A position first among equal scores). The
  released PyTorch code uses an unstable argsort, so its choice among exactly tied scores is unspecified; this one
  is reproducible (and matches tests/morphing_reference.py).

  Args:
    tokens: f32/bf16 [B, N, D] teacher tokens; no gradient flows through the grouping.
    num_merge: int32 [B] (or a scalar), tokens to remove, in [0, N]. 0 leaves every token in its own group.
    num_iters: int32 [B] (or a scalar), merging rounds k, in [1, max_iters].
    max_iters: static bound on the rounds; rounds past it are not run.
    protect_first: faithful mode (a bool, may be traced). The first slot can never be merged away (an artefact of
      the released code, which treats it like a class token) and unmerged A slots keep their positional order. With
      False every slot can merge and unmerged A slots stay in descending-score order, as the released code leaves
      them.
    implementation: how the rounds run (speed only; the partitions agree up to float summation order, exactly on
      exact inputs). "cpu_kernel": a native kernel that morphs each image in cache-resident memory, images spread
      over XLA's CPU threads (dtm_jax.kernels; built on first use, CPU only). The XLA versions update the slot Gram
      matrix of a round's merges either "pairwise", one source's row and column at a time (O(r·N) per round), or
      by "scatter", the whole round in one scatter-add (O(N²) but one parallel op). "matmul" holds the slot Gram
      matrix by slot position and does a round's merges and reordering as two batched matmuls with a 0/1 matrix,
      with no scatter anywhere (TPUs run scatters nearly serially, GPUs with non-deterministic atomics). "auto":
      cpu_kernel on CPUs (pairwise if it cannot be built), matmul elsewhere.

  Returns:
    int32 [B, N] group ids in [0, number of groups): tokens with equal ids form one group; the id is the final slot
    position, so ids are contiguous.
  """
  return morph_schedules(tokens, [num_merge], [num_iters], max_iters=max_iters, protect_first=protect_first,
                         implementation=implementation)[0]


def morph_schedules(tokens, num_merge, num_iters, *, max_iters=14, protect_first=True, implementation="auto"):
  """`morph` for each of L schedules: num_merge/num_iters int32 [L, B] → group ids int32 [L, B, N].

  The token Gram matrix is computed once for all schedules. The CPU kernel morphs all L·B image-schedules in one
  call; the XLA versions run the schedules one after the other (L is static) so that each stops after its own
  rounds (a vmap over schedules would run every schedule for as many rounds as the longest).
  """
  if tokens.ndim != 3:
    raise ValueError(f"morph expects tokens of shape [batch, tokens, dim]; got shape {tokens.shape}.")
  gram, protected = token_gram(tokens), jnp.asarray(protect_first, jnp.int32)
  schedules = [_schedule_arrays(tokens.shape[0], merge, iters) for merge, iters in zip(num_merge, num_iters)]
  implementation = _resolve_implementation(implementation)
  if implementation == "cpu_kernel":
    return kernels.morph_gram(gram, jnp.stack([merge for merge, _ in schedules]),
                              jnp.stack([iters for _, iters in schedules]), protected, max_iters=max_iters)
  if implementation == "matmul":
    return jnp.stack([_morph_gram_matmul(gram, merge, iters, protected, max_iters=max_iters)
                      for merge, iters in schedules])
  return jnp.stack([_morph_gram(gram, merge, iters, protected, max_iters=max_iters, gram_update=implementation)
                    for merge, iters in schedules])


def token_gram(tokens):
  """Inner products of every pair of an image's tokens: [B, N, D] → float32 [B, N, N], full float32 precision.

  The only pass over the features that morphing makes; on accelerators it is one well-shaped matmul at HIGHEST
  precision (no TF32/bf16 passes). XLA:CPU computes float32 dots exactly at any precision but runs HIGHEST through
  a slower routine, and a loop over blocks of 8 images beats its batched dot by ~25% at the default shapes
  (benchmarks/morphing.py), so CPUs get that unless the batch is explicitly sharded (the blocks would cut across
  shards).
  """
  x = lax.stop_gradient(tokens).astype(jnp.float32)
  if not platform.current().is_cpu:
    return jnp.einsum("bnd,bmd->bnm", x, x, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  batch, num_tokens, dim = x.shape
  if any(axis is not None for axis in jax.typeof(x).sharding.spec):
    return jnp.einsum("bnd,bmd->bnm", x, x)
  block = math.gcd(batch, _CPU_GRAM_BLOCK)
  blocks = x.reshape(batch // block, block, num_tokens, dim)
  return lax.map(lambda b: jnp.einsum("bnd,bmd->bnm", b, b), blocks).reshape(batch, num_tokens, num_tokens)


def _schedule_arrays(batch, num_merge, num_iters):
  """num_merge, num_iters as int32 [B] whatever the callers pass (Python ints, int64, bool), so calls share one
  compilation."""
  return (jnp.broadcast_to(jnp.asarray(num_merge, jnp.int32), (batch,)),
          jnp.broadcast_to(jnp.asarray(num_iters, jnp.int32), (batch,)))


def _resolve_implementation(name):
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={name!r} is not one of {IMPLEMENTATIONS}.")
  if name == "auto":
    if not platform.current().is_cpu:
      return "matmul"
    return "cpu_kernel" if kernels.available() else "pairwise"
  if name == "cpu_kernel":
    kernels.require()
  return name


@functools.partial(jax.jit, static_argnames=("max_iters", "gram_update"))
def _morph_gram(gram, num_merge, num_iters, protected, *, max_iters, gram_update):
  """Morphing from the token Gram matrix f32 [B, N, N]: num_merge, num_iters int32 [B], protected int32 []."""
  batch, num_tokens, _ = gram.shape
  per_round = merges_per_round(num_merge, num_iters, num_tokens)
  identity = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32), (batch, num_tokens))
  slots = _Slots(gram=gram, sizes=jnp.ones((batch, num_tokens), jnp.float32), order=identity, parent=identity,
                 count=jnp.full((batch,), num_tokens, jnp.int32), rounds=jnp.zeros((batch,), jnp.int32))
  slots = jax.tree.map(lambda x: sharding.varying_like(x, gram), slots)  # one loop-state type under shard_map

  merge_round = lambda s, active, capacity: _merge_round(s, active, per_round, protected, capacity, gram_update)
  slots = _run_rounds(slots, merge_round, per_round, num_iters, protected, max_iters=max_iters)
  return _group_ids(slots, max_iters)


@functools.partial(jax.jit, static_argnames=("max_iters",))
def _morph_gram_matmul(gram, num_merge, num_iters, protected, *, max_iters):
  """`_morph_gram` without scatters (implementation "matmul"): the slot state is held by slot *position*.

  A round moves every slot at position i to position dest(i) of the new order (a source to its partner's), so the
  new slot Gram matrix and sizes are Pᵀ·G·P and Pᵀ·sizes for the 0/1 matrix P[i, dest(i)] = 1 (see
  _merge_round_matmul), and every token's group is its slot's position, carried along by the same map.
  """
  batch, num_tokens, _ = gram.shape
  per_round = merges_per_round(num_merge, num_iters, num_tokens)
  slots = _SlotsByPosition(
      gram=gram, sizes=jnp.ones((batch, num_tokens), jnp.float32),
      labels=jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32), (batch, num_tokens)),
      count=jnp.full((batch,), num_tokens, jnp.int32), rounds=jnp.zeros((batch,), jnp.int32))
  slots = jax.tree.map(lambda x: sharding.varying_like(x, gram), slots)  # one loop-state type under shard_map

  merge_round = lambda s, active, capacity: _merge_round_matmul(s, active, per_round, protected, capacity)
  return _run_rounds(slots, merge_round, per_round, num_iters, protected, max_iters=max_iters).labels


def _run_rounds(slots, merge_round, per_round, num_iters, protected, *, max_iters):
  """Runs `merge_round(slots, active, capacity)` until no image has a round left (an image whose schedule is done
  sits the remaining rounds out), through the static slot capacities of _slot_capacities. `slots` is a _Slots or a
  _SlotsByPosition (both have `count` and `rounds`)."""
  capacities = _slot_capacities(slots.sizes.shape[1])
  for capacity, next_capacity in zip(capacities, capacities[1:] + [0]):

    def needs_round(s, next_capacity=next_capacity):
      merges = jnp.minimum(per_round, (s.count - protected) // 2)
      return (s.rounds < num_iters) & (s.rounds < max_iters) & (merges > 0) & (s.count > next_capacity)

    def one_round(s, capacity=capacity):
      return merge_round(s, needs_round(s), capacity)

    slots = lax.while_loop(lambda s: jnp.any(needs_round(s)), one_round, slots)
  return slots


class _SlotsByPosition(NamedTuple):
  """Morphing state of a batch of images for the "matmul" rounds: everything indexed by current slot position.

  Positions from `count` on hold no slot: their Gram rows and columns and sizes are zero.
  """
  gram: jax.Array     # f32 [B, N, N]: inner products of the slots' feature sums, by position
  sizes: jax.Array    # f32 [B, N]: number of member tokens, by position
  labels: jax.Array   # int32 [B, N]: the position of every token's slot
  count: jax.Array    # int32 [B]: number of slots
  rounds: jax.Array   # int32 [B]: rounds done


def _merge_round_matmul(slots, active, per_round, protected, capacity):
  """One bipartite merging round of every `active` image (the others are kept) with matmuls and comparisons only.

  Active images have at most `capacity` slots, so only the leading capacity×capacity block is matched and
  rewritten. With P[i, p] = [dest(i) = p] (0/1, one 1 per row), the new Gram matrix Pᵀ·G·P is two batched matmuls
  at HIGHEST precision: each entry is a float32 sum of the old entries of the slots that meet there plus exact
  zeros, the same sums the scatter version forms (so exact inputs stay exact, and ties stay ties).
  """
  merges = jnp.where(active, jnp.minimum(per_round, (slots.count - protected) // 2), 0)
  gram, sizes = slots.gram[:, :capacity, :capacity], slots.sizes[:, :capacity]
  position = jnp.arange(capacity, dtype=jnp.int32)
  destination = jax.vmap(_destinations, in_axes=(0, 0, 0, 0, None))(gram, sizes, slots.count, merges, protected)
  destination = jnp.where(active[:, None], destination, position)
  moves = (destination[:, :, None] == position).astype(jnp.float32)  # P: [B, old position, new position]
  highest = dict(precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  merged = jnp.einsum("bpi,biq->bpq", jnp.einsum("bip,bij->bpj", moves, gram, **highest), moves, **highest)
  new_sizes = jnp.einsum("bip,bi->bp", moves, sizes, **highest)  # sums of at most N ones: exact
  # Each token's new position: its slot's destination, looked up by comparison (no gather, no scatter).
  labels = jnp.sum(jnp.where(slots.labels[:, :, None] == position, destination[:, None, :], 0), axis=2,
                   dtype=jnp.int32)
  return _SlotsByPosition(
      gram=lax.dynamic_update_slice(slots.gram, jnp.where(active[:, None, None], merged, gram), (0, 0, 0)),
      sizes=lax.dynamic_update_slice(slots.sizes, jnp.where(active[:, None], new_sizes, sizes), (0, 0)),
      labels=jnp.where(active[:, None], labels, slots.labels),
      count=slots.count - merges, rounds=slots.rounds + active)


def _destinations(gram, sizes, count, merges, protected):
  """Steps 2–7 for one image held by position: the new position of the slot at every position (a source's is its
  partner's); positions past `count` hold no slot and stay put."""
  capacity = gram.shape[0]
  similarity = _cosine_similarity_by_position(gram, jnp.maximum(sizes, 1.0))
  _, is_source, partner, unmerged_position, num_unmerged = _choose_sources(similarity, count, merges, protected)
  a_destination = jnp.where(is_source, num_unmerged + partner, unmerged_position)
  destination = _interleave(a_destination, num_unmerged + jnp.arange(similarity.shape[1]))
  position = jnp.arange(capacity)
  return jnp.where(position < count, destination, position).astype(jnp.int32)


def per_group_means(x, groups):
  """The mean of every group, indexed by group id: O(N·C) segment sums, accumulated in float32 (on accelerators
  O(N²·C) one-hot matmuls instead, which need no scatter in the program or its gradient).

  Args:
    x: [B, N, C] token features.
    groups: int32 [B, N] group ids in [0, N) (others are clipped), or [L, B, N]: L partitions of the same tokens.

  Returns:
    (means f32 groups.shape + [C], sizes f32 groups.shape): row g holds group g's mean and size; unused ids have
    zeros.
  """
  ids = _valid_ids(groups)
  if not _uses_one_hot():
    sizes = _segment_sum(jnp.ones(ids.shape, jnp.float32), ids)
    return _group_sums(x.astype(jnp.float32), ids) / jnp.maximum(sizes, 1.0)[..., None], sizes
  sizes = jnp.sum(_one_hot(ids), axis=-2, dtype=jnp.float32)
  means = _group_sums(x.astype(jnp.float32), ids) / jnp.maximum(sizes, 1.0)[..., None]
  # The rows of unused ids are zeros either way, but the select also drops their cotangents: a matmul's transpose,
  # unlike a scatter's (a gather of the used rows), would spread a NaN there (a cosine loss at a zero mean) to all.
  return jnp.where(sizes[..., None] > 0, means, 0.0), sizes


def _group_sums(x, ids):
  """Sums of x [B, N, C] per id for ids [..., B, N] in [0, N): the CPU kernel where it runs, a one-hot matmul where
  morphing runs as matmuls (accelerators), else one scatter-add."""
  batch, num_tokens, channels = x.shape
  partitions = ids.reshape(-1, batch, num_tokens)
  implementation = _resolve_implementation("auto")
  if implementation == "cpu_kernel":
    sums = kernels.group_sums(x, partitions)
  elif implementation == "matmul":
    # Each sum is a float32 sum of its members and exact zeros; the gradient is the transposed matmul.
    sums = jnp.einsum("lbng,bnc->lbgc", _one_hot(partitions).astype(jnp.float32), x,
                      precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  else:
    sums = _segment_sum(jnp.broadcast_to(x, partitions.shape + (channels,)), partitions)
  return sums.reshape(ids.shape + (channels,))


def group_mean(x, groups):
  """Replaces every token of x [B, N, C] by the mean of its group (groups int32 [B, N]); returns x's dtype."""
  means, _ = per_group_means(x, groups)
  ids = _valid_ids(groups)
  if _uses_one_hot():  # a gather's gradient is a scatter
    return jnp.einsum("...ng,...gc->...nc", _one_hot(ids).astype(jnp.float32), means,
                      precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32).astype(x.dtype)
  return jnp.take_along_axis(means, ids[..., None], axis=-2).astype(x.dtype)


def num_groups(groups):
  """Realised number of groups per image (for logging): groups int32 [B, N] → int32 [B]."""
  ids = _valid_ids(groups)
  if _uses_one_hot():
    present = jnp.any(_one_hot(ids), axis=-2)
  else:
    present = _segment_sum(jnp.ones(groups.shape, jnp.int32), ids) > 0
  return jnp.sum(present, axis=1, dtype=jnp.int32)


def _uses_one_hot():
  """Whether group sums, sizes and counts are one-hot contractions (where morphing runs as matmuls: no scatters)."""
  return _resolve_implementation("auto") == "matmul"


def _one_hot(ids):
  """bool [..., N, N]: [n, g] is whether token n is in group g, for ids [..., N] in [0, N)."""
  return ids[..., :, None] == jnp.arange(ids.shape[-1], dtype=ids.dtype)


def _valid_ids(ids):
  """Group ids clipped to [0, N), which keeps the unchecked scatters of _segment_sum in bounds."""
  return jnp.clip(ids, 0, ids.shape[-1] - 1)


def _segment_sum(values, ids):
  """Sums the rows of values [..., N, ...] that share an id (int32 [..., N], in [0, N)) into row `id`, per leading
  index (image, or partition and image).

  One unchecked scatter-add over the flattened leading dimensions: XLA's bounds-checked scatter, and a vmapped
  (batched) one, are several times slower on CPU.
  """
  num_tokens, rows = ids.shape[-1], ids.size // ids.shape[-1]
  flat_ids = (jnp.arange(rows, dtype=jnp.int32)[:, None] * num_tokens + ids.reshape(rows, num_tokens)).reshape(-1)
  flat_values = values.reshape((ids.size,) + values.shape[ids.ndim:])
  return jnp.zeros_like(flat_values).at[flat_ids].add(flat_values, mode="promise_in_bounds").reshape(values.shape)


class _Slots(NamedTuple):
  """Morphing state of a batch of images.

  A slot is named by an id, the original token it started from; ids of slots merged away are dead. The Gram matrix
  and sizes are indexed by id, so a merge only touches the rows and columns of the two slots involved.
  """
  gram: jax.Array     # f32 [B, N, N]: inner products of the slots' feature sums, by id
  sizes: jax.Array    # f32 [B, N]: number of member tokens, by id
  order: jax.Array    # int32 [B, N]: the ids of the current slots, in slot order (first `count` valid)
  parent: jax.Array   # int32 [B, N]: the id a slot was merged into (its own id while alive)
  count: jax.Array    # int32 [B]: number of slots
  rounds: jax.Array   # int32 [B]: rounds done


def _slot_capacities(num_tokens):
  """Static slot-array sizes the morphing steps down through as slots merge away: N, ¾N, ½N.

  Over the default schedule draw (N = 196) this cuts the similarity work by ~20% (a ¼N step would add ~1%) and each
  step adds a copy of the round to the compiled program.
  """
  capacities = [-(-num_tokens * quarters // 4) for quarters in (4, 3, 2)]
  return sorted({c for c in capacities if c >= 2}, reverse=True)


def _merge_round(slots, active, per_round, protected, capacity, gram_update):
  """One bipartite merging round (docs/METHOD.md §3 steps 1–7) of every image that is `active`; the others are kept.

  Active images have at most `capacity` slots, so only that prefix of the order is matched and rewritten.
  """
  merges = jnp.where(active, jnp.minimum(per_round, (slots.count - protected) // 2), 0)
  current_order = slots.order[:, :capacity]
  new_order, sources, partners = jax.vmap(_match, in_axes=(0, 0, 0, 0, 0, None))(
      slots.gram, slots.sizes, current_order, slots.count, merges, protected)
  order = slots.order.at[:, :capacity].set(jnp.where(active[:, None], new_order, current_order))
  merging = jnp.arange(sources.shape[1]) < merges[:, None]  # [B, A]: the first `merges` sources merge
  merge_gram = _merge_gram_pairwise if gram_update == "pairwise" else _merge_gram_scatter
  gram = merge_gram(slots.gram, sources, partners, merges)
  batch = jnp.arange(sources.shape[0])[:, None]
  dead = slots.sizes.shape[1]  # an out-of-range id: updates sent there are dropped
  sizes = slots.sizes.at[batch, jnp.where(merging, partners, dead)].add(
      jnp.take_along_axis(slots.sizes, sources, axis=1), mode="drop")
  parent = slots.parent.at[batch, jnp.where(merging, sources, dead)].set(partners, mode="drop")
  return _Slots(gram=gram, sizes=sizes, order=order, parent=parent,
                count=slots.count - merges, rounds=slots.rounds + active)


def _match(gram, sizes, order, count, merges, protected):
  """Steps 2–7 for one image: (new slot order, A-slot ids by descending best score, the id of each one's partner).

  The first `merges` entries of the last two are the round's sources and their partners.
  """
  capacity = order.shape[0]
  a_ids, b_ids = order[0::2], order[1::2]

  # Steps 2–4: alternate split, cosine similarity of the slot means.
  similarity = _cosine_similarity_of_means(gram, jnp.maximum(sizes, 1.0), a_ids, b_ids)
  num_a, num_b = similarity.shape
  a_position, b_position = jnp.arange(num_a), jnp.arange(num_b)
  rank, is_source, partner, unmerged_position, num_unmerged = _choose_sources(similarity, count, merges, protected)

  # Step 7: new order [unmerged A, B]; sources leave the order. Positions past `count` hold no slot and stay put.
  destination = _interleave(jnp.where(is_source, capacity, unmerged_position), num_unmerged + b_position)
  position = jnp.arange(capacity)
  destination = jnp.where(position < count, destination, position)
  new_order = order.at[destination].set(order, mode="drop")

  by_rank = jnp.zeros_like(rank).at[rank].set(a_position)  # A positions in descending-score order
  return new_order, a_ids[by_rank], b_ids[partner[by_rank]]


def _choose_sources(similarity, count, merges, protected):
  """Steps 4–5 and the unmerged slots' order of step 7, from the A×B similarities [ceil(C/2), floor(C/2)] of one
  image's (first C) slots: (rank of every A slot by best score, is_source, partner B position, new position of an
  unmerged A slot, number of unmerged A slots)."""
  num_a, num_b = similarity.shape
  a_position, b_position = jnp.arange(num_a), jnp.arange(num_b)
  similarity = jnp.where(b_position[None, :] < count // 2, similarity, -jnp.inf)
  best = jnp.max(similarity, axis=1)
  partner = jnp.min(jnp.where(similarity == best[:, None], b_position[None, :], num_b), axis=1)  # first maximum
  partner = jnp.minimum(partner, num_b - 1)  # rows that are all -inf or NaN: any in-range partner (never a source)
  may_merge = (a_position < (count + 1) // 2) & (a_position >= protected)
  best = jnp.where(may_merge, best, -jnp.inf)

  # Step 5: the `merges` best-matched A slots are sources.
  rank = _stable_descending_rank(best)
  is_source = rank < merges

  # Step 7: unmerged A slots come first in the new order, by position (protected) or by score.
  num_unmerged = (count + 1) // 2 - merges
  unmerged_position = jnp.where(protected > 0, jnp.cumsum(~is_source) - 1, rank - merges)
  return rank, is_source, partner, unmerged_position, num_unmerged


def _merge_gram_pairwise(gram, sources, partners, merges):
  """Merges source j into partner j for j < merges, one pair at a time: adds its row, then its column.

  Adding a slot's row and column to another's gives exactly the Gram matrix of the merged sums, so sources that
  share a partner simply follow one another. The loop runs max(merges) times over the batch; an image with fewer
  merges adds zeros. Each step touches 2·N entries per image, so a round costs O(r·N), not O(N²).
  """
  batch = jnp.arange(gram.shape[0])

  def merge_one(j, gram):
    source, partner, merging = sources[:, j], partners[:, j], (j < merges)[:, None]
    # One row (then column) per image, so the indices are unique: a plain in-place write, ~30% faster on CPU than
    # an accumulating scatter-add.
    row = gram[batch, partner] + jnp.where(merging, gram[batch, source], 0.0)
    gram = gram.at[batch, partner].set(row, mode="promise_in_bounds", unique_indices=True)
    column = gram[batch, :, partner] + jnp.where(merging, gram[batch, :, source], 0.0)
    return gram.at[batch, :, partner].set(column, mode="promise_in_bounds", unique_indices=True)

  return lax.fori_loop(0, jnp.max(merges), merge_one, gram)


def _merge_gram_scatter(gram, sources, partners, merges):
  """Merges every source j < merges into partner j at once: the Gram matrix summed over rows and columns that share
  a destination, one scatter-add of the N² entries per image (dead ids and non-sources map to themselves)."""
  batch, num_tokens, _ = gram.shape
  merging = jnp.arange(sources.shape[1]) < merges[:, None]
  image = jnp.arange(batch, dtype=jnp.int32)[:, None]
  destination = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32), (batch, num_tokens)).at[
      image, jnp.where(merging, sources, num_tokens)].set(partners, mode="drop")
  row = image * num_tokens + destination
  pair = (row[:, :, None] * num_tokens + destination[:, None, :]).reshape(-1)
  return jnp.zeros((gram.size,), gram.dtype).at[pair].add(gram.reshape(-1), mode="promise_in_bounds").reshape(
      gram.shape)


def _group_ids(slots, max_iters):
  """Group id of every token: the final position of the slot its own slot was (transitively) merged into.

  A slot is merged away at most once and only into a slot alive in that round, so following `parent` ends at a
  live slot within max_iters links; pointer doubling gets there in ⌈log2(max_iters)⌉ gathers.
  """
  root = slots.parent
  for _ in range((max_iters - 1).bit_length()):
    root = jnp.take_along_axis(root, root, axis=1)
  batch, num_tokens = root.shape
  live = jnp.arange(num_tokens)[None, :] < slots.count[:, None]
  position = jnp.zeros((batch, num_tokens), jnp.int32).at[
      jnp.arange(batch)[:, None], jnp.where(live, slots.order, num_tokens)].set(
          jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32), (batch, num_tokens)), mode="drop")
  return jnp.take_along_axis(position, root, axis=1)


def _interleave(even, odd):
  """[even[0], odd[0], even[1], odd[1], ...]; even may be one longer than odd."""
  pairs = jnp.stack([even[:odd.shape[0]], odd], axis=1).reshape(-1)
  return jnp.concatenate([pairs, even[odd.shape[0]:]])


def _cosine_similarity_of_means(gram, sizes, a_ids, b_ids):
  """Cosine similarities [len(a_ids), len(b_ids)] between slots, from the Gram matrix of their sums (by id).

  Sums are first divided by the sizes — mean·mean = sumᵢ·sumⱼ / (nᵢ·nⱼ) — with a true division: XLA would turn
  `x / broadcast(n)` into the inexact `x * (1 / n)`, which the barrier prevents. Slots of k equal tokens then have
  exactly the inner products of one such token (given exact sums), and equal groups tie exactly, as in PyTorch.
  An all-zero slot has similarity 0 with everything.
  """
  squared_norms = jnp.diagonal(gram) / lax.optimization_barrier(sizes * sizes)
  inverse_norms = lax.rsqrt(jnp.maximum(squared_norms, _MIN_SQUARED_NORM))
  a_sizes, b_sizes = sizes[a_ids], sizes[b_ids]
  dots = gram[a_ids[:, None], b_ids[None, :]] / lax.optimization_barrier(a_sizes[:, None] * b_sizes[None, :])
  return dots * inverse_norms[a_ids][:, None] * inverse_norms[b_ids][None, :]


def _cosine_similarity_by_position(gram, sizes):
  """`_cosine_similarity_of_means` of the A (even) and B (odd) slots of a Gram matrix held by slot position, with
  the same float operations; the diagonal is taken by a mask, not a gather."""
  diagonal = jnp.sum(jnp.where(jnp.eye(gram.shape[0], dtype=bool), gram, 0.0), axis=1)
  squared_norms = diagonal / lax.optimization_barrier(sizes * sizes)
  inverse_norms = lax.rsqrt(jnp.maximum(squared_norms, _MIN_SQUARED_NORM))
  a_sizes, b_sizes = sizes[0::2], sizes[1::2]
  dots = gram[0::2, 1::2] / lax.optimization_barrier(a_sizes[:, None] * b_sizes[None, :])
  return dots * inverse_norms[0::2][:, None] * inverse_norms[1::2][None, :]


def _stable_descending_rank(scores):
  """Position of each score in a stable descending sort: higher scores first, equal scores in index order."""
  other, this = scores[None, :], scores[:, None]
  earlier = jnp.arange(scores.shape[0])[None, :] < jnp.arange(scores.shape[0])[:, None]
  return jnp.sum((other > this) | ((other == this) & earlier), axis=1, dtype=jnp.int32)
