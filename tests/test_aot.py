"""--mode=compile: programs compiled for a TPU slice by the real TPU compiler in this CPU-only process, and the same
programs lowered for CUDA. Needs the TPU runtime (libtpu), which requirements-test.txt installs."""
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from configs import finetune_demo, knn_demo, linear_probe_demo, test_tiny
from dtm_jax import aot, platform, sharding, targets
from dtm_jax.modes import pretrain as train

pytestmark = pytest.mark.tpu_compiler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLICE = "v5e:2x2"  # 4 chips: the smallest slice that shards the batch


@pytest.mark.parametrize("name, expected", [
    ("v4-32", ("v4", "2x2x4")), ("v5p-128", ("v5p", "4x4x4")), ("v5p-32", ("v5p", "2x2x4")),
    ("v5e-256", ("v5e", "16x16")), ("v5e-64", ("v5e", "8x8")), ("v6e-64", ("v6e", "8x8")), ("v5e-8", ("v5e", "2x4")),
    ("v5p:4x4x8", ("v5p", "4x4x8")), ("v5litepod-16", ("v5e", "4x4")), ("V4-8", ("v4", "2x2x1")),
])
def test_slice_names_give_the_standard_shapes(name, expected):
  assert aot.parse_topology(name) == expected


@pytest.mark.parametrize("name, message", [
    ("v5p-127", "even"), ("v9-32", "Unknown TPU generation"), ("tpu-big", "Unknown topology"),
    ("v5e:2x2x2", "2-D shapes"), ("v5e-24", "power of two"),
])
def test_bad_topology_names_say_what_to_use(name, message):
  with pytest.raises(ValueError, match=message):
    aot.parse_topology(name)


@pytest.fixture(scope="module")
def slice_4():
  return aot.topology(SLICE)


def test_topology_has_the_slice_devices():
  topo = aot.topology("v5p-32")  # 16 chips, 4 hosts
  assert (topo.num_chips, topo.num_hosts, topo.generation) == (16, 4, "v5p")
  assert {platform.platform_of(d) for d in topo.devices} == {"tpu"}


def _assert_tpu_program(report):
  hbm = report["hbm"]
  assert 0 < hbm["total_bytes"] < hbm["capacity_bytes"]
  assert hbm["argument_bytes"] > 0
  flops = report["flops_per_chip"]
  assert flops["compiler"] > 0 and flops["analytic"] > 0
  assert not [c for c in report["custom_calls"] if c.startswith("dtm_")], report["custom_calls"]
  assert report["roofline"]["seconds"] > 0 and 0 < report["roofline"]["mfu"] <= 1


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["beit", "mae"])
def test_tiny_pretraining_compiles_for_a_tpu_slice_without_cpu_kernels(slice_4, kind):
  """The pretraining step (morphing and attention included; the BEiT-style or MAE-style student) compiles for 4 TPU
  chips; on a single CPU device the same config would take the CPU kernels, so the choice really follows the mesh's
  devices."""
  config = test_tiny.get_config(f"kind={kind}")
  reports = aot.compile_config(config, slice_4)
  assert [r["program"] for r in reports] == ["train_step"]
  _assert_tpu_program(reports[0])
  assert reports[0]["mesh"] == {"data": 4, "fsdp": 1}
  assert "all-reduce" in reports[0]["collectives"]  # gradients averaged over the data axis


@pytest.mark.slow
def test_multi_slice_data_parallelism_spans_the_slices():
  """Two v5e:2x2 slices: the mesh is built by slice (data parallelism over DCN), which jax.make_mesh refuses."""
  topo = aot.topology("v5e:2x2", num_slices=2)
  assert topo.num_chips == 8 and len({d.slice_index for d in topo.devices}) == 2
  report = aot.compile_config(test_tiny.get_config(), topo)[0]
  assert report["mesh"] == {"data": 8, "fsdp": 1}
  _assert_tpu_program(report)


@pytest.mark.slow
def test_fsdp_program_gathers_parameters(slice_4):
  config = aot.with_overrides(test_tiny.get_config(), {"mesh.fsdp": 4, "mesh.min_fsdp_size": 16})
  report = aot.compile_config(config, slice_4)[0]
  assert report["mesh"] == {"data": 1, "fsdp": 4}
  assert "all-gather" in report["collectives"]


@pytest.mark.slow
@pytest.mark.parametrize("get_config, overrides, programs", [
    (finetune_demo.get_config, {"batch_size": 32, "eval_batch_size": 32}, ["train_step"]),
    (linear_probe_demo.get_config, {"batch_size": 32, "eval_batch_size": 32}, ["encode", "probe_step"]),
    (knn_demo.get_config, {"knn.batch_size": 32, "knn.num_train_examples": 256}, ["encode", "knn_step"]),
])
def test_evaluation_configs_compile_for_a_tpu_slice(slice_4, get_config, overrides, programs):
  reports = aot.compile_config(aot.with_overrides(get_config(), overrides), slice_4)
  assert [r["program"] for r in reports] == programs
  for report in reports:
    _assert_tpu_program(report)


