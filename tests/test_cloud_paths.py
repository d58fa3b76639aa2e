"""`gs://` paths end to end against a GCS emulator on 127.0.0.1 (tests/gcs_emulator.py says how each client is pointed
at it): a converted teacher, pretraining into a bucket, resuming there, and evaluating from it. Also the files epath
writes through its tf.io.gfile backend (the one used in production when TensorFlow is installed), with a fake gfile.
"""
import json
import os
import subprocess
import sys

import eval_testing
import gcs_emulator
import jax
import numpy as np
import pytest
from etils import epath
from flax import nnx
from train_testing import REPO

from configs import common as config_common
from dtm_jax import targets
from dtm_jax.models import clip, convert, functional
from dtm_jax.runtime import metrics

pytestmark = pytest.mark.gcs

BUCKET = gcs_emulator.BUCKET


def _teacher():
  """The random CLIP tower configs/test_tiny.py's target describes, as a converted checkpoint."""
  cfg = config_common.pretrain_config().target
  cfg.update(variant="test", overrides={"patch_size": 4}, dtype="float32")
  clip_cfg = targets.random_clip_config(cfg, image_size=16)
  _, params = functional.split_module(clip.CLIPVision(clip_cfg, rngs=nnx.Rngs(3)))
  return convert.Converted("clip", clip_cfg, jax.tree.map(np.asarray, params))


def test_converted_checkpoint_round_trips_through_a_bucket(gcs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # a path mistaken for a local one would appear here (as ./gs:/...)
  converted = _teacher()
  convert.save_converted(converted, f"gs://{BUCKET}/converted/clip", source={"format": "test"})
  fs = gcs.gcsfs()
  assert fs.exists(f"{BUCKET}/converted/clip/{convert.CONFIG_FILE}")
  assert fs.exists(f"{BUCKET}/converted/clip/{convert.PARAMS_DIR}")
  module = convert.load_converted(f"gs://{BUCKET}/converted/clip")
  _, loaded = functional.split_module(module)
  jax.tree.map(np.testing.assert_array_equal, loaded, converted.params)
  with pytest.raises(convert.ConversionError, match="already holds"):
    convert.save_converted(converted, f"gs://{BUCKET}/converted/clip")
  assert not os.path.exists(tmp_path / "gs:")


@pytest.mark.torch
def test_pytorch_and_safetensors_weights_are_read_from_a_bucket(gcs):
  import io  # pylint: disable=g-import-not-at-top

  torch = pytest.importorskip("torch")
  from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
  weights = {"visual.proj": np.arange(6, dtype=np.float32).reshape(2, 3), "visual.ln_post.bias": np.ones(3, np.float32)}
  epath.Path(f"gs://{BUCKET}/weights/w.safetensors").write_bytes(save(weights))
  buffer = io.BytesIO()
  torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in weights.items()}}, buffer)
  epath.Path(f"gs://{BUCKET}/weights/w.pt").write_bytes(buffer.getvalue())
  for name in ("w.safetensors", "w.pt"):
    read = convert.read_checkpoint(f"gs://{BUCKET}/weights/{name}")
    assert sorted(read) == sorted(weights)
    for key, value in weights.items():
      np.testing.assert_array_equal(read[key], value)


def test_study_records_are_written_to_a_bucket(gcs):
  from tools import study_summary  # pylint: disable=g-import-not-at-top
  path = epath.Path(f"gs://{BUCKET}/study/runs/a/eval.json")
  study_summary.write_json(path, {"knn_top1": 1.0})
  study_summary.write_json(path, {"knn_top1": 2.0})  # overwrites
  assert json.loads(path.read_text()) == {"knn_top1": 2.0}


