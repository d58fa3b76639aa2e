"""Plain-Python reference for DTM token morphing and the DTM loss, written straight from docs/METHOD.md §2.5 and §3.

Lists and loops, one slot object per group, numpy only for vector arithmetic. It is slow and meant to be obviously
right: the tests hold dtm_jax.morphing and dtm_jax.losses to it. Ties are broken as documented in
dtm_jax.morphing.morph: first maximum for the partner, stable descending sort for the sources.
"""
import math

import numpy as np


def merges_per_round(num_merge, num_iters, num_tokens):
  """r = ceil(num_merge / num_iters), or the floor when r · num_iters > num_tokens."""
  r = math.ceil(num_merge / num_iters)
  if r * num_iters > num_tokens:
    r = num_merge // num_iters
  return r


class Slot:
  """A group of original tokens: the sum of their features, their count and their indices."""

  def __init__(self, feature_sum, size, members):
    self.feature_sum = feature_sum
    self.size = size
    self.members = members

  def mean(self):
    return self.feature_sum / self.size

  def absorb(self, other):
    """Merges `other` into this slot; the mean becomes the size-weighted mean of both."""
    return Slot(self.feature_sum + other.feature_sum, self.size + other.size, self.members + other.members)


def unit(v):
  """v scaled to norm 1; an all-zero vector stays zero (so it is similar to nothing)."""
  return v / max(float(np.linalg.norm(v)), 1e-12)


def cosine_similarity(u, v):
  return float(np.dot(unit(u), unit(v)))


