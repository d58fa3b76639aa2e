"""The pretraining loop: sharded equivalence, one compilation, resume, preemption, accumulation, multi-process."""
import os
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_testing
from flax import nnx
from train_testing import free_port, losses_by_step, main_command, main_env, tiny_config

from dtm_jax import morphing, sharding, targets
from dtm_jax.models import functional, mae
from dtm_jax.modes import pretrain as train
from dtm_jax.runner import run as runner
from dtm_jax.runtime import checkpoint, metrics


def _components(config, mesh=None):
  model_cfg = train.student_config(config)
  student, _ = functional.abstract_split(lambda: mae.student_model(model_cfg, rngs=nnx.Rngs(0)))
  _, params = functional.split_module(mae.student_model(model_cfg, rngs=nnx.Rngs(config.seed)))
  target = targets.build_target(config.target, image_size=model_cfg.image_size, patch_size=model_cfg.patch_size)
  loss_and_grads = train.make_loss_and_grads(student=student, target=target, config=config,
                                             tokens=train.num_patches(config), mesh=mesh)
  return params, target, loss_and_grads


def _batch(config, seed=0):
  from input_pipeline import synthetic
  it = synthetic.SyntheticPretrain(image_size=config.model.image_size, patch_size=config.model.patch_size,
                                   global_batch_size=config.batch_size, seed=seed,
                                   num_masking_patches=config.input.num_masking_patches)
  return next(it)


def _run_on_mesh(mesh, params, target, loss_and_grads, batch):
  param_sh = sharding.param_shardings(params, mesh, min_fsdp_size=64)
  target_sh = sharding.param_shardings(target.params, mesh, min_fsdp_size=64)
  fn = jax.jit(loss_and_grads, in_shardings=(param_sh, target_sh, sharding.batch_sharding(mesh), None))
  put = lambda tree, sh: jax.tree.map(jax.device_put, tree, sh)
  return jax.device_get(fn(put(params, param_sh), put(target.params, target_sh),
                           sharding.to_global(batch, mesh), jnp.int32(0)))


@pytest.mark.slow
@pytest.mark.parametrize("implementation, kind", [("cpu_kernel", "beit"), ("pairwise", "beit"), ("scatter", "beit"),
                                                  ("matmul", "beit"), ("cpu_kernel", "mae"), ("matmul", "mae")])
def test_first_step_on_sharded_mesh_equals_one_device(implementation, kind, monkeypatch):
  # Every morphing implementation, as GPUs/TPUs ("matmul") and CPUs without a compiler ("pairwise") run it too; the
  # MAE-style student's masks are drawn for the global batch, so they are the same on any mesh.
  resolve = morphing._resolve_implementation
  monkeypatch.setattr(morphing, "_resolve_implementation", lambda name: resolve(implementation))
  config = tiny_config(kind)
  params, target, loss_and_grads = _components(config)
  batch = _batch(config)
  one = _run_on_mesh(sharding.make_mesh(1, 1, devices=jax.devices()[:1]), params, target, loss_and_grads, batch)
  mesh = sharding.make_mesh(4, 2)
  many = _run_on_mesh(mesh, params, target, _components(config, mesh)[2], batch)  # morphing + loss per device
  assert np.isfinite(one[0]) and one[0] > 0
  np.testing.assert_allclose(many[0], one[0], rtol=1e-5)
  np.testing.assert_allclose(many[1], one[1], rtol=1e-6)
  for g_many, g_one in zip(jax.tree.leaves(many[2]), jax.tree.leaves(one[2])):
    np.testing.assert_allclose(g_many, g_one, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["beit", "mae"])
def test_gradient_accumulation_equals_full_batch(kind):
  config = tiny_config(kind, batch_size=32)
  params, target, full = _components(config)
  accumulated = _components(tiny_config(kind, batch_size=32, grad_accum_steps=4))[2]
  batch = _batch(config)
  mesh = sharding.make_mesh(8, 1)
  loss_full, groups_full, grads_full = _run_on_mesh(mesh, params, target, full, batch)
  loss_acc, groups_acc, grads_acc = _run_on_mesh(mesh, params, target, accumulated, batch)
  np.testing.assert_allclose(loss_acc, loss_full, rtol=1e-5)
  np.testing.assert_allclose(groups_acc, groups_full, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads_acc), jax.tree.leaves(grads_full)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["beit", "mae"])
