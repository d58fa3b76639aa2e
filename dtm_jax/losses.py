"""Token regression losses and the DTM loss on morphed tokens (DTM_SPEC §2.5).

The student regresses the teacher through the same groups: both token sets are replaced by their group means
(groups come from the raw teacher tokens, see dtm_jax.morphing), and a per-token loss compares them.
"""
import jax
from jax import lax
import jax.numpy as jnp

from dtm_jax import morphing

LOSS_KINDS = ("smooth_l1", "l1", "l2", "cosine")
WEIGHTINGS = ("token", "group")

# Norms below this count as zero in the cosine loss (the loss is then 1).
_MIN_NORM = 1e-12


def token_loss(prediction, target, kind="smooth_l1", beta=2.0):
  """Per-token loss [..., N] of prediction vs target [..., N, C]: elementwise loss averaged over channels.

  smooth_l1: 0.5·d²/β if |d| < β, else |d| − β/2 (as in the released code, β = 2); l1: |d|; l2: d²;
  cosine: 1 − cos(prediction, target), which has the gradient of the released code's −cos.
  """
  if kind == "cosine":
    dot = jnp.sum(prediction * target, axis=-1)
    norms = (jnp.maximum(jnp.linalg.norm(prediction, axis=-1), _MIN_NORM) *
             jnp.maximum(jnp.linalg.norm(target, axis=-1), _MIN_NORM))
    return 1.0 - dot / norms
  d = prediction - target
  if kind == "smooth_l1":
    elementwise = jnp.where(jnp.abs(d) < beta, 0.5 * d * d / beta, jnp.abs(d) - 0.5 * beta)
  elif kind == "l1":
    elementwise = jnp.abs(d)
  elif kind == "l2":
    elementwise = d * d
  else:
    raise ValueError(f"Unknown loss kind {kind!r}; choose one of {LOSS_KINDS}.")
  return jnp.mean(elementwise, axis=-1)


def standardize(x, eps=1e-6):
  """Per-token standardisation over channels (the released code's optional target normalisation)."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.var(x, axis=-1, keepdims=True)
  return (x - mean) * lax.rsqrt(var + eps)


def dtm_loss(student, target, groups_per_schedule, kind="smooth_l1", beta=2.0, normalize_target=False,
             weighting="token"):
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

  Returns:
    Scalar float32 loss.
  """
  if kind not in LOSS_KINDS:
    raise ValueError(f"Unknown loss kind {kind!r}; choose one of {LOSS_KINDS}.")
  if weighting not in WEIGHTINGS:
    raise ValueError(f"Unknown weighting {weighting!r}; choose one of {WEIGHTINGS}.")
  if kind == "smooth_l1" and not beta > 0:
    raise ValueError(f"smooth_l1 needs beta > 0; got {beta}.")
  if student.shape != target.shape or student.ndim != 3:
    raise ValueError(f"student and target must both be [batch, tokens, channels]; got {student.shape} and "
                     f"{target.shape}.")
  if groups_per_schedule.ndim != 3 or groups_per_schedule.shape[1:] != student.shape[:2]:
    raise ValueError(f"groups_per_schedule must be [schedules, batch, tokens] = [L, {student.shape[0]}, "
                     f"{student.shape[1]}]; got {groups_per_schedule.shape}.")

  student = student.astype(jnp.float32)
  target = lax.stop_gradient(target).astype(jnp.float32)
  if normalize_target:
    target = standardize(target)

  def schedule_loss(groups):
    per_token = token_loss(morphing.group_mean(student, groups), morphing.group_mean(target, groups), kind, beta)
    if weighting == "token":
      return jnp.mean(per_token)
    sizes = morphing.group_sizes(groups).astype(jnp.float32)
    per_image = jnp.sum(per_token / sizes, axis=-1) / morphing.num_groups(groups).astype(jnp.float32)
    return jnp.mean(per_image)

  return jnp.mean(jax.vmap(schedule_loss)(groups_per_schedule))
