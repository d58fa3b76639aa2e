"""Compile a config's programs for a TPU slice ahead of time, on a machine without TPUs (`--mode=compile`).

The TPU runtime (libtpu, from `pip install "jax[tpu]==<jax version>"`) describes a whole slice's devices inside a
CPU-only process (`jax.experimental.topologies`); the programs a mode would run on that slice — same mesh rule,
shardings, donation, accumulation, morphing, teacher — are built from abstract inputs (nothing is initialised and no
data, weights or checkpoints are read) and compiled by the real TPU compiler. For each program this reports, per
chip: HBM (arguments, outputs, temporaries, total against the chip's capacity), the compiler's FLOPs and bytes beside
the analytic model FLOPs, the collectives in the program (kind, count, result bytes), the compile time, and a roofline
step time and MFU. The same goes to `<workdir>/compile_<topology>.json`.

The roofline: step time ≥ max(FLOPs / peak bf16 FLOP/s, bytes accessed / HBM bandwidth, collective bytes / ICI
bandwidth), per chip. It is a lower bound built from the compiler's counts, not a measurement; the compiler's own
`optimal_seconds` is shown only where it is positive (it is not for programs with while loops). XLA counts a while
loop's body once, so programs with loops (morphing rounds, gradient accumulation) under-report FLOPs: the analytic
count is then the better figure, and MFU uses it.

`--fit` searches the memory knobs (remat policy, grad_accum_steps, FSDP size) for the cheapest setting that fits
and prints it as `--config.…` overrides.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import itertools
import json
import math
import os
import re
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from dtm_jax import flops, platform, registry, sharding
from dtm_jax.program import Mode, Program

GiB = 2 ** 30
# Fraction of a chip's HBM a program may use and still count as fitting (headroom for the runtime and fragmentation).
DEFAULT_HBM_LIMIT = 0.9


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-chip figures of a TPU generation (Cloud TPU documentation)."""
  hbm_bytes: int
  hbm_bandwidth: float  # bytes/s
  ici_bandwidth: float  # bytes/s, all links of a chip together
  slice_counts_cores: bool  # "v4-32"/"v5p-128" count TensorCores (2 per chip); "v5e-256"/"v6e-64" count chips
  dims: int  # torus dimensions of the slice shape
  device_kind: str  # as the chip reports it: its peak FLOP/s are in dtm_jax.flops

  @property
  def peak_flops(self) -> float:
    return flops.peak_flops_per_device(self.device_kind)


