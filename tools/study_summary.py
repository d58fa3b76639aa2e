"""What a study's files say: the records of its runs, mean ± std tables and the generated block of RESULTS.md.

Reads only `<study>/runs/*/eval.json`, `<study>/floors/*/eval.json` and `<study>/study_calls.json` (written by
tools/study.py), so the tables can be rebuilt at any time without rerunning anything.
"""
from __future__ import annotations

import json

import numpy as np
from etils import epath

KINDS = ("pixels", "ema", "clip", "checkpoint", "clip_fmnist")
VARIANTS = ("dtm", "tokenwise", "fixed")
FLOORS = ("random_init", "raw_pixels", "teacher")  # reference rows; "teacher" only in clip_fmnist studies
DEFAULT_BLOCK = "study tables"
SCORES = ("knn_top1", "probe_top1", "finetune_top1")  # finetune_top1 only in studies run with --finetune_epochs
KIND_LABELS = {
    "pixels": "pixels (normalised patches)",
    "ema": "ema (momentum teacher)",
    "clip": "clip (random-init tower)",
    "checkpoint": "checkpoint (a study run's student)",
    "clip_fmnist": "clip (tower trained on labelled Fashion-MNIST)",
    "random_init": "floor: student at init",
    "raw_pixels": "floor: raw pixels",
    "teacher": "reference: the trained teacher's target tokens, mean-pooled",
}
VARIANT_LABELS = {"dtm": "DTM (dynamic)", "tokenwise": "token-wise", "fixed": "fixed schedule", "-": "—"}


def write_json(path, payload: dict) -> None:
  """Writes atomically (temporary file, then rename), so a killed study never leaves a half-written record."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
  tmp.replace(path)  # atomic on local disks, and overwrites (epath's rename refuses an existing file)


def collect(out) -> list[dict]:
  """Every eval.json of the study, runs and floors."""
  return [json.loads(p.read_text()) for p in sorted(out.glob("*/*/eval.json"))]


def mean_std(values) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for a single value)."""
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def summarise(records: list[dict]) -> dict:
  """Per (kind, variant): n, mean ± std of kNN and probe top-1 (and final loss); per kind, paired differences."""
  groups: dict[tuple[str, str], list[dict]] = {}
  for r in records:
    groups.setdefault((r["kind"], r["variant"]), []).append(r)
  order = {k: i for i, k in enumerate(FLOORS + KINDS)}
  variant_order = {v: i for i, v in enumerate(("-",) + VARIANTS)}
  rows = []
  for (kind, variant), members in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], variant_order[kv[0][1]])):
    row = {"kind": kind, "variant": variant, "n": len(members), "seeds": sorted(m["seed"] for m in members)}
    for key in SCORES + ("final_loss",):
      if all(key in m for m in members):
        row[key] = mean_std([m[key] for m in members])
    rows.append(row)
  differences = []
  for kind in KINDS:
    for variant in ("tokenwise", "fixed"):
      dtm = {r["seed"]: r for r in groups.get((kind, "dtm"), [])}
      other = {r["seed"]: r for r in groups.get((kind, variant), [])}
      seeds = sorted(set(dtm) & set(other))
      if not seeds:
        continue
      diff = {"kind": kind, "versus": variant, "n": len(seeds)}
      for key in SCORES:
        if all(key in dtm[s] and key in other[s] for s in seeds):
          diff[key] = mean_std([dtm[s][key] - other[s][key] for s in seeds])
      differences.append(diff)
  return {"rows": rows, "dtm_minus": differences}


def _pm(value: tuple[float, float] | None, digits: int = 2) -> str:
  return "—" if value is None else f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"


def _signed(value: tuple[float, float] | None) -> str:
  return "—" if value is None else f"{value[0]:+.2f} ± {value[1]:.2f}"


