"""Single-host hardening (issue 18): damaged metadata, one writer per workdir, config checks of every mode, Ctrl-C,
a full disk during a save, and counters and logs that tell the truth after a resume.

Runs use configs/test_tiny.py for a few steps; subprocesses use 2 fake CPU devices.
"""
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from train_testing import REPO, losses_by_step, tiny_config

from configs import finetune_demo, knn_demo, linear_probe_demo
from dtm_jax import registry, students
from dtm_jax.modes import finetune
from dtm_jax.runner import run as runner
from dtm_jax.runtime import checkpoint, errors, metrics, preemption, workdir_lock


def _env(devices=2):
  env = dict(os.environ)
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return env


def _command(workdir, *extra):
  return [sys.executable, os.path.join(REPO, "main.py"), "--config=" + os.path.join(REPO, "configs/test_tiny.py"),
          f"--workdir={workdir}", *extra]


def _saved_steps(workdir):
  return sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints")) if p.isdigit())


def _config(**overrides):
  base = {"log_every": 1, "checkpoint_every": 5, "total_steps": 1000, "async_checkpointing": False}
  return tiny_config(**{**base, **overrides})


# ---------------------------------------------------------------------------------------------------------------------
# 1. A damaged metadata item of the newest step falls back like any other item.
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated_json", "deleted", "no_config_key"])
def test_damaged_metadata_of_the_newest_step_resumes_from_the_older_one(tmp_path, damage, caplog):
  runner.run("pretrain", _config(stop_after_step=10), str(tmp_path))
  assert _saved_steps(tmp_path) == [5, 10]
  path = tmp_path / "checkpoints" / "10" / "metadata" / "metadata"
  if damage == "truncated_json":
    path.write_text(path.read_text()[:40])
  elif damage == "deleted":
    path.unlink()
  else:
    path.write_text(json.dumps({"step": 10}))
  with caplog.at_level(logging.INFO):
    result = runner.run("pretrain", _config(stop_after_step=12), str(tmp_path))
  assert "Resumed from the checkpoint of step 5" in caplog.text
  assert result["step"] == 12
  assert (tmp_path / "checkpoints" / "10.unreadable").is_dir()


# ---------------------------------------------------------------------------------------------------------------------
# 2. One writer per workdir.
# ---------------------------------------------------------------------------------------------------------------------
_LOCKER = ("import sys, time; from dtm_jax.runtime import workdir_lock; "
           "workdir_lock.WorkdirLock(sys.argv[1], mode='pretrain').acquire(); print('locked', flush=True); "
           "time.sleep(600)")


def _hold_lock(workdir):
  """A separate process that takes the workdir's lock and keeps it (heartbeat included) until killed."""
  proc = subprocess.Popen([sys.executable, "-c", _LOCKER, str(workdir)], env=_env(1), stdout=subprocess.PIPE,
                          text=True)
  assert proc.stdout.readline().strip() == "locked"
  return proc


def test_a_second_run_on_a_locked_workdir_is_refused_naming_the_holder(tmp_path):
  workdir = tmp_path / "run"
  holder = _hold_lock(workdir)
  try:
    with pytest.raises(workdir_lock.WorkdirLockedError) as error:
      runner.run("pretrain", _config(stop_after_step=2), str(workdir))
    message = str(error.value)
    assert socket.gethostname() in message and f"pid {holder.pid}" in message and "started" in message
    assert not (workdir / "checkpoints").exists() and not (workdir / "metrics.jsonl").exists()
    for mode, config in _eval_configs(tmp_path).items():  # every mode takes the lock, kNN included
      with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {holder.pid}"):
        runner.run(mode, config, str(workdir))
  finally:
    holder.kill()
    holder.wait()


def test_a_stale_lock_left_by_kill_9_is_recovered(tmp_path, caplog):
  workdir = tmp_path / "run"
  holder = _hold_lock(workdir)
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  assert (workdir / workdir_lock.LOCK_FILE).exists()
  with caplog.at_level(logging.WARNING):
    result = runner.run("pretrain", _config(stop_after_step=2), str(workdir))
  assert result["step"] == 2
  assert "stale" in caplog.text and str(holder.pid) in caplog.text
  assert not (workdir / workdir_lock.LOCK_FILE).exists()  # released at the end of the run


