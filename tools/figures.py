"""Drawing the study's figures (tools/plots.py is the command): loss curves, accuracy bars, morphed groups."""
from __future__ import annotations

import textwrap

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
# pylint: disable=g-import-not-at-top,wrong-import-position
import matplotlib.pyplot as plt
import numpy as np
from etils import epath

from dtm_jax.evaluators import frozen_features
from dtm_jax.runtime import metrics
from tools import study_summary, teachers

VARIANT_COLOURS = {"dtm": "tab:blue", "tokenwise": "tab:orange", "fixed": "tab:green"}


def _save(fig, path: epath.Path) -> None:
  """PNG through epath, so a gs://… output directory works (matplotlib writes only local files)."""
  with epath.Path(path).open("wb") as f:
    fig.savefig(f, format="png", dpi=120)


def losses_by_run(study_dir: epath.Path) -> dict[str, dict[int, float]]:
  """{run name: {step: loss}} from every run's metrics.jsonl."""
  out = {}
  for path in sorted(study_dir.glob("runs/*/metrics.jsonl")):
    out[path.parent.name] = {r["step"]: r["loss"] for r in metrics.read_jsonl(path) if "loss" in r}
  return out


def running_mean(values: np.ndarray, window: int) -> np.ndarray:
  """Trailing mean over the last `window` entries along the last axis (shorter at the start)."""
  sums = np.cumsum(values, axis=-1)
  shifted = np.concatenate([np.zeros_like(sums[..., :window]), sums[..., :-window]], axis=-1)[..., :values.shape[-1]]
  counts = np.minimum(np.arange(1, values.shape[-1] + 1), window)
  return (sums - shifted) / counts


