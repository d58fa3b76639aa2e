"""How a process joins its job: which launcher started it and what `jax.distributed.initialize()` is called with.

`initialize_distributed()` (called by main.py before JAX starts its backend):
  * explicit `--coordinator_address/--num_processes/--process_id` win;
  * Cloud TPU VMs: always `jax.distributed.initialize()` (JAX reads the slice from the TPU metadata / GKE variables);
  * the launchers JAX detects itself (jax._src.clusters: SLURM under `srun`, Open MPI's `mpirun`, Kubernetes Indexed
    Jobs with the `kubernetes` package, i.e. `pip install "jax[k8s]"`): `jax.distributed.initialize()`, with two
    corrections for SLURM: the process count is the step's (`srun -n1` inside a larger allocation runs alone), and with
    one task per node each task sees every GPU of its node (JAX would bind GPU `SLURM_LOCALID` only) — likewise for
    one Open MPI rank per node;
  * torchrun-style variables (`WORLD_SIZE`, `RANK`, `MASTER_ADDR`, `MASTER_PORT`: torchrun, Kubeflow's PyTorchJob and
    other Kubernetes GPU operators): joined with `MASTER_ADDR:MASTER_PORT` as the coordinator.
A launch that announces several processes but that JAX cannot join (a Kubernetes Indexed Job without the `kubernetes`
package, Open MPI 5 without `OMPI_MCA_orte_hnp_uri`, …) is refused before anything starts, and so is a job whose
processes, once initialised, did not join one another: each would believe it is process 0 of 1 and train alone into
the same workdir. (The workdir lock, dtm_jax/runtime/workdir_lock.py, refuses a second writer on one workdir in
general.)
Nothing here imports TensorFlow.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from absl import logging

from dtm_jax.runtime import errors

_FIX = ("pass --coordinator_address=HOST0:PORT --num_processes=N --process_id=I to every process (README, "
        "\"Multi-host, GPU and TPU\")")


class LaunchError(errors.RunError):
  """The launcher started several processes that cannot (or did not) form one JAX job."""


@dataclasses.dataclass(frozen=True)
class Launch:
  """What the launcher says and what we do about it."""
  launcher: str | None  # "flags", "cloud_tpu", "slurm", "open_mpi", "kubernetes", "torchrun", … or None
  announced: int | None  # processes the launcher says the job has (None: it does not say)
  index: int | None  # this process's index as the launcher says (None: it does not say)
  kwargs: dict[str, Any] | None  # for jax.distributed.initialize(); None: a single process, nothing to join


def _int(name: str) -> int | None:
  try:
    return int(os.environ[name])
  except (KeyError, ValueError):
    return None


def on_cloud_tpu_vm() -> bool:
  """True on a Cloud TPU VM, as JAX decides it when imported (libtpu installed and TPU chips on the PCI bus); the
  TPU runtime is not started."""
  try:
    # Importing it imports jax first, whose __init__ runs cloud_tpu_init() and sets the flag.
    from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
    return bool(cloud_tpu_init.running_in_cloud_tpu_vm)
  except Exception:  # pylint: disable=broad-except
    return False


def jax_cluster() -> str | None:
  """The cluster environment jax.distributed.initialize() would detect (the first present one, in JAX's order)."""
  try:
    from jax._src import clusters  # pylint: disable=g-import-not-at-top
    kinds = list(getattr(clusters.ClusterEnv, "_cluster_types", ()))
  except Exception:  # pylint: disable=broad-except
    return None
  for kind in kinds:
    if getattr(kind, "opt_in_only_method", False):
      continue
    try:
      if kind.is_env_present():
        return kind.__name__
    except Exception:  # pylint: disable=broad-except  # e.g. the Kubernetes client outside a cluster
      continue
  return None


def _slurm_tasks_on_this_node() -> int | None:
  """Tasks of this step on this node, from SLURM_STEP_TASKS_PER_NODE (e.g. "2(x3),1") and SLURM_NODEID."""
  spec = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE")
  if not spec:
    return _int("SLURM_NTASKS_PER_NODE")
  counts = []
  for count, repeat in re.findall(r"(\d+)(?:\(x(\d+)\))?", spec):
    counts += [int(count)] * int(repeat or 1)
  node = _int("SLURM_NODEID") or 0
  if not counts:
    return None
  return counts[node] if node < len(counts) else counts[-1]


def _all_local_gpus() -> list[int]:
  """local_device_ids for "every GPU of this node": the GPUs CUDA shows this process (CUDA_VISIBLE_DEVICES, set by
  SLURM's --gres), else SLURM_GPUS_ON_NODE; [] when unknown, which JAX treats as "no restriction"."""
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible and visible.strip() not in ("", "NoDevFiles"):
    return list(range(len(visible.split(","))))
  count = _int("SLURM_GPUS_ON_NODE")
  return list(range(count)) if count else []


def _announced() -> tuple[str | None, int | None, int | None]:
  """(launcher, process count, this process's index) that launcher variables announce, whoever can join them."""
  if "SLURM_STEP_NUM_TASKS" in os.environ:  # set by srun for the step (SLURM_NTASKS is the allocation's)
    return "slurm", _int("SLURM_STEP_NUM_TASKS"), _int("SLURM_PROCID")
  if "OMPI_COMM_WORLD_SIZE" in os.environ:
    return "open_mpi", _int("OMPI_COMM_WORLD_SIZE"), _int("OMPI_COMM_WORLD_RANK")
  if "PMI_SIZE" in os.environ:  # MPICH, Intel MPI, srun --mpi=pmi2
    return "mpi", _int("PMI_SIZE"), _int("PMI_RANK")
  if "WORLD_SIZE" in os.environ:
    return "torchrun", _int("WORLD_SIZE"), _int("RANK")
  if "JOB_COMPLETION_INDEX" in os.environ:  # a Kubernetes Indexed Job's pod; the pod count is not in the env
    return "kubernetes", None, _int("JOB_COMPLETION_INDEX")
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("TPU_PROCESS_ADDRESSES")
  if hosts:
    return "cloud_tpu", len(hosts.split(",")) * (_int("MEGASCALE_NUM_SLICES") or 1), _int("TPU_WORKER_ID")
  return None, None, None


def plan(coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None) -> Launch:
  """Decides how this process joins its job (reads the environment; starts nothing)."""
  if coordinator_address:
    return Launch("flags", num_processes, process_id, dict(coordinator_address=coordinator_address,
                                                           num_processes=num_processes, process_id=process_id))
  launcher, count, index = _announced()
  cluster = jax_cluster()
  if on_cloud_tpu_vm():
    if cluster is not None or (count or 1) > 1:
      return Launch("cloud_tpu", count, index, {})  # JAX reads the slice from the TPU metadata or GKE's variables
    logging.warning("Cloud TPU VM without TPU metadata (TPU_SKIP_MDS_QUERY?) or GKE variables: running as a single "
                    "process.")
    return Launch("cloud_tpu", 1, 0, None)
  if cluster == "SlurmCluster":
    count = _int("SLURM_STEP_NUM_TASKS") or _int("SLURM_NTASKS")
    if count == 1:
      return Launch("slurm", 1, 0, None)
    kwargs: dict[str, Any] = {"num_processes": count}
    if _slurm_tasks_on_this_node() == 1:
      kwargs["local_device_ids"] = _all_local_gpus()
    return Launch("slurm", count, _int("SLURM_PROCID"), kwargs)
  if cluster == "OmpiCluster":
    count = _int("OMPI_COMM_WORLD_SIZE")
    if count == 1:
      return Launch("open_mpi", 1, 0, None)
    kwargs = {"local_device_ids": _all_local_gpus()} if _int("OMPI_COMM_WORLD_LOCAL_SIZE") == 1 else {}
    return Launch("open_mpi", count, index, kwargs)
  if cluster == "K8sCluster":
    return Launch("kubernetes", count, index, {})
  if cluster is not None:  # a cluster kind of a newer JAX: let JAX bootstrap it
    return Launch(cluster, count, index, {})
  if launcher == "torchrun" and count and count > 1 and os.environ.get("MASTER_ADDR"):
    port = os.environ.get("MASTER_PORT", "29500")
    kwargs = dict(coordinator_address=f"{os.environ['MASTER_ADDR']}:{port}", num_processes=count,
                  process_id=index, cluster_detection_method="deactivate")
    local_size = _int("LOCAL_WORLD_SIZE")
    if local_size and local_size > 1 and _int("LOCAL_RANK") is not None:
      kwargs["local_device_ids"] = [_int("LOCAL_RANK")]
    return Launch("torchrun", count, index, kwargs)
  if (count or 1) > 1 or (index or 0) > 0:
    raise LaunchError(_cannot_join(launcher, count, index))
  return Launch(launcher, count, index, None)


def _cannot_join(launcher: str | None, count: int | None, index: int | None) -> str:
  what = f"{count} processes" if count else f"several processes (this is number {index})"
  if launcher == "kubernetes":
    return (f"This pod is part of a Kubernetes Indexed Job ({what}), but JAX cannot bootstrap the job: its Kubernetes "
            "detection needs the `kubernetes` package (pip install \"jax[k8s]\") and an Indexed Job with a headless "
            f"service; or {_FIX}. Without it each pod would train alone into the same workdir.")
  names = {"slurm": "SLURM", "open_mpi": "Open MPI", "mpi": "MPI (PMI)", "torchrun": "torchrun-style launcher",
           "cloud_tpu": "TPU slice"}
  return (f"The {names.get(launcher, launcher)} launcher started {what}, but JAX finds no coordinator for them (its "
          f"cluster detection does not cover this launch); {_FIX}. Without it each process would train alone into "
          "the same workdir.")


def check_joined(launch: Launch, process_count: int) -> None:
  """Refuses processes that a launcher started together but that did not form one JAX job."""
  alone = process_count == 1 and ((launch.announced or 1) > 1 or (launch.index or 0) > 0)
  if alone or (launch.announced and launch.kwargs is not None and process_count != launch.announced):
    raise LaunchError(
        f"The {launch.launcher} launcher announced {launch.announced or 'several'} processes (this one has index "
        f"{launch.index}), but JAX sees {process_count}: every process would believe it is process 0 of "
        f"{process_count} and write the same workdir. Check the launcher's variables, or {_FIX}.")


def _jax_initialize(**kwargs) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  if "coordinator_address" in kwargs:
    # Only affects CPU devices (the localhost multi-process tests); GPU/TPU collectives are unchanged.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)


def _process_count() -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_count()


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> Launch:
  """Joins the job the launcher started (see the module docstring); returns what was decided."""
  launch = plan(coordinator_address, num_processes, process_id)
  if launch.kwargs is not None:
    logging.info("Joining a %s job: jax.distributed.initialize(%s).", launch.launcher,
                 ", ".join(f"{k}={v!r}" for k, v in launch.kwargs.items()))
    _jax_initialize(**launch.kwargs)
  if launch.launcher is not None:
    check_joined(launch, _process_count())
  return launch