CHIPS = {
    "v4": Chip(32 * GiB, 1.2e12, 300e9, True, 3, "TPU v4"),
    "v5e": Chip(16 * GiB, 819e9, 200e9, False, 2, "TPU v5e"),
    "v5p": Chip(95 * GiB, 2.765e12, 600e9, True, 3, "TPU v5p"),
    "v6e": Chip(32 * GiB, 1.64e12, 448e9, False, 2, "TPU v6e"),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e", "v5": "v5p"}


# ----------------------------------------------------------------------------------------------------------------
# Topologies.
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # as given
  generation: str  # key of CHIPS
  shape: str  # e.g. "4x4x4"
  num_slices: int
  devices: tuple

  @property
  def chip(self) -> Chip:
    return CHIPS[self.generation]

  @property
  def num_chips(self) -> int:
    return len(self.devices)

  @property
  def num_hosts(self) -> int:
    return len({d.process_index for d in self.devices})


def _slice_shape(num_chips: int, dims: int) -> str:
  """The standard slice shape of `num_chips` chips: 2x2x1 → 2x2x2 → 2x2x4 → 2x4x4 → 4x4x4 … (3-D tori) and
  1x2 → 2x2 → 2x4 → 4x4 → … (2-D), doubling the last of the smallest sides."""
  if num_chips < 1 or num_chips & (num_chips - 1):
    raise ValueError(f"{num_chips} chips is not a power of two; give the shape instead, e.g. v5p:4x4x4.")
  sides = [1] * dims
  if dims == 3 and num_chips >= 4:
    sides = [2, 2, 1]
  while math.prod(sides) < num_chips:
    smallest = min(sides)
    index = max(i for i, side in enumerate(sides) if side == smallest)
    sides[index] *= 2
  return "x".join(map(str, sides))


def parse_topology(name: str) -> tuple[str, str]:
  """("v5p", "4x4x4") from "v5p-128" (TensorCores for v4/v5p, chips for v5e/v6e) or "v5p:4x4x4"."""
  text = name.strip().lower()
  match = re.fullmatch(r"(v\d+[a-z]*)(?:-(\d+)|:(\d+(?:x\d+)+))", text)
  if not match:
    raise ValueError(f"Unknown topology {name!r}: use a slice name such as v4-32, v5e-256, v5p-128, v6e-64, or a "
                     f"generation and shape such as v5p:4x4x4 or v5e:2x2 (generations: {sorted(CHIPS)}).")
  generation = _ALIASES.get(match.group(1), match.group(1))
  if generation not in CHIPS:
    raise ValueError(f"Unknown TPU generation {match.group(1)!r} in {name!r}; known: {sorted(CHIPS)}.")
  chip = CHIPS[generation]
  if match.group(3):
    shape = match.group(3)
    if len(shape.split("x")) != chip.dims:
      raise ValueError(f"{generation} slices have {chip.dims}-D shapes; got {shape!r} in {name!r}.")
    return generation, shape
  count = int(match.group(2))
  if chip.slice_counts_cores:
    if count % 2:
      raise ValueError(f"{name!r}: {generation} slice names count TensorCores (2 per chip); use an even number.")
    count //= 2
  return generation, _slice_shape(count, chip.dims)


def topology(name: str, num_slices: int = 1) -> Topology:
  """The devices of a TPU slice (or `num_slices` of them), from the TPU runtime, in this CPU-only process."""
  generation, shape = parse_topology(name)
  if importlib.util.find_spec("libtpu") is None:
    raise RuntimeError(f"Compiling for {name} needs the TPU runtime: pip install \"jax[tpu]=={jax.__version__}\" "
                       "(it brings libtpu; no TPU is needed).")
  # This process only describes the slice and compiles: no metadata server to ask, and no TPU to lock, so several
  # compiling processes (and a training job on a TPU VM) can load libtpu at once.
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
  if generation == "v4":
    kwargs["chip_config_name"] = "megacore"  # one device per chip, as v4 runs by default
  try:
    description = topologies.get_topology_desc(platform="tpu", topology_name=f"{generation}:{shape}", **kwargs)
  except Exception as error:  # pylint: disable=broad-except
    raise RuntimeError(f"The TPU runtime could not describe {generation}:{shape} ({name}): {error}") from error
  return Topology(name, generation, shape, num_slices, tuple(description.devices))


# ----------------------------------------------------------------------------------------------------------------
# Programs of each mode, from abstract inputs.
# ----------------------------------------------------------------------------------------------------------------
def build_programs(config: ml_collections.ConfigDict, mesh, mode: str | None = None) -> list[Program]:
  """The programs `mode` (default: the config's) runs on `mesh`, built from abstract inputs (the mode's own
  `programs`)."""
  return compilable(mode or registry.mode_of(config)).programs(config, mesh)


def compilable(mode: str) -> Mode:
  """The registered mode, if it declares programs; a clear error otherwise."""
  found = registry.get(mode)
  if found.programs is None:
    raise ValueError(found.not_compilable or f"--mode=compile does not cover --mode={mode}.")
  return found


# ----------------------------------------------------------------------------------------------------------------
# Compiling and reading the compiled program.
# ----------------------------------------------------------------------------------------------------------------
_COLLECTIVE = re.compile(r"\b(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all|ragged-all-to-all|"
                         r"collective-broadcast)(-start)?\(")
_ARRAY = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64|c64|c128|f8e4m3fn|f8e5m2)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """{kind: {"count", "bytes"}} of the collectives in an HLO module (per chip; a loop body's ops counted once).

  Bytes are each op's result size (the largest array of an async start's tuple; all of them for a tuple
  all-reduce).
  """
  found: dict[str, dict[str, int]] = {}
  for line in hlo_text.splitlines():
    match = _COLLECTIVE.search(line)
    if not match or "=" not in line[:match.start()]:
      continue
    shape_text = line[line.index("=") + 1:match.start()]
    sizes = [_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
             for dtype, dims in _ARRAY.findall(shape_text)]
    kind = match.group(1)
    size = sum(sizes) if kind == "all-reduce" else max(sizes, default=0)
    entry = found.setdefault(kind, {"count": 0, "bytes": 0})
    entry["count"] += 1
    entry["bytes"] += size
  return found


