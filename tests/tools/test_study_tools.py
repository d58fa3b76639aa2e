"""The study, plotting and spatial-consistency tools: run configs, summaries, measures, pictures, the EMA teacher."""
import json

import jax
import jax.numpy as jnp
import matplotlib.image
import ml_collections
import numpy as np
import pytest
from etils import epath
from flax import nnx

from configs import test_tiny
from dtm_jax import registry, sharding, targets
from dtm_jax.evaluators import frozen_features
from dtm_jax.models import functional, vit
from dtm_jax.modes import pretrain as train
from dtm_jax.runtime import checkpoint as checkpoint_lib
from tools import (
  figures,
  spatial_measures,
  study,
  study_scores,
  study_summary,
  teachers,
)

GRID = 7


# ----- study: run configs and the grid -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["pixels", "ema", "clip"])
def test_study_configs_are_valid_and_match_their_target(kind):
  config = study.study_config(kind, "dtm", 2, steps=40, batch_size=16, ema_momentum=0.98, fixed_schedule=(24, 4))
  registry.validate("pretrain", config)
  model_cfg = train.student_config(config)
  target = targets.build_target(config.target, image_size=28, patch_size=4, student_config=model_cfg)
  assert target.out_dim == model_cfg.out_dim
  assert (config.seed, config.total_steps, config.batch_size, config.checkpoint_every) == (2, 40, 16, 40)
  assert config.target.kind == kind and config.dtm.enabled and not config.dtm.fixed_schedule
  if kind == "ema":
    assert config.target.ema_momentum == 0.98


def test_study_config_of_the_mae_style_student():
  config = study.study_config("pixels", "tokenwise", 1, steps=20, batch_size=16, ema_momentum=0.99,
                              fixed_schedule=(24, 4), student="mae", decoder=(32, 1, 2))
  registry.validate("pretrain", config)
  model_cfg = train.student_config(config)
  assert (model_cfg.num_visible, model_cfg.decoder_width, model_cfg.decoder_depth) == (12, 32, 1)
  assert (model_cfg.width, model_cfg.depth) == (96, 4) and not config.dtm.enabled  # the demo's encoder


def test_study_config_of_the_trained_clip_teacher_reads_its_directory(tmp_path):
  from tools import semantic_teacher  # pylint: disable=g-import-not-at-top
  tower = semantic_teacher.tower_config(width=32, depth=1, num_heads=2, mlp_dim=64, proj_dim=24)
  semantic_teacher.save(tmp_path / "teacher", tower, semantic_teacher.init_teacher(tower, 10, seed=0)[1], {})
  config = study.study_config("clip_fmnist", "tokenwise", 1, steps=20, batch_size=16, ema_momentum=0.99,
                              fixed_schedule=(24, 4), clip_teacher=str(tmp_path / "teacher"))
  registry.validate("pretrain", config)
  assert config.target.kind == "clip" and config.target.checkpoint == str(tmp_path / "teacher")
  assert config.model.out_dim == 24 and not config.dtm.enabled
  target = targets.build_target(config.target, image_size=28, patch_size=4, student_config=train.student_config(config))
  assert target.out_dim == 24
  with pytest.raises(FileNotFoundError, match="tools.train_teacher"):
    study.study_config("clip_fmnist", "dtm", 0, steps=20, batch_size=16, ema_momentum=0.99, fixed_schedule=(24, 4),
                       clip_teacher=str(tmp_path / "nowhere"))


def test_study_variants_set_tokenwise_and_fixed_schedules():
  kwargs = dict(steps=10, batch_size=16, ema_momentum=0.99, fixed_schedule=(24, 4))
  assert not study.study_config("pixels", "tokenwise", 0, **kwargs).dtm.enabled
  fixed = study.study_config("pixels", "fixed", 0, **kwargs)
  assert fixed.dtm.enabled and tuple(fixed.dtm.fixed_schedule) == (24, 4)
  registry.validate("pretrain", fixed)
  with pytest.raises(ValueError, match="Unknown variant"):
    study.study_config("pixels", "halfway", 0, **kwargs)
  teacher = study.study_config("checkpoint", "dtm", 0, teacher_dir="/nowhere/run", **kwargs)
  with pytest.raises(ValueError, match="does not exist"):
    registry.validate("pretrain", teacher)