def test_program_that_cannot_fit_names_the_knobs(slice_4):
  config = aot.with_overrides(test_tiny.get_config(), {"batch_size": 4 * 131072})
  with pytest.raises(aot.DoesNotFitError, match="grad_accum_steps.*remat.*fsdp.*--fit"):
    aot.compile_config(config, slice_4)


@pytest.mark.slow
def test_fit_returns_the_cheapest_setting_that_fits(slice_4, monkeypatch):
  too_big = {"model.remat": "none", "grad_accum_steps": 1, "mesh.fsdp": 1}
  # 512 images per chip and micro-batch: the compile time grows with the micro-batch (16 steps of 32,768: ~135 s on
  # this 2-core VM, 256 steps of 512: ~30 s), the search is the same.
  fits = {"model.remat": "none", "grad_accum_steps": 256, "mesh.fsdp": 1}
  monkeypatch.setattr(aot, "_candidates", lambda config, mode, num_chips: [too_big, fits])
  config = aot.with_overrides(test_tiny.get_config(), {"batch_size": 4 * 131072})
  setting, reports = aot.fit(config, slice_4)
  assert setting == fits
  assert reports[0]["hbm"]["fraction"] < aot.DEFAULT_HBM_LIMIT


def test_candidates_go_from_cheap_to_expensive():
  config = aot.with_overrides(test_tiny.get_config(), {"batch_size": 64})
  settings = aot._candidates(config, "pretrain", 4)
  assert settings[0] == {"model.remat": "none", "grad_accum_steps": 1, "mesh.fsdp": 1}
  assert settings[-1]["model.remat"] == "full"
  assert all(64 % (4 * s["grad_accum_steps"]) == 0 for s in settings)


@pytest.mark.slow
def test_compile_mode_from_the_command_line(tmp_path):
  """main.py --mode=compile writes the JSON report; an impossible batch exits non-zero naming the knobs."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  command = [sys.executable, "main.py", "--mode=compile", "--config=configs/test_tiny.py", f"--topology={SLICE}",
             f"--workdir={tmp_path}"]
  done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "HBM per chip" in done.stdout and "roofline" in done.stdout
  report = json.loads((tmp_path / "compile_v5e_2x2.json").read_text())
  assert report["num_chips"] == 4 and report["programs"][0]["program"] == "train_step"
  assert report["libtpu_version"]
  failed = subprocess.run(command + ["--config.batch_size=524288"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
  assert failed.returncode == 1
  assert "does not fit" in failed.stderr and "--config.grad_accum_steps" in failed.stderr


@pytest.mark.slow
def test_programs_lowered_for_cuda_have_no_cpu_kernels():
  """The same pretraining step lowered for CUDA from this CPU host: no CPU custom call (on one CPU device the
  program would hold the morphing and attention kernels)."""
  config = aot.with_overrides(test_tiny.get_config(), {"batch_size": 8})
  mesh = sharding.make_mesh(-1, 1, devices=jax.devices()[:1])
  with platform.building_for(mesh):
    cpu_text = train.build_program(config, mesh).step.trace(
        *train.build_program(config, mesh).abstract_inputs()).lower().as_text()
  with platform.building_for(mesh, platform="gpu"):
    program = train.build_program(config, mesh)
    cuda_text = program.step.trace(*program.abstract_inputs()).lower(lowering_platforms=("cuda",)).as_text()
  from dtm_jax import kernels  # pylint: disable=g-import-not-at-top
  if kernels.available():
    assert "dtm_morph_gram" in cpu_text and "dtm_attention_fwd" in cpu_text
  assert "dtm_" not in cuda_text


@pytest.mark.parametrize("get_config, overrides", [
    (finetune_demo.get_config, {"batch_size": 8, "eval_batch_size": 8}),
    # Random erasing on the device: uint8 images plus the pipeline's boxes (input_pipeline, dtm_jax/images.py).
    (finetune_demo.get_config, {"batch_size": 8, "eval_batch_size": 8, "input.random_erase_prob": 0.25}),
    (linear_probe_demo.get_config, {"batch_size": 8, "eval_batch_size": 8, "precompute_features": False}),
    (linear_probe_demo.get_config, {"batch_size": 8, "eval_batch_size": 8, "precompute_features": False,
                                    "augment": True, "input.random_erase_prob": 0.25}),
    (knn_demo.get_config, {"knn.batch_size": 8, "knn.num_train_examples": 64}),
])
def test_evaluation_programs_lowered_for_cuda_have_no_cpu_kernels(get_config, overrides):
  config = aot.with_overrides(get_config(), overrides)
  mesh = sharding.make_mesh(-1, 1, devices=jax.devices()[:1])
  with platform.building_for(mesh, platform="gpu"):
    for program in aot.build_programs(config, mesh):
      text = program.jitted.trace(*program.args).lower(lowering_platforms=("cuda",)).as_text()
      assert "dtm_" not in text, program.name
      images = [a for a in jax.tree.leaves(program.args) if getattr(a, "ndim", 0) == 4 and a.shape[-1] == 3]
      assert images and all(a.dtype == jnp.uint8 for a in images), program.name  # every batch travels as uint8


@pytest.fixture
def cudnn_version_faked(monkeypatch):
  """jax asks the cuDNN library for its version while lowering cuDNN attention; this CPU host has none, so the
  lowering is given the version of a current install (9.10) and a Hopper GPU. Only the lowering runs."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(cudnn, "check_cudnn_version", lambda: 91000)
  monkeypatch.setattr(cudnn, "check_compute_capability", lambda capability: True)
  monkeypatch.setattr(cudnn, "is_cuda_compute_capability_equal", lambda capability: False)


