"""--mode=segment: a tiny UperNet run from a restored student learns, resumes and survives preemption exactly, runs
end to end on the real input pipeline from a random initialisation, and compiles for a TPU slice."""
import json
import logging
import os
import signal

import eval_testing
import jax
import numpy as np
import pytest
from train_testing import as_if_written_by_two_processes, recording_stream_factory

from configs import segment_ade20k_vit_b16, segment_demo
from dtm_jax import aot, optim, registry, sharding, students
from dtm_jax.models import vit
from dtm_jax.modes import segment
from dtm_jax.runner import run as runner
from dtm_jax.runtime import checkpoint, errors, metrics

CROP, CANVAS, BATCH, NUM_CLASSES = 32, 48, 16, 4
TOTAL_STEPS, EVAL_EVERY = 6, 3
# Class c is a region tinted by COLOURS[c] (uint8, as the pipeline sends it) under noise.
COLOURS = np.array([[230, 40, 40], [40, 230, 40], [40, 40, 230], [200, 200, 200]], np.float32)


def student_config():
  """A 4-block test student with 16-pixel patches (BEiT's pyramid adapters assume them); 2×2 tokens at the crop."""
  return vit.get_config("test", image_size=32, patch_size=16, depth=4, out_dim=8)


def tinted_scene(rng, size):
  """uint8 image [size, size, 3] and label [size, size]: two vertical bands of random classes, split at random."""
  split = rng.integers(size // 4, 3 * size // 4)
  classes = rng.integers(0, NUM_CLASSES, 2)
  label = np.where(np.arange(size)[None, :] < split, classes[0], classes[1]).repeat(size, 0).astype(np.uint8)
  image = COLOURS[label] + rng.normal(scale=25.0, size=(size, size, 3))
  return np.clip(image, 0, 255).astype(np.uint8), label


class SceneStream:
  """Infinite training batches, batch s a function of (seed, s); save/restore its position like the real input.
  `sigterm_at`: the process sends itself SIGTERM when asked for that batch (a preemption notice mid-run)."""

  def __init__(self, seed=0, sigterm_at=None):
    self.seed, self.step, self.sigterm_at, self.first = seed, 0, sigterm_at, None

  def __iter__(self):
    return self

  def __next__(self):
    if self.step == self.sigterm_at:
      os.kill(os.getpid(), signal.SIGTERM)
    self.first = self.step if self.first is None else self.first
    rng = np.random.default_rng([self.seed, self.step])
    self.step += 1
    images, labels = zip(*[tinted_scene(rng, CROP) for _ in range(BATCH)])
    return {"image": np.stack(images), "label": np.stack(labels)}

  def save(self, path):
    with open(path, "w") as f:
      json.dump({"step": self.step}, f)

  def restore(self, path):
    with open(path) as f:
      self.step = json.load(f)["step"]


def scene_eval_batches(num_images=20, batch_size=8):
  """One pass on CANVAS² canvases: each scene in the top-left CROP+8 square, the rest ignored (255); the last batch
  padded with invalid images, as input_pipeline.segmentation.build_segment_eval gives them."""
  rng = np.random.default_rng(123)
  size = CROP + 8
  padded = -(-num_images // batch_size) * batch_size
  images = np.zeros((padded, CANVAS, CANVAS, 3), np.uint8)
  labels = np.full((padded, CANVAS, CANVAS), 255, np.uint8)
  for i in range(num_images):
    images[i, :size, :size], labels[i, :size, :size] = tinted_scene(rng, size)
  labels[num_images:, :size, :size] = 0  # invalid images' labels must not count
  valid = np.arange(padded) < num_images
  return [{"image": images[i:i + batch_size], "label": labels[i:i + batch_size], "valid": valid[i:i + batch_size]}
          for i in range(0, padded, batch_size)]


def tiny_config(pretraining_workdir, **fields):
  config = segment_demo.get_config()
  config.pretrained.update(workdir=str(pretraining_workdir), step=5)
  config.pretrained.architecture = dict(variant="test", image_size=32, patch_size=16, depth=4, out_dim=8)
  config.segmenter.update(num_classes=NUM_CLASSES, channels=16, aux_channels=8, pool_scales=(1, 2))
  config.update(crop_size=CROP, batch_size=BATCH, eval_batch_size=8, total_steps=TOTAL_STEPS, warmup_steps=2,
                eval_every_steps=EVAL_EVERY, log_every=1, **fields)
  config.eval.update(window=CROP, stride=16, canvas_size=CANVAS)
  config.optim.update(base_lr=3e-3, layer_decay=0.9)
  return config


def run_segment(config, workdir, mesh, stream, student_fn):
  return segment.train_and_evaluate(config, str(workdir), student_fn=student_fn,
                                    train_data_fn=lambda crop, start_step=0: stream,
                                    eval_data_fn=scene_eval_batches, mesh=mesh)


def final_params(workdir):
  return jax.device_get(checkpoint.restore_params(workdir / "checkpoints", TOTAL_STEPS)[0])


def eval_rows(workdir):
  return [r for r in metrics.read_jsonl(workdir / "metrics.jsonl") if "miou" in r]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  root = tmp_path_factory.mktemp("segment")
  eval_testing.save_pretraining_checkpoints(root / "pretrain", steps=(5,), config=student_config())
  return root


@pytest.mark.slow
def test_segment_learns_and_resumes_and_preempts_like_an_uninterrupted_run(pretrained):
  mesh = sharding.make_mesh(data=4, fsdp=2)
  config = tiny_config(pretrained / "pretrain")
  restored = []

  def restore_student():
    restored.append(students.restore_student(config.pretrained, mesh, model_overrides=config.model))
    return restored[-1]

  whole = run_segment(config, pretrained / "whole", mesh, SceneStream(), restore_student)
  assert whole["checkpoint"].endswith("checkpoints/5") and whole["step"] == 5 and whole["steps"] == TOTAL_STEPS
  assert whole["preempted"] == 0.0
  assert 0.0 <= whole["miou"] <= 100.0 and whole["best_miou"] >= whole["miou"]
  assert whole["aacc"] > 100.0 / NUM_CLASSES  # better than one class everywhere would be, on average
  assert whole["num_eval_images"] == 20  # the padding images of the last batch are not scored
  assert len(whole["per_class_iou"]) == NUM_CLASSES
  assert [r["step"] for r in eval_rows(pretrained / "whole")] == [EVAL_EVERY, TOTAL_STEPS]
  saved = json.loads((pretrained / "whole" / "per_class_iou.json").read_text())
  assert saved["step"] == TOTAL_STEPS and saved["iou"] == whole["per_class_iou"]
  losses = [r["train_loss"] for r in metrics.read_jsonl(pretrained / "whole" / "metrics.jsonl") if "train_loss" in r]
  assert all(np.isfinite(losses)) and len(losses) == TOTAL_STEPS

  # The same run stopped by stop_after_step=2, rerun, preempted by SIGTERM during step 5, rerun: the same result.
  stopped_config = tiny_config(pretrained / "pretrain", stop_after_step=2)
  first = run_segment(stopped_config, pretrained / "interrupted", mesh, SceneStream(), restore_student)
  assert first["steps"] == 2 and first["preempted"] == 1.0 and "miou" not in first
  stream = SceneStream(sigterm_at=4)  # drawn while step 4 runs (double buffering): step 5 runs, then is saved
  with pytest.raises(errors.Interrupted) as stop:
    run_segment(config, pretrained / "interrupted", mesh, stream, restore_student)
  assert stop.value.exit_code == 0 and stream.first == 2
  assert checkpoint.Checkpointer(pretrained / "interrupted").all_steps()[-1] == 5
  stream = SceneStream()
  resumed = run_segment(config, pretrained / "interrupted", mesh, stream, restore_student)
  assert len(restored) == 2  # the student is restored only when starting afresh (once per workdir)
  assert stream.first == 5 and stream.step == TOTAL_STEPS

  for key in ("miou", "aacc", "macc", "best_miou", "per_class_iou", "steps"):
    assert resumed[key] == whole[key], key
  assert eval_rows(pretrained / "interrupted") == eval_rows(pretrained / "whole")
  jax.tree.map(np.testing.assert_array_equal, final_params(pretrained / "interrupted"),
               final_params(pretrained / "whole"))


@pytest.mark.slow
def test_segmentation_resumes_a_checkpoint_of_another_process_count_at_its_step(pretrained, caplog):
  """Another slice (issue 17): the step is restored without the 2-process job's iterator states, and the input is
  rebuilt at that step, with one warning."""
  mesh = sharding.make_mesh(data=4, fsdp=2)
  student = lambda: students.restore_student(tiny_config(pretrained / "pretrain").pretrained, mesh)
  workdir = pretrained / "other_slice"
  run_segment(tiny_config(pretrained / "pretrain", stop_after_step=EVAL_EVERY), workdir, mesh, SceneStream(), student)
  as_if_written_by_two_processes(workdir / "checkpoints" / str(EVAL_EVERY))
  starts = []
  train_data_fn = recording_stream_factory(SceneStream, starts)

  with caplog.at_level(logging.WARNING):
    result = segment.train_and_evaluate(tiny_config(pretrained / "pretrain"), str(workdir), student_fn=student,
                                        train_data_fn=train_data_fn, eval_data_fn=scene_eval_batches, mesh=mesh)
  assert starts == [EVAL_EVERY]  # built once, at the restored step; no iterator state was tried
  warnings = [r.getMessage() for r in caplog.records if "written by 2 processes" in r.getMessage()]
  assert len(warnings) == 1 and f"rebuilt at global batch {EVAL_EVERY}" in warnings[0], caplog.text
  assert result["steps"] == TOTAL_STEPS


def test_poly_schedule_is_mmcv_poly_with_linear_warmup():
  """mmcv 1.x: lr(t) = peak·(1 − t/T)^p, times (r + (1 − r)·t/W) during the W warm-up steps."""
  schedule = optim.warmup_poly(1e-3, total_steps=100, warmup_steps=10, min_lr=0.0, power=1.0, warmup_ratio=1e-6)
  expected = {0: 1e-3 * 1e-6, 5: 1e-3 * 0.95 * (1e-6 + (1 - 1e-6) * 0.5), 10: 1e-3 * 0.9, 60: 1e-3 * 0.4, 100: 0.0}
  for step, lr in expected.items():
    assert float(schedule(step)) == pytest.approx(lr, rel=1e-5, abs=1e-12), step
  squared = optim.warmup_poly(1.0, total_steps=10, warmup_steps=0, min_lr=0.1, power=2.0)
  assert float(squared(5)) == pytest.approx(0.1 + 0.9 * 0.25)


def test_segment_configs_are_valid_and_mistakes_are_named():
  assert not registry.problems("segment", segment_ade20k_vit_b16.get_config(), num_devices=8)
  assert registry.mode_of(segment_ade20k_vit_b16.get_config()) == "segment"
  config = segment_demo.get_config()
  config.eval.update(stride=40, window=24)
  config.segmenter.update(out_indices=(0, 1, 2, 4), ignore_index=3)
  found = "\n".join(registry.problems("segment", config, num_devices=1))
  for field in ("eval.stride=40", "eval.window=24", "segmenter.out_indices", "segmenter.ignore_index=3"):
    assert f"config.{field}" in found, field


@pytest.mark.slow
def test_segment_run_end_to_end_from_scratch_on_fashion_mnist(tmp_path):
  """`main.py --mode=segment` on the offline demo task through the real input pipeline, from a random
  initialisation (`pretrained.workdir=""`): results.json with mIoU, aAcc and per-class IoU of the 11 classes."""
  config = segment_demo.get_config()
  config.pretrained.update(workdir="")
  config.pretrained.architecture = dict(variant="test", image_size=32, patch_size=16, depth=4, out_dim=8)
  config.segmenter.update(channels=16, aux_channels=8, pool_scales=(1, 2))
  config.update(batch_size=8, eval_batch_size=8, total_steps=2, warmup_steps=1, eval_every_steps=2, log_every=1)
  config.eval.update(window=32, stride=24, canvas_size=56, num_images=16)
  result = runner.run("segment", config, str(tmp_path))
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["mode"] == "segment" and saved["step"] is None and saved["checkpoint"] == "(random initialisation)"
  assert saved["num_eval_images"] == 16 and len(saved["per_class_iou"]) == 11
  assert saved["miou"] == result["miou"] and 0.0 <= saved["miou"] <= 100.0 and 0.0 <= saved["aacc"] <= 100.0


@pytest.mark.slow
def test_segment_programs_compile_for_a_tpu_slice():
  topo = aot.topology("v5e:2x2")
  config = segment_demo.get_config()
  config.pretrained.architecture = dict(variant="test", image_size=32, patch_size=16, depth=4, out_dim=8)
  config.segmenter.update(channels=16, aux_channels=8, pool_scales=(1, 2))
  config.update(batch_size=8, eval_batch_size=4)
  reports = aot.compile_config(config, topo)
  assert [r["program"] for r in reports] == ["train_step", "eval_step"]
  for report in reports:
    assert 0 < report["hbm"]["total_bytes"] < report["hbm"]["capacity_bytes"]
    assert report["flops_per_chip"]["compiler"] > 0 and report["flops_per_chip"]["analytic"] > 0
    assert report["mesh"] == {"data": 4, "fsdp": 1}
  assert "all-reduce" in reports[0]["collectives"]  # gradients (and SyncBN statistics) over the data axis
