"""The "compiled for TPU" table of docs/BENCHMARKS.md: each recipe compiled for its slices by the real TPU compiler
(`--mode=compile`, dtm_jax/aot.py), on a machine without TPUs.

Command (needs `pip install "jax[tpu]==<jax version>"`; ~4 min per ViT-B/16 row and ~10 per ViT-L/16 row on one
core; rows already in --out are not compiled again):
  python benchmarks/compile_table.py --out=/tmp/compile_table
  python benchmarks/compile_table.py --out=/tmp/compile_table --rows=b16_v5p32,b16_v5p32_no_dtm
Prints one markdown row per (recipe, topology, per-chip batch, remat, FSDP): HBM per chip (and % of capacity),
FLOPs per chip (compiler vs analytic), collectives, compile time, roofline step time and MFU. All figures are the
compiler's (memory_analysis, cost_analysis, the optimised HLO), not measurements on a TPU.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

from dtm_jax import (
  aot,
  morphing,  # pylint: disable=g-import-not-at-top,wrong-import-position
)

# name: (what, config module, overrides, topology[, morphing implementation forced for the comparison row])
ROWS = {
    "b16_v4_32": ("DTM B/16 + CLIP-B/16", "configs.dtm_vit_b16_in1k", {}, "v4-32"),
    "b16_v5p32": ("DTM B/16 + CLIP-B/16", "configs.dtm_vit_b16_in1k", {}, "v5p-32"),
    "b16_v5p32_teacher_bf16": ("DTM B/16 + CLIP-B/16, bfloat16 teacher", "configs.dtm_vit_b16_in1k",
                               {"target.dtype": "bfloat16"}, "v5p-32"),
    "b16_v5p32_teacher_bf16_f32_head": ("DTM B/16 + CLIP-B/16, bfloat16 teacher with float32 ln_post/proj",
                                        "configs.dtm_vit_b16_in1k",
                                        {"target.dtype": "bfloat16", "target.head_dtype": "float32"}, "v5p-32"),
    "b16_v5p32_no_dtm": ("token-wise B/16 + CLIP-B/16 (no morphing)", "configs.dtm_vit_b16_in1k",
                         {"dtm.enabled": False}, "v5p-32"),
    "b16_v5p32_scatter": ("DTM B/16 + CLIP-B/16, morphing by scatters (before)", "configs.dtm_vit_b16_in1k", {},
                          "v5p-32", "scatter"),
    "b16_v5e64": ("DTM B/16 + CLIP-B/16", "configs.dtm_vit_b16_in1k", {}, "v5e-64"),
    "l16_v5p64": ("DTM L/16 + CLIP-B/16", "configs.dtm_vit_l16_in1k", {}, "v5p-64"),
    "l16_v5p64_fsdp": ("DTM L/16 + CLIP-B/16", "configs.dtm_vit_l16_in1k", {"mesh.fsdp": 32}, "v5p-64"),
    "s16_v5e16": ("DTM S/16 + CLIP-B/16", "configs.dtm_vit_s16_in1k", {}, "v5e-16"),
    # The MAE-style rows keep the bfloat16 teacher they were compiled with (beside the bfloat16 B/16 row).
    "mae_b16_v5p32_b2048": ("DTM MAE-style B/16 + CLIP-B/16, batch 2048", "configs.dtm_mae_vit_b16_in1k",
                            {"batch_size": 2048, "target.dtype": "bfloat16"}, "v5p-32"),
    "mae_b16_v5p32_no_dtm_b2048": ("token-wise MAE-style B/16 + CLIP-B/16, batch 2048", "configs.dtm_mae_vit_b16_in1k",
                                   {"batch_size": 2048, "dtm.enabled": False, "target.dtype": "bfloat16"}, "v5p-32"),
    "mae_b16_v5e64_b2048": ("DTM MAE-style B/16 + CLIP-B/16, batch 2048", "configs.dtm_mae_vit_b16_in1k",
                            {"batch_size": 2048, "target.dtype": "bfloat16"}, "v5e-64"),
    "mae_b16_v5p32": ("DTM MAE-style B/16 + CLIP-B/16 (MAE's batch 4096)", "configs.dtm_mae_vit_b16_in1k",
                      {"target.dtype": "bfloat16"}, "v5p-32"),
    "ft_b16_v5p32": ("fine-tuning B/16", "configs.finetune_vit_b16_in1k", {}, "v5p-32"),
    "seg_b16_v5p16": ("UperNet B/16 on ADE20K, 512² crops (train step)", "configs.segment_ade20k_vit_b16", {},
                      "v5p-16"),
}
HEADER = ("| recipe | topology | chips | per-chip batch | remat | FSDP | HBM per chip | FLOPs per chip: compiler / "
          "analytic | bytes accessed per chip | collectives per chip | compile | roofline step / MFU | compiler's step "
          "estimate |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def compile_row(name: str, out: str) -> dict:
  path = os.path.join(out, f"{name}.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  what, module, overrides, topology_name, *forced = ROWS[name]
  config = aot.with_overrides(importlib.import_module(module).get_config(""), overrides)
  topo = aot.topology(topology_name)
  print(f"{name}: compiling {what} for {topology_name} ...", flush=True)
  resolve = morphing._resolve_implementation  # pylint: disable=protected-access
  if forced:  # the previous accelerator formulation, for the before/after row (a comparison, not a setting)
    morphing._resolve_implementation = lambda implementation: resolve(forced[0])  # pylint: disable=protected-access
  try:
    reports = aot.compile_config(config, topo)
  finally:
    morphing._resolve_implementation = resolve  # pylint: disable=protected-access
  for report in reports:
    print(aot.format_report(report, topo), flush=True)
  batch = config.batch_size
  row = {"name": name, "what": what, "config": module.replace(".", "/") + ".py", "overrides": overrides,
         "topology": topology_name, "num_chips": topo.num_chips, "per_chip_batch": batch // topo.num_chips,
         "remat": config.model.get("remat", "none"), "fsdp": reports[0]["mesh"]["fsdp"], "report": reports[0],
         "jax": jax.__version__, "libtpu": aot._libtpu_version()}  # pylint: disable=protected-access
  os.makedirs(out, exist_ok=True)
  with open(path, "w") as f:
    json.dump(row, f, indent=2, default=str)
  return row


def markdown_row(row: dict) -> str:
  report = row["report"]
  hbm, flops, roofline = report["hbm"], report["flops_per_chip"], report["roofline"]
  collectives = ", ".join(f"{kind} ×{c['count']} ({aot._size(c['bytes'])})"  # pylint: disable=protected-access
                          for kind, c in sorted(report["collectives"].items())) or "none"
  flags = " ".join(f"--config.{k}={v}" for k, v in row["overrides"].items())
  optimal = report["compiler_optimal_seconds"]
  estimate = f"{optimal * 1e3:.0f} ms" if optimal else "not valid (negative)"
  return (f"| {row['what']} (`{row['config']}`{' ' + flags if flags else ''}) | {row['topology']} | "
          f"{row['num_chips']} | {row['per_chip_batch']} | {row['remat']} | {row['fsdp']} | "
          f"{hbm['total_bytes'] / aot.GiB:.2f} GiB ({hbm['fraction']:.0%}) | "
          f"{flops['compiler'] / 1e12:.2f} / {flops['analytic'] / 1e12:.2f} T | "
          f"{report['bytes_accessed_per_chip'] / aot.GiB:.1f} GiB | {collectives} | "
          f"{report['compile_seconds'] / 60:.1f} min | {roofline['seconds'] * 1e3:.0f} ms "
          f"({roofline['bound_by']}) / {roofline['mfu']:.0%} | {estimate} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="Folder for one JSON file per row (reused when present).")
  parser.add_argument("--rows", default=",".join(ROWS), help=f"Comma-separated rows of {sorted(ROWS)}.")
  args = parser.parse_args()
  rows = [compile_row(name, args.out) for name in args.rows.split(",")]
  print(HEADER)
  for row in rows:
    print(markdown_row(row))


if __name__ == "__main__":
  main()