def test_training_on_data_fsdp_mesh_learns_compiles_once_and_checkpoints(tmp_path, kind):
  # One compilation across the steps' schedules and (MAE-style) masks.
  config = tiny_config(kind, **{"mesh.data": 4, "mesh.fsdp": 2, "mesh.min_fsdp_size": 64, "log_every": 1})
  result = runner.run("pretrain", config, str(tmp_path))
  assert result["step"] == 20 and result["step_compilations"] == 1
  curve = losses_by_step(tmp_path)
  assert sorted(curve) == list(range(1, 21))
  assert np.mean([curve[s] for s in range(16, 21)]) < 0.8 * np.mean([curve[s] for s in range(1, 6)])
  steps = sorted(int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit())
  assert steps == [10, 20]
  assert (tmp_path / "config.json").exists()
  assert list((tmp_path / "tensorboard").iterdir())


@pytest.mark.slow
def test_relative_workdir_checkpoints_and_restores(tmp_path, monkeypatch):
  # `make demo` passes --workdir=workdirs/demo; Orbax only accepts absolute paths.
  monkeypatch.chdir(tmp_path)
  result = runner.run("pretrain", tiny_config(stop_after_step=2), "runs/relative")
  assert result["step"] == 2
  params, _, step = checkpoint.restore_params("runs/relative")
  assert step == 2 and jax.tree.leaves(params)
  assert (tmp_path / "runs" / "relative" / "checkpoints" / "2" / "params").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("source, kind", [("synthetic", "beit"), ("fashion_mnist", "beit"), ("synthetic", "mae")])
def test_resume_continues_exactly(tmp_path, source, kind):
  overrides = {"log_every": 1, "checkpoint_every": 5, "input.source": source}
  uninterrupted = tmp_path / "uninterrupted"
  runner.run("pretrain", tiny_config(kind, **overrides), str(uninterrupted))
  resumed = tmp_path / "resumed"
  first = runner.run("pretrain", tiny_config(kind, **overrides, stop_after_step=10), str(resumed))
  assert first["step"] == 10 and first["preempted"] == 1.0
  second = runner.run("pretrain", tiny_config(kind, **overrides), str(resumed))
  assert second["step"] == 20
  expected, got = losses_by_step(uninterrupted), losses_by_step(resumed)
  assert sorted(got) == list(range(1, 21))
  for step in range(11, 21):
    assert abs(got[step] - expected[step]) <= 1e-6 * max(1.0, abs(expected[step])), step


@pytest.mark.slow
def test_resume_with_a_different_config_is_refused(tmp_path):
  runner.run("pretrain", tiny_config(stop_after_step=5), str(tmp_path))
  with pytest.raises(ValueError, match="optim.base_lr"):
    runner.run("pretrain", tiny_config(**{"optim.base_lr": 1e-4}), str(tmp_path))
  result = runner.run("pretrain", tiny_config(**{"optim.base_lr": 1e-4, "allow_config_change": True}), str(tmp_path))
  assert result["step"] == 20






