"""Cluster start-up (dtm_jax/runtime/launch.py): which launcher started this process, what
jax.distributed.initialize() is called with, and the refusal of processes that a launcher started together but that
did not join one job.

Environment variables are faked; jax.distributed.initialize is replaced by a recorder, but the arguments are also fed
through JAX's own cluster detection (jax._src.clusters) to check what JAX would make of them.
"""
import os
import subprocess
import sys
import types

import pytest
from train_testing import REPO

from dtm_jax.runtime import errors, launch

ROOT = REPO  # the repository root
_LAUNCH_VARS = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "TPU_", "MEGASCALE_", "KUBERNETES_", "JOB_COMPLETION_INDEX",
                "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "JAX_COORDINATOR", "JAX_LOCAL_DEVICE_IDS", "CUDA_VISIBLE_DEVICES")


@pytest.fixture(name="env")
def _clean_env(monkeypatch):
  """No launcher variables (whatever the test machine has), no TPU VM, and a recording jax.distributed.initialize."""
  for name in list(os.environ):
    if name.startswith(_LAUNCH_VARS):
      monkeypatch.delenv(name)
  monkeypatch.setattr(launch, "on_cloud_tpu_vm", lambda: False)
  calls = []
  monkeypatch.setattr(launch, "_jax_initialize", lambda **kwargs: calls.append(kwargs))
  # JAX then sees the processes it was told about (a test of processes that did not join overrides this).
  monkeypatch.setattr(launch, "_process_count", lambda: (calls[-1].get("num_processes") or 1) if calls else 1)

  def setenv(**variables):
    for k, v in variables.items():
      monkeypatch.setenv(k, str(v))
  setenv.calls = calls
  return setenv


def _jax_would_use(kwargs):
  """What JAX's auto-detection fills in for the arguments we pass (no network: SLURM reads the environment)."""
  from jax._src import clusters  # pylint: disable=g-import-not-at-top
  return clusters.ClusterEnv.auto_detect_unset_distributed_params(
      kwargs.get("coordinator_address"), kwargs.get("num_processes"), kwargs.get("process_id"),
      kwargs.get("local_device_ids"), None, None)


_SLURM = dict(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="gpu[01-04]", SLURM_NTASKS=4, SLURM_STEP_NUM_TASKS=4,
              SLURM_PROCID=1, SLURM_LOCALID=0, SLURM_NODEID=1, SLURM_STEP_NUM_NODES=4)


def test_no_launcher_runs_alone(env):
  plan = launch.initialize_distributed()
  assert env.calls == [] and plan.kwargs is None