def custom_calls(hlo_text: str) -> list[str]:
  return sorted(set(_CUSTOM_CALL.findall(hlo_text)))


class DoesNotFitError(RuntimeError):
  """A program needs more HBM than the chip has (or than the allowed fraction of it)."""


_KNOB_WORDS = {"model.remat": "--config.model.remat=dots or full", "grad_accum_steps": "--config.grad_accum_steps",
               "mesh.fsdp": "--config.mesh.fsdp (shard parameters and optimizer state)"}


def _knob_advice(mode: str) -> str:
  knobs = ["the per-chip batch (--config.batch_size)"]
  knobs += [_KNOB_WORDS[knob] for knob in registry.get(mode).memory_knobs]
  return "; ".join(knobs) + ", or run --mode=compile --fit to search them"


@contextlib.contextmanager
def outside_the_compilation_cache():
  """A process without a TPU client cannot load TPU executables back from JAX's persistent compilation cache
  (reading them only warns): keep what is compiled for a slice out of it."""
  option = "jax_persistent_cache_min_compile_time_secs"
  previous = getattr(jax.config, option)
  jax.config.update(option, float("inf"))
  try:
    yield
  finally:
    jax.config.update(option, previous)


def compile_program(program: Program, topo: Topology, *, hbm_limit: float = DEFAULT_HBM_LIMIT,
                    mode: str = "pretrain") -> dict[str, Any]:
  """Lowers and compiles one program for the slice; the report of `analyse`. Raises DoesNotFitError."""
  chip = topo.chip
  started = time.perf_counter()
  try:
    with outside_the_compilation_cache():
      compiled = program.jitted.lower(*program.args).compile()
  except Exception as error:  # pylint: disable=broad-except
    text = str(error)
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
      used = re.search(r"Used ([\d.]+[KMGT]?i?B?) of ([\d.]+[KMGT]?i?B?) hbm", text)
      amount = f" ({used.group(0)})" if used else ""
      raise DoesNotFitError(
          f"{program.name} does not fit in the {chip.hbm_bytes / GiB:.0f} GiB of HBM of a {topo.generation} chip "
          f"on {topo.name}{amount}. Lower the memory with: {_knob_advice(mode)}.") from error
    raise
  seconds = time.perf_counter() - started
  report = analyse(compiled, program, topo, compile_seconds=seconds)
  if report["hbm"]["total_bytes"] > hbm_limit * chip.hbm_bytes:
    raise DoesNotFitError(
        f"{program.name} needs {report['hbm']['total_bytes'] / GiB:.2f} GiB per chip, more than {hbm_limit:.0%} of "
        f"the {chip.hbm_bytes / GiB:.0f} GiB of a {topo.generation} chip on {topo.name}. Lower the memory with: "
        f"{_knob_advice(mode)}.")
  return report


def analyse(compiled, program: Program, topo: Topology, *, compile_seconds: float) -> dict[str, Any]:
  """Per-chip memory, FLOPs, bytes, collectives and roofline of a compiled program."""
  chip = topo.chip
  memory = compiled.memory_analysis()
  hbm = {
      "argument_bytes": int(memory.argument_size_in_bytes),
      "output_bytes": int(memory.output_size_in_bytes),
      "alias_bytes": int(memory.alias_size_in_bytes),
      "temp_bytes": int(memory.temp_size_in_bytes),
      "code_bytes": int(memory.generated_code_size_in_bytes),
  }
  hbm["total_bytes"] = (hbm["argument_bytes"] + hbm["output_bytes"] - hbm["alias_bytes"] + hbm["temp_bytes"] +
                        hbm["code_bytes"])
  hbm["capacity_bytes"] = chip.hbm_bytes
  hbm["fraction"] = hbm["total_bytes"] / chip.hbm_bytes
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  compiler_flops = float(cost.get("flops", 0.0))
  bytes_accessed = float(cost.get("bytes accessed", 0.0))
  optimal = cost.get("optimal_seconds")
  hlo = compiled.as_text()
  found = collectives(hlo)
  analytic = program.analytic_flops / topo.num_chips
  collective_bytes = sum(c["bytes"] for c in found.values())
  times = {"compute": max(compiler_flops, analytic) / chip.peak_flops, "hbm": bytes_accessed / chip.hbm_bandwidth,
           "collectives": collective_bytes / chip.ici_bandwidth}
  roofline = max(times.values())
  return {
      "program": program.name,
      "hbm": hbm,
      "flops_per_chip": {"compiler": compiler_flops, "analytic": analytic,
                         "compiler_over_analytic": compiler_flops / analytic if analytic else None},
      "bytes_accessed_per_chip": bytes_accessed,
      "collectives": found,
      "custom_calls": custom_calls(hlo),
      "compile_seconds": compile_seconds,
      "compiler_optimal_seconds": float(optimal) if optimal is not None and float(optimal) > 0 else None,
      "roofline": {"seconds": roofline, "bound_by": max(times, key=times.get), "terms_seconds": times,
                   "mfu": analytic / (roofline * chip.peak_flops) if roofline else None},
  }