@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_and_exits_cleanly(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.Popen(main_command(workdir, "--config.total_steps=100000", "--config.checkpoint_every=100000",
                                        "--config.log_every=1"), env=main_env(2), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 120
  while time.time() < deadline and len(losses_by_step(workdir) if (workdir / "metrics.jsonl").exists() else {}) < 3:
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  steps = sorted(int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit())
  assert len(steps) == 1 and steps[0] >= 3, steps
  logged = max(losses_by_step(workdir))
  assert steps[0] == logged  # the checkpoint is of the last step taken
  # The checkpoint restores: the same command resumes from it.
  resumed = subprocess.run(main_command(workdir, "--config.total_steps=100000", "--config.checkpoint_every=100000",
                                         "--config.log_every=1", f"--config.stop_after_step={steps[0] + 2}"),
                           env=main_env(2), capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  assert f"Resumed from the checkpoint of step {steps[0]}" in resumed.stderr
  assert max(losses_by_step(workdir)) == steps[0] + 2


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  single = tmp_path / "single"
  runner.run("pretrain", tiny_config(log_every=1, total_steps=8, checkpoint_every=4), str(single))
  port = free_port()
  multi = tmp_path / "multi"
  procs = [subprocess.Popen(main_command(multi, "--config.log_every=1", "--config.total_steps=8",
                                          "--config.checkpoint_every=4", f"--coordinator_address=127.0.0.1:{port}",
                                          "--num_processes=2", f"--process_id={i}"),
                            env=main_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
  expected, got = losses_by_step(single), losses_by_step(multi)
  assert sorted(got) == list(range(1, 9))
  for step in expected:
    np.testing.assert_allclose(got[step], expected[step], rtol=2e-5)
  checkpoint = multi / "checkpoints" / "8" / "data_iterator"
  assert sorted(p for p in os.listdir(checkpoint) if p.startswith("process_")) == ["process_0_of_2", "process_1_of_2"]


class _Recording:
  """A data iterator that records when batches are drawn (for the loop-order test)."""

  def __init__(self, iterator, events):
    self._iterator, self._events = iterator, events

  def __iter__(self):
    return self

  def __next__(self):
    self._events.append("batch")
    return next(self._iterator)

  def __getattr__(self, name):  # save, restore, num_corrupt
    return getattr(self._iterator, name)


def test_the_next_batch_is_sent_while_the_step_runs_and_never_past_a_checkpoint(tmp_path, monkeypatch):
  """Double buffering: right after a step is dispatched the next batch is read and put on the devices, before the
  loop waits for the step's metrics; after a checkpoint step it is read only once the checkpoint is written, so the
  saved input position is exactly the steps taken (and no batch is drawn past the end)."""
  import dataclasses
  events = []
  build_program, build_data = train.build_program, train.build_pretrain_data

  def recording_program(*args, **kwargs):
    program = build_program(*args, **kwargs)

    def step(*step_args):
      events.append("step")
      return program.step(*step_args)
    return dataclasses.replace(program, step=step)

  write_scalars, save = metrics.MetricsWriter.write_scalars, checkpoint.Checkpointer.save
  monkeypatch.setattr(train, "build_program", recording_program)
  monkeypatch.setattr(train, "build_pretrain_data",
                      lambda *args, **kwargs: _Recording(build_data(*args, **kwargs), events))
  monkeypatch.setattr(metrics.MetricsWriter, "write_scalars",
                      lambda self, *args: (events.append("metrics"), write_scalars(self, *args))[1])
  monkeypatch.setattr(checkpoint.Checkpointer, "save", lambda self, *args, **kwargs: (
      events.append("save"), save(self, *args, **kwargs))[1])
  runner.run("pretrain", tiny_config(log_every=1, total_steps=6, checkpoint_every=3), str(tmp_path))
  assert events == ["batch",
                    "step", "batch", "metrics",  # step 1: the batch of step 2 goes out before the wait for metrics
                    "step", "batch", "metrics",
                    "step", "metrics", "save", "batch",  # step 3 saves: the next batch only after the save
                    "step", "batch", "metrics",
                    "step", "batch", "metrics",
                    "step", "metrics", "save"]  # the last step: nothing drawn past the end


def test_uint8_images_are_normalised_in_the_step():
  """Images travel as uint8 and the step normalises them with the input block's mean/std: the same loss as the
  float32 images the pipeline used to send (normalised on the host)."""
  config = tiny_config(**{"input.source": "fashion_mnist"})
  mesh = sharding.make_mesh(-1, 1)
  program = train.build_program(config, mesh)
  assert program.abstract_inputs()[2]["image"].dtype == jnp.uint8
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
  normalised = ((pixels / 255.0 - np.array(config.input.mean)) / np.array(config.input.std)).astype(np.float32)
  mask = jnp.asarray(rng.random((16, 16)) < 0.4)
  target_params = jax.device_put(program.target.params, program.target_shardings)
  losses = []
  for images in (pixels, normalised):
    state = jax.jit(program.init_state, out_shardings=program.state_shardings)()
    _, step_metrics = program.step(state, target_params, {"image": jnp.asarray(images), "mask": mask})
    losses.append(float(step_metrics["loss"]))
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


@pytest.mark.slow
def test_the_in_training_knn_runs(tmp_path):
  # eval.every > 0 used to fail with a TypeError (the kNN's arguments had changed); its batch is checked too.
  config = train_testing.long_tiny_config(
      stop_after_step=5, **{"input.source": "fashion_mnist", "input.eval_split": "test", "eval.every": 5,
                            "eval.batch_size": 32, "eval.k": 5, "eval.num_train_examples": 64,
                            "eval.num_eval_examples": 32})
  result = runner.run("pretrain", config, str(tmp_path))
  assert result["knn_bank_size"] == 64 and 0.0 <= result["knn_top1"] <= 100.0
