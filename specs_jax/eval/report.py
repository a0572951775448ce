r"""The run report: paper-shaped tables in `DIR/report.md` and plots in `DIR/plots/*.png`.

    md = report.render_report(json.load(open(f"{DIR}/summary.json")), DIR)

Inputs (DESIGN.md "Run outputs"):
- summary["eval"][checkpoint][split] = {"accuracy", "format_rate", "n", optional "pass@k": {k: rate}}.
  Rows are the checkpoints in `CHECKPOINT_ORDER` that are present, then any others in summary order;
  columns are the splits ("id", "ood" first, then the benchmarks in order of first appearance) and
  "Avg." (the mean of the row's cells, as the paper's AVG/Overall columns; a row missing a cell is
  averaged over the cells it has and marked with *). A "Δ final − base" row follows when both exist.
- summary["gf"][method] = [[step, id_rate, ood_rate, gf], ...] -> a table of the last point per method
  and `plots/gf.png` (ID, OOD and Γ against the cold-start step, one line per method).
- summary["stages"][name] = {"status", "seconds", "steps"} -> a stage table.
- `DIR/<stage>/metrics.jsonl` (one JSON object per logged step, with a "step" key):
  GRPO stages (`GRPO_STAGES`) -> `plots/grpo_curves.png`: reward, format and accuracy rewards, read from
  the first key of `GRPO_KEYS[...]` that the file has; DPO stages (`DPO_STAGES`) ->
  `plots/dpo_rewards.png`: rewards/chosen, rewards/rejected and rewards/margins.
- pass@k entries -> `plots/pass_at_k.png`, one panel per split, one line per checkpoint.
Numbers in the tables are percentages with one decimal. A missing or unreadable input skips its table
or plot with a note in the report; this module never raises because of a run's outputs.

Plots use matplotlib's object API with the Agg canvas (no pyplot, no global backend switch).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["CHECKPOINT_LABELS", "CHECKPOINT_ORDER", "DPO_KEYS", "DPO_STAGES", "GRPO_KEYS", "GRPO_STAGES",
           "read_metrics", "render_report"]

log = logging.getLogger(__name__)

CHECKPOINT_ORDER = ("base", "zero", "coldstart", "final", "sft_coldstart", "sft_final")
CHECKPOINT_LABELS = {
    "base": "Base (instruct)",
    "zero": "Ours-zero (GRPO only)",
    "coldstart": "Cold start (DPO+SFT)",
    "final": "SPECS (cold start + GRPO)",
    "sft_coldstart": "SFT cold start",
    "sft_final": "SFT-based GRPO",
}
SPLIT_LABELS = {"id": "ID", "ood": "OOD", "mathvista": "MathVista", "mathverse": "MathVerse",
                "mathvision": "MathVision", "mmmu": "MMMU", "mega_bench": "MEGA-Bench"}
_FIRST_SPLITS = ("id", "ood")

GRPO_STAGES = ("zero_rl", "final_rl", "sft_final")
DPO_STAGES = ("coldstart", "sft_coldstart")
# Keys a GRPO stage may log each quantity under; the first one present in a file is used. The first are
# what `training.rollout.collect_rollouts` returns (mean over the step's rollouts).
GRPO_KEYS = {
    "reward": ("rollout/reward_mean", "rewards/total", "reward", "reward/mean", "rewards/mean"),
    "format": ("rollout/format_reward_mean", "rewards/format", "format_reward", "reward/format"),
    "accuracy": ("rollout/accuracy_reward_mean", "rewards/accuracy", "accuracy_reward", "reward/accuracy"),
}
DPO_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins")

_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf", "#7f7f7f")


# --------------------------------------------------------------------------------------------- inputs


def _finite(v: Any) -> float | None:
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    return None
  v = float(v)
  return v if math.isfinite(v) else None


def read_metrics(path: str | os.PathLike) -> tuple[list[dict], int]:
  """Reads a metrics.jsonl file: (the JSON objects in order, number of unreadable lines skipped).

  A torn last line (an interrupted write) or a non-object line is skipped and counted, not an error.
  Raises OSError only when the file cannot be opened.
  """
  rows, bad = [], 0
  with open(path, encoding="utf-8") as f:
    for line in f:
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except ValueError:
        bad += 1
        continue
      if isinstance(obj, dict):
        rows.append(obj)
      else:
        bad += 1
  return rows, bad


def _series(rows: Sequence[Mapping], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of the rows that have a finite `key`; rows without "step" use their index."""
  xs, ys = [], []
  for i, r in enumerate(rows):
    y = _finite(r.get(key))
    if y is None:
      continue
    step = _finite(r.get("step"))
    xs.append(step if step is not None else float(i))
    ys.append(y)
  return np.asarray(xs), np.asarray(ys)