def test_grid_parsing_and_run_order():
  grid = study.parse_grid(["checkpoint:dtm", "pixels:dtm+tokenwise"])
  assert grid == {"checkpoint": ["dtm"], "pixels": ["dtm", "tokenwise"]}
  runs = study.planned_runs(grid, seeds=2)
  assert runs[-2:] == [("checkpoint", "dtm", 0), ("checkpoint", "dtm", 1)]  # the taught kind runs last
  assert len(runs) == 6 and len(set(runs)) == 6
  assert runs[:2] == [("pixels", "dtm", 0), ("pixels", "tokenwise", 0)]  # seed by seed: pairs complete early
  for bad in (["pixels"], ["pixels:dtm+warp"], ["mae:dtm"]):
    with pytest.raises(ValueError, match="--grid entry"):
      study.parse_grid(bad)


# ----- study: summaries ----------------------------------------------------------------------------------------------
def record(kind, variant, seed, knn, probe, loss=None):
  r = {"kind": kind, "variant": variant, "seed": seed, "knn_top1": knn, "probe_top1": probe}
  if loss is not None:
    r.update(final_loss=loss, steps=100, batch_size=32)
  return r


def test_summary_gives_mean_std_and_paired_differences():
  records = [record("pixels", "dtm", 0, 60.0, 70.0, 0.1), record("pixels", "dtm", 1, 62.0, 74.0, 0.1),
             record("pixels", "tokenwise", 0, 59.0, 71.0, 0.2), record("pixels", "tokenwise", 1, 58.0, 72.0, 0.2),
             record("pixels", "tokenwise", 2, 40.0, 40.0, 0.2),  # no DTM partner: left out of the differences
             record("raw_pixels", "-", 0, 80.0, 76.0)]
  summary = study_summary.summarise(records)
  rows = {(r["kind"], r["variant"]): r for r in summary["rows"]}
  assert [r["kind"] for r in summary["rows"]] == ["raw_pixels", "pixels", "pixels"]  # floors first
  np.testing.assert_allclose(rows["pixels", "dtm"]["knn_top1"], (61.0, np.std([60, 62], ddof=1)))
  assert rows["pixels", "tokenwise"]["n"] == 3 and rows["raw_pixels", "-"]["knn_top1"] == (80.0, 0.0)
  (diff,) = summary["dtm_minus"]
  assert diff["versus"] == "tokenwise" and diff["n"] == 2
  np.testing.assert_allclose(diff["knn_top1"], (2.5, np.std([1.0, 4.0], ddof=1)))
  np.testing.assert_allclose(diff["probe_top1"][0], 0.5)
  table = study_summary.markdown(summary, {"steps": [100], "batch_size": [32]})
  assert "| pixels (normalised patches) | DTM (dynamic) | 61.00 ± 1.41 | 72.00 ± 2.83 |" in table
  assert "+2.50 ± 2.12" in table


def test_report_rebuilds_the_generated_block_from_run_files(tmp_path):
  out = epath.Path(tmp_path / "study")
  study_summary.write_json(out / "runs" / "ema-dtm-s0" / "eval.json", record("ema", "dtm", 0, 55.0, 66.0, 0.3))
  study_summary.write_json(out / "floors" / "random_init-s0" / "eval.json", record("random_init", "-", 0, 50.0, 49.0))
  study_summary.record_call(out, argv=["--grid=ema:dtm"], wall_seconds=30.0, runs=1)
  study_summary.record_call(out, argv=["--seeds=1"], wall_seconds=150.0, runs=2)
  results = tmp_path / "RESULTS.md"
  begin, end = study_summary.markers()
  results.write_text(f"# Title\nprose\n{begin}\nold table\n{end}\nmore prose\n")
  study_summary.write_report(out, str(results))
  text = results.read_text()
  assert "old table" not in text and text.startswith("# Title\nprose\n") and text.endswith("more prose\n")
  assert "| ema (momentum teacher) | DTM (dynamic) | 55.00 ± 0.00 |" in text
  assert "100 steps at batch 32; 1 runs (--grid=ema:dtm) took 0 min; 2 runs (the default --grid) took 2 min." in text
  assert json.loads((out / "summary.json").read_text())["settings"]["steps"] == [100]
  results.write_text("no markers here\n")
  with pytest.raises(ValueError, match="no generated block"):
    study_summary.write_report(out, str(results))


