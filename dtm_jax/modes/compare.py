"""What pretraining bought: the pretrained student beside the same student at initialisation and raw pixels.

One accuracy alone does not say whether pretraining helped: a randomly initialised ViT and raw pixels already
classify Fashion-MNIST well above chance. So `--mode=compare` (the demo's closing evaluation) scores three feature
sets with the same two protocols and prints one table: kNN top-1 (DINO's weighted kNN, as `--mode=knn`) and the
top-1 of a linear probe (BatchNorm + linear layer, as `--mode=linear_probe`) trained on the kNN bank's features.
The images are decoded once and each encoder runs once over them. The untrained student is the pretrained one's
architecture initialised as pretraining initialised it (the run's seed, read from the checkpoint), recomputed on
every run (on 2 CPU cores ~25s for the demo's student, mostly encoding 30,000 images).
"""
from __future__ import annotations

import jax
import ml_collections
from etils import epath

from dtm_jax import config_checks, students
from dtm_jax.evaluators import encoding, frozen_features
from dtm_jax.program import Mode
from dtm_jax.runtime import metrics

# (key in results.json, row of the table)
ROWS = (("pretrained", "pretrained student"), ("untrained", "untrained student"), ("raw_pixels", "raw pixels"))


def pretraining_seed(student: students.Student, default: int) -> int:
  """The seed the student's pretraining run initialised it with (its checkpoint's saved config); `default` for a
  converted checkpoint, which has none."""
  if student.step is None:
    return default
  return int(students.pretraining_config(epath.Path(student.checkpoint)).get("seed", default))


def format_table(results: dict) -> str:
  """The table `run` prints, from the numbers in `results` (what results.json holds)."""
  lines = [f"what pretraining bought ({results['dataset']} {results['eval_split']}, {results['num_queries']:,} "
           f"images; kNN bank and probe training set: the first {results['bank_size']:,} "
           f"{results['train_split']} images)",
           f"{'features':<24}{'kNN top-1':>10}{'linear probe top-1':>21}"]
  for key, row in ROWS:
    lines.append(f"{row:<24}{results[f'{key}_knn_top1']:>9.1f}%{results[f'{key}_probe_top1']:>20.1f}%")
  lines.append(f"untrained student: the same architecture at initialisation (seed {results['untrained_seed']}), "
               "computed on this run; all rows on one decoding of the images.")
  return "\n".join(lines)


def probe_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """What `linear_probe.train_on_features` reads, from the compare config's `probe` block (evaluated once, at the
  end)."""
  return ml_collections.ConfigDict({**config.probe.to_dict(), "seed": config.seed, "num_classes": config.num_classes,
                                    "eval_every_epochs": config.probe.epochs})


def run(config: ml_collections.ConfigDict, workdir: epath.Path, mesh) -> dict:
  """`main.py --mode=compare`: the table of what pretraining bought (printed, and in TensorBoard)."""
  if jax.process_count() > 1:
    raise ValueError("--mode=compare holds the images and features in one process (it is for small students such as "
                     "the demo's); run it as a single process, or use --mode=knn and --mode=linear_probe on a pod.")
  min_fsdp_size = config.mesh.min_fsdp_size
  student = students.restore_student(config.pretrained, mesh, min_fsdp_size=min_fsdp_size,
                                   model_overrides=config.model)
  seed = pretraining_seed(student, default=config.seed)
  untrained = students.initial_student(student.pretraining_architecture, mesh, seed=seed,
                                       min_fsdp_size=min_fsdp_size)
  cfg, input_cfg = config.compare, config.input
  image_size = student.config.image_size
  train, test = (frozen_features.load_split(input_cfg, split, count, image_size=image_size, batch_size=cfg.batch_size)
                 for split, count in ((input_cfg.train_split, cfg.num_train_examples),
                                      (input_cfg.eval_split, cfg.num_eval_examples)))

  def encoded(encoder: students.Student):
    encode = encoding.feature_fn(encoder, pooling=config.features.pooling, num_blocks=config.features.num_blocks)
    return [frozen_features.encoder_features(encode, encoder.params, s, mesh, cfg.batch_size) for s in (train, test)]

  features = {"pretrained": encoded(student), "untrained": encoded(untrained),
              "raw_pixels": [frozen_features.pixel_features(s, mesh) for s in (train, test)]}
  scores = {}
  for key, (train_features, test_features) in features.items():
    scores[f"{key}_knn_top1"] = frozen_features.knn_top1(train_features, test_features, mesh, k=config.knn.k,
                                                         temperature=config.knn.temperature)
    scores[f"{key}_probe_top1"] = frozen_features.probe_top1(train_features, test_features, mesh,
                                                             probe_config(config))
  writer = metrics.MetricsWriter(workdir)
  writer.write_scalars(student.step or 0, scores)
  writer.close()
  dataset = input_cfg.get("dataset") if input_cfg.source == "tfds" else input_cfg.source
  results = {"mode": "compare", **student.source(), **scores, "untrained_seed": seed,
             "untrained_computed": "on this run", "dataset": dataset, "train_split": input_cfg.train_split,
             "eval_split": input_cfg.eval_split, "bank_size": len(train), "num_queries": len(test),
             "k": config.knn.k, "temperature": config.knn.temperature, "probe_epochs": config.probe.epochs}
  print(format_table(results), flush=True)
  return results


def check_config(c: config_checks.Checker, num_devices: int, check_paths: bool = True) -> None:
  config_checks.check_pretrained(c, check_paths)
  config_checks.check_model_overrides(c)
  config_checks.check_input(c, pretraining=False)
  config_checks.check_run_basics(c)  # seed: the probe's
  c.integer("num_classes", 1)
  config_checks.check_knn_scoring(c)
  c.batch("compare.batch_size", num_devices)
  c.integer("compare.num_train_examples", 0)
  c.integer("compare.num_eval_examples", 0)
  epochs = c.integer("probe.epochs", 1)
  warmup = c.number("probe.warmup_epochs", 0.0)
  if epochs is not None and warmup is not None and warmup > epochs:
    c.add("probe.warmup_epochs", warmup, f"must not exceed probe.epochs={epochs}.")
  c.batch("probe.batch_size", num_devices)
  config_checks.check_probe_training(c, prefix="probe.")
  config_checks.check_mesh(c, num_devices)


MODE = Mode(
    name="compare",
    summary="kNN and linear probe of a pretrained student beside the untrained student and raw pixels.",
    check=check_config,
    run=run,
    not_compilable=("--mode=compile does not cover --mode=compare, which runs the kNN and the linear probe on a "
                    "small student in one process: "
                    "compile configs/knn_demo.py and configs/linear_probe_demo.py instead."),
)