def _first_key(rows: Sequence[Mapping], candidates: Sequence[str]) -> str | None:
  for k in candidates:
    if any(_finite(r.get(k)) is not None for r in rows):
      return k
  return None


def _load_stage_metrics(workdir: str, stages: Sequence[str], notes: list[str]) -> dict[str, list[dict]]:
  out = {}
  for stage in stages:
    path = os.path.join(workdir, stage, "metrics.jsonl")
    if not os.path.exists(path):
      continue
    try:
      rows, bad = read_metrics(path)
    except OSError as e:
      notes.append(f"`{stage}/metrics.jsonl` could not be read ({e}).")
      continue
    if bad:
      notes.append(f"`{stage}/metrics.jsonl`: skipped {bad} unreadable line(s).")
    if rows:
      out[stage] = rows
  return out


def _checkpoint_rows(eval_: Mapping) -> list[str]:
  known = [c for c in CHECKPOINT_ORDER if c in eval_]
  return known + [c for c in eval_ if c not in CHECKPOINT_ORDER]


def _split_columns(eval_: Mapping, rows: Sequence[str]) -> list[str]:
  seen: list[str] = []
  for c in rows:
    splits = eval_.get(c)
    if isinstance(splits, Mapping):
      seen += [s for s in splits if s not in seen]
  return [s for s in _FIRST_SPLITS if s in seen] + [s for s in seen if s not in _FIRST_SPLITS]


def _pass_at_k(entry: Mapping) -> dict[int, float]:
  """{k: rate} from entry["pass@k"] = {k: rate} and/or keys "pass@k" at the entry's top level."""
  out = {}
  nested = entry.get("pass@k")
  items = list(nested.items()) if isinstance(nested, Mapping) else []
  items += [(m.group(1), v) for key, v in entry.items() if (m := re.fullmatch(r"pass@(\d+)", str(key)))]
  for k, v in items:
    try:
      k = int(k)
    except (TypeError, ValueError):
      continue
    if k >= 1 and (v := _finite(v)) is not None:
      out[k] = v
  return dict(sorted(out.items()))


# --------------------------------------------------------------------------------------------- tables


def _pct(v: float | None, signed: bool = False) -> str:
  if v is None:
    return "–"
  return f"{100 * v:+.1f}" if signed else f"{100 * v:.1f}"


def _label(checkpoint: str) -> str:
  return CHECKPOINT_LABELS.get(checkpoint, checkpoint)


def _split_label(split: str) -> str:
  return SPLIT_LABELS.get(split.lower(), split)


def _cell(eval_: Mapping, ckpt: str, split: str, metric: str) -> float | None:
  entry = eval_.get(ckpt, {}).get(split) if isinstance(eval_.get(ckpt), Mapping) else None
  return _finite(entry.get(metric)) if isinstance(entry, Mapping) else None


def _metric_table(eval_: Mapping, rows: Sequence[str], cols: Sequence[str], metric: str) -> list[str]:
  """Markdown lines of one paper-shaped table of `metric` (rows: checkpoints, columns: splits + Avg.)."""
  lines = ["| Model | " + " | ".join(_split_label(c) for c in cols) + " | Avg. |",
           "|---|" + "---|" * (len(cols) + 1)]
  values: dict[str, list[float | None]] = {}
  partial = False
  for r in rows:
    vals = [_cell(eval_, r, c, metric) for c in cols]
    values[r] = vals
    present = [v for v in vals if v is not None]
    avg = _pct(float(np.mean(present))) if present else "–"
    if present and len(present) < len(vals):
      avg += "*"
      partial = True
    lines.append(f"| {_label(r)} | " + " | ".join(_pct(v) for v in vals) + f" | {avg} |")
  if "base" in values and "final" in values:
    b, f = values["base"], values["final"]
    deltas = [None if x is None or y is None else y - x for x, y in zip(b, f)]
    both = [i for i, d in enumerate(deltas) if d is not None]
    avg_delta = (float(np.mean([f[i] for i in both]) - np.mean([b[i] for i in both])) if both else None)
    lines.append("| Δ final − base | " + " | ".join(_pct(d, signed=True) for d in deltas)
                 + f" | {_pct(avg_delta, signed=True)} |")
  if partial:
    lines.append("")
    lines.append("\\* averaged over the columns this row has.")
  return lines


