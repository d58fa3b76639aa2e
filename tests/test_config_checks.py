"""Every field of every mode is checked before anything is created or compiled, all problems at once, each naming
the field; batch sizes against the devices of the slice a run is for.
"""
import subprocess

import eval_testing
import jax
import pytest
from train_testing import main_command, main_env, tiny_config

from dtm_jax import registry
from dtm_jax.runner import run as runner
from dtm_jax.runtime import errors


@pytest.fixture
def no_compilation(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("compiled before the config was checked")
  monkeypatch.setattr(jax, "jit", refuse)


@pytest.mark.parametrize("overrides, field", [
    ({"batch_size": 0}, "config.batch_size=0"),
    ({"batch_size": -16}, "config.batch_size=-16"),
    ({"log_every": 0}, "config.log_every=0"),
    ({"checkpoint_every": 0}, "config.checkpoint_every=0"),
    ({"keep_checkpoints": 0}, "config.keep_checkpoints=0"),
    ({"total_steps": 0}, "config.total_steps=0"),
    ({"grad_accum_steps": 0}, "config.grad_accum_steps=0"),
    ({"optim.base_lr": -1.0}, "config.optim.base_lr=-1.0"),
    ({"model.drop_path_rate": 1.5}, "config.model.drop_path_rate=1.5"),
    ({"dtm.num_schedules": 0}, "config.dtm.num_schedules=0"),
    ({"dtm.schedule_group_size": 0}, "config.dtm.schedule_group_size=0"),
    ({"dtm.schedule_group_size": 6}, "config.dtm.schedule_group_size=6 does not divide batch_size=16"),
    ({"dtm.schedule_group_size": 32}, "config.dtm.schedule_group_size=32 does not divide batch_size=16"),
    ({"input.crop_scale_min": 0.0}, "config.input.crop_scale_min=0.0"),
    ({"eval.every": 5, "eval.batch_size": 12}, "config.eval.batch_size=12"),
    ({"eval.every": -1}, "config.eval.every=-1"),
    ({"mesh.fsdp": 3}, "config.mesh.fsdp=3"),
    ({"seed": -1}, "config.seed=-1"),
])
def test_bad_pretraining_values_are_refused_before_anything_is_made(tmp_path, no_compilation, overrides, field):
  workdir = tmp_path / "run"
  with pytest.raises(errors.ConfigError, match="Invalid config") as error:
    runner.run("pretrain", tiny_config(**overrides), str(workdir))
  assert field in str(error.value)
  assert not workdir.exists()


def test_every_problem_is_listed_at_once():
  with pytest.raises(errors.ConfigError) as error:
    registry.validate("pretrain", tiny_config(batch_size=0, log_every=0, **{"optim.base_lr": -1.0}))
  for field in ("config.batch_size=0", "config.log_every=0", "config.optim.base_lr=-1.0"):
    assert field in str(error.value)


def test_batch_sizes_are_checked_against_the_device_count_of_the_target_slice():
  config = tiny_config(batch_size=64, **{"eval.every": 100, "eval.batch_size": 1000})
  registry.validate("pretrain", config, num_devices=8)  # 1000 = 8 × 125
  with pytest.raises(errors.ConfigError, match=r"config.eval.batch_size=1000 .*16"):
    registry.validate("pretrain", config, num_devices=16)


@pytest.mark.parametrize("module, name", [
    ("configs.dtm_vit_b16_in1k", "pretrain"), ("configs.dtm_vit_s16_in1k", "pretrain"),
    ("configs.dtm_vit_l16_in1k", "pretrain"), ("configs.finetune_vit_b16_in1k", "finetune"),
    ("configs.finetune_vit_b16_in1k_384", "finetune"), ("configs.finetune_inat18", "finetune"),
    ("configs.linear_probe_in1k", "linear_probe"), ("configs.knn_in1k", "knn")])
@pytest.mark.parametrize("devices", [16, 32, 64, 256])
def test_shipped_batch_sizes_divide_common_slice_sizes(module, name, devices):
  import importlib
  config = importlib.import_module(module).get_config()
  with config.unlocked():
    if name == "pretrain":
      config.eval.every = 1000  # the in-training kNN's batch too
  problems = [p for p in registry.problems(name, config, num_devices=devices) if "batch_size" in p]
  assert not problems, problems


@pytest.mark.parametrize("mode, overrides, field", [
    ("finetune", {"batch_size": 0}, "config.batch_size=0"),
    ("finetune", {"eval_batch_size": 12}, "config.eval_batch_size=12"),
    ("finetune", {"epochs": 0}, "config.epochs=0"),
    ("finetune", {"log_every": 0}, "config.log_every=0"),
    ("finetune", {"mix.prob": 2.0}, "config.mix.prob=2.0"),
    ("finetune", {"num_classes": 0}, "config.num_classes=0"),
    ("finetune", {"pooling": "max"}, "config.pooling='max'"),
    ("linear_probe", {"batch_size": 12}, "config.batch_size=12"),
    ("linear_probe", {"optimizer.name": "adam"}, "config.optimizer.name='adam'"),
    ("linear_probe", {"eval_every_epochs": 0}, "config.eval_every_epochs=0"),
    ("knn", {"knn.k": 0}, "config.knn.k=0"),
    ("knn", {"knn.batch_size": 12}, "config.knn.batch_size=12"),
    ("knn", {"knn.temperature": 0.0}, "config.knn.temperature=0.0"),
])
def test_bad_evaluation_values_are_refused_before_anything_is_made(tmp_path, no_compilation, mode, overrides,
                                                                     field):
  config = eval_testing.eval_configs(tmp_path)[mode]
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  workdir = tmp_path / "run"
  with pytest.raises(errors.ConfigError, match="Invalid config") as error:
    runner.run(mode, config, str(workdir))
  assert field in str(error.value)
  assert not workdir.exists()


@pytest.mark.slow
def test_unknown_config_key_is_a_clear_error(tmp_path):
  workdir = tmp_path / "run"
  done = subprocess.run(main_command(workdir, "--config.nonexistent_key=1"), env=main_env(), capture_output=True,
                        text=True,
                        timeout=300)
  assert done.returncode != 0
  assert "Invalid config: unknown field" in done.stderr and "nonexistent_key" in done.stderr
  assert "Traceback" not in done.stderr
  assert not workdir.exists()


@pytest.mark.slow
@pytest.mark.parametrize("flag, expected", [
    ("--config.totl_steps=5", "Invalid config: unknown field 'totl_steps' (--config.totl_steps=5). Did you mean "
                              "'total_steps'?"),
    ("--config.optim.zzz=5", "Invalid config: unknown field 'zzz' (--config.optim.zzz=5). Check its spelling")])
def test_an_unknown_field_is_one_plain_last_line_with_a_suggestion(tmp_path, flag, expected):
  done = subprocess.run(main_command(tmp_path / "run", flag), env=main_env(), capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 2
  last = done.stderr.strip().splitlines()[-1]
  assert last.startswith(expected) and "\\\\" not in last, done.stderr[-2000:]
  assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_missing_config_file_is_one_line(tmp_path):
  done = subprocess.run(main_command(tmp_path / "run", config="configs/no_such_config.py"), env=main_env(),
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 1
  last = done.stderr.strip().splitlines()[-1]
  assert last.startswith("Error: Cannot load the config file") and "no_such_config.py" in last, done.stderr[-2000:]
  assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()
  verbose = subprocess.run(main_command(tmp_path / "run", "--verbose", config="configs/no_such_config.py"),
                           env=main_env(), capture_output=True, text=True, timeout=120)
  assert "Traceback" in verbose.stderr and verbose.stderr.strip().splitlines()[-1] == last  # still last


@pytest.mark.parametrize("module", ["configs.dtm_vit_b16_in1k", "configs.dtm_vit_s16_in1k", "configs.dtm_vit_l16_in1k"])
@pytest.mark.parametrize("epochs, drop_path, b2", [(300, 0.0, 0.98), (800, 0.1, 0.999), (1600, 0.1, 0.999)])
def test_recipes_take_drop_path_and_beta2_by_schedule_length(module, epochs, drop_path, b2):
  # docs/METHOD.md §6 "Recipe": BEiT v2's guidance, 300 epochs → (0.0, 0.98), long schedules → (0.1, 0.999).
  import importlib
  get_config = importlib.import_module(module).get_config
  config = get_config(f"epochs={epochs}") if epochs != 300 else get_config()
  assert (config.total_epochs, config.model.drop_path_rate, config.optim.b2) == (epochs, drop_path, b2)
  assert config.dtm.schedule_group_size == 256 and config.batch_size % 256 == 0  # 8 draws of the released per-GPU batch
  assert config.model.layer_scale_init == (1e-5 if module.endswith("l16_in1k") else 0.1)
  optim = config.optim
  assert (optim.b1, optim.eps, optim.weight_decay, optim.grad_clip) == (0.9, 1e-8, 0.05, 3.0)
  assert (optim.base_lr, optim.lr_scaling, optim.min_lr) == (1.5e-3, "sqrt", 1e-5)
  assert (config.warmup_epochs, config.input.crop_scale_min, config.input.num_masking_patches) == (10, 0.2, 75)