def loss_curves(losses: dict[str, dict[int, float]], path: epath.Path, smooth: int = 5) -> None:
  """One panel per target kind; per variant the mean over seeds and the seeds' min–max band, each a running mean
  over `smooth` logged steps (DTM's loss jumps with the schedule drawn at each step)."""
  curves: dict[str, dict[str, list[dict[int, float]]]] = {}
  for name, by_step in losses.items():
    kind, variant, _ = name.rsplit("-", 2)
    curves.setdefault(kind, {}).setdefault(variant, []).append(by_step)
  kinds = sorted(curves, key=study_summary.KINDS.index)
  cols = min(2, len(kinds))
  rows = -(-len(kinds) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.4 * rows), squeeze=False)
  for ax in axes.flat[len(kinds):]:
    ax.axis("off")
  for ax, kind in zip(axes.flat, kinds):
    for variant in study_summary.VARIANTS:
      seeds = curves[kind].get(variant)
      if not seeds:
        continue
      steps = sorted(set.intersection(*(set(s) for s in seeds)))
      values = running_mean(np.array([[s[step] for step in steps] for s in seeds]), smooth)
      colour = VARIANT_COLOURS[variant]
      label = f"{study_summary.VARIANT_LABELS[variant]} ({len(seeds)} seeds)"
      ax.plot(steps, values.mean(0), color=colour, label=label)
      ax.fill_between(steps, values.min(0), values.max(0), color=colour, alpha=0.2, linewidth=0)
    ax.set_yscale("log")
    ax.set_title(study_summary.KIND_LABELS[kind], fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  for ax in axes[:, 0]:
    ax.set_ylabel(f"training loss (smooth-L1),\nmean of {smooth} logs")
  fig.suptitle("Training loss: DTM regresses group means, so its level is not comparable to token-wise", fontsize=10)
  fig.tight_layout()
  _save(fig, path)
  plt.close(fig)


def probe_bars(summary: dict, path: epath.Path) -> None:
  """kNN and probe top-1 (and fine-tuned top-1 when every run has it) per (target, variant) with std error bars; the
  floors as horizontal lines."""
  rows = [r for r in summary["rows"] if r["kind"] not in study_summary.FLOORS]
  floors = {r["kind"]: r for r in summary["rows"] if r["kind"] in study_summary.FLOORS}
  panels = [("knn_top1", "kNN top-1 (%)"), ("probe_top1", "linear probe top-1 (%)")]
  if all("finetune_top1" in r for r in rows):
    panels.append(("finetune_top1", "fine-tuned top-1 (%)"))
  fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.4))
  x = np.arange(len(rows))
  for ax, (key, title) in zip(axes, panels):
    means = [r[key][0] for r in rows]
    stds = [r[key][1] for r in rows]
    ax.bar(x, means, yerr=stds, capsize=3, color=[VARIANT_COLOURS[r["variant"]] for r in rows])
    for floor, style in zip(study_summary.FLOORS, ("--", ":", "-.")):
      if floor in floors and key in floors[floor]:
        ax.axhline(floors[floor][key][0], color="black", linestyle=style, linewidth=1,
                   label=study_summary.KIND_LABELS[floor])
    values = means + [f[key][0] for f in floors.values() if key in f]
    ax.set_ylim(max(0.0, min(values) - 8), min(100.0, max(values) + 5))
    ax.set_xticks(x, [f"{r['kind']} · {study_summary.VARIANT_LABELS[r['variant']]}" for r in rows], fontsize=7,
                  rotation=35, ha="right")
    ax.set_title(f"{title}, mean ± std over seeds", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
  fig.tight_layout(rect=(0, 0.05, 1, 1))
  _save(fig, path)
  plt.close(fig)


def group_colours(num_groups: int, seed: int = 0) -> np.ndarray:
  """Distinct-looking RGB colours [num_groups, 3] (a shuffled qualitative palette, repeated if needed)."""
  palette = np.concatenate([plt.get_cmap(name).colors for name in ("tab20", "tab20b", "tab20c")])[:, :3]
  order = np.random.default_rng(seed).permutation(len(palette))
  return palette[order][np.arange(num_groups) % len(palette)]


def groups_overlay(image01: np.ndarray, groups: np.ndarray, patch_size: int, scale: int = 8,
                   alpha: float = 0.55) -> np.ndarray:
  """RGB [scale·H, scale·W, 3]: the grey image tinted by each patch's group colour, group borders drawn white.

  The image is enlarged `scale` times (nearest neighbour) so that one-pixel borders stay thin next to the patches.
  """
  grid = image01.shape[0] // patch_size
  cell = patch_size * scale
  labels = np.repeat(np.repeat(groups.reshape(grid, grid), cell, 0), cell, 1)
  _, dense = np.unique(labels, return_inverse=True)
  dense = dense.reshape(labels.shape)
  grey = np.repeat(np.repeat(image01.mean(-1), scale, 0), scale, 1)[..., None]
  rgb = (1 - alpha) * grey + alpha * group_colours(dense.max() + 1)[dense]
  border = np.zeros(labels.shape, bool)
  border[:, 1:] |= labels[:, 1:] != labels[:, :-1]
  border[1:, :] |= labels[1:, :] != labels[:-1, :]
  rgb[border] = 1.0
  return rgb


def groups_figure(images01: np.ndarray, groups: list[np.ndarray], titles: list[str], patch_size: int,
                  path: epath.Path, heading: str) -> None:
  """Rows: images; columns: the image, then its groups under each schedule (groups[i]: int [M, N])."""
  rows, cols = len(images01), 1 + len(groups)
  fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.1 * rows), squeeze=False)
  for i, image in enumerate(images01):
    axes[i][0].imshow(image.mean(-1), cmap="gray", vmin=0, vmax=1)
    for j, g in enumerate(groups, 1):
      axes[i][j].imshow(groups_overlay(image, g[i], patch_size))
      axes[i][j].set_title(f"{len(np.unique(g[i]))} groups", fontsize=8)
    for ax in axes[i]:
      ax.set_xticks([])
      ax.set_yticks([])
  axes[0][0].set_title("image", fontsize=8)
  for j, title in enumerate(titles, 1):
    axes[0][j].set_title(f"{title}\n{axes[0][j].get_title()}", fontsize=8)
  fig.suptitle(textwrap.fill(heading, 60), fontsize=8)
  fig.tight_layout()
  _save(fig, path)
  plt.close(fig)


def draw_groups(study_dir: epath.Path, run: str, schedules: list[tuple[int, int]], num_images: int,
                path: epath.Path) -> None:
  run_dir = study_dir / "runs" / run
  config = teachers.run_config(run_dir)
  target, params = teachers.load(config, str(run_dir))
  split = frozen_features.load_split(config.input, "test", num_images, image_size=config.model.image_size)
  tokens = teachers.target_tokens(target, params, split.images)
  groups = [teachers.morph_groups(tokens, m, k, max_iters=max(k, config.dtm.max_iters),
                                             protect_first=config.dtm.protect_first) for m, k in schedules]
  images01 = np.clip(split.images * np.asarray(config.input.std) + np.asarray(config.input.mean), 0, 1)
  groups_figure(images01, groups, [f"remove {m} in {k} rounds" for m, k in schedules], config.model.patch_size, path,
                f"Groups found by morphing the target tokens of run {run}: {target.description}. The top-left patch "
                "never merges (faithful mode).")