def _pass_at_k_table(eval_: Mapping, rows: Sequence[str], cols: Sequence[str]) -> list[str]:
  entries = []
  for r in rows:
    for c in cols:
      entry = eval_.get(r, {}).get(c) if isinstance(eval_.get(r), Mapping) else None
      if isinstance(entry, Mapping) and (pk := _pass_at_k(entry)):
        entries.append((r, c, pk))
  if not entries:
    return []
  ks = sorted({k for _, _, pk in entries for k in pk})
  lines = ["| Model | Split | " + " | ".join(f"pass@{k}" for k in ks) + " |", "|---|---|" + "---|" * len(ks)]
  for r, c, pk in entries:
    lines.append(f"| {_label(r)} | {_split_label(c)} | " + " | ".join(_pct(pk.get(k)) for k in ks) + " |")
  return lines


def _gf_points(gf: Any, notes: list[str]) -> dict[str, np.ndarray]:
  """{method: [T, 4] array of (step, id, ood, gf)}, rows sorted by step; malformed rows skipped."""
  out = {}
  if not isinstance(gf, Mapping):
    return out
  for method, rows in gf.items():
    good, bad = [], 0
    for row in rows if isinstance(rows, (list, tuple)) else []:
      vals = [_finite(v) for v in row] if isinstance(row, (list, tuple)) and len(row) == 4 else [None]
      if any(v is None for v in vals):
        bad += 1
      else:
        good.append(vals)
    if bad:
      notes.append(f"GF `{method}`: skipped {bad} malformed point(s) (expected [step, id, ood, gf]).")
    if good:
      out[str(method)] = np.asarray(sorted(good, key=lambda v: v[0]), np.float64)
  return out


def _gf_table(points: Mapping[str, np.ndarray]) -> list[str]:
  lines = ["| Method | Step | ID | OOD | Γ (β=2) | max Γ (step) |", "|---|---|---|---|---|---|"]
  for method, arr in points.items():
    step, id_r, ood, gf = arr[-1]
    best = int(np.argmax(arr[:, 3]))
    lines.append(f"| {method} | {int(step)} | {_pct(id_r)} | {_pct(ood)} | {_pct(gf)} | "
                 f"{_pct(arr[best, 3])} ({int(arr[best, 0])}) |")
  return lines


def _stage_table(stages: Any) -> list[str]:
  if not isinstance(stages, Mapping) or not stages:
    return []
  lines = ["| Stage | Status | Steps | Time (s) |", "|---|---|---|---|"]
  for name, info in stages.items():
    info = info if isinstance(info, Mapping) else {}
    steps, secs = _finite(info.get("steps")), _finite(info.get("seconds"))
    lines.append(f"| {name} | {info.get('status', '?')} | {'–' if steps is None else int(steps)} | "
                 f"{'–' if secs is None else f'{secs:.1f}'} |")
  return lines


# ---------------------------------------------------------------------------------------------- plots


def _save(fig: Figure, path: str) -> None:
  FigureCanvasAgg(fig)
  fig.savefig(path, dpi=110)


