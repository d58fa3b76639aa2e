"""Shared helpers of the training and reliability tests."""
import json
import os
import shutil
import socket
import subprocess
import sys

from configs import test_tiny
from dtm_jax.runtime import metrics

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def tiny_config(kind="beit", **overrides):
  """configs/test_tiny.py (`kind="mae"`: its MAE-style student) with dotted-key overrides."""
  config = test_tiny.get_config(f"kind={kind}")
  with config.unlocked():
    for key, value in overrides.items():
      node = config
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
  return config


def losses_by_step(workdir):
  """Loss per logged step; a step logged twice (recomputed after a kill) keeps its last value."""
  rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]




def main_command(workdir, *flags, config="configs/test_tiny.py"):
  """`python main.py --config=<config> --workdir=<workdir> <flags>` (the config relative to the repository)."""
  return [sys.executable, os.path.join(REPO, "main.py"), "--config=" + os.path.join(REPO, config),
          f"--workdir={workdir}", *flags]


def main_env(devices=2):
  """Environment of a `main.py` subprocess with `devices` fake CPU devices."""
  env = dict(os.environ)
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return env


def run_main(workdir, *flags, num_processes=1, devices=2, timeout=300):
  """Runs configs/test_tiny.py through `main.py` as one job of `num_processes` processes on 127.0.0.1 with `devices`
  fake CPU devices each; returns (exit codes, outputs), one per process. A hung job is killed and fails the test."""
  command = main_command(workdir, *flags)
  if num_processes > 1:
    command += [f"--coordinator_address=127.0.0.1:{free_port()}", f"--num_processes={num_processes}"]
  procs = [subprocess.Popen(command + ([f"--process_id={i}"] if num_processes > 1 else []), env=main_env(devices),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(num_processes)]
  return wait_for(procs, timeout)


def wait_for(procs, timeout=300):
  """(exit codes, outputs) of started processes; a hung one is killed (all are) and fails the test."""
  import pytest  # pylint: disable=g-import-not-at-top
  try:
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    outs = [p.communicate()[0] for p in procs]
    pytest.fail("the processes hung:\n" + "\n".join(out[-3000:] for out in outs))
  return [p.returncode for p in procs], outs


def as_if_written_by_two_processes(step_dir):
  """What a 2-process job leaves in a step: its metadata says so and each process has its own iterator state."""
  path = step_dir / "metadata" / "metadata"
  path.write_text(json.dumps({**json.loads(path.read_text()), "process_count": 2, "device_count": 8}))
  states = step_dir / "data_iterator"
  (states / "process_0_of_1").rename(states / "process_0_of_2")
  shutil.copyfile(states / "process_0_of_2", states / "process_1_of_2")


def recording_stream_factory(stream_class, starts: list):
  """A `train_data_fn(size, start_step=0)` that records each start step in `starts` and returns a fresh
  `stream_class()` going on from that batch (the resume-on-another-slice tests)."""
  def train_data_fn(size, start_step=0):
    del size
    starts.append(start_step)
    stream = stream_class()
    stream.step, stream.start_note = start_step, "the test stream goes on from that batch"
    return stream
  return train_data_fn


_LOCKER = ("import sys, time; from dtm_jax.runtime import workdir_lock; "
           "workdir_lock.WorkdirLock(sys.argv[1], mode='pretrain').acquire(); print('locked', flush=True); "
           "time.sleep(600)")


def hold_lock(workdir):
  """A separate process that takes the workdir's lock and keeps it (heartbeat included) until killed."""
  proc = subprocess.Popen([sys.executable, "-c", _LOCKER, str(workdir)], env=main_env(1), stdout=subprocess.PIPE,
                          text=True)
  assert proc.stdout.readline().strip() == "locked"
  return proc


def long_tiny_config(**overrides):
  base = {"log_every": 1, "checkpoint_every": 5, "total_steps": 1000, "async_checkpointing": False}
  return tiny_config(**{**base, **overrides})


def saved_steps(workdir):
  return sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints")) if p.isdigit())


def jsonl_steps(workdir):
  path = workdir / "metrics.jsonl"
  return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []
