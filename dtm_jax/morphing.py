"""Dynamic token morphing: random schedules, bipartite token grouping and group means (DTM_SPEC §2.4, §3).

Morphing groups contextually similar teacher tokens by repeated bipartite matching (ToMe). Everything here has fixed
shapes, so any mix of schedules runs through one compiled program inside the jitted training step:

  * the slots of one image live in an array of fixed capacity; the first `count` entries are the current ordered
    slots, each kept as the *sum* of its members' features and its size (sums merge by plain addition and stay exact
    on coarse inputs, so equal groups give bit-identical similarities and ties stay ties);
  * `lax.while_loop` runs rounds until no image has one left; an image whose schedule is done sits the remaining
    rounds out unchanged;
  * the merge of a round is a slot→slot map applied by segment sums, and an original-token→slot label array follows
    the merges, so the output is the group id of every token.

To save work, the slot array shrinks in static steps (N, ¾N, ½N) as the slots merge away; this changes no result,
only the size of the similarity matrices.
"""
import functools
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp

# Smallest squared norm used when normalising: an all-zero feature gets cosine similarity 0 with everything.
_MIN_SQUARED_NORM = 1e-24


def sample_schedules(rng, batch_size, num_schedules=2, max_merge=196, max_iters=14, per_image=False):
  """Draws the random morphing schedules of one step (DTM_SPEC §2.4).

  num_merge ~ U{0..max_merge} (tokens to remove) and num_iters ~ U{1..max_iters} (rounds), inclusive bounds. The
  released code draws one schedule per step and shares it over the batch (per_image=False); per_image=True draws one
  per image. Set max_merge to the number of tokens when it is not 196.

  Returns:
    (num_merge, num_iters), each int32 [num_schedules, batch_size].
  """
  if max_merge < 0 or max_iters < 1:
    raise ValueError(f"Need max_merge >= 0 and max_iters >= 1; got max_merge={max_merge}, max_iters={max_iters}.")
  merge_rng, iters_rng = jax.random.split(rng)
  draw_shape = (num_schedules, batch_size if per_image else 1)
  num_merge = jax.random.randint(merge_rng, draw_shape, 0, max_merge + 1, dtype=jnp.int32)
  num_iters = jax.random.randint(iters_rng, draw_shape, 1, max_iters + 1, dtype=jnp.int32)
  shape = (num_schedules, batch_size)
  return jnp.broadcast_to(num_merge, shape), jnp.broadcast_to(num_iters, shape)