def _plot_line(ax, x: np.ndarray, y: np.ndarray, label: str, colour: str) -> None:
  """A raw curve, plus a moving average once there are enough points to be noisy."""
  if len(x) >= 20:
    ax.plot(x, y, color=colour, alpha=0.3, linewidth=1)
    w = max(3, len(x) // 20)
    smooth = np.convolve(y, np.ones(w) / w, mode="valid")
    ax.plot(x[w - 1:], smooth, color=colour, linewidth=1.8, label=f"{label} (mean of {w})")
  else:
    ax.plot(x, y, color=colour, linewidth=1.8, marker="o" if len(x) < 8 else None, markersize=3, label=label)


def _plot_grpo(metrics: Mapping[str, list[dict]], path: str) -> str | None:
  """GRPO reward / format / accuracy vs step; None when no stage logs any of them."""
  found = {stage: {q: _first_key(rows, keys) for q, keys in GRPO_KEYS.items()} for stage, rows in metrics.items()}
  found = {s: ks for s, ks in found.items() if any(ks.values())}
  if not found:
    return None
  fig = Figure(figsize=(13, 3.8), layout="constrained")
  axes = fig.subplots(1, 3)
  for ax, (q, title) in zip(axes, (("reward", "Total reward"), ("format", "Format reward"),
                                   ("accuracy", "Accuracy reward"))):
    for i, (stage, keys) in enumerate(found.items()):
      if keys[q]:
        x, y = _series(metrics[stage], keys[q])
        _plot_line(ax, x, y, f"{stage} ({keys[q]})", _COLOURS[i % len(_COLOURS)])
    ax.set_title(title)
    ax.set_xlabel("GRPO step")
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=7)
    else:
      ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
  fig.suptitle("GRPO training curves")
  _save(fig, path)
  return path


def _plot_dpo(metrics: Mapping[str, list[dict]], path: str) -> str | None:
  stages = [s for s, rows in metrics.items() if _first_key(rows, DPO_KEYS)]
  if not stages:
    return None
  fig = Figure(figsize=(5.5 * len(stages), 3.8), layout="constrained")
  axes = np.atleast_1d(fig.subplots(1, len(stages)))
  for ax, stage in zip(axes, stages):
    for i, key in enumerate(DPO_KEYS):
      x, y = _series(metrics[stage], key)
      if len(x):
        _plot_line(ax, x, y, key, _COLOURS[i])
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_title(f"{stage}: DPO implicit rewards")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  _save(fig, path)
  return path


def _plot_gf(points: Mapping[str, np.ndarray], path: str) -> str:
  fig = Figure(figsize=(13, 3.8), layout="constrained")
  axes = fig.subplots(1, 3)
  for ax, (col, title) in zip(axes, ((1, "ID format-following (%)"), (2, "OOD format-following (%)"),
                                     (3, "Generalisation factor Γ (%)"))):
    for i, (method, arr) in enumerate(points.items()):
      ax.plot(arr[:, 0], 100 * arr[:, col], color=_COLOURS[i % len(_COLOURS)], marker="o", markersize=3,
              linewidth=1.8, label=method)
    ax.set_title(title)
    ax.set_xlabel("cold-start step")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle("Generalisation factor during the cold start")
  _save(fig, path)
  return path


def _plot_pass_at_k(eval_: Mapping, rows: Sequence[str], cols: Sequence[str], path: str) -> str | None:
  panels: dict[str, list[tuple[str, dict[int, float]]]] = {}
  for c in cols:
    for r in rows:
      entry = eval_.get(r, {}).get(c) if isinstance(eval_.get(r), Mapping) else None
      if isinstance(entry, Mapping) and (pk := _pass_at_k(entry)):
        panels.setdefault(c, []).append((r, pk))
  if not panels:
    return None
  fig = Figure(figsize=(5 * len(panels), 3.8), layout="constrained")
  axes = np.atleast_1d(fig.subplots(1, len(panels)))
  for ax, (split, curves) in zip(axes, panels.items()):
    for r, pk in curves:
      i = CHECKPOINT_ORDER.index(r) if r in CHECKPOINT_ORDER else len(CHECKPOINT_ORDER) + rows.index(r)
      ks = np.asarray(list(pk))
      ax.plot(ks, [100 * v for v in pk.values()], color=_COLOURS[i % len(_COLOURS)], marker="o", markersize=4,
              linewidth=1.8, label=_label(r))
    ax.set_xscale("log", base=2)
    all_ks = sorted({k for _, pk in curves for k in pk})
    ax.set_xticks(all_ks, labels=[str(k) for k in all_ks])
    ax.minorticks_off()
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k (%)")
    ax.set_title(f"{_split_label(split)}: pass@k")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  _save(fig, path)
  return path


# --------------------------------------------------------------------------------------------- report