# ----------------------------------------------------------------------------------------------------------------
# The mode.
# ----------------------------------------------------------------------------------------------------------------
def compile_config(config: ml_collections.ConfigDict, topo: Topology, *, hbm_limit: float = DEFAULT_HBM_LIMIT,
                   mode: str | None = None) -> list[dict[str, Any]]:
  """Builds and compiles every program of the config's mode for the slice; raises DoesNotFitError."""
  mode = mode or registry.mode_of(config)
  registry.validate(mode, config, num_devices=topo.num_chips, check_paths=False)  # nothing is read
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, devices=list(topo.devices))
  with platform.building_for(mesh):
    programs = build_programs(config, mesh, mode)
    reports = []
    for program in programs:
      logging.info("Compiling %s for %s (%d chips, mesh %s)...", program.name, topo.name, topo.num_chips,
                   dict(mesh.shape))
      report = compile_program(program, topo, hbm_limit=hbm_limit, mode=mode)
      report["mesh"] = dict(mesh.shape)
      reports.append(report)
  return reports


def _candidates(config: ml_collections.ConfigDict, mode: str, num_chips: int) -> list[dict[str, Any]]:
  """Settings of the mode's memory knobs to try, cheapest first: remat none < dots < full (≈ +0 / +5 / +33% compute),
  fewer accumulation steps (smaller matmuls use the chip less well), smaller FSDP (more all-gathers)."""
  knobs = registry.get(mode).memory_knobs
  remat_cost = {"none": 1.0, "dots": 1.05, "full": 1.33}
  remats = list(remat_cost) if "model.remat" in knobs else [None]
  accums = [1]
  if "grad_accum_steps" in knobs:
    accums = [a for a in (1, 2, 4, 8, 16) if config.batch_size % (num_chips * a) == 0]
  fsdps = [None]
  if "mesh.fsdp" in knobs:
    fsdps = [f for f in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if f <= num_chips and num_chips % f == 0]
  options = []
  for remat, accum, fsdp in itertools.product(remats, accums, fsdps):
    cost = remat_cost.get(remat, 1.0) * (1 + 0.03 * math.log2(accum)) * (1 + 0.02 * math.log2(fsdp or 1))
    setting = {"model.remat": remat, "grad_accum_steps": accum, "mesh.fsdp": fsdp}
    options.append((cost, {k: v for k, v in setting.items() if k in knobs}))
  options.sort(key=lambda option: option[0])
  return [setting for _, setting in options]


def with_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(config.to_dict())
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
    if key == "mesh.fsdp":
      config.mesh.data = -1
  return config


