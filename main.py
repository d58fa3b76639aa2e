"""Entry point: `python main.py --config=configs/<file>.py[:arg] --workdir=DIR [--mode=pretrain] [--config.x=y]`.

Modes: pretrain (DTM pretraining, resumes from DIR), linear_probe, finetune, knn (evaluate a pretrained student).
Multi-host: `jax.distributed.initialize()` runs when the job has several processes (TPU pods and SLURM/Kubernetes
GPU jobs are detected by JAX; or pass --coordinator_address, --num_processes and --process_id).
"""
import json
import os
import socket
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/demo.py.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_MODE = flags.DEFINE_enum("mode", "pretrain", ["pretrain", "linear_probe", "finetune", "knn"], "What to run.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-process jobs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process job.")
flags.mark_flags_as_required(["config", "workdir"])

# Environment variables through which cluster launchers announce a multi-process job that JAX can auto-detect.
_MULTIPROCESS_ENV = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS",
                     "OMPI_COMM_WORLD_SIZE")


def _initialize_distributed():
  import jax  # pylint: disable=g-import-not-at-top
  if _COORDINATOR.value:
    # Only affects CPU devices (the localhost multi-process tests); GPU/TPU collectives are unchanged.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif any(v in os.environ for v in _MULTIPROCESS_ENV) or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()


def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from dtm_jax import cpu_host  # pylint: disable=g-import-not-at-top
  cpu_host.configure()  # before JAX starts its backend and threads
  _initialize_distributed()
  import jax  # pylint: disable=g-import-not-at-top
  from dtm_jax import metrics  # pylint: disable=g-import-not-at-top
  metrics.quiet_library_logs()
  config, workdir, mode = _CONFIG.value, _WORKDIR.value, _MODE.value
  logging.info("Host %s: process %d of %d; %d local / %d global devices (%s); jax %s.", socket.gethostname(),
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].device_kind, jax.__version__)
  logging.info("Config (%s):\n%s", mode, config)

  if mode == "pretrain":
    from dtm_jax import train  # pylint: disable=g-import-not-at-top
    result = train.train(config, workdir)
  else:
    import importlib  # pylint: disable=g-import-not-at-top
    result = importlib.import_module(f"dtm_jax.evaluate.{mode}").run(config, workdir)
  if jax.process_index() == 0:
    print(f"{mode} finished: " + json.dumps(result, default=float), flush=True)
  followup = config.get("then_evaluate") if mode == "pretrain" else None
  if followup and not result.get("preempted"):
    _run_followup(followup, workdir)


def _run_followup(spec, workdir):
  """The demo's closing evaluation (e.g. a kNN or linear probe of the student just trained)."""
  import importlib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  cfg = importlib.import_module(spec.config_module).get_config(spec.get("config_arg", ""))
  with cfg.unlocked():
    cfg.pretrained.workdir = workdir
  result = importlib.import_module(f"dtm_jax.evaluate.{spec.mode}").run(cfg, os.path.join(workdir, spec.mode))
  if jax.process_index() == 0:
    print(f"{spec.mode} of the pretrained student: " + json.dumps(result, default=float), flush=True)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  app.run(main)