def merge_round(slots, r, protected):
  """One round of bipartite matching.

  Returns the new ordered list of slots and the round's margin: the smallest gap between two *different* scores
  whose order decided the result (a partner choice, the source cut-off, or with protected=0 the order of the
  unmerged slots); math.inf when nothing was close. Exactly equal scores are ties, broken by position.
  """
  merges = min(r, (len(slots) - protected) // 2)
  if merges <= 0:
    return slots, math.inf
  a_slots, b_slots = slots[0::2], slots[1::2]

  b_units = [unit(b.mean()) for b in b_slots]
  best_scores, partners, partner_margins = [], [], []
  for i, a in enumerate(a_slots):
    if i < protected:
      best_scores.append(-math.inf)
      partners.append(0)
      partner_margins.append(math.inf)
      continue
    a_unit = unit(a.mean())
    scores = [float(np.dot(a_unit, b_unit)) for b_unit in b_units]  # cosine similarities
    best = max(scores)
    best_scores.append(best)
    partners.append(scores.index(best))  # first maximum
    partner_margins.append(min([best - s for s in scores if s != best], default=math.inf))

  by_score = sorted(range(len(a_slots)), key=lambda i: -best_scores[i])  # Python's sort is stable
  sources, unmerged = by_score[:merges], by_score[merges:]

  new_b = list(b_slots)
  for i in sources:
    new_b[partners[i]] = new_b[partners[i]].absorb(a_slots[i])
  if protected:
    unmerged = sorted(unmerged)  # positional order

  # The score comparisons that decided this round: each source's partner, the cut-off between sources and
  # unmerged slots and, when the unmerged slots stay in score order, every neighbouring pair among them.
  ranked = [best_scores[i] for i in by_score]
  deciding_pairs = [(merges - 1, merges)] if merges < len(ranked) else []
  if not protected:
    deciding_pairs += [(j, j + 1) for j in range(merges, len(ranked) - 1)]
  order_gaps = [ranked[j] - ranked[k] for j, k in deciding_pairs if ranked[j] != ranked[k]]
  margin = min([partner_margins[i] for i in sources] + order_gaps, default=math.inf)
  return [a_slots[i] for i in unmerged] + new_b, margin


def morph(tokens, num_merge, num_iters, protect_first=True):
  """Morphs one image's tokens [N, D].

  Returns:
    (groups, margin): the group id (final slot position) of every token, and the smallest margin of any round (see
    merge_round). A margin within float32 rounding (~1e-6) means float32 code may legitimately choose otherwise.
  """
  num_tokens = len(tokens)
  slots = [Slot(np.asarray(tokens[i], np.float64), 1, [i]) for i in range(num_tokens)]
  margin = math.inf
  if num_merge > 0:
    r = merges_per_round(num_merge, num_iters, num_tokens)
    for _ in range(num_iters):
      slots, round_margin = merge_round(slots, r, protected=1 if protect_first else 0)
      margin = min(margin, round_margin)
  groups = [0] * num_tokens
  for slot_position, slot in enumerate(slots):
    for token in slot.members:
      groups[token] = slot_position
  return groups, margin


def expected_num_groups(num_tokens, num_merge, num_iters, protect_first=True):
  """Number of groups morph leaves; it depends only on the schedule, never on the features."""
  if num_merge == 0:
    return num_tokens
  r = merges_per_round(num_merge, num_iters, num_tokens)
  count = num_tokens
  for _ in range(num_iters):
    count -= max(0, min(r, (count - (1 if protect_first else 0)) // 2))
  return count


def group_mean(x, groups):
  """x [N, C] with every row replaced by the mean of the rows in its group."""
  out = np.zeros_like(x, dtype=np.float64)
  for i in range(len(x)):
    members = [j for j in range(len(x)) if groups[j] == groups[i]]
    out[i] = np.mean([x[j] for j in members], axis=0)
  return out


def standardize(x, eps=1e-6):
  """Per-token standardisation over channels."""
  out = np.zeros_like(x, dtype=np.float64)
  for i, row in enumerate(x):
    out[i] = (row - np.mean(row)) / math.sqrt(np.var(row) + eps)
  return out


def token_loss(prediction, target, kind, beta):
  """Loss of one token: mean over channels of the elementwise loss, or 1 − cosine."""
  if kind == "cosine":
    return 1.0 - cosine_similarity(prediction, target)
  values = []
  for p, t in zip(prediction, target):
    d = float(p) - float(t)
    if kind == "smooth_l1":
      values.append(0.5 * d * d / beta if abs(d) < beta else abs(d) - 0.5 * beta)
    elif kind == "l1":
      values.append(abs(d))
    elif kind == "l2":
      values.append(d * d)
    else:
      raise ValueError(kind)
  return sum(values) / len(values)


def dtm_loss(student, target, groups_per_schedule, kind="smooth_l1", beta=2.0, normalize_target=False,
             weighting="token", scored=None):
  """Mean over schedules of the morphed-token loss; student/target [B, N, C], groups [L][B][N]. `scored` [B][N]
  (bools): only those tokens count ("token": their mean; "group": the groups holding one, equally)."""
  schedule_losses = []
  for groups in groups_per_schedule:
    image_losses = []
    for b in range(len(student)):
      t = standardize(target[b]) if normalize_target else np.asarray(target[b], np.float64)
      morphed_student = group_mean(np.asarray(student[b], np.float64), groups[b])
      morphed_target = group_mean(t, groups[b])
      per_token = [token_loss(morphed_student[i], morphed_target[i], kind, beta) for i in range(len(t))]
      if scored is not None:
        kept = [i for i in range(len(t)) if scored[b][i]]
        if weighting == "token":
          image_losses.append(sum(per_token[i] for i in kept) / len(kept))
        else:
          first = {}
          for i in kept:
            first.setdefault(groups[b][i], i)
          image_losses.append(sum(per_token[i] for i in first.values()) / len(first))
      elif weighting == "token":
        image_losses.append(sum(per_token) / len(per_token))
      else:
        sizes = [list(groups[b]).count(g) for g in groups[b]]
        num_groups = len(set(groups[b]))
        image_losses.append(sum(loss / size for loss, size in zip(per_token, sizes)) / num_groups)
    schedule_losses.append(sum(image_losses) / len(image_losses))
  return sum(schedule_losses) / len(schedule_losses)