def fit(config: ml_collections.ConfigDict, topo: Topology, *, hbm_limit: float = DEFAULT_HBM_LIMIT,
        mode: str | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """The cheapest memory setting that fits (see _candidates) and its reports; DoesNotFitError if none does."""
  mode = mode or registry.mode_of(config)
  tried = []
  for setting in _candidates(config, mode, topo.num_chips):
    print(f"  trying {_as_flags(setting)} ...", flush=True)
    try:
      return setting, compile_config(with_overrides(config, setting), topo, hbm_limit=hbm_limit, mode=mode)
    except DoesNotFitError as error:
      tried.append(_as_flags(setting))
      logging.info("%s", error)
  raise DoesNotFitError(f"No setting of remat, grad_accum_steps and FSDP fits {topo.name} ({len(tried)} tried); "
                        "lower the per-chip batch (--config.batch_size) or use a larger slice.")


def _as_flags(setting: dict[str, Any]) -> str:
  return " ".join(f"--config.{k}={v}" for k, v in setting.items())


def _size(num_bytes: float) -> str:
  for unit, scale in (("GiB", GiB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
    if num_bytes >= scale:
      return f"{num_bytes / scale:.2f} {unit}"
  return f"{num_bytes:.0f} B"


def format_report(report: dict[str, Any], topo: Topology) -> str:
  hbm, counts, roofline = report["hbm"], report["flops_per_chip"], report["roofline"]
  lines = [
      f"{report['program']} on {topo.name}{f' × {topo.num_slices} slices' if topo.num_slices > 1 else ''} "
      f"({topo.num_chips} chips of {topo.generation}, {topo.num_hosts} hosts, "
      f"mesh {report.get('mesh')}), compiled in {report['compile_seconds']:.1f} s:",
      f"  HBM per chip: arguments {_size(hbm['argument_bytes'])}, outputs {_size(hbm['output_bytes'])} (aliased "
      f"{_size(hbm['alias_bytes'])}), temporaries {_size(hbm['temp_bytes'])} → total {_size(hbm['total_bytes'])} "
      f"of {hbm['capacity_bytes'] / GiB:.0f} GiB ({hbm['fraction']:.1%})",
      f"  FLOPs per chip: compiler {counts['compiler'] / 1e9:.2f} G, analytic {counts['analytic'] / 1e9:.2f} G"
      + (f" (compiler/analytic {counts['compiler_over_analytic']:.3f})" if counts["compiler_over_analytic"] else ""),
      f"  bytes accessed per chip: {_size(report['bytes_accessed_per_chip'])}",
  ]
  if report["collectives"]:
    parts = [f"{kind} ×{c['count']} ({_size(c['bytes'])})" for kind, c in sorted(report["collectives"].items())]
    lines.append("  collectives per chip: " + ", ".join(parts))
  else:
    lines.append("  collectives per chip: none")
  optimal = report["compiler_optimal_seconds"]
  lines.append(
      f"  roofline step time ≥ {roofline['seconds'] * 1e3:.3g} ms ({roofline['bound_by']}-bound), MFU ≤ "
      f"{roofline['mfu']:.1%}; compiler estimate: "
      + (f"{optimal * 1e3:.3g} ms" if optimal else "not valid for this program (negative: while loops)"))
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict, workdir: str | None, *, topology_name: str, num_slices: int = 1,
        search: bool = False, hbm_limit: float = DEFAULT_HBM_LIMIT) -> dict[str, Any]:
  """`main.py --mode=compile`: compile (or `search` for the cheapest fitting setting), print, write JSON."""
  if num_slices < 1:
    raise ValueError(f"--num_slices={num_slices}: a program runs on at least one slice; pass 1 or more.")
  if not 0 < hbm_limit <= 1:
    raise ValueError(f"--hbm_limit={hbm_limit}: a fraction of a chip's HBM, in (0, 1].")
  mode = compilable(registry.mode_of(config)).name  # before the TPU runtime: refused at once if it cannot be
  topo = topology(topology_name, num_slices)
  setting = None
  if search:
    setting, reports = fit(config, topo, hbm_limit=hbm_limit, mode=mode)
  else:
    reports = compile_config(config, topo, hbm_limit=hbm_limit, mode=mode)
  for report in reports:
    print(format_report(report, topo), flush=True)
  if setting is not None:
    print(f"Cheapest setting that fits {topo.name}: {_as_flags(setting)}", flush=True)
  result = {"mode": mode, "topology": topo.name, "shape": f"{topo.generation}:{topo.shape}",
            "num_slices": num_slices, "num_chips": topo.num_chips, "num_hosts": topo.num_hosts,
            "jax_version": jax.__version__, "libtpu_version": _libtpu_version(), "hbm_limit": hbm_limit,
            "fit_overrides": _as_flags(setting) if setting else None, "programs": reports}
  if workdir:
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    out = path / f"compile_{re.sub(r'[^A-Za-z0-9_.-]', '_', topo.name)}.json"
    out.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    print(f"Wrote {out}", flush=True)
  return result


def _libtpu_version() -> str | None:
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  try:
    return importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    return None


def _json_default(value):
  if isinstance(value, np.generic):
    return value.item()
  return str(value)
