"""The study's pictures, drawn from the files `tools/study.py` leaves in its --out directory.

  loss_curves.png         training loss per step, DTM vs token-wise (and the fixed schedule), mean over seeds with
                          the seeds' range shaded. DTM's loss compares group means, so its level is not comparable.
  probe_bars.png          kNN and linear-probe top-1 (mean ± std over seeds) per target and variant; floors as lines.
  morph_groups_<run>.png  a few test images with the groups morphing finds in the target tokens of a study run, as
                          colour regions, at two schedule sizes (`--schedules`); one picture per run in
                          `--groups_runs` (an `ema` run's teacher is its EMA at the end of training).

Commands (the figures in docs/RESULTS.md; `--prefix` keeps a second study's pictures apart):
  python -m tools.plots --study=workdirs/study --out=docs/figures
  python -m tools.plots --study=workdirs/study_semantic --out=docs/figures --prefix=semantic_ \
      --groups_runs=clip_fmnist-dtm-s0
"""
from __future__ import annotations

import json

from absl import app, flags, logging
from etils import epath

from dtm_jax.runtime import checkpoint as checkpoint_lib
from tools import figures

_STUDY = flags.DEFINE_string("study", None, "The --out directory of tools/study.py.")
_OUT = flags.DEFINE_string("out", "docs/figures", "Directory for the PNG files.")
_GROUPS_RUNS = flags.DEFINE_list("groups_runs", ["pixels-dtm-s0", "ema-dtm-s0"],
                                  "Study runs whose teachers' groups are drawn (one picture each).")
_SCHEDULES = flags.DEFINE_list("schedules", ["16:2", "40:7"], "Two schedules num_merge:num_iters for the groups.")
_PREFIX = flags.DEFINE_string("prefix", "", "Prepended to every file name.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 5, "Test images in the groups picture.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not _STUDY.value:
    raise app.UsageError("Pass --study=<the --out directory of tools/study.py>.")
  logging.set_verbosity(logging.WARNING)
  # Orbax: absolute local paths (gs://… stays as it is).
  study_dir, out = checkpoint_lib.absolute_path(_STUDY.value), epath.Path(_OUT.value)
  summary_path = study_dir / "summary.json"
  if not summary_path.exists():
    raise app.UsageError(f"{summary_path} is missing; run `python -m tools.study --out={study_dir} --report_only`.")
  out.mkdir(parents=True, exist_ok=True)
  prefix = _PREFIX.value
  written = [f"{prefix}loss_curves.png", f"{prefix}probe_bars.png"]
  figures.loss_curves(figures.losses_by_run(study_dir), out / written[0])
  figures.probe_bars(json.loads(summary_path.read_text()), out / written[1])
  schedules = [tuple(int(v) for v in s.split(":")) for s in _SCHEDULES.value]
  for run in _GROUPS_RUNS.value:
    written.append(f"{prefix}morph_groups_{run}.png")
    figures.draw_groups(study_dir, run, schedules, _NUM_IMAGES.value, out / written[-1])
  print(f"Wrote {', '.join(written)} to {out}.", flush=True)


if __name__ == "__main__":
  app.run(main)