def test_fine_tuning_scores_get_their_own_columns_and_paired_differences(tmp_path):
  records = [dict(record("clip_fmnist", v, seed, 60.0 + seed, 70.0, 0.1), finetune_top1=80.0 + seed + (v == "dtm"))
             for v in ("dtm", "tokenwise") for seed in (0, 1, 2)] + [record("random_init", "-", 0, 50.0, 49.0)]
  summary = study_summary.summarise(records)
  (diff,) = summary["dtm_minus"]
  np.testing.assert_allclose(diff["finetune_top1"], (1.0, 0.0), atol=1e-12)
  table = study_summary.markdown(summary, {"steps": [500], "batch_size": [128]})
  assert "| kNN top-1 (%) | linear probe top-1 (%) | fine-tuned top-1 (%) | final train loss | runs |" in table
  assert "| clip (tower trained on labelled Fashion-MNIST) | DTM (dynamic) | 61.00 ± 1.00 | 70.00 ± 0.00 | " \
         "82.00 ± 1.00 |" in table
  assert "| floor: student at init | — | 50.00 ± 0.00 | 49.00 ± 0.00 | — |" in table
  assert "| +0.00 ± 0.00 | +0.00 ± 0.00 | +1.00 ± 0.00 | 3 |" in table
  # Two studies keep two generated blocks in one results file; each report replaces only its own.
  results = tmp_path / "RESULTS.md"
  first, semantic = study_summary.markers(), study_summary.markers("semantic study")
  results.write_text(f"{first[0]}\nfirst\n{first[1]}\nprose\n{semantic[0]}\nsecond\n{semantic[1]}\n")
  text = study_summary.replace_block(results.read_text(), table, "semantic study")
  assert "\nfirst\n" in text and "second" not in text and table in text


def test_run_one_resumes_a_study_run_part_by_part(tmp_path, monkeypatch):
  """Pretraining and scoring are skipped once eval.json exists; fine-tuning runs once and is added to it."""
  out = epath.Path(tmp_path)
  calls = []

  def run(mode, config, workdir):
    if mode == "pretrain":
      return calls.append(("train", config.seed))
    calls.append((mode, config.pretrained.workdir, config.epochs, config.seed, workdir))
    return {"last_top1": 77.5}

  monkeypatch.setattr(study.runner, "run", run)
  run = out / "runs" / "pixels-dtm-s1"
  study_summary.write_json(run / "eval.json", record("pixels", "dtm", 1, 55.0, 66.0, 0.3))
  kwargs = dict(probe_epochs=1, steps=10, batch_size=16, ema_momentum=0.99, fixed_schedule=(24, 4))
  assert study.run_one(out, "pixels", "dtm", 1, None, None, **kwargs)["knn_top1"] == 55.0
  assert calls == []
  result = study.run_one(out, "pixels", "dtm", 1, None, None, finetune_epochs=2, **kwargs)
  assert calls == [("finetune", str(run), 2, 1, str(run / "finetune"))]
  assert result["finetune_top1"] == 77.5 and json.loads((run / "eval.json").read_text())["finetune_top1"] == 77.5
  study.run_one(out, "pixels", "dtm", 1, None, None, finetune_epochs=2, **kwargs)
  assert len(calls) == 1
  config = study.finetune_config(run, seed=1, epochs=2)
  assert config.warmup_epochs == 0.5 and config.num_classes == 10
  registry.validate("finetune", config, check_paths=False)


@pytest.mark.slow
def test_floors_include_the_teacher_reference_and_are_computed_once(tmp_path, monkeypatch):
  from tools import semantic_teacher  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  split = lambda n: frozen_features.Split(rng.normal(size=(n, 28, 28, 3)).astype(np.float32),
                                          (np.arange(n) % 10).astype(np.int32))
  tower = semantic_teacher.tower_config(width=32, depth=1, num_heads=2, mlp_dim=64, proj_dim=24)
  semantic_teacher.save(tmp_path / "teacher", tower, semantic_teacher.init_teacher(tower, 10, seed=0)[1], {})
  teacher = targets.build_target(ml_collections.ConfigDict(dict(kind="clip", checkpoint=str(tmp_path / "teacher"),
                                                                dtype="float32")), image_size=28, patch_size=4)
  out, mesh = epath.Path(tmp_path / "study"), sharding.make_mesh(-1, 1)
  study.run_floors(out, (split(40), split(20)), mesh, seeds=1, probe_epochs=1, teacher=teacher)
  records = {r["kind"]: r for r in study_summary.collect(out)}
  assert sorted(records) == ["random_init", "raw_pixels", "teacher"]
  assert all(0 <= r["knn_top1"] <= 100 and 0 <= r["probe_top1"] <= 100 for r in records.values())
  monkeypatch.setattr(study.study_scores, "scores", lambda *a, **k: pytest.fail("a finished floor was redone"))
  study.run_floors(out, (split(40), split(20)), mesh, seeds=1, probe_epochs=1, teacher=teacher)


