"""Does dynamic token morphing beat token-wise distillation at small scale? The study behind docs/RESULTS.md.

The demo-size student (configs/demo.py: Fashion-MNIST 28², patch 4, width 96, depth 4) is pretrained for the same
`--steps` towards each target kind of `--grid` with the variants listed there:
  dtm        dynamic morphing: a random (num_merge, num_iters) per schedule and step (docs/METHOD.md §2.4),
  tokenwise  token-wise distillation (num_merge = 0),
  fixed      the paper's ablation: the same `--fixed_schedule` every step,
once per seed in `--seeds` (the seed sets the student's initialisation, the data order and the schedules). Every
student is then scored on frozen, mean-pooled patch tokens: DINO's kNN (k = 20) and a linear probe, both fitted on the
first `--train_examples` Fashion-MNIST training images and tested on the first `--test_examples` test images (the
same images for every run). Floors: the student at initialisation and raw pixels. With `--finetune_epochs` > 0 each
student is also fine-tuned (configs/finetune_demo.py for that many epochs, same seed) and scored on the whole test
split.

`--student=mae` studies the MAE-style student instead (dtm_jax/models/mae.py: the demo's encoder on the visible
quarter of the patches, 37 of 49 hidden, and a decoder of `--decoder` = width,depth,heads); the floors' untrained
student is then the MAE-style one. Give it its own `--out`.

Target kinds: pixels, ema, clip (a randomly initialised CLIP-style tower), checkpoint (the student of
`--teacher_run`), and clip_fmnist: the semantic teacher of tools/train_teacher.py (a CLIP-style tower trained on
labelled Fashion-MNIST), read from `--clip_teacher`.

Runs live in `--out`: `runs/<kind>-<variant>-s<seed>/` (the pretraining workdir: config.json, metrics.jsonl,
checkpoint) with `eval.json`, and `floors/<name>-s<seed>/eval.json`. Finished runs are skipped, so an interrupted
study resumes where it stopped. `--report_only` rebuilds `summary.json`, `summary.md` and, with `--results_md`, the
generated block of docs/RESULTS.md from those files alone.

Commands (the numbers in docs/RESULTS.md; its headers give the measured wall times). The first study (300 steps):
  python -m tools.study --out=workdirs/study --results_md=docs/RESULTS.md
  python -m tools.plots --study=workdirs/study --out=docs/figures
The semantic-teacher study (the demo's 500 steps at batch 128, 1.07 epochs; fine-tuning 1 epoch):
  python -m tools.train_teacher --out=workdirs/teacher_fmnist
  python -m tools.study --out=workdirs/study_semantic --grid=clip_fmnist:dtm+tokenwise+fixed --steps=500 \
      --batch_size=128 --train_examples=10000 --test_examples=10000 --finetune_epochs=1 \
      --clip_teacher=workdirs/teacher_fmnist --results_md=docs/RESULTS.md --results_block="semantic study"
The MAE-style study (docs/RESULTS.md "MAE-style student"; its header gives the flags and the measured wall time):
  python -m tools.study --student=mae --out=workdirs/study_mae --grid=clip_fmnist:dtm+tokenwise ...
"""
from __future__ import annotations

import json
import sys
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging

from configs import demo, dtm_mae_vit_b16_in1k, finetune_demo
from dtm_jax import sharding, students, targets
from dtm_jax.evaluators import encoding, frozen_features
from dtm_jax.modes import pretrain as train
from dtm_jax.runner import run as runner
from dtm_jax.runtime import checkpoint as checkpoint_lib
from dtm_jax.runtime import metrics
from tools import study_scores, study_summary, teachers

_OUT = flags.DEFINE_string("out", None, "Directory of the study's runs and summaries.")
_GRID = flags.DEFINE_list(
    "grid", ["pixels:dtm+tokenwise+fixed", "ema:dtm+tokenwise", "clip:dtm"],
    "Runs per target kind, as kind:variant+variant,... Kinds: pixels, ema, clip, checkpoint; variants: dtm, "
    "tokenwise, fixed.")
