"""Times the jitted DTM pretraining step on synthetic in-memory batches (no TensorFlow, so it runs on GPU hosts).

Standard tables (one command each):
  python benchmarks/train_step.py --table=gpu   # ViT-S/16 and ViT-B/16 students, CLIP ViT-B/16 teacher, 224², bf16,
                                                # batch 256, DTM on and off (H100/H200)
  python benchmarks/train_step.py --table=cpu   # ViT-Tiny student + ViT-Tiny-sized CLIP teacher, 224², fp32, batch 16
  python benchmarks/train_step.py --table=cpu --torch  # and the same step in PyTorch (benchmarks/train_step_torch.py)
One configuration:
  python benchmarks/train_step.py --student=base --teacher=B/16 --batch=256 --dtype=bfloat16 --dtm=both

Prints per configuration: step time (median over the timed steps), images/s, TFLOP/s per device, MFU (analytic
FLOPs: student forward+backward = 3× forward, teacher forward, morphing; peak from flops.PEAK_BF16_FLOPS), peak
device memory, the number of compilations of the step, and the DTM overhead = step time with DTM ÷ step time of the
token-wise program (dtm.enabled=False: no morphing in it), both measured in this process, their steps taking turns.
The step is built by train.build_program, as main.py builds it.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from dtm_jax.runtime import cpu_host  # pylint: disable=g-import-not-at-top

cpu_host.configure()

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import common
from dtm_jax import flops, sharding
from dtm_jax.models import clip, vit
from dtm_jax.modes import pretrain as train

TABLES = {
    "gpu": [dict(student="small", teacher="B/16", batch=256, dtype="bfloat16", image_size=224),
            dict(student="base", teacher="B/16", batch=256, dtype="bfloat16", image_size=224)],
    "cpu": [dict(student="tiny", teacher="tiny", batch=16, dtype="float32", image_size=224)],
}
# A CLIP-style teacher of ViT-Tiny size for the CPU table (the authors' CPU reference used the same sizes).
TINY_CLIP = dict(width=192, depth=12, num_heads=3, mlp_dim=768, proj_dim=512)


def _config(*, student: str, teacher: str, batch: int, dtype: str, image_size: int, dtm: bool,
            attention: str | None, accum: int, patch_size: int, fsdp: int) -> ml_collections.ConfigDict:
  """The paper recipe (configs/common.py) at these sizes, random-init teacher, synthetic data."""
  c = common.pretrain_config()
  c.model.update(variant=student, image_size=image_size, patch_size=patch_size, dtype=dtype, attention_impl=attention)
  overrides = dict(TINY_CLIP) if teacher == "tiny" else {}
  if attention:
    overrides["attention_impl"] = attention
  c.target.update(kind="clip", init="random", variant="B/16" if teacher == "tiny" else teacher, overrides=overrides,
                  dtype=dtype)
  c.input.source = "synthetic"
  c.dtm.enabled = dtm
  c.dtm.schedule_group_size = math.gcd(batch, c.dtm.schedule_group_size)  # the recipe's 256, or fewer: must divide
  c.batch_size, c.grad_accum_steps = batch, accum
  c.mesh.fsdp = fsdp
  c.total_steps, c.warmup_steps = 10_000, 100
  return c


def build(*, student: str, teacher: str, batch: int, dtype: str, image_size: int, dtm: bool,
          attention: str | None = None, accum: int = 1, patch_size: int = 16, fsdp: int = 1) -> dict:
  """Builds (train.build_program: the pretraining step as main.py runs it) and warms up the step (compilation + 3
  steps). Returns the step runner and what `figures` needs."""
  config = _config(student=student, teacher=teacher, batch=batch, dtype=dtype, image_size=image_size, dtm=dtm,
                   attention=attention, accum=accum, patch_size=patch_size, fsdp=fsdp)
  mesh = sharding.make_mesh(-1, fsdp)
  traces = []
  program = train.build_program(config, mesh, on_trace=lambda: traces.append(1))
  state = jax.jit(program.init_state, out_shardings=program.state_shardings)()
  target_params = jax.device_put(program.target.params, program.target_shardings)
  tokens = program.model_config.num_patches
  rng = np.random.default_rng(0)
  masks = rng.random((batch, tokens)).argsort(axis=1) < int(round(tokens * 75 / 196))
  data = jax.device_put({"image": jnp.asarray(rng.standard_normal((batch, image_size, image_size, 3)), jnp.float32),
                         "mask": jnp.asarray(masks)}, program.batch_sharding)
  carry = {"state": state}

  def run_step():
    carry["state"], out = program.step(carry["state"], target_params, data)
    jax.block_until_ready(out)

  for _ in range(3):  # compile + warm-up
    run_step()
  return {"run_step": run_step, "traces": traces, "flops": batch * program.flops_per_image, "config": dict(
      student=student, teacher=teacher, batch=batch, dtype=dtype, image_size=image_size, dtm=dtm,
      attention=attention or "default")}


def time_interleaved(built: list[dict], steps: int) -> list[dict]:
  """Times `steps` steps of every built step, taking turns (one step of each in every round), so that a change in the
  machine's speed during the run (±30% on shared VMs) affects them alike and their ratio stays fair."""
  times = [[] for _ in built]
  for _ in range(steps):
    for b, step_times in zip(built, times):
      t0 = time.perf_counter()
      b["run_step"]()
      step_times.append(time.perf_counter() - t0)
  return [figures(b, statistics.median(t)) for b, t in zip(built, times)]


