"""The paper's pilot study as a tool: how spatially consistent are a teacher's patch targets, before and after morphing?

DTM's premise is that teacher patch tokens are noisy neighbour to neighbour, and that grouping similar tokens and
averaging them gives better targets. For the target of a pretraining config (any `config.target` kind; the EMA teacher
is read from a run's checkpoint with --run) and that config's dataset, this reports for each morphing schedule
(num_merge, num_iters):
  * neighbour cosine: the mean cosine similarity of 4-neighbouring target tokens, per token and after morphing
    (every token replaced by its group's mean), and the share of neighbouring pairs that morphing puts in one group;
  * token probe: top-1 of a linear probe that classifies single tokens (each labelled with its image's class) from
    per-token features, from morphed features, and, as a control, from groups of the same sizes with random members;
  * zero-shot token top-1, for a teacher trained with class embeddings (tools/train_teacher.py): each token labelled
    with its most similar class embedding, as the paper's pilot labels CLIP's tokens with its text embeddings
    (per token, morphed, random groups).
Only object tokens count by default (patches with some ink: Fashion-MNIST's background is exactly zero), as the
paper's pilot scores the pixels of objects.

Command (the demo's teacher; the table in docs/RESULTS.md):
  python -m tools.spatial_consistency --config=configs/demo.py --out=workdirs/spatial/demo.json
  python -m tools.spatial_consistency --run=workdirs/study/runs/ema-dtm-s0 --out=workdirs/spatial/ema.json
  python -m tools.spatial_consistency --run=workdirs/study_semantic/runs/clip_fmnist-dtm-s0 \
      --out=workdirs/spatial/clip_fmnist.json
"""
from __future__ import annotations

import json

from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from dtm_jax.runtime import metrics
from tools import spatial_measures, teachers

_CONFIG = config_flags.DEFINE_config_file("config", None, "Pretraining config whose target and data to analyse.")
_RUN = flags.DEFINE_string("run", None, "A pretraining workdir: its config.json (unless --config is given) and, for "
                           "kind='ema', its EMA teacher.")
_SCHEDULES = flags.DEFINE_list("schedules", ["12:2", "24:4", "36:6"],
                               "Morphing schedules num_merge:num_iters (tokens removed, rounds).")
_TRAIN_SPLIT = flags.DEFINE_string("train_split", "train", "Split whose images fit the token probe.")
_TEST_SPLIT = flags.DEFINE_string("test_split", "test", "Split whose images score it and give the cosines.")
_TRAIN_IMAGES = flags.DEFINE_integer("train_images", 2000, "Training images whose tokens fit the probe.")
_TEST_IMAGES = flags.DEFINE_integer("test_images", 1000, "Test images whose tokens score it (and give the cosines).")
_TOKENS = flags.DEFINE_enum("tokens", "object", ["object", "all"], "Which tokens count: patches with ink, or all.")
_INK = flags.DEFINE_float("ink", 0.1, "A patch is an object patch when some pixel exceeds this intensity (0..1).")
_PROBE_EPOCHS = flags.DEFINE_integer("probe_epochs", 30, "Epochs of the token probe.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the probe and of the random-group control.")
_OUT = flags.DEFINE_string("out", None, "Optional JSON file for the results.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None and _RUN.value is None:
    raise app.UsageError("Pass --config=<pretraining config> or --run=<pretraining workdir> (or both).")
  logging.set_verbosity(logging.WARNING)
  metrics.quiet_library_logs()
  config = _CONFIG.value if _CONFIG.value is not None else teachers.run_config(_RUN.value)
  schedules = []
  for entry in _SCHEDULES.value:
    merge, _, iters = entry.partition(":")
    if not (merge.isdigit() and iters.isdigit() and int(iters) >= 1):
      raise app.UsageError(f"--schedules entry {entry!r} must be num_merge:num_iters, e.g. 24:4.")
    schedules.append((int(merge), int(iters)))
  result = spatial_measures.analyse(
      config, _RUN.value, schedules=schedules, split_names=(_TRAIN_SPLIT.value, _TEST_SPLIT.value),
      train_images=_TRAIN_IMAGES.value, test_images=_TEST_IMAGES.value, object_only=_TOKENS.value == "object",
      ink=_INK.value, probe_epochs=_PROBE_EPOCHS.value, seed=_SEED.value)
  if _OUT.value:
    path = epath.Path(_OUT.value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
  print(spatial_measures.table(result), flush=True)


if __name__ == "__main__":
  app.run(main)