def _try_plot(name: str, fn, notes: list[str]) -> tuple[str | None, bool]:
  """(path or None, whether the plot raised); a failure is logged and noted, never raised."""
  try:
    return fn(), False
  except Exception as e:  # noqa: BLE001 - a plot must never take the report down with it
    log.exception("report: plot %s failed", name)
    notes.append(f"Plot `{name}` failed: {type(e).__name__}: {e}.")
    return None, True


def _write_atomic(path: str, text: str) -> None:
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def render_report(summary: Mapping[str, Any], workdir: str | os.PathLike) -> str:
  """Writes `workdir/report.md` and `workdir/plots/*.png` (see module docstring); returns the markdown.

  Args:
    summary: the run's summary.json content ({"stages", "eval", "gf"}; any may be missing).
    workdir: the run directory DIR; stage metrics are read from DIR/<stage>/metrics.jsonl.
  Returns:
    The markdown written to report.md; plots are linked relative to it ("plots/…png").
  """
  workdir = os.fspath(workdir)
  plots_dir = os.path.join(workdir, "plots")
  os.makedirs(plots_dir, exist_ok=True)
  summary = summary if isinstance(summary, Mapping) else {}
  notes: list[str] = []
  md = ["# SPECS run report", ""]

  eval_ = summary.get("eval") if isinstance(summary.get("eval"), Mapping) else {}
  rows = [r for r in _checkpoint_rows(eval_) if isinstance(eval_.get(r), Mapping)]
  cols = _split_columns(eval_, rows)
  if rows and cols:
    md += ["## Accuracy (%)", "", *_metric_table(eval_, rows, cols, "accuracy"), ""]
    md += ["## Format-following rate (%)", "", *_metric_table(eval_, rows, cols, "format_rate"), ""]
    counts = {c: next((int(n) for r in rows if (n := _cell(eval_, r, c, "n")) is not None), None) for c in cols}
    md += ["Items per split: " + ", ".join(f"{_split_label(c)} {'?' if n is None else n}"
                                          for c, n in counts.items()) + ".", ""]
    pk_lines = _pass_at_k_table(eval_, rows, cols)
    if pk_lines:
      md += ["## pass@k (%)", "", *pk_lines, ""]
  else:
    notes.append("No evaluation results in summary.json (`eval`): accuracy tables skipped.")

  gf_points = _gf_points(summary.get("gf"), notes)
  if gf_points:
    md += ["## Generalisation factor (cold start)", "",
           "Γ = (1+β²)·ID·OOD / (β²·ID + OOD), β = 2, on the format-following rates at each step.", "",
           *_gf_table(gf_points), ""]

  stage_lines = _stage_table(summary.get("stages"))
  if stage_lines:
    md += ["## Stages", "", *stage_lines, ""]

  grpo_metrics = _load_stage_metrics(workdir, GRPO_STAGES, notes)
  dpo_metrics = _load_stage_metrics(workdir, DPO_STAGES, notes)
  plots = [
      ("GRPO reward, format and accuracy", "grpo_curves.png",
       lambda p: _plot_grpo(grpo_metrics, p),
       f"no GRPO reward metrics in {', '.join(f'`{s}/metrics.jsonl`' for s in GRPO_STAGES)}"),
      ("DPO rewards (chosen, rejected, margins)", "dpo_rewards.png",
       lambda p: _plot_dpo(dpo_metrics, p),
       f"no {', '.join(DPO_KEYS)} in {', '.join(f'`{s}/metrics.jsonl`' for s in DPO_STAGES)}"),
      ("Generalisation factor", "gf.png",
       lambda p: _plot_gf(gf_points, p) if gf_points else None, "no `gf` points in summary.json"),
      ("pass@k", "pass_at_k.png",
       lambda p: _plot_pass_at_k(eval_, rows, cols, p), "no pass@k results in summary.json `eval`"),
  ]
  md += ["## Plots", ""]
  for title, fname, fn, missing in plots:
    path = os.path.join(plots_dir, fname)
    made, failed = _try_plot(fname, lambda fn=fn, path=path: fn(path), notes)
    if made:
      md += [f"### {title}", "", f"![{title}](plots/{fname})", ""]
    elif not failed:
      notes.append(f"Plot `{fname}` skipped: {missing}.")
  if notes:
    md += ["## Notes", "", *[f"- {n}" for n in notes], ""]
  text = "\n".join(md)
  _write_atomic(os.path.join(workdir, "report.md"), text)
  return text