# ----- frozen-feature scores -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_knn_and_probe_separate_easy_classes_and_not_random_labels():
  mesh = sharding.make_mesh(-1, 1)
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, 400)
  centres = rng.normal(size=(4, 16)) * 3
  features = centres[labels] + rng.normal(size=(400, 16))
  train_set = frozen_features.feature_set(features[:300], labels[:300], mesh)
  test_set = frozen_features.feature_set(features[300:], labels[300:], mesh)
  assert train_set.num_valid == 300
  assert frozen_features.knn_top1(train_set, test_set, mesh) > 90
  assert study_scores.probe_top1(train_set, test_set, mesh, seed=0, epochs=20, num_classes=4) > 90
  shuffled = frozen_features.feature_set(features[300:], rng.permutation(labels[300:]), mesh)
  assert frozen_features.knn_top1(train_set, shuffled, mesh) < 50


def test_padded_batches_mark_padding_invalid():
  batches = frozen_features.padded_batches({"x": np.arange(10)}, batch_size=8)
  assert [len(b["x"]) for b in batches] == [8, 8]
  assert batches[1]["valid"].tolist() == [True, True] + [False] * 6
  np.testing.assert_array_equal(np.concatenate([b["x"][b["valid"]] for b in batches]), np.arange(10))


# ----- spatial-consistency measures ----------------------------------------------------------------------------------
def test_neighbour_pairs_are_the_grid_edges():
  pairs = spatial_measures.neighbour_pairs(3)
  assert len(pairs) == 2 * 3 * 2
  rows, cols = np.divmod(pairs, 3)
  steps = np.abs(rows[:, 0] - rows[:, 1]) + np.abs(cols[:, 0] - cols[:, 1])
  assert np.all(steps == 1)


def test_group_means_raise_neighbour_cosine_where_groups_join_neighbours():
  rng = np.random.default_rng(0)
  tokens = rng.normal(size=(2, GRID * GRID, 8)).astype(np.float32)
  pairs = spatial_measures.neighbour_pairs(GRID)
  assert abs(spatial_measures.neighbour_cosine(tokens, pairs)) < 0.15  # independent tokens
  rows = np.repeat(np.arange(GRID), GRID)
  groups = np.stack([rows, rows])  # every grid row is one group
  morphed = teachers.group_means(tokens, groups)
  horizontal = len(pairs) // 2
  assert spatial_measures.same_group_share(groups, pairs) == pytest.approx(0.5)
  np.testing.assert_allclose(spatial_measures.neighbour_cosine(morphed[:, :, :], pairs[:horizontal]), 1.0, rtol=1e-5)
  keep = np.zeros((2, len(pairs)), bool)
  keep[:, horizontal:] = True
  assert spatial_measures.same_group_share(groups, pairs, keep) == 0.0


def test_random_group_control_keeps_group_sizes():
  rng = np.random.default_rng(1)
  groups = np.stack([np.repeat(np.arange(7), 7), np.minimum(np.arange(49), 20)])
  control = spatial_measures.shuffled_groups(groups, rng)
  for g, c in zip(groups, control):
    assert sorted(np.bincount(g)) == sorted(np.bincount(c))
  assert not np.array_equal(groups, control)


def test_object_tokens_find_inked_patches():
  images = np.zeros((1, 28, 28, 3), np.float32)
  images[0, 5, 9] = 0.8  # patch (row 1, col 2) of a 7×7 grid
  keep = spatial_measures.object_tokens(images, 4, ink=0.1)
  assert keep.sum() == 1 and keep[0, 1 * 7 + 2]


# ----- figures -------------------------------------------------------------------------------------------------------
def test_groups_overlay_colours_each_group_and_outlines_it():
  image = np.full((8, 8, 3), 0.5, np.float32)
  groups = np.array([0, 1, 0, 1])  # 2×2 grid of 4-pixel patches, row-major: left column vs right column
  rgb = figures.groups_overlay(image, groups, patch_size=4, scale=2)
  assert rgb.shape == (16, 16, 3)
  left, right = rgb[3, 2], rgb[3, 12]
  assert np.allclose(rgb[12, 2], left) and np.allclose(rgb[12, 12], right) and not np.allclose(left, right)
  np.testing.assert_allclose(rgb[:, 8], 1.0)  # the border between the two groups is white
  assert not np.allclose(rgb[:, 4], 1.0)  # no border inside a group


