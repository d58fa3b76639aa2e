"""Entry point: `python main.py --config=configs/<file>.py[:arg] --workdir=DIR [--mode=MODE] [--config.x=y]`.

The modes are listed in dtm_jax/registry.py (one module each in dtm_jax/modes/: pretrain, finetune, linear_probe,
knn, compare, segment); every config names its own (`config.mode`), so `--mode` may be left out. `--mode=compile`
compiles the config's mode's programs for a TPU slice on any machine (`--mode=compile --topology=v5p-128`, see
dtm_jax/aot.py; needs `pip install "jax[tpu]==<jax version>"`, no TPU).
Multi-host: `jax.distributed.initialize()` runs when the job has several processes (TPU pods and SLURM/Kubernetes
GPU jobs are detected by JAX; or pass --coordinator_address, --num_processes and --process_id).
"""
import json
import os
import socket
import sys

# Before anything imports TensorFlow (a config file's input block does, while the flags are parsed): its C++ start-up
# lines would otherwise land after a run's last line.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/demo.py.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_MODE = flags.DEFINE_string("mode", None, "What to run: the config's own mode (config.mode) when left out; `compile` "
                            "compiles it for --topology. The modes: dtm_jax/registry.py.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "--mode=compile: TPU slice, e.g. v4-32, v5e-256, v5p-128, v6e-64 "
                                "or v5p:4x4x4.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "--mode=compile: number of slices (multi-slice over DCN).")
_FIT = flags.DEFINE_bool("fit", False, "--mode=compile: search remat, grad_accum_steps and FSDP for the cheapest "
                         "setting that fits, and print it as --config overrides.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache_dir", None, "Persistent compilation cache (default: $JAX_COMPILATION_CACHE_DIR or "
    "~/.cache/dtm_jax/jax_compilation_cache; '' turns it off). See dtm_jax/runtime/compilation_cache.py.")
_HBM_LIMIT = flags.DEFINE_float("hbm_limit", 0.9, "--mode=compile: fraction of a chip's HBM a program may use.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Also print the traceback of errors that are otherwise reported as "
                             "one line (a bad config, a workdir in use, a failed save, unusable data).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-process jobs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process job.")
flags.mark_flags_as_required(["config", "workdir"])

def _initialize_distributed():
  """Joins the job the launcher started (TPU VMs, SLURM, Open MPI, Kubernetes, torchrun-style;
  dtm_jax/runtime/launch.py);
  a launch whose processes cannot or did not join one job is refused (launch.LaunchError, one line)."""
  from dtm_jax.runtime import launch  # pylint: disable=g-import-not-at-top
  launch.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)


def _config():
  """The loaded config; a config file that cannot be loaded (missing, a syntax error) is one line, not a traceback."""
  from dtm_jax.runtime import errors  # pylint: disable=g-import-not-at-top  # imports no JAX
  config = _CONFIG.value
  try:
    config.get("mode")  # a config that failed to load raises on first use
  except OSError as error:
    reason = str(error).strip().splitlines()[-1].strip()
    raise errors.ConfigError(f"Cannot load the config file: {reason}") from None
  return config


def _compile(config, workdir):
  """--mode=compile: a CPU-only process that compiles for a TPU slice (nothing initialised, nothing read)."""
  if not _TOPOLOGY.value:
    raise app.UsageError("--mode=compile needs --topology, e.g. --topology=v5p-128 or --topology=v5e:2x2.")
  os.environ["JAX_PLATFORMS"] = "cpu"  # this process runs nothing; the TPU runtime only describes the slice
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  from dtm_jax import aot  # pylint: disable=g-import-not-at-top
  try:
    aot.run(config, workdir, topology_name=_TOPOLOGY.value, num_slices=_NUM_SLICES.value, search=_FIT.value,
            hbm_limit=_HBM_LIMIT.value)
  except (aot.DoesNotFitError, ValueError, RuntimeError) as error:
    print(f"compile failed: {error}", file=sys.stderr, flush=True)
    sys.exit(1)


def main(argv):
  del argv
  if _MODE.value == "compile":
    _compile(_config(), _WORKDIR.value)
    return
  from dtm_jax.runtime import cpu_host  # pylint: disable=g-import-not-at-top
  cpu_host.configure()  # before JAX starts its backend and threads
  _initialize_distributed()
  import jax  # pylint: disable=g-import-not-at-top

  from dtm_jax import registry  # pylint: disable=g-import-not-at-top
  from dtm_jax.runner import run  # pylint: disable=g-import-not-at-top
  from dtm_jax.runtime import compilation_cache, metrics  # pylint: disable=g-import-not-at-top
  compilation_cache.enable(_COMPILATION_CACHE.value)
  metrics.quiet_library_logs()
  config, workdir = _config(), _WORKDIR.value
  mode = registry.mode_of(config, _MODE.value)
  logging.info("Host %s: process %d of %d; %d local / %d global devices (%s); jax %s.", socket.gethostname(),
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].device_kind, jax.__version__)
  logging.info("Config (%s):\n%s", mode, config)
  result = run.run(mode, config, workdir)
  if jax.process_index() == 0:
    print(f"{mode} finished: " + json.dumps(result, default=float), flush=True)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from dtm_jax import cli  # pylint: disable=g-import-not-at-top  # imports no JAX
  from dtm_jax.runtime import errors  # pylint: disable=g-import-not-at-top  # imports no JAX
  # Config override errors, RunErrors (bad config, workdir in use, failed save) and Ctrl-C: one clear line and an
  # exit status instead of a traceback.
  app.run(errors.cli(main, verbose=lambda: _VERBOSE.value), flags_parser=cli.parse_flags)