def test_slurm_one_task_per_node_sees_every_gpu_of_its_node(env):
  env(**_SLURM, SLURM_STEP_TASKS_PER_NODE="1(x4)", CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
  launch.initialize_distributed()
  assert env.calls == [{"num_processes": 4, "local_device_ids": list(range(8))}]
  address, count, index, local = _jax_would_use(env.calls[0])
  assert address.startswith("gpu01:") and (count, index, list(local)) == (4, 1, list(range(8)))


def test_slurm_one_task_per_gpu_keeps_one_gpu_per_task(env):
  env(**{**_SLURM, "SLURM_NTASKS": 16, "SLURM_STEP_NUM_TASKS": 16, "SLURM_LOCALID": 3},
      SLURM_STEP_TASKS_PER_NODE="4(x4)", CUDA_VISIBLE_DEVICES="0,1,2,3")
  launch.initialize_distributed()
  assert env.calls == [{"num_processes": 16}]
  assert list(_jax_would_use(env.calls[0])[3]) == [3]  # JAX's default: SLURM_LOCALID


def test_slurm_single_task_step_inside_a_larger_allocation_runs_alone(env):
  # `srun -n1 python main.py ...` in a 4-task allocation: SLURM_NTASKS says 4, the step has one task.
  env(**{**_SLURM, "SLURM_STEP_NUM_TASKS": 1, "SLURM_PROCID": 0}, SLURM_STEP_TASKS_PER_NODE="1")
  plan = launch.initialize_distributed()
  assert env.calls == [] and plan.kwargs is None


def test_kubernetes_indexed_job_without_the_kubernetes_package_is_refused(env, monkeypatch):
  monkeypatch.setitem(sys.modules, "kubernetes", None)  # not installed
  env(KUBERNETES_SERVICE_HOST="10.0.0.1", KUBERNETES_SERVICE_PORT=443, JOB_COMPLETION_INDEX=2)
  with pytest.raises(errors.RunError, match=r"(?s)Kubernetes.*jax\[k8s\].*--coordinator_address"):
    launch.initialize_distributed()
  assert env.calls == []


def test_kubernetes_indexed_job_is_bootstrapped_by_jax(env, monkeypatch):
  fake = types.ModuleType("kubernetes")
  fake.config = types.SimpleNamespace(load_incluster_config=lambda: None)
  fake.client = types.SimpleNamespace(CoreV1Api=object, BatchV1Api=object,
                                      exceptions=types.SimpleNamespace(ApiException=Exception))
  monkeypatch.setitem(sys.modules, "kubernetes", fake)
  env(KUBERNETES_SERVICE_HOST="10.0.0.1", JOB_COMPLETION_INDEX=2)
  monkeypatch.setattr(launch, "_process_count", lambda: 4)
  plan = launch.initialize_distributed()
  assert env.calls == [{}] and plan.launcher == "kubernetes"


def test_torchrun_style_variables_are_joined(env):
  # Kubeflow's PyTorchJob / torchrun-style launchers (common for Kubernetes GPU jobs): WORLD_SIZE, RANK, MASTER_ADDR.
  env(WORLD_SIZE=4, RANK=2, LOCAL_RANK=0, LOCAL_WORLD_SIZE=1, MASTER_ADDR="job-master-0", MASTER_PORT=23456)
  launch.initialize_distributed()
  assert env.calls == [{"coordinator_address": "job-master-0:23456", "num_processes": 4, "process_id": 2,
                        "cluster_detection_method": "deactivate"}]


def test_torchrun_style_several_processes_per_node_take_one_gpu_each(env):
  env(WORLD_SIZE=16, RANK=5, LOCAL_RANK=1, LOCAL_WORLD_SIZE=4, MASTER_ADDR="m", MASTER_PORT=1234)
  launch.initialize_distributed()
  assert env.calls[0]["local_device_ids"] == [1]


def test_cloud_tpu_vm_always_initializes(env, monkeypatch):
  monkeypatch.setattr(launch, "on_cloud_tpu_vm", lambda: True)
  monkeypatch.setattr(launch, "jax_cluster", lambda: "GceTpuCluster")  # the TPU metadata answers (one host or many)
  plan = launch.initialize_distributed()
  assert env.calls == [{}] and plan.launcher == "cloud_tpu"


def test_cloud_tpu_vm_without_metadata_runs_alone(env, monkeypatch):
  monkeypatch.setattr(launch, "on_cloud_tpu_vm", lambda: True)
  monkeypatch.setattr(launch, "jax_cluster", lambda: None)  # e.g. TPU_SKIP_MDS_QUERY in a container
  assert launch.initialize_distributed().kwargs is None and env.calls == []


def test_open_mpi_job_jax_cannot_join_is_refused_before_initializing(env):
  # Open MPI 5 (PRRTE) sets no OMPI_MCA_orte_hnp_uri, which JAX's detection needs.
  env(OMPI_COMM_WORLD_SIZE=2, OMPI_COMM_WORLD_RANK=1, OMPI_COMM_WORLD_LOCAL_RANK=0)
  with pytest.raises(errors.RunError, match=r"(?s)Open MPI.*2 processes.*--coordinator_address"):
    launch.initialize_distributed()
  assert env.calls == []


def test_processes_started_together_that_did_not_join_are_refused(env, monkeypatch):
  # The launcher announced 2 processes; after initialising, JAX sees 1: both would be "process 0 of 1".
  env(**{**_SLURM, "SLURM_NTASKS": 2, "SLURM_STEP_NUM_TASKS": 2}, SLURM_STEP_TASKS_PER_NODE="2")
  monkeypatch.setattr(launch, "_process_count", lambda: 1)
  with pytest.raises(errors.RunError, match=r"process 0 of 1"):
    launch.initialize_distributed()


def test_explicit_flags_win(env):
  env(**_SLURM)
  launch.initialize_distributed("127.0.0.1:1234", 4, 1)
  assert env.calls == [{"coordinator_address": "127.0.0.1:1234", "num_processes": 4, "process_id": 1}]


@pytest.mark.slow
def test_main_refuses_an_uncoordinated_launch_with_one_line(tmp_path):
  """Through main.py: an MPI launch JAX cannot join is one clear error (today: a ValueError traceback)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCH_VARS)}
  env.update(OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_RANK="1", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "main.py", "--config=configs/test_tiny.py", f"--workdir={tmp_path / 'w'}"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr and "--coordinator_address" in proc.stderr, proc.stderr[-2000:]
  assert not (tmp_path / "w").exists()
