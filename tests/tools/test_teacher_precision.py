"""tools/teacher_precision.py: group comparison against a plain reference, and the figures it reports."""
import itertools

import numpy as np
from flax import nnx
from flax.nnx import traversals

from dtm_jax.models import clip, convert
from tools import teacher_precision


def _same_groups_reference(a, b):
  """Token i keeps its group when the set of tokens sharing its id is the same under a and b."""
  out = np.zeros(a.shape, bool)
  for m, i in itertools.product(range(a.shape[0]), range(a.shape[1])):
    out[m, i] = set(np.flatnonzero(a[m] == a[m, i])) == set(np.flatnonzero(b[m] == b[m, i]))
  return out


def test_same_groups_compares_members_not_ids():
  rng = np.random.default_rng(0)
  a = rng.integers(0, 5, (20, 12))
  b = np.where(rng.random(a.shape) < 0.2, rng.integers(0, 5, a.shape), a)
  np.testing.assert_array_equal(teacher_precision.same_groups(a, b), _same_groups_reference(a, b))
  relabelled = (a + 3) % 7  # other ids, the same partition
  assert teacher_precision.same_groups(a, relabelled).all()


def test_measure_reports_no_change_for_float32_and_some_for_lower_precisions(tmp_path):
  config = clip.get_config("test", image_size=16, patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64,
                           proj_dim=16)
  state = nnx.state(clip.CLIPVision(config, rngs=nnx.Rngs(0)), nnx.Param).to_pure_dict()
  params = traversals.unflatten_mapping({k: np.asarray(v) for k, v in traversals.flatten_mapping(state).items()})
  convert.save_converted(convert.Converted("clip", config, params), tmp_path / "teacher")
  images = np.random.default_rng(1).normal(size=(24, 16, 16, 3)).astype(np.float32)
  result = teacher_precision.measure(str(tmp_path / "teacher"), images, draws=3, max_iters=4, protect_first=True,
                                     seed=0)
  rows = result["rows"]
  assert set(rows) == set(teacher_precision.PRECISIONS)
  assert rows["float32"] == dict(target_error=0.0, moved_tokens=0.0, moved_images=0.0)
  for name in ("bfloat16", "bfloat16, float32 head", "float16"):
    assert 0 < rows[name]["target_error"] < 0.05
    assert 0 <= rows[name]["moved_tokens"] <= rows[name]["moved_images"] <= 1
  assert rows["bfloat16, float32 head"]["target_error"] < rows["bfloat16"]["target_error"]
  assert result["tokens_per_image"] == 16 and result["images"] == 24
  assert "| bfloat16 |" in teacher_precision.table(result)