def test_figures_are_written_and_open(tmp_path):
  rng = np.random.default_rng(0)
  losses = {f"pixels-{v}-s{s}": {step: float(rng.uniform(0.1, 1)) for step in range(5, 55, 5)}
            for v in ("dtm", "tokenwise") for s in range(2)}
  figures.loss_curves(losses, epath.Path(tmp_path / "loss.png"))
  summary = study_summary.summarise([record("pixels", v, s, 60 + s, 70 - s) for v in ("dtm", "fixed") for s in (0, 1)]
                                    + [record("raw_pixels", "-", 0, 80, 76)])
  figures.probe_bars(summary, epath.Path(tmp_path / "bars.png"))
  groups = [rng.integers(0, 5, (2, 49)), rng.integers(0, 20, (2, 49))]
  figures.groups_figure(rng.uniform(size=(2, 28, 28, 3)), groups, ["a", "b"], 4, epath.Path(tmp_path / "groups.png"),
                        "heading")
  for name in ("loss.png", "bars.png", "groups.png"):
    picture = matplotlib.image.imread(tmp_path / name)
    assert picture.ndim == 3 and min(picture.shape[:2]) > 200 and picture.std() > 0.01


# ----- the EMA teacher of a finished run -----------------------------------------------------------------------------
def test_teachers_read_the_ema_teacher_from_a_run(tmp_path):
  config = test_tiny.get_config()
  config.target.kind = "ema"
  config.model.out_dim = 32
  model_cfg = train.student_config(config)
  _, student = functional.split_module(vit.PretrainViT(model_cfg, rngs=nnx.Rngs(0)))
  _, ema = functional.split_module(vit.PretrainViT(model_cfg, rngs=nnx.Rngs(1)))
  checkpointer = checkpoint_lib.Checkpointer(tmp_path, async_save=False)
  checkpointer.save(3, params=student, train={"step": jnp.int32(3), "ema_params": ema}, data_iterator=None,
                    metadata={})
  checkpointer.close()
  (tmp_path / "config.json").write_text(json.dumps(config.to_dict(), default=str))

  target, params = teachers.load(teachers.run_config(tmp_path), str(tmp_path))
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
  np.testing.assert_allclose(teachers.target_tokens(target, params, np.asarray(images)),
                             jax.jit(target.tokens)(ema, images), rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(jax.jit(target.tokens)(student, images) - target.tokens(params, images)).max()) > 1e-3
  with pytest.raises(ValueError, match="pass the run's workdir"):
    teachers.load(config)
  with pytest.raises(FileNotFoundError, match="config.json"):
    teachers.run_config(tmp_path / "nowhere")


def test_teacher_config_from_a_config_dict_builds_frozen_kinds():
  config = test_tiny.get_config()
  target, params = teachers.load(ml_collections.ConfigDict(json.loads(json.dumps(config.to_dict(), default=str))))
  assert target.kind == "clip" and params is target.params


@pytest.mark.slow
def test_spatial_analysis_runs_end_to_end_on_fashion_mnist():
  from configs import demo  # pylint: disable=g-import-not-at-top
  config = demo.get_config()
  config.target.kind = "pixels"
  config.model.out_dim = 48
  result = spatial_measures.analyse(config, None, schedules=[(24, 4)], split_names=("train", "test"),
                                    train_images=40, test_images=20, object_only=True, ink=0.1, probe_epochs=1,
                                    seed=0)
  assert result["tokens_per_image"] == 49 and 0 < result["kept_tokens_per_image"] < 49
  (schedule,) = result["schedules"]
  assert schedule["groups_per_image"] == 49 - 24
  assert 0 < schedule["neighbour_same_group"] < 1
  # DTM's premise, and what these (fixed) images show: morphed neighbours are more alike than single tokens.
  assert schedule["neighbour_cosine_morphed"] > result["neighbour_cosine_per_token"]
  assert 0 <= result["probe_top1_per_token"] <= 100 and 0 <= schedule["probe_top1_random_groups"] <= 100
  assert "| 24:4 | 25.0 |" in spatial_measures.table(result)
  # Matching joins the most similar tokens: the neighbours it joins were more alike than neighbours on average.
  assert schedule["joined_pairs_cosine_before"] > result["neighbour_cosine_per_token"]