def test_stale_lock_rule_for_other_hosts(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  now = time.time()
  holder = {"host": "some-other-host", "pid": 12345, "start_time": now - 3600, "heartbeat": now - 5,
            "token": "abc", "mode": "pretrain"}
  (workdir / workdir_lock.LOCK_FILE).write_text(json.dumps(holder))
  with pytest.raises(workdir_lock.WorkdirLockedError, match="some-other-host.*pid 12345"):
    workdir_lock.WorkdirLock(workdir).acquire()
  holder["heartbeat"] = now - workdir_lock.STALE_AFTER_S - 60  # no heartbeat for longer than the rule allows
  (workdir / workdir_lock.LOCK_FILE).write_text(json.dumps(holder))
  lock = workdir_lock.WorkdirLock(workdir).acquire()
  assert json.loads((workdir / workdir_lock.LOCK_FILE).read_text())["pid"] == os.getpid()
  lock.release()
  assert not (workdir / workdir_lock.LOCK_FILE).exists()


# ---------------------------------------------------------------------------------------------------------------------
# 3. Every field of every mode is checked before anything is created or compiled.
# ---------------------------------------------------------------------------------------------------------------------
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


def _eval_configs(tmp_path):
  """Valid evaluation configs (each run is refused before it reads the pretrained workdir)."""
  configs = {"finetune": finetune_demo.get_config(), "linear_probe": linear_probe_demo.get_config(),
             "knn": knn_demo.get_config()}
  for config in configs.values():
    config.pretrained.workdir = str(tmp_path / "pretrain")
  configs["finetune"].update(batch_size=16, eval_batch_size=16)
  configs["linear_probe"].update(batch_size=16, eval_batch_size=16)
  configs["knn"].knn.batch_size = 16
  return configs


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
  config = _eval_configs(tmp_path)[mode]
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


def test_unknown_config_key_is_a_clear_error(tmp_path):
  workdir = tmp_path / "run"
  done = subprocess.run(_command(workdir, "--config.nonexistent_key=1"), env=_env(), capture_output=True, text=True,
                        timeout=300)
  assert done.returncode != 0
  assert "Invalid config: unknown field" in done.stderr and "nonexistent_key" in done.stderr
  assert "Traceback" not in done.stderr
  assert not workdir.exists()


# ---------------------------------------------------------------------------------------------------------------------
# 4. Ctrl-C saves the step reached, like SIGTERM, and exits with 130.
# ---------------------------------------------------------------------------------------------------------------------
def test_ctrl_c_checkpoints_the_step_reached_exits_130_and_the_rerun_resumes(tmp_path):
  workdir = tmp_path / "run"
  flags = ("--config.total_steps=100000", "--config.checkpoint_every=100000", "--config.log_every=1")
  proc = subprocess.Popen(_command(workdir, *flags), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  deadline = time.time() + 300
  while time.time() < deadline and len(losses_by_step(workdir) if (workdir / "metrics.jsonl").exists() else {}) < 3:
    time.sleep(0.1)
  # While it runs, a second run on the same workdir is refused and names it.
  second = subprocess.run(_command(workdir, *flags), env=_env(), capture_output=True, text=True, timeout=300)
  assert second.returncode != 0
  assert f"pid {proc.pid}" in second.stderr and "Traceback" not in second.stderr, second.stderr[-3000:]
  proc.send_signal(signal.SIGINT)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 130, out[-3000:]
  steps = _saved_steps(workdir)
  assert len(steps) == 1 and steps[0] == max(losses_by_step(workdir)), (steps, out[-2000:])
  resumed = subprocess.run(_command(workdir, *flags, f"--config.stop_after_step={steps[0] + 2}"), env=_env(),
                           capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Resumed from the checkpoint of step {steps[0]}" in resumed.stderr


@pytest.fixture
def sigint_guard():
  """SIGINT sent by a test never reaches pytest's own handler (which would end the session)."""
  previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
  yield
  signal.signal(signal.SIGINT, previous)


def test_a_second_ctrl_c_exits_at_once(monkeypatch, sigint_guard):
  exits = []
  monkeypatch.setattr(os, "_exit", exits.append)
  flag = preemption.PreemptionFlag().install()
  try:
    os.kill(os.getpid(), signal.SIGINT)
    assert flag.requested and flag.interrupted and not exits
    os.kill(os.getpid(), signal.SIGINT)
    assert exits == [130]
  finally:
    flag.uninstall()


class _InterruptingStream:
  """Labelled batches that send this process SIGINT when batch `interrupt_at` is taken."""

  def __init__(self, batch_size, interrupt_at=None):
    import eval_testing
    self._stream = eval_testing.TintedStream(batch_size)
    self.interrupt_at, self.first = interrupt_at, None

  @property
  def step(self):
    return self._stream.step

  def __iter__(self):
    return self

  def __next__(self):
    if self._stream.step == self.interrupt_at:
      os.kill(os.getpid(), signal.SIGINT)
    self.first = self._stream.step if self.first is None else self.first
    return next(self._stream)

  def save(self, path):
    self._stream.save(path)

  def restore(self, path):
    self._stream.restore(path)


def _tiny_fine_tuning(tmp_path, steps_per_epoch):
  """`run(workdir, stream)`: 2 epochs of fine-tuning a 1-block student saved in tmp_path/pretrain, batches of 16."""
  import eval_testing

  from dtm_jax import sharding
  eval_testing.save_pretraining_checkpoints(tmp_path / "pretrain", steps=(5,),
                                            config=eval_testing.tiny_student_config(depth=1))
  mesh = sharding.make_mesh(data=8, fsdp=1)
  config = finetune_demo.get_config()
  config.pretrained.update(workdir=str(tmp_path / "pretrain"), step=5)
  config.update(num_classes=eval_testing.NUM_CLASSES, num_train_examples=16 * steps_per_epoch, batch_size=16,
                eval_batch_size=64, epochs=2, warmup_epochs=0, log_every=1)
  config.mix.prob = 0.0

  def run(workdir, stream):
    return finetune.train_and_evaluate(
        config, str(workdir), student_fn=lambda: students.restore_student(config.pretrained, mesh),
        train_data_fn=lambda size: stream,
        eval_data_fn=lambda size: eval_testing.tinted_eval_batches(64, config.eval_batch_size), mesh=mesh)

  return run


def test_ctrl_c_during_fine_tuning_saves_the_step_and_the_rerun_resumes_mid_epoch(tmp_path, sigint_guard):
  run = _tiny_fine_tuning(tmp_path, steps_per_epoch=6)

  reference = run(tmp_path / "reference", _InterruptingStream(16))
  stream = _InterruptingStream(16, interrupt_at=8)  # mid-way through the second epoch
  with pytest.raises(errors.Interrupted):
    run(tmp_path / "finetune", stream)
  assert _saved_steps(tmp_path / "finetune") == [6, 9]  # the first epoch's evaluation, then the step reached
  stream = _InterruptingStream(16)
  result = run(tmp_path / "finetune", stream)
  assert stream.first == 9 and result["steps"] == 12
  assert result["top1"] == pytest.approx(reference["top1"])
  expected, got = (losses_by_step_of(tmp_path / name) for name in ("reference", "finetune"))
  assert sorted(got) == list(range(1, 13))
  for step in expected:
    assert got[step] == pytest.approx(expected[step], rel=1e-5), step


def test_damaged_metadata_of_the_newest_fine_tuning_step_resumes_from_the_older_one(tmp_path):
  run = _tiny_fine_tuning(tmp_path, steps_per_epoch=3)
  run(tmp_path / "finetune", _InterruptingStream(16))
  assert _saved_steps(tmp_path / "finetune") == [3, 6]
  (tmp_path / "finetune" / "checkpoints" / "6" / "metadata" / "metadata").write_text("{\"step\": 6")  # truncated
  stream = _InterruptingStream(16)
  result = run(tmp_path / "finetune", stream)
  assert stream.first == 3 and result["steps"] == 6  # resumed from step 3, not a crash on step 6's metadata


def losses_by_step_of(workdir):
  rows = metrics.read_jsonl(workdir / "metrics.jsonl")
  steps = [r["step"] for r in rows if "train_loss" in r]
  assert len(steps) == len(set(steps)), steps  # one line per step
  return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}


# ---------------------------------------------------------------------------------------------------------------------
# 5. A full disk during a save: one clear error, older checkpoints intact.
# ---------------------------------------------------------------------------------------------------------------------
_FULL_DISK = """
import errno, os, sys
import orbax.checkpoint as ocp
save = ocp.CheckpointManager.save
def full_disk_save(self, step, *args, **kwargs):
  if step >= 10:
    path = os.path.join(str(self.directory), f"{step}.orbax-checkpoint-tmp", "params.orbax-checkpoint-tmp", "d", "x")
    raise ValueError(f'RESOURCE_EXHAUSTED: Error writing local file "{path}": Failed to write 2889 bytes to file 19: '
                     "No space left on device [os_error_code='28']")
  return save(self, step, *args, **kwargs)
ocp.CheckpointManager.save = full_disk_save
sys.argv = [sys.argv[1]] + sys.argv[2:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
import runpy
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_full_disk_during_a_save_is_one_clear_error_and_older_checkpoints_stay(tmp_path):
  workdir = tmp_path / "run"
  command = _command(workdir, "--config.checkpoint_every=5", "--config.total_steps=1000",
                     "--config.async_checkpointing=False")
  done = subprocess.run([sys.executable, "-c", _FULL_DISK, *command[1:]], env=_env(), capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 1, done.stderr[-3000:]
  last = done.stderr.strip().splitlines()[-1]
  assert "No space left on device" in last and "step 10" in last and "step 5" in last, last
  assert str(workdir / "checkpoints") in last
  assert "Traceback" not in done.stderr and "ImportError" not in done.stderr, done.stderr[-3000:]
  assert _saved_steps(workdir) == [5]
  params, _, step = checkpoint.restore_params(workdir)
  assert step == 5 and jax.tree.leaves(params)


def test_a_save_error_names_the_step_of_an_earlier_asynchronous_save(tmp_path, monkeypatch):
  ckpt = checkpoint.Checkpointer(tmp_path, async_save=False)
  ckpt.save(5, params={"w": np.ones(3)}, train={"step": np.int32(5)}, data_iterator=None, metadata={"step": 5})
  real_save = ckpt._manager.save

  def failing(step, *args, **kwargs):
    raise ValueError(f'RESOURCE_EXHAUSTED: Failed writing: "{ckpt.directory}/10.orbax-checkpoint-tmp/train/x": '
                     "No space left on device")
  monkeypatch.setattr(ckpt._manager, "save", failing)
  with pytest.raises(checkpoint.CheckpointSaveError) as error:
    ckpt.save(15, params={"w": np.ones(3)}, train={"step": np.int32(15)}, data_iterator=None, metadata={})
  message = str(error.value)
  assert "step 10" in message and "last complete checkpoint is step 5" in message, message
  monkeypatch.setattr(ckpt._manager, "save", real_save)
  ckpt.close()


# ---------------------------------------------------------------------------------------------------------------------
# 6. Counters and logs.
# ---------------------------------------------------------------------------------------------------------------------
def test_metrics_have_one_line_per_step_after_a_kill_and_resume(tmp_path):
  runner.run("pretrain", _config(stop_after_step=8), str(tmp_path))
  # What a kill -9 after step 8's metrics and before its checkpoint leaves: lines 6-8 past the last checkpoint (5).
  os.rename(tmp_path / "checkpoints" / "8", tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp-1")
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 9, "lo')  # a line cut by the kill
  runner.run("pretrain", _config(stop_after_step=10), str(tmp_path))
  rows = metrics.read_jsonl(tmp_path / "metrics.jsonl")
  steps = [r["step"] for r in rows if "loss" in r]
  assert steps == list(range(1, 11)), steps


def test_a_deleted_iterator_state_is_reported_as_missing(tmp_path):
  import eval_testing
  ckpt = checkpoint.Checkpointer(tmp_path, async_save=False)
  ckpt.save(5, params={"w": np.ones(3)}, train={"step": np.int32(5)}, data_iterator=eval_testing.TintedStream(4),
            metadata={"step": 5})
  ckpt.close()
  for path in (tmp_path / "checkpoints" / "5" / "data_iterator").iterdir():
    if path.name.startswith("process_"):
      path.unlink()
  ckpt = checkpoint.Checkpointer(tmp_path, async_save=False)
  abstract = {"w": jax.ShapeDtypeStruct((3,), np.float64)}
  with pytest.raises(FileNotFoundError) as error:
    ckpt.restore(5, params=abstract, train={"step": jax.ShapeDtypeStruct((), np.int32)},
                 data_iterator=eval_testing.TintedStream(4))
  ckpt.close()
  assert "missing" in str(error.value) and "different number of processes" not in str(error.value)


def test_the_in_training_knn_runs(tmp_path):
  # eval.every > 0 used to fail with a TypeError (the kNN's arguments had changed); its batch is checked too.
  config = _config(stop_after_step=5, **{"input.source": "fashion_mnist", "input.eval_split": "test", "eval.every": 5,
                                         "eval.batch_size": 32, "eval.k": 5, "eval.num_train_examples": 64,
                                         "eval.num_eval_examples": 32})
  result = runner.run("pretrain", config, str(tmp_path))
  assert result["knn_bank_size"] == 64 and 0.0 <= result["knn_top1"] <= 100.0