_FIXED_SCHEDULE = flags.DEFINE_list("fixed_schedule", ["24", "4"],
                                    "num_merge,num_iters of the fixed ablation (24 of 49 tokens in 4 rounds).")
_SEEDS = flags.DEFINE_integer("seeds", 3,
                              "Seeds per (kind, variant): 0 .. seeds-1 (init, data order, masks, schedules).")
_STEPS = flags.DEFINE_integer("steps", 300, "Pretraining steps of every run.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Pretraining batch size.")
_EMA_MOMENTUM = flags.DEFINE_float("ema_momentum", 0.99, "Start of the EMA teacher's momentum (cosine to 1.0).")
_TEACHER_RUN = flags.DEFINE_string("teacher_run", "pixels-dtm-s0",
                                   "The study run whose student teaches the 'checkpoint' kind (its encoder tokens).")
_CLIP_TEACHER = flags.DEFINE_string("clip_teacher", "workdirs/teacher_fmnist",
                                    "The clip_fmnist kind's teacher: a directory written by tools/train_teacher.py.")
_FINETUNE_EPOCHS = flags.DEFINE_integer("finetune_epochs", 0,
                                        "Fine-tune every student for this many epochs (0: no fine-tuning).")
_TRAIN_EXAMPLES = flags.DEFINE_integer("train_examples", 5000, "kNN bank / probe training images (train split).")
_TEST_EXAMPLES = flags.DEFINE_integer("test_examples", 2000, "Evaluation images (test split).")
_PROBE_EPOCHS = flags.DEFINE_integer("probe_epochs", 100, "Linear-probe epochs on the frozen features.")
_STUDENT = flags.DEFINE_enum("student", "beit", ["beit", "mae"],
                              "The demo's BEiT-style student, or an MAE-style one with the demo's encoder.")
_DECODER = flags.DEFINE_list("decoder", ["64", "2", "2"],
                             "--student=mae: the decoder's width,depth,heads (MAE's ViT-B default is 512,8,16; "
                             "this demo's encoder has width 96).")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only rebuild the summaries from the runs already in --out.")
_RESULTS_MD = flags.DEFINE_string("results_md", None,
                                  "Markdown file whose block between the study markers is replaced by the tables.")
_RESULTS_BLOCK = flags.DEFINE_string("results_block", study_summary.DEFAULT_BLOCK,
                                     "Name in the markers of that block (one block per study).")
flags.mark_flag_as_required("out")


# ----------------------------------------------------------------------------------------------------------------
# Run configs.
# ----------------------------------------------------------------------------------------------------------------
def target_settings(kind: str, *, width: int, ema_momentum: float, teacher_dir: str,
                    clip_teacher: str = "") -> tuple[dict, int]:
  """(config.target fields, the student's out_dim) of one target kind for the demo-size student."""
  if kind == "pixels":
    return dict(kind="pixels", normalize_patches=True), 4 * 4 * 3
  if kind == "ema":
    return dict(kind="ema", ema_momentum=ema_momentum, ema_momentum_end=1.0), width
  if kind == "clip":  # A randomly initialised CLIP-style tower of the student's size: no weights to download.
    return dict(kind="clip", init="random", variant="test", dtype="float32", seed=0,
                overrides=dict(patch_size=4, width=96, depth=4, num_heads=3, mlp_dim=384, proj_dim=64)), 64
  if kind == "checkpoint":
    return dict(kind="checkpoint", checkpoint=teacher_dir, features="encoder", dtype="float32"), width
  if kind == "clip_fmnist":
    return dict(kind="clip", checkpoint=clip_teacher, dtype="float32"), teachers.clip_proj_dim(clip_teacher)
  raise ValueError(f"Unknown target kind {kind!r}; choose from {study_summary.KINDS}.")


