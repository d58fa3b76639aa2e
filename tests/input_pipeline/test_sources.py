"""Data files that cannot be used end the run with one line naming the file (errors.DataError), never a traceback."""
import gzip
import os
import struct
import subprocess

import numpy as np
import pytest
from train_testing import main_command, main_env

from dtm_jax.runtime import errors
from input_pipeline import sources

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def idx(array: np.ndarray) -> bytes:
  return struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_fashion_mnist(directory, *, damage=None, gz=True):
  """Four small valid IDX files (60 train, 20 test images of 28²); `damage` cuts the train images file short."""
  directory.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  arrays = {"train-images-idx3-ubyte": rng.integers(0, 255, (60, 28, 28), np.uint8),
            "train-labels-idx1-ubyte": rng.integers(0, 10, (60,), np.uint8),
            "t10k-images-idx3-ubyte": rng.integers(0, 255, (20, 28, 28), np.uint8),
            "t10k-labels-idx1-ubyte": rng.integers(0, 10, (20,), np.uint8)}
  for name, array in arrays.items():
    data = idx(array)
    data = gzip.compress(data) if gz else data
    if damage and name == "train-images-idx3-ubyte":
      data = data[:len(data) // 2]
    (directory / (name + (".gz" if gz else ""))).write_bytes(data)
  return directory


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "raw"])
def test_a_truncated_idx_file_is_a_data_error_naming_it(tmp_path, gz):
  directory = write_fashion_mnist(tmp_path / "fmnist", damage=True, gz=gz)
  with pytest.raises(errors.DataError) as error:
    sources.FashionMnistSource(str(directory))._table("train")
  name = "train-images-idx3-ubyte" + (".gz" if gz else "")
  assert os.path.join(str(directory), name) in str(error.value) and "truncated" in str(error.value)
  assert "reinstall" in str(error.value)


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "raw"])
def test_intact_files_read_back(tmp_path, gz):
  directory = write_fashion_mnist(tmp_path / "fmnist", gz=gz)
  count, _ = sources.FashionMnistSource(str(directory))._table("train")
  assert count == 60


@pytest.mark.slow
def test_a_run_on_a_truncated_file_ends_with_one_line_naming_it(tmp_path):
  directory = write_fashion_mnist(tmp_path / "fmnist", damage=True, gz=True)
  done = subprocess.run(main_command(tmp_path / "run", "--config.input.source=fashion_mnist",
                                     f"--config.input.data_dir={directory}"),
                        env=main_env(), capture_output=True, text=True, timeout=300)
  assert done.returncode == 1, done.stderr[-3000:]
  last = done.stderr.strip().splitlines()[-1]
  assert last.startswith("Error: ") and str(directory / "train-images-idx3-ubyte.gz") in last, done.stderr[-3000:]
  assert "Traceback" not in done.stderr


@pytest.mark.parametrize("layout, expected", [
    ({"train": []}, "has no class sub-folders"),
    ({"train": ["class_0"]}, "No "),
])
def test_folders_without_images_are_data_errors_naming_the_folder(tmp_path, layout, expected):
  # An empty split is the user's data, not a bug: a DataError (one line from main.py), naming the folder.
  for split, classes in layout.items():
    (tmp_path / split).mkdir()
    for name in classes:
      (tmp_path / split / name).mkdir()
  with pytest.raises(errors.DataError, match=expected) as error:
    sources.FolderSource(str(tmp_path), train_split="train").files("train")
  assert str(tmp_path / "train") in str(error.value)


@pytest.mark.slow
def test_a_run_on_an_empty_image_folder_ends_with_one_line_naming_it(tmp_path):
  (tmp_path / "images" / "train").mkdir(parents=True)
  done = subprocess.run(main_command(tmp_path / "run", "--config.input.source=folder",
                                     f"--config.input.data_dir={tmp_path / 'images'}"),
                        env=main_env(), capture_output=True, text=True, timeout=300)
  assert done.returncode == 1, done.stderr[-3000:]
  last = done.stderr.strip().splitlines()[-1]
  assert last.startswith("Error: ") and str(tmp_path / "images" / "train") in last, done.stderr[-3000:]
  assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()