def merges_per_round(num_merge, num_iters, num_tokens):
  """Tokens merged away per round, r, as the released code computes it (DTM_SPEC §2.4).

  r = ceil(num_merge / num_iters), or floor(num_merge / num_iters) when r·num_iters would exceed num_tokens. Every
  round then merges min(r, (slots - protected) // 2), so a schedule may realise fewer merges than it asks for.
  Works elementwise on integer arrays (numpy or jax) and returns int32.
  """
  num_merge = jnp.asarray(num_merge, jnp.int32)
  num_iters = jnp.maximum(jnp.asarray(num_iters, jnp.int32), 1)
  ceil = -(-num_merge // num_iters)
  return jnp.where(ceil * num_iters > num_tokens, num_merge // num_iters, ceil)


def morph(tokens, num_merge, num_iters, *, max_iters=14, protect_first=True):
  """Groups similar tokens by iterated bipartite soft matching, exactly as DTM_SPEC §3 describes.

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

  Returns:
    int32 [B, N] group ids in [0, number of groups): tokens with equal ids form one group; the id is the final slot
    position, so ids are contiguous.
  """
  if tokens.ndim != 3:
    raise ValueError(f"morph expects tokens of shape [batch, tokens, dim]; got shape {tokens.shape}.")
  batch = tokens.shape[0]
  # One signature whatever the callers pass (Python ints, int64, bool), so eager calls share one compilation.
  return _morph(tokens, jnp.broadcast_to(jnp.asarray(num_merge, jnp.int32), (batch,)),
                jnp.broadcast_to(jnp.asarray(num_iters, jnp.int32), (batch,)), jnp.asarray(protect_first, jnp.int32),
                max_iters=max_iters)


@functools.partial(jax.jit, static_argnames="max_iters")
def _morph(tokens, num_merge, num_iters, protected, *, max_iters):
  """morph with normalised arguments: num_merge, num_iters int32 [B], protected int32 [] (1 or 0)."""
  batch, num_tokens, _ = tokens.shape
  per_round = merges_per_round(num_merge, num_iters, num_tokens)
  slots = _Slots(sums=lax.stop_gradient(tokens).astype(jnp.float32), sizes=jnp.ones((batch, num_tokens), jnp.float32),
                 labels=jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32), (batch, num_tokens)),
                 count=jnp.full((batch,), num_tokens, jnp.int32), rounds=jnp.zeros((batch,), jnp.int32))
  merge_round = jax.vmap(_merge_round, in_axes=(0, 0, 0, None))

  capacities = _slot_capacities(num_tokens)
  for capacity, next_capacity in zip(capacities, capacities[1:] + [0]):
    slots = slots._replace(sums=slots.sums[:, :capacity], sizes=slots.sizes[:, :capacity])

    def needs_round(s, next_capacity=next_capacity):
      merges = jnp.minimum(per_round, (s.count - protected) // 2)
      return (s.rounds < num_iters) & (s.rounds < max_iters) & (merges > 0) & (s.count > next_capacity)

    slots = lax.while_loop(lambda s: jnp.any(needs_round(s)),
                           lambda s: merge_round(s, needs_round(s), per_round, protected), slots)
  return slots.labels


def morph_schedules(tokens, num_merge, num_iters, *, max_iters=14, protect_first=True):
  """`morph` for each of L schedules: num_merge/num_iters int32 [L, B] → group ids int32 [L, B, N].

  Schedules run one after the other (L is static) so that each stops after its own rounds; a vmap over schedules
  would run every schedule for as many rounds as the longest one.
  """
  return jnp.stack([
      morph(tokens, merge, iters, max_iters=max_iters, protect_first=protect_first)
      for merge, iters in zip(num_merge, num_iters)])


def per_group_means(x, groups):
  """The mean of every group, indexed by group id: O(N·C) segment sums, accumulated in float32.

  Args:
    x: [B, N, C] token features.
    groups: int32 [B, N] group ids in [0, N) (others are clipped).

  Returns:
    (means f32 [B, N, C], sizes f32 [B, N]): row g holds group g's mean and size; unused ids have zeros.
  """
  def one_image(features, ids):
    ids = _valid_ids(ids)
    sizes = _segment_sum(jnp.ones(ids.shape, jnp.float32), ids)
    return _segment_sum(features.astype(jnp.float32), ids) / jnp.maximum(sizes, 1.0)[:, None], sizes
  return jax.vmap(one_image)(x, groups)


def group_mean(x, groups):
  """Replaces every token of x [B, N, C] by the mean of its group (groups int32 [B, N]); returns x's dtype."""
  means, _ = per_group_means(x, groups)
  return jax.vmap(lambda m, ids: m[_valid_ids(ids)])(means, groups).astype(x.dtype)


def num_groups(groups):
  """Realised number of groups per image (for logging): groups int32 [B, N] → int32 [B]."""
  def one_image(ids):
    return jnp.sum(_segment_sum(jnp.ones(ids.shape, jnp.int32), _valid_ids(ids)) > 0, dtype=jnp.int32)
  return jax.vmap(one_image)(groups)


def _valid_ids(ids):
  """Group ids clipped to [0, N), which keeps the unchecked scatters of _segment_sum in bounds."""
  return jnp.clip(ids, 0, ids.shape[0] - 1)


def _segment_sum(values, ids):
  """Sums the rows of values [N, ...] that share an id into row `id`; ids must lie in [0, N).

  An unchecked scatter-add: XLA's bounds-checked scatter is several times slower on CPU.
  """
  return jnp.zeros_like(values).at[ids].add(values, mode="promise_in_bounds")


class _Slots(NamedTuple):
  """Morphing state of one image (_morph carries a batch of them). Positions >= count hold no slot."""
  sums: jax.Array     # f32 [capacity, D]: sum of the member tokens of each slot, in the current slot order
  sizes: jax.Array    # f32 [capacity]: number of member tokens
  labels: jax.Array   # int32 [N]: current slot position of every original token
  count: jax.Array    # int32 []: number of slots
  rounds: jax.Array   # int32 []: rounds done


def _slot_capacities(num_tokens):
  """Static slot-array sizes the morphing steps down through as slots merge away: N, ¾N, ½N.

  Over the default schedule draw (N = 196) this cuts the similarity work by ~20% (a ¼N step would add ~1%) and each
  step adds a copy of the round to the compiled program.
  """
  capacities = [-(-num_tokens * quarters // 4) for quarters in (4, 3, 2)]
  return sorted({c for c in capacities if c >= 2}, reverse=True)


def _merge_round(slots, active, per_round, protected):
  """One bipartite merging round of one image (DTM_SPEC §3 steps 1–7); changes nothing unless `active`."""
  capacity = slots.sizes.shape[0]
  merges = jnp.where(active, jnp.minimum(per_round, (slots.count - protected) // 2), 0)

  # Steps 2–4: alternate split, cosine similarity of the slot means, best B partner of every A slot.
  # XLA turns `x / broadcast(n)` into `x * (1 / n)`, which is inexact; the barrier keeps a true division, so that a
  # slot of k equal tokens has exactly their feature as its mean and equal groups tie exactly (as in PyTorch).
  sizes = lax.optimization_barrier(jnp.broadcast_to(jnp.maximum(slots.sizes, 1.0)[:, None], slots.sums.shape))
  means = slots.sums / sizes
  similarity = _cosine_similarity(means[0::2], means[1::2])
  num_a, num_b = similarity.shape
  a_position, b_position = jnp.arange(num_a), jnp.arange(num_b)
  similarity = jnp.where(b_position[None, :] < slots.count // 2, similarity, -jnp.inf)
  best, partner = jnp.max(similarity, axis=1), jnp.argmax(similarity, axis=1)
  may_merge = (a_position < (slots.count + 1) // 2) & (a_position >= protected)
  best = jnp.where(may_merge, best, -jnp.inf)

  # Step 5: the `merges` best-matched A slots are sources.
  rank = _stable_descending_rank(best)
  is_source = rank < merges

  # Steps 6–7: new order [unmerged A, B]; sources land on their partner.
  num_unmerged = (slots.count + 1) // 2 - merges
  unmerged_position = jnp.where(protected > 0, jnp.cumsum(~is_source) - 1, rank - merges)
  destination = _interleave(jnp.where(is_source, num_unmerged + partner, unmerged_position),
                            num_unmerged + b_position)
  position = jnp.arange(capacity)
  destination = jnp.where(active & (position < slots.count), destination, position)  # else nothing moves

  # Destinations are in [0, capacity) by construction. An image that is done keeps its labels: they may point past
  # a later, smaller capacity (its sums are then cut short, but nothing reads them again).
  return _Slots(sums=_segment_sum(slots.sums, destination), sizes=_segment_sum(slots.sizes, destination),
                labels=jnp.where(active, destination[slots.labels], slots.labels), count=slots.count - merges,
                rounds=slots.rounds + active)


def _interleave(even, odd):
  """[even[0], odd[0], even[1], odd[1], ...]; even may be one longer than odd."""
  pairs = jnp.stack([even[:odd.shape[0]], odd], axis=1).reshape(-1)
  return jnp.concatenate([pairs, even[odd.shape[0]:]])


def _cosine_similarity(a, b):
  """[n, D] × [m, D] → [n, m] cosine similarities in full float32 (also on TPU/GPU, whose default is lower).

  The dot products come first and the norms scale the small result, which saves a pass over the features.
  """
  def inverse_norm(x):
    return lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1), _MIN_SQUARED_NORM))
  dots = jnp.einsum("nd,md->nm", a, b, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
  return dots * inverse_norm(a)[:, None] * inverse_norm(b)[None, :]


def _stable_descending_rank(scores):
  """Position of each score in a stable descending sort: higher scores first, equal scores in index order."""
  other, this = scores[None, :], scores[:, None]
  earlier = jnp.arange(scores.shape[0])[None, :] < jnp.arange(scores.shape[0])[:, None]
  return jnp.sum((other > this) | ((other == this) & earlier), axis=1, dtype=jnp.int32)