def base_config(student: str = "beit", decoder: tuple[int, int, int] = (64, 2, 2)):
  """configs/demo.py, with an MAE-style student of the demo's encoder (decoder = width, depth, heads) for "mae"."""
  c = demo.get_config()
  if student == "mae":
    width, depth, heads = decoder
    dtm_mae_vit_b16_in1k.mae_student(c).model.update(decoder_width=width, decoder_depth=depth,
                                                     decoder_num_heads=heads)
  return c


def study_config(kind: str, variant: str, seed: int, *, steps: int, batch_size: int, ema_momentum: float,
                 fixed_schedule: tuple[int, int], teacher_dir: str = "", clip_teacher: str = "",
                 student: str = "beit", decoder: tuple[int, int, int] = (64, 2, 2)):
  """configs/demo.py (`base_config`) with the study's target, variant, seed and run length."""
  c = base_config(student, decoder)
  c.then_evaluate = None  # the study scores every student itself (run_one): the demo's follow-up compare is skipped
  c.seed = seed
  c.total_steps = steps
  c.warmup_steps = max(1, steps // 10)
  c.batch_size = batch_size
  c.log_every = max(1, steps // 60)
  c.checkpoint_every = steps
  c.keep_checkpoints = 1
  c.async_checkpointing = False
  c.progress_every_secs = 120.0
  target, out_dim = target_settings(kind, width=c.model.width, ema_momentum=ema_momentum, teacher_dir=teacher_dir,
                                    clip_teacher=clip_teacher)
  c.target.update(target)
  c.model.out_dim = out_dim
  if variant == "tokenwise":
    c.dtm.enabled = False
  elif variant == "fixed":
    c.dtm.fixed_schedule = tuple(fixed_schedule)
  elif variant != "dtm":
    raise ValueError(f"Unknown variant {variant!r}; choose from {study_summary.VARIANTS}.")
  return c


def run_name(kind: str, variant: str, seed: int) -> str:
  return f"{kind}-{variant}-s{seed}"


def parse_grid(grid: list[str]) -> dict[str, list[str]]:
  """["pixels:dtm+tokenwise", "ema:dtm"] → {"pixels": ["dtm", "tokenwise"], "ema": ["dtm"]}, checked."""
  parsed = {}
  for entry in grid:
    kind, _, variants = entry.partition(":")
    variants = variants.split("+") if variants else []
    kinds, all_variants = study_summary.KINDS, study_summary.VARIANTS
    if kind not in kinds or not variants or any(v not in all_variants for v in variants):
      raise ValueError(f"--grid entry {entry!r} must be kind:variant+variant with a kind from {kinds} and variants "
                       f"from {all_variants}.")
    parsed[kind] = variants
  return parsed


def planned_runs(grid: dict[str, list[str]], seeds: int) -> list[tuple[str, str, int]]:
  """(kind, variant, seed) in the order they run: the checkpoint kind last (it is taught by another run); within a
  kind seed by seed, so a study stopped early already holds complete pairs of variants."""
  return [(kind, variant, seed) for kind in sorted(grid, key=lambda k: k == "checkpoint") for seed in range(seeds)
          for variant in grid[kind]]


# ----------------------------------------------------------------------------------------------------------------
# Running and scoring.
# ----------------------------------------------------------------------------------------------------------------
def run_floors(out, data, mesh, *, seeds: int, probe_epochs: int, teacher: targets.Target | None = None,
               base: ml_collections.ConfigDict | None = None) -> None:
  """The student of `base` (default configs/demo.py) at initialisation (one per seed) and raw pixels (probe seeds
  only): the numbers to beat; with a `teacher`, its mean-pooled target tokens (what the students regress, scored like
  them)."""
  model_cfg = train.student_config(base or demo.get_config())
  pixels_train, pixels_test = (frozen_features.pixel_features(split, mesh) for split in data)
  teacher_features = None
  for seed in range(seeds):
    path = out / "floors" / f"random_init-s{seed}" / "eval.json"
    if not path.exists():
      student = students.initial_student(model_cfg, mesh, seed=seed)
      encode = encoding.feature_fn(student)
      features = [frozen_features.encoder_features(encode, student.params, s, mesh) for s in data]
      result = study_scores.scores(*features, mesh, seed=seed, probe_epochs=probe_epochs)
      study_summary.write_json(path, {"kind": "random_init", "variant": "-", "seed": seed, **result})
      print(f"floor random_init s{seed}: {result}", flush=True)
    path = out / "floors" / f"raw_pixels-s{seed}" / "eval.json"
    if not path.exists():
      result = study_scores.scores(pixels_train, pixels_test, mesh, seed=seed, probe_epochs=probe_epochs)
      study_summary.write_json(path, {"kind": "raw_pixels", "variant": "-", "seed": seed, **result})
      print(f"floor raw_pixels s{seed}: {result}", flush=True)
    path = out / "floors" / f"teacher-s{seed}" / "eval.json"
    if teacher is not None and not path.exists():
      if teacher_features is None:  # the same for every seed (only the probe's seed differs)
        encode = lambda params, images: teacher.tokens(params, images).mean(axis=1)
        teacher_features = [frozen_features.encoder_features(encode, teacher.params, s, mesh) for s in data]
      result = study_scores.scores(*teacher_features, mesh, seed=seed, probe_epochs=probe_epochs)
      study_summary.write_json(path, {"kind": "teacher", "variant": "-", "seed": seed, **result})
      print(f"reference teacher s{seed}: {result}", flush=True)


def run_one(out, kind: str, variant: str, seed: int, data, mesh, *, probe_epochs: int, finetune_epochs: int = 0,
            **config_kwargs) -> dict:
  """Pretrain one student, score it, write `eval.json`, then (finetune_epochs > 0) fine-tune it and add the result.

  Each part is skipped when its result is in `eval.json`. Pretraining is checkpointed only at its end, so an
  interrupted one starts over (its metrics.jsonl then holds both attempts; readers keep the last); fine-tuning
  resumes from its own checkpoints (`<run>/finetune`)."""
  workdir = out / "runs" / run_name(kind, variant, seed)
  path = workdir / "eval.json"
  if path.exists():
    record = json.loads(path.read_text())
  else:
    config = study_config(kind, variant, seed, **config_kwargs)
    start = time.time()
    runner.run("pretrain", config, str(workdir))
    train_seconds = time.time() - start
    losses = [row["loss"] for row in metrics.read_jsonl(workdir / "metrics.jsonl") if "loss" in row]
    student = students.restore_student(ml_collections.ConfigDict({"workdir": str(workdir), "step": None}), mesh)
    encode = encoding.feature_fn(student)
    features = [frozen_features.encoder_features(encode, student.params, split, mesh) for split in data]
    result = study_scores.scores(*features, mesh, seed=seed, probe_epochs=probe_epochs)
    record = {"kind": kind, "variant": variant, "seed": seed, "steps": config.total_steps,
              "batch_size": config.batch_size, "final_loss": float(np.mean(losses[-3:])), **result,
              "train_seconds": train_seconds, "eval_seconds": time.time() - start - train_seconds}
    study_summary.write_json(path, record)
  if finetune_epochs and "finetune_top1" not in record:
    start = time.time()
    result = runner.run("finetune", finetune_config(workdir, seed, finetune_epochs), str(workdir / "finetune"))
    record.update(finetune_top1=result["last_top1"], finetune_epochs=finetune_epochs,
                  finetune_seconds=time.time() - start)
    study_summary.write_json(path, record)
  return record


def finetune_config(workdir, seed: int, epochs: int) -> ml_collections.ConfigDict:
  """configs/finetune_demo.py for the student of `workdir`: `epochs` epochs (a quarter of them warm-up), `seed`."""
  c = finetune_demo.get_config()
  c.pretrained.workdir = str(workdir)
  c.seed = seed
  c.epochs = epochs
  c.warmup_epochs = epochs / 4
  c.keep_checkpoints = 1
  c.progress_every_secs = 120.0
  return c


def run_study(out) -> None:
  try:
    grid = parse_grid(_GRID.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  teacher_dir = out / "runs" / _TEACHER_RUN.value
  planned = {run_name(*run) for run in planned_runs(grid, _SEEDS.value) if run[0] != "checkpoint"}
  if "checkpoint" in grid and _TEACHER_RUN.value not in planned and not (teacher_dir / "eval.json").exists():
    raise app.UsageError(f"--teacher_run={_TEACHER_RUN.value} is neither in this study's grid nor finished in {out}.")
  clip_teacher = checkpoint_lib.absolute_path(_CLIP_TEACHER.value)
  if "clip_fmnist" in grid and not (clip_teacher / "model_config.json").exists():
    raise app.UsageError(f"--clip_teacher={_CLIP_TEACHER.value} holds no teacher; train one first: "
                         f"python -m tools.train_teacher --out={_CLIP_TEACHER.value}")
  metrics.quiet_library_logs()
  # Every run compiles the same evaluation programs (and a resumed study the same train steps): cache them on disk.
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", str(out / "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  mesh = sharding.make_mesh(-1, 1)
  decoder = tuple(int(v) for v in _DECODER.value)
  base = base_config(_STUDENT.value, decoder)
  start = time.time()
  data = (frozen_features.load_split(base.input, "train", _TRAIN_EXAMPLES.value, image_size=base.model.image_size),
          frozen_features.load_split(base.input, "test", _TEST_EXAMPLES.value, image_size=base.model.image_size))
  teacher = None
  if "clip_fmnist" in grid:
    teacher = targets.build_target(ml_collections.ConfigDict(dict(kind="clip", checkpoint=str(clip_teacher),
                                                                  dtype="float32")),
                                   image_size=base.model.image_size, patch_size=base.model.patch_size)
  run_floors(out, data, mesh, seeds=_SEEDS.value, probe_epochs=_PROBE_EPOCHS.value, teacher=teacher, base=base)
  runs = planned_runs(grid, _SEEDS.value)
  config_kwargs = dict(steps=_STEPS.value, batch_size=_BATCH_SIZE.value, ema_momentum=_EMA_MOMENTUM.value,
                       fixed_schedule=tuple(int(v) for v in _FIXED_SCHEDULE.value), teacher_dir=str(teacher_dir),
                       clip_teacher=str(clip_teacher), student=_STUDENT.value, decoder=decoder)
  for i, (kind, variant, seed) in enumerate(runs, 1):
    run_start = time.time()
    record = run_one(out, kind, variant, seed, data, mesh, probe_epochs=_PROBE_EPOCHS.value,
                     finetune_epochs=_FINETUNE_EPOCHS.value, **config_kwargs)
    finetuned = f", fine-tuned {record['finetune_top1']:.2f}%" if "finetune_top1" in record else ""
    print(f"[{i}/{len(runs)}] {run_name(kind, variant, seed)}: kNN {record['knn_top1']:.2f}%, probe "
          f"{record['probe_top1']:.2f}%{finetuned}, final loss {record['final_loss']:.4f} "
          f"({time.time() - run_start:.0f} s; "
          f"study {(time.time() - start) / 60:.1f} min)", flush=True)
  print(f"Study finished in {(time.time() - start) / 60:.1f} min on {jax.device_count()} {jax.devices()[0].platform} "
        f"device(s).", flush=True)
  study_summary.record_call(out, argv=sys.argv[1:], wall_seconds=time.time() - start, runs=len(runs))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  out = checkpoint_lib.absolute_path(_OUT.value)  # Orbax writes only to absolute paths; gs://… stays as it is.
  if not _REPORT_ONLY.value:
    logging.set_verbosity(logging.WARNING)
    run_study(out)
  print(study_summary.write_report(out, _RESULTS_MD.value, _RESULTS_BLOCK.value), flush=True)


if __name__ == "__main__":
  app.run(main)
