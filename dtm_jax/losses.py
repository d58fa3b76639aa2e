"""Token regression losses and the DTM loss on morphed tokens (docs/METHOD.md §2.5).

The student regresses the teacher through the same groups: both token sets are replaced by their group means
(groups come from the raw teacher tokens, see dtm_jax.morphing) and a per-token loss compares them. Every token of a
group then has the same loss, so it is computed once per group and weighted by the group's size.
"""
import jax.numpy as jnp
from jax import lax

from dtm_jax import morphing

LOSS_KINDS = ("smooth_l1", "l1", "l2", "cosine")
WEIGHTINGS = ("token", "group")

# Norms below this count as zero in the cosine loss (the loss is then 1).
_MIN_NORM = 1e-12


def elementwise_loss(difference, kind="smooth_l1", beta=2.0):
  """smooth_l1: 0.5·d²/β if |d| < β, else |d| − β/2 (the released code's, β = 2); l1: |d|; l2: d²."""
  if kind == "smooth_l1":
    magnitude = jnp.abs(difference)
    return jnp.where(magnitude < beta, 0.5 * difference * difference / beta, magnitude - 0.5 * beta)
  if kind == "l1":
    return jnp.abs(difference)
  if kind == "l2":
    return difference * difference
  raise ValueError(f"Unknown elementwise loss {kind!r}; choose one of {LOSS_KINDS[:3]}.")


def token_loss(prediction, target, kind="smooth_l1", beta=2.0):
  """Per-token loss [..., N] of prediction vs target [..., N, C].

  The elementwise kinds average over channels; cosine is 1 − cos(prediction, target), which has the gradient of the
  released code's −cos.
  """
  if kind == "cosine":
    dot = jnp.sum(prediction * target, axis=-1)
    norms = (jnp.maximum(jnp.linalg.norm(prediction, axis=-1), _MIN_NORM) *
             jnp.maximum(jnp.linalg.norm(target, axis=-1), _MIN_NORM))
    return 1.0 - dot / norms
  return jnp.mean(elementwise_loss(prediction - target, kind, beta), axis=-1)


def standardize(x, eps=1e-6):
  """Per-token standardisation over channels (the released code's optional target normalisation)."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.var(x, axis=-1, keepdims=True)
  return (x - mean) * lax.rsqrt(var + eps)


def token_wise_loss(student, target, kind="smooth_l1", beta=2.0, normalize_target=False, scored=None):
  """The loss without morphing (every token its own group): the mean per-token loss, which equals `dtm_loss` with
  singleton groups under either weighting. `scored`: optional bool [B, N], the positions scored (the mean over each
  image's scored tokens, then over the images). Scalar float32."""
  student = student.astype(jnp.float32)
  target = lax.stop_gradient(target).astype(jnp.float32)
  if normalize_target:
    target = standardize(target)
  per_token = token_loss(student, target, kind, beta)
  if scored is None:
    return jnp.mean(per_token)
  weights = scored.astype(jnp.float32)
  return jnp.mean(jnp.sum(weights * per_token, axis=-1) / jnp.maximum(jnp.sum(weights, axis=-1), 1.0))


def dtm_loss(student, target, groups_per_schedule, kind="smooth_l1", beta=2.0, normalize_target=False,
             weighting="token", scored=None):
  """The DTM loss: morphed student vs morphed target, averaged over the L schedules.

  Args:
    student: [B, N, C] student predictions for every patch token (any float dtype; computed in float32).
    target: [B, N, C] teacher tokens; a constant (no gradient flows into it).
    groups_per_schedule: int32 [L, B, N] group ids from dtm_jax.morphing.morph, one set per schedule.
    kind: per-token loss, one of LOSS_KINDS (see token_loss).
    beta: smooth-L1 threshold.
    normalize_target: standardise every target token over channels before the group means.
    weighting: "token" (faithful) averages over all B·N positions, so a group weighs by its size; "group" (the
      paper's reading) weighs every group of an image equally.
    scored: optional bool [B, N], the positions scored (MAE's "masked patches only"). Groups still span all
      tokens; a group then counts by its scored tokens ("token") or counts at all only if it has one ("group").

  Returns:
    Scalar float32 loss.
  """
  if kind not in LOSS_KINDS:
    raise ValueError(f"Unknown loss kind {kind!r}; choose one of {LOSS_KINDS}.")
  if weighting not in WEIGHTINGS:
    raise ValueError(f"Unknown weighting {weighting!r}; choose one of {WEIGHTINGS}.")
  if kind == "smooth_l1" and not beta > 0:
    raise ValueError(f"smooth_l1 needs beta > 0; got {beta}.")
  if student.ndim != 3 or student.shape != target.shape:
    raise ValueError(f"student and target must both be [batch, tokens, channels]; got {student.shape} and "
                     f"{target.shape}.")
  if groups_per_schedule.ndim != 3 or groups_per_schedule.shape[1:] != student.shape[:2]:
    raise ValueError(f"groups_per_schedule must be [schedules, batch, tokens] = [L, {student.shape[0]}, "
                     f"{student.shape[1]}]; got {groups_per_schedule.shape}.")

  student = student.astype(jnp.float32)
  target = lax.stop_gradient(target).astype(jnp.float32)
  if normalize_target:
    target = standardize(target)
  difference = student - target

  if kind == "cosine":
    student_means, sizes = morphing.per_group_means(student, groups_per_schedule)
    target_means, _ = morphing.per_group_means(target, groups_per_schedule)
    per_group = token_loss(student_means, target_means, kind)
  else:  # group means are linear: mean(student) − mean(target) = mean(student − target)
    difference_means, sizes = morphing.per_group_means(difference, groups_per_schedule)
    per_group = jnp.mean(elementwise_loss(difference_means, kind, beta), axis=-1)
  if scored is not None:  # the scored tokens of every group: its size times its mean of the 0/1 indicator
    scored_means, _ = morphing.per_group_means(scored[..., None].astype(jnp.float32), groups_per_schedule)
    sizes = jnp.round(scored_means[..., 0] * sizes)
  if weighting == "token":
    weights = (sizes / sizes.shape[-1] if scored is None else
               sizes / jnp.maximum(jnp.sum(sizes, axis=-1, keepdims=True), 1.0))
  else:
    present = (sizes > 0).astype(jnp.float32)
    weights = present / jnp.sum(present, axis=-1, keepdims=True)
  return jnp.mean(jnp.sum(weights * per_group, axis=-1))  # over images and schedules