def markdown(summary: dict, settings: dict) -> str:
  """The tables; the fine-tuning columns appear only when some run was fine-tuned."""
  finetuned = any("finetune_top1" in row for row in summary["rows"])
  scores = SCORES if finetuned else SCORES[:2]
  names = {"knn_top1": "kNN top-1", "probe_top1": "linear probe top-1", "finetune_top1": "fine-tuned top-1"}
  lines = [f"Settings: {settings_line(settings)}", "",
           "| target | variant | " + " | ".join(f"{names[k]} (%)" for k in scores) + " | final train loss | runs |",
           "|---|---|" + "---|" * len(scores) + "---|---|"]
  for row in summary["rows"]:
    lines.append(f"| {KIND_LABELS[row['kind']]} | {VARIANT_LABELS[row['variant']]} | " +
                 "".join(f"{_pm(row.get(k))} | " for k in scores) + f"{_pm(row.get('final_loss'), 4)} | {row['n']} |")
  if summary["dtm_minus"]:
    names = {"knn_top1": "Δ kNN top-1", "probe_top1": "Δ probe top-1", "finetune_top1": "Δ fine-tuned top-1"}
    lines += ["", "Paired differences, DTM minus the other variant, same seeds (mean ± std over seeds):", "",
              "| target | DTM − … | " + " | ".join(f"{names[k]} (points)" for k in scores) + " | pairs |",
              "|---|---|" + "---|" * len(scores) + "---|"]
    for d in summary["dtm_minus"]:
      lines.append(f"| {KIND_LABELS[d['kind']]} | {VARIANT_LABELS[d['versus']]} | " +
                   "".join(f"{_signed(d.get(k))} | " for k in scores) + f"{d['n']} |")
  return "\n".join(lines) + "\n"


def record_call(out, *, argv: list[str], wall_seconds: float, runs: int) -> None:
  """Appends one study call (its flags, wall time and number of runs) to `<study>/study_calls.json`."""
  path = out / "study_calls.json"
  calls = json.loads(path.read_text())["calls"] if path.exists() else []
  write_json(path, {"calls": calls + [{"argv": argv, "wall_seconds": wall_seconds, "runs": runs}]})


def run_settings(out) -> dict:
  """Steps and batch size as recorded in the run files (not as given by this call's flags), and the study calls."""
  settings = {}
  for p in sorted(out.glob("runs/*/eval.json")):
    record = json.loads(p.read_text())
    settings.setdefault("steps", set()).add(record["steps"])
    settings.setdefault("batch_size", set()).add(record["batch_size"])
  settings = {k: sorted(v) for k, v in settings.items()}
  if (out / "study_calls.json").exists():
    settings["calls"] = json.loads((out / "study_calls.json").read_text())["calls"]
  return settings


def settings_line(settings: dict) -> str:
  parts = [f"{', '.join(map(str, settings.get('steps', [])))} steps at batch "
           f"{', '.join(map(str, settings.get('batch_size', [])))}"]
  for call in settings.get("calls", []):
    grid = next((a for a in call["argv"] if a.startswith("--grid")), "the default --grid")
    parts.append(f"{call['runs']} runs ({grid}) took {call['wall_seconds'] / 60:.0f} min")
  return "; ".join(parts) + "."


def markers(name: str = DEFAULT_BLOCK) -> tuple[str, str]:
  """The begin and end lines of a study's generated block in a results file (one block per study name)."""
  return f"<!-- {name}: begin (generated by tools/study.py) -->", f"<!-- {name}: end -->"


def replace_block(text: str, block: str, name: str = DEFAULT_BLOCK) -> str:
  begin, end = markers(name)
  if begin not in text or end not in text:
    raise ValueError(f"The results file has no generated block {name!r}; add the lines\n{begin}\n{end}\n"
                     "where the tables go.")
  head, rest = text.split(begin, 1)
  _, tail = rest.split(end, 1)
  return f"{head}{begin}\n{block}{end}{tail}"


def write_report(out, results_md: str | None, block_name: str = DEFAULT_BLOCK) -> str:
  records = collect(out)
  if not records:
    raise ValueError(f"No finished runs in {out}; run the study first (without --report_only).")
  summary = summarise(records)
  settings = run_settings(out)
  write_json(out / "summary.json", {**summary, "settings": settings})
  table = markdown(summary, settings)
  (out / "summary.md").write_text(table)
  if results_md:
    path = epath.Path(results_md)
    path.write_text(replace_block(path.read_text(), table, block_name))
  return table
