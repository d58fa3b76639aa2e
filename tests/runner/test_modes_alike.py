"""One behaviour per situation in every mode (dtm_jax/runner): signals, config drift on resume, a second writer.

Each mode runs in-process through `runner.run` on tiny configs with its real input pipeline (an image folder, or
Fashion-MNIST canvases for segmentation) and a tiny random pretrained student.
"""
import os
import re
import signal

import eval_testing
import pytest
import train_testing

from configs import common as config_common
from configs import (
  compare_demo,
  finetune_demo,
  knn_demo,
  linear_probe_demo,
  segment_demo,
)
from dtm_jax.evaluators import encoding
from dtm_jax.models import vit
from dtm_jax.runner import resume
from dtm_jax.runner import run as runner
from dtm_jax.runtime import checkpoint, errors, metrics, workdir_lock

TRAINING_MODES = ("pretrain", "finetune", "segment", "linear_probe")
ALL_MODES = TRAINING_MODES + ("knn", "compare")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  """Two tiny pretraining runs (a 16² student for classification, a 32² one with patch 16 for segmentation) and a
  labelled image folder."""
  root = tmp_path_factory.mktemp("modes")
  eval_testing.save_pretraining_checkpoints(root / "pretrain", steps=(3,),
                                            config=eval_testing.tiny_student_config(depth=1))
  eval_testing.save_pretraining_checkpoints(
      root / "pretrain32", steps=(3,), config=vit.get_config("test", image_size=32, patch_size=16, depth=4, out_dim=8))
  eval_testing.write_image_folder(root / "images", per_class={"train": 16, "test": 6})
  return root


def tiny_config(mode, root, **fields):
  """A valid, quick config of `mode` (every run below changes only what its test is about)."""
  if mode == "pretrain":
    return train_testing.tiny_config(total_steps=6, checkpoint_every=3, log_every=1, **fields)
  if mode == "segment":
    config = segment_demo.get_config()
    config.pretrained.update(workdir=str(root / "pretrain32"), step=3)
    config.segmenter.update(channels=16, aux_channels=8, pool_scales=(1, 2))
    config.update(batch_size=8, eval_batch_size=8, total_steps=6, warmup_steps=1, eval_every_steps=3, log_every=1)
    config.eval.update(num_images=8)
  else:
    config = {"finetune": finetune_demo, "linear_probe": linear_probe_demo, "knn": knn_demo,
              "compare": compare_demo}[mode].get_config()
    config.pretrained.update(workdir=str(root / "pretrain"), step=3)
    config.input = config_common.input_config(source="folder", data_dir=str(root / "images"), train_split="train",
                                              eval_split="test", num_parallel_calls=2)
    if mode == "finetune":
      config.update(num_classes=eval_testing.NUM_CLASSES, num_train_examples=64, batch_size=16, eval_batch_size=8,
                    epochs=2, warmup_epochs=0, eval_every_epochs=1, log_every=1)
      config.mix.prob = 0.0
    elif mode == "linear_probe":
      config.update(num_classes=eval_testing.NUM_CLASSES, num_train_examples=64, batch_size=16, eval_batch_size=8,
                    epochs=6, warmup_epochs=1, eval_every_epochs=2, precompute_features=False)
    elif mode == "knn":
      config.knn.update(batch_size=16, num_train_examples=48)
    else:
      config.update(num_classes=eval_testing.NUM_CLASSES)
      config.compare.update(batch_size=16, num_train_examples=48)
      config.probe.update(batch_size=16, epochs=2, warmup_epochs=1)
  config.update(fields)
  return config


@pytest.fixture
def signal_after_first_line(monkeypatch):
  """Sends this process `signal` once the run has written its first metrics line (mid-run, as a scheduler would)."""
  def arm(sig):
    write = metrics.MetricsWriter.write_scalars
    sent = []

    def write_then_signal(self, step, scalars, **kwargs):
      write(self, step, scalars, **kwargs)
      if not sent:
        sent.append(step)
        os.kill(os.getpid(), sig)

    monkeypatch.setattr(metrics.MetricsWriter, "write_scalars", write_then_signal)
    return sent
  previous = signal.signal(signal.SIGINT, lambda signum, frame: None)  # a stray SIGINT never ends the session
  yield arm
  signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("sig, exit_code, name", [(signal.SIGTERM, 0, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")])
@pytest.mark.parametrize("mode", TRAINING_MODES)
def test_a_signal_saves_the_step_reached_and_every_mode_exits_alike(root, tmp_path, signal_after_first_line, mode,
                                                                    sig, exit_code, name):
  signal_after_first_line(sig)
  with pytest.raises(errors.Interrupted) as stopped:
    runner.run(mode, tiny_config(mode, root), tmp_path / "run")
  assert stopped.value.exit_code == exit_code  # main.py exits with it (errors.cli)
  found = re.search(rf"stopped \({name}\) after (step|epoch) (\d+) of (\d+); its checkpoint is in (\S+)\. Rerun",
                    str(stopped.value))
  assert found, str(stopped.value)
  assert int(found.group(2)) < int(found.group(3))
  _, saved = checkpoint.find_step_directory(tmp_path / "run")
  assert saved > 0


def with_lr(config, lr):
  (config.optimizer if "optimizer" in config else config.optim).base_lr = lr
  return config


@pytest.mark.parametrize("mode", TRAINING_MODES)
def test_resuming_with_a_changed_value_is_refused_naming_it_unless_allowed(root, tmp_path, mode):
  workdir = tmp_path / "run"
  runner.run(mode, tiny_config(mode, root), workdir)
  key = "optimizer.base_lr" if mode == "linear_probe" else "optim.base_lr"
  with pytest.raises(resume.ConfigDriftError, match=rf"differing keys: {key}\)"):
    runner.run(mode, with_lr(tiny_config(mode, root), 1e-5), workdir)
  result = runner.run(mode, with_lr(tiny_config(mode, root, allow_config_change=True), 1e-5), workdir)
  assert result["mode"] == mode


@pytest.mark.parametrize("mode", ALL_MODES)
def test_a_second_writer_is_refused_in_every_mode(root, tmp_path, mode):
  workdir = tmp_path / "run"
  holder = train_testing.hold_lock(workdir)
  try:
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {holder.pid}"):
      runner.run(mode, tiny_config(mode, root), workdir)
  finally:
    holder.kill()
    holder.wait()
  assert not (workdir / "checkpoints").exists() and not (workdir / "results.json").exists()


@pytest.mark.parametrize("sig, exit_code, name", [(signal.SIGTERM, 0, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")])
def test_a_signal_outside_the_training_steps_stops_at_once_with_the_same_exit(root, tmp_path, monkeypatch, sig,
                                                                              exit_code, name):
  """The probe encoding its features once, before any step: the signal ends it at once, one line, same status."""
  extract = encoding.extract_features

  def extract_then_signal(*args, **kwargs):
    os.kill(os.getpid(), sig)
    return extract(*args, **kwargs)

  monkeypatch.setattr(encoding, "extract_features", extract_then_signal)
  previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
  try:
    with pytest.raises(errors.Interrupted, match=rf"stopped \({name}\) outside its training steps") as stopped:
      runner.run("linear_probe", tiny_config("linear_probe", root, precompute_features=True), tmp_path / "run")
  finally:
    signal.signal(signal.SIGINT, previous)
  assert stopped.value.exit_code == exit_code