def _main(gcs, *args, timeout=240):
  env = {**os.environ, **gcs.env, "JAX_PLATFORMS": "cpu"}
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "").strip()
  proc = subprocess.run([sys.executable, "-c", gcs_emulator.LAUNCHER, "main.py", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


@pytest.mark.slow
def test_convert_pretrain_resume_and_evaluate_in_a_bucket(gcs, tmp_path):
  teacher, workdir = f"gs://{BUCKET}/e2e/clip", f"gs://{BUCKET}/e2e/run"
  convert.save_converted(_teacher(), teacher)
  pretrain = ["--config=configs/test_tiny.py", f"--workdir={workdir}", "--config.target.init=checkpoint",
              f"--config.target.checkpoint={teacher}", "--config.async_checkpointing=False"]
  _main(gcs, *pretrain, "--config.stop_after_step=10")
  fs = gcs.gcsfs()
  run = f"{BUCKET}/e2e/run"
  assert fs.exists(f"{run}/checkpoints/10") and fs.exists(f"{run}/config.json")
  assert [r["step"] for r in metrics.read_jsonl(f"gs://{run}/metrics.jsonl") if "loss" in r] == [5, 10]
  assert fs.ls(f"{run}/tensorboard")

  resumed = _main(gcs, *pretrain)
  fs = gcs.gcsfs()  # a fresh listing cache
  assert "Resumed from the checkpoint of step 10" in resumed.stderr
  assert "CLIP tower from gs://" in resumed.stderr
  assert [r["step"] for r in metrics.read_jsonl(f"gs://{run}/metrics.jsonl") if "loss" in r] == [5, 10, 15, 20]
  assert fs.exists(f"{run}/checkpoints/20")
  assert len(fs.ls(f"{run}/tensorboard")) == 2

  images = eval_testing.write_image_folder(tmp_path / "images", per_class={"train": 8, "test": 4})
  knn = f"gs://{BUCKET}/e2e/knn"
  _main(gcs, "--mode=knn", "--config=configs/knn_demo.py", f"--workdir={knn}", f"--config.pretrained.workdir={workdir}",
        "--config.input.source=folder", f"--config.input.data_dir={images}", "--config.input.train_split=train",
        "--config.input.num_parallel_calls=2", "--config.knn.batch_size=16", "--config.knn.num_train_examples=32",
        f"--config.num_classes={eval_testing.NUM_CLASSES}", "--config.num_train_examples=32")
  results = json.loads(epath.Path(f"{knn}/results.json").read_text())
  assert results["step"] == 20 and results["checkpoint"].startswith("gs://")
  assert not os.path.exists(os.path.join(REPO, "gs:"))


# ----- epath's tf.io.gfile backend (production's, with TensorFlow installed) on a fake gfile -----------------------
class _FakeGfile:
  """tf.io.gfile's API over a local directory: `gs://bucket/x` is `<root>/bucket/x`."""

  def __init__(self, root):
    self.root = str(root)

  def _local(self, path):
    path = os.fspath(path)
    assert path.startswith("gs://"), f"the tf backend got a non-gs:// path {path}"
    return os.path.join(self.root, path[len("gs://"):])

  def GFile(self, path, mode):  # pylint: disable=invalid-name
    return open(self._local(path), mode)  # pylint: disable=unspecified-encoding

  def exists(self, path):
    return os.path.exists(self._local(path))

  def isdir(self, path):
    return os.path.isdir(self._local(path))

  def listdir(self, path):
    return os.listdir(self._local(path))

  def glob(self, pattern):
    import glob  # pylint: disable=g-import-not-at-top
    return ["gs://" + os.path.relpath(p, self.root) for p in glob.glob(self._local(pattern))]

  def makedirs(self, path):
    os.makedirs(self._local(path), exist_ok=True)

  def mkdir(self, path):
    os.makedirs(self._local(path), exist_ok=True)

  def remove(self, path):
    os.remove(self._local(path))

  def rename(self, src, dst, overwrite=False):
    if not overwrite and os.path.exists(self._local(dst)):
      raise FileExistsError(dst)
    os.replace(self._local(src), self._local(dst))


def test_files_written_through_epaths_tf_gfile_backend(tmp_path, monkeypatch):
  """metrics.jsonl, TensorBoard events, the iterator state and study records reach tf.io.gfile as gs:// paths."""
  import types  # pylint: disable=g-import-not-at-top

  from etils.epath import backend, gpath  # pylint: disable=g-import-not-at-top

  from input_pipeline import synthetic  # pylint: disable=g-import-not-at-top
  from tools import study_summary  # pylint: disable=g-import-not-at-top
  errors = types.SimpleNamespace(**{n: type(n, (Exception,), {}) for n in (
      "NotFoundError", "OpError", "FailedPreconditionError", "AlreadyExistsError")})
  fake = types.SimpleNamespace(io=types.SimpleNamespace(gfile=_FakeGfile(tmp_path / "bucket")), errors=errors)
  monkeypatch.setattr(backend._TfBackend, "tf", property(lambda self: fake))  # pylint: disable=protected-access
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: True)
  monkeypatch.setattr(gpath, "_is_zonal_gcs_bucket", lambda bucket: False)
  monkeypatch.chdir(tmp_path)
  root = tmp_path / "bucket" / "b"
  root.mkdir(parents=True)

  writer = metrics.MetricsWriter("gs://b/run", enabled=True)
  writer.write_scalars(1, {"loss": 1.0}, log=False)
  writer.close()
  writer = metrics.MetricsWriter("gs://b/run", enabled=True, resume_step=1)
  writer.write_scalars(2, {"loss": 0.5}, log=False)
  writer.close()
  assert [r["step"] for r in metrics.read_jsonl("gs://b/run/metrics.jsonl")] == [1, 2]
  assert len(os.listdir(root / "run" / "tensorboard")) >= 1

  iterator = synthetic.SyntheticPretrain(image_size=16, patch_size=4, global_batch_size=2, seed=0,
                                         num_masking_patches=2)
  next(iterator)
  epath.Path("gs://b/run/ckpt").mkdir(parents=True, exist_ok=True)
  iterator.save("gs://b/run/ckpt/process_0_of_1")
  again = synthetic.SyntheticPretrain(image_size=16, patch_size=4, global_batch_size=2, seed=0, num_masking_patches=2)
  again.restore("gs://b/run/ckpt/process_0_of_1")
  np.testing.assert_array_equal(next(again)["image"], next(iterator)["image"])

  study_summary.write_json(epath.Path("gs://b/study/summary.json"), {"a": 1})
  assert json.loads((root / "study" / "summary.json").read_text()) == {"a": 1}
  assert not os.path.exists(tmp_path / "gs:")
