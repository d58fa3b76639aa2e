"""`--mode=compare` end to end on a tiny checkpoint and an image folder: three rows (pretrained, untrained, raw
pixels) of kNN and probe top-1 in the printed table and in results.json, and its config refused or accepted before
anything runs."""
import importlib
import json

import eval_testing
import numpy as np
import pytest

from configs import common as config_common
from configs import compare_demo, demo
from dtm_jax import aot, registry, sharding, students
from dtm_jax.evaluators import encoding, frozen_features
from dtm_jax.modes import compare
from dtm_jax.runner import run as runner
from dtm_jax.runtime import errors

RUN_SEED = 3  # the pretraining seed the checkpoint records: the untrained student's


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("compare")
  eval_testing.save_pretraining_checkpoints(root / "pretrain", steps=(2,),
                                            config=eval_testing.tiny_student_config(depth=1),
                                            run_config={"seed": RUN_SEED})
  images = eval_testing.write_image_folder(root / "images", per_class={"train": 12, "test": 5})
  config = compare_demo.get_config()
  config.pretrained.workdir = str(root / "pretrain")
  config.input = config_common.input_config(source="folder", data_dir=str(images), train_split="train",
                                            eval_split="test", num_parallel_calls=2)
  config.num_classes = eval_testing.NUM_CLASSES
  config.knn.k = 5
  config.compare.update(batch_size=16, num_train_examples=40, num_eval_examples=0)
  config.probe.update(epochs=3, warmup_epochs=1, batch_size=8)
  return root, config


@pytest.mark.slow
def test_compare_run_prints_and_saves_three_rows(setup, capsys):
  root, config = setup
  result = runner.run("compare", config, str(root / "compare"))
  printed = capsys.readouterr().out
  saved = json.loads((root / "compare" / "results.json").read_text())
  assert saved == json.loads(json.dumps(result))
  assert saved["mode"] == "compare" and saved["step"] == 2 and saved["untrained_seed"] == RUN_SEED
  assert saved["bank_size"] == 40 and saved["num_queries"] == 4 * 5  # a slice of train, all of test
  assert compare.format_table(saved) in printed
  for key, row in compare.ROWS:
    for score in ("knn_top1", "probe_top1"):
      assert 0.0 <= saved[f"{key}_{score}"] <= 100.0
    line = next(line for line in printed.splitlines() if line.startswith(row))
    assert f"{saved[f'{key}_knn_top1']:.1f}%" in line and f"{saved[f'{key}_probe_top1']:.1f}%" in line
  assert saved["raw_pixels_knn_top1"] > 50.0  # colours are trivially separable from their pixels


def test_untrained_row_is_the_student_pretraining_initialised(setup):
  """The untrained student is initialised with the run's seed from the checkpoint (a converted checkpoint, which
  records none, takes config.seed) and encodes differently from another seed's."""
  root, config = setup
  mesh = sharding.config_mesh(config)
  student = students.restore_student(config.pretrained, mesh)
  assert compare.pretraining_seed(student, default=11) == RUN_SEED
  converted = students.Student(student.config, student.model, student.params, checkpoint="converted", step=None)
  assert compare.pretraining_seed(converted, default=11) == 11
  images = np.random.default_rng(0).normal(size=(8, 16, 16, 3)).astype(np.float32)
  split = frozen_features.Split(images, np.zeros(8, np.int32))
  def features(seed):
    untrained = students.initial_student(student.config, mesh, seed=seed)
    encode = encoding.feature_fn(untrained)
    return np.asarray(frozen_features.encoder_features(encode, untrained.params, split, mesh, batch_size=8).features)

  assert np.array_equal(features(RUN_SEED), features(RUN_SEED))
  assert not np.allclose(features(RUN_SEED), features(RUN_SEED + 1))


def test_format_table_shows_each_rows_numbers():
  numbers = {"pretrained_knn_top1": 61.04, "pretrained_probe_top1": 71.66, "untrained_knn_top1": 53.71,
             "untrained_probe_top1": 50.24, "raw_pixels_knn_top1": 82.05, "raw_pixels_probe_top1": 78.07}
  table = compare.format_table({**numbers, "dataset": "fashion_mnist", "eval_split": "test", "num_queries": 10_000,
                                "train_split": "train", "bank_size": 20_000, "untrained_seed": 0})
  lines = table.splitlines()
  assert "10,000 images" in lines[0] and "20,000 train images" in lines[0]
  assert lines[2].startswith("pretrained student") and lines[2].split()[-2:] == ["61.0%", "71.7%"]
  assert lines[3].startswith("untrained student") and lines[3].split()[-2:] == ["53.7%", "50.2%"]
  assert lines[4].startswith("raw pixels") and lines[4].split()[-2:] == ["82.0%", "78.1%"]


@pytest.mark.parametrize("field, value", [("compare.batch_size", 12), ("probe.batch_size", 12), ("knn.k", 0),
                                          ("probe.warmup_epochs", 99), ("probe.optimizer.name", "adam")])
def test_bad_compare_values_are_refused_before_anything_runs(tmp_path, field, value):
  config = compare_demo.get_config()
  *parents, leaf = field.split(".")
  node = config
  for parent in parents:
    node = node[parent]
  node[leaf] = value
  with pytest.raises(errors.ConfigError, match="Invalid config") as error:
    runner.run("compare", config, str(tmp_path / "run"))
  assert f"config.{field}={value!r}" in str(error.value)
  assert not (tmp_path / "run").exists()


def test_demo_ends_with_a_valid_compare_and_compile_refuses_it():
  followup = demo.get_config().then_evaluate
  config = importlib.import_module(followup.config_module).get_config()
  assert config.mode == "compare" and not registry.problems(config.mode, config, num_devices=8)
  with pytest.raises(ValueError, match="does not cover --mode=compare"):
    aot.compilable(registry.mode_of(config))