def _tiny_pretraining_step_for_cuda(teacher_dtype):
  """The tiny pretraining step (bf16 student, teacher in `teacher_dtype`) lowered for CUDA, as StableHLO text."""
  config = aot.with_overrides(test_tiny.get_config(), {"batch_size": 8, "model.dtype": "bfloat16",
                                                       "target.dtype": teacher_dtype})
  mesh = sharding.make_mesh(-1, 1, devices=jax.devices()[:1])
  with platform.building_for(mesh, platform="gpu"):
    program = train.build_program(config, mesh)
    return program.step.trace(*program.abstract_inputs()).lower(lowering_platforms=("cuda",)).as_text()


def test_cuda_programs_use_cudnn_attention_for_student_and_teacher(cudnn_version_faked):
  """In bf16 on GPUs the student (relative-position bias, 17 tokens padded to 18, with gradients) and the CLIP
  teacher (no bias, no gradient) run cuDNN's fused attention: the pretraining step lowered for CUDA holds its
  forward and backward custom calls, and no CPU kernel."""
  del cudnn_version_faked
  text = _tiny_pretraining_step_for_cuda("bfloat16")
  calls = re.findall(r"custom_call @([^(]+)\(", text)
  assert not [c for c in calls if c.startswith("dtm_")]
  # 2 student blocks, forward and backward with the bias, on 17 tokens padded to 18; 2 teacher blocks, forward only.
  assert calls.count("__cudnn$fmhaScaleBiasSoftmax") == 2 and calls.count("__cudnn$fmhaScaleBiasSoftmaxBackward") == 2
  assert calls.count("__cudnn$fmhaSoftmax") == 2
  assert "tensor<8x18x2x16xbf16>" in text and "tensor<8x17x2x16xbf16>" in text


_WITHOUT_TENSORFLOW = """
import glob, importlib, os, sys
sys.modules["tensorflow"] = None  # any import of TensorFlow now fails, as on hosts without it
sys.path.append("benchmarks")
for path in sorted(glob.glob("configs/*.py")):
  name = os.path.basename(path)[:-3]
  if name not in ("__init__", "common"):
    importlib.import_module("configs." + name).get_config("")
from configs import test_tiny
from dtm_jax import aot
aot.compile_config(test_tiny.get_config(), aot.topology("v5e:2x2"))
import train_step
built = train_step.build(student="test", teacher="tiny", batch=8, dtype="float32", image_size=32, dtm=True)
built["run_step"]()
print("ok without tensorflow")
"""


@pytest.mark.slow
def test_configs_compile_mode_and_step_benchmark_need_no_tensorflow():
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  done = subprocess.run([sys.executable, "-c", _WITHOUT_TENSORFLOW], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0 and "ok without tensorflow" in done.stdout, done.stderr[-3000:]


def test_missing_tpu_runtime_says_what_to_install(monkeypatch):
  find_spec = aot.importlib.util.find_spec
  monkeypatch.setattr(aot.importlib.util, "find_spec", lambda name: None if name == "libtpu" else find_spec(name))
  with pytest.raises(RuntimeError, match=r'pip install "jax\[tpu\]=='):
    aot.topology("v5e:2x2")


@pytest.mark.parametrize("num_slices, hbm_limit, message", [(0, 0.9, "--num_slices=0"), (1, 1.5, "--hbm_limit=1.5")])
def test_impossible_compile_flags_are_refused_before_the_tpu_runtime_starts(num_slices, hbm_limit, message):
  with pytest.raises(ValueError, match=message):
    aot.run(test_tiny.get_config(), None, topology_name=SLICE, num_slices=num_slices, hbm_limit=hbm_limit)


def test_an_auto_teacher_runs_float16_on_gpus_and_float32_on_tpus_and_cpus(cudnn_version_faked):
  """`target.dtype="auto"` (the recipes' default) is chosen from the devices the program is built for."""
  del cudnn_version_faked
  for name, expected in (("tpu", jnp.float32), ("gpu", jnp.float16), ("cpu", jnp.float32)):
    with platform.building_for(platform=name, num_devices=1):
      assert targets.teacher_dtype("auto") == expected
      assert targets.teacher_dtype("bfloat16") == jnp.bfloat16  # a named dtype is kept everywhere
  text = _tiny_pretraining_step_for_cuda("auto")
  assert re.findall(r"custom_call @([^(]+)\(", text).count("__cudnn$fmhaSoftmax") == 2  # the teacher's, in float16
  assert "x16xf16>" in text and "x16xbf16>" in text  # teacher attention in float16, the student's in bfloat16