def figures(b: dict, step_time: float) -> dict:
  tflops = b["flops"] / step_time / jax.device_count() / 1e12
  peak = flops.peak_flops_per_device(jax.devices()[0].device_kind)
  stats = jax.devices()[0].memory_stats() or {}
  return {
      **b["config"], "step_ms": 1e3 * step_time, "images_per_s": b["config"]["batch"] / step_time,
      "tflops_per_device": tflops, "mfu": tflops * 1e12 / peak if peak else float("nan"),
      "peak_memory_gib": stats.get("peak_bytes_in_use", float("nan")) / 2 ** 30, "compilations": len(b["traces"]),
  }


def _row(r: dict, overhead: float | None) -> str:
  mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] == r["mfu"] else "n/a"
  mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] == r["peak_memory_gib"] else "n/a"
  ovh = f"{overhead:.3f}" if overhead else "—"
  return (f"| {r['student']} | {r['teacher']} | {r['batch']} | {r['dtype']} | {'on' if r['dtm'] else 'off'} | "
          f"{r['attention']} | {r['step_ms']:.1f} | {r['images_per_s']:.1f} | {r['tflops_per_device']:.2f} | {mfu} | "
          f"{mem} | {r['compilations']} | {ovh} |")


HEADER = ("| student | teacher | batch | dtype | DTM | attention | step ms | images/s | TFLOP/s/device | MFU | "
          "peak GiB | compilations | DTM overhead |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--table", choices=sorted(TABLES))
  parser.add_argument("--student", default="base", choices=sorted(vit.VARIANTS))
  parser.add_argument("--teacher", default="B/16", choices=sorted(clip.VARIANTS) + ["tiny"])
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--dtm", default="both", choices=["on", "off", "both"])
  parser.add_argument("--attention", default=None, help="jax.nn.dot_product_attention implementation: xla, cudnn")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--accum", type=int, default=1)
  parser.add_argument("--torch", action="store_true",
                      help="Also time the PyTorch counterpart (float32, one thread per usable CPU; needs torch and "
                           "transformers).")
  args = parser.parse_args()

  runs = TABLES[args.table] if args.table else [dict(student=args.student, teacher=args.teacher, batch=args.batch,
                                                     dtype=args.dtype, image_size=args.image_size)]
  modes = {"on": [True], "off": [False], "both": [False, True]}[args.dtm]
  print(f"# jax {jax.__version__}, {jax.device_count()} × {jax.devices()[0].device_kind}, "
        f"backend {jax.default_backend()}", flush=True)
  print(HEADER, flush=True)
  for run in runs:
    built = [build(**run, dtm=dtm, attention=args.attention, accum=args.accum) for dtm in modes]
    results = dict(zip(modes, time_interleaved(built, args.steps)))
    for dtm in modes:
      overhead = (results[True]["step_ms"] / results[False]["step_ms"]) if dtm and False in results else None
      print(_row(results[dtm], overhead), flush=True)
    if args.torch:
      _print_torch_rows(run, modes, results, args.steps)


def _print_torch_rows(run: dict, modes: list[bool], jax_results: dict, steps: int) -> None:
  """The PyTorch step of the same sizes, and how many times slower it is than the JAX step of this process."""
  import train_step_torch  # pylint: disable=g-import-not-at-top
  if run["dtype"] != "float32":
    raise SystemExit("--torch compares float32 CPU steps; use it with --table=cpu or --dtype=float32.")
  for dtm in modes:
    r = train_step_torch.measure_torch(batch=run["batch"], image_size=run["image_size"], dtm=dtm, steps=steps)
    ratio = r["step_ms"] / jax_results[dtm]["step_ms"]
    print(f"PyTorch {r['torch']} (transformers {r['transformers']}, {r['threads']} threads), DTM "
          f"{'on' if dtm else 'off'}: {r['step_ms']:.1f} ms per step = {ratio:.2f}× the JAX step", flush=True)


if __name__ == "__main__":
  main()
