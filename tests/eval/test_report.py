"""The run report from a fixture summary.json and fixture metrics.jsonl files: tables, PNGs, missing inputs."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from specs_jax.eval import metrics, report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fixture_summary() -> dict:
  """A run shaped as DESIGN.md says, with the paper's Table 2 numbers for base / zero / final."""
  def entry(acc, fmt, n, **extra):
    return {"accuracy": acc, "format_rate": fmt, "n": n, **extra}
  gf = {}
  for method, (id_end, ood_end) in {"sft": (0.98, 0.69), "dpo": (0.975, 0.88), "dpo_sft": (0.985, 0.945)}.items():
    rows = []
    for step in range(0, 26, 5):
      t = 1 - math.exp(-step / 4)
      i, o = 0.25 + (id_end - 0.25) * t, ood_end * t
      rows.append([step, i, o, metrics.generalization_factor(i, o)])
    gf[method] = rows
  return {
      "stages": {"zero_rl": {"status": "done", "seconds": 812.5, "steps": 200},
                 "coldstart": {"status": "done", "seconds": 120.0, "steps": 25},
                 "final_rl": {"status": "running", "seconds": 33.0, "steps": 40}},
      "eval": {
          "final": {"id": entry(0.9, 0.99, 64), "ood": entry(0.7, 0.94, 64),
                    "mmmu": entry(0.5678, 0.98, 30, **{"pass@k": {"1": 0.5678, "2": 0.64, "4": 0.71, "8": 0.7755}}),
                    "mathvista": entry(0.759, 0.97, 30)},
          "base": {"id": entry(0.5, 0.41, 64), "ood": entry(0.3, 0.2, 64),
                   "mmmu": entry(0.542, 0.4, 30, **{"pass@k": {"1": 0.542, "2": 0.6, "4": 0.64, "8": 0.6689}}),
                   "mathvista": entry(0.637, 0.45, 30)},
          "zero": {"id": entry(0.8, 0.97, 64), "ood": entry(0.5, 0.6, 64), "mmmu": entry(0.543, 0.96, 30)},
      },
      "gf": gf,
  }


def write_metrics(path, rows, torn_tail=False):
  path.parent.mkdir(parents=True, exist_ok=True)
  text = "".join(json.dumps(r) + "\n" for r in rows)
  path.write_text(text + ('{"step": 999, "rewa' if torn_tail else ""))


def fixture_workdir(tmp_path):
  rng = np.random.default_rng(0)
  for stage, start in (("zero_rl", 0.6), ("final_rl", 0.9)):
    rows = []
    for s in range(60):
      fmt = min(1.0, start + s / 80 + 0.03 * rng.standard_normal())
      acc = min(1.0, 0.2 + s / 150 + 0.05 * rng.standard_normal())
      if stage == "zero_rl":   # the keys training.rollout logs
        rows.append({"step": s, "rollout/format_reward_mean": fmt, "rollout/accuracy_reward_mean": acc,
                     "rollout/reward_mean": 0.5 * fmt + acc, "loss": 0.01 * rng.standard_normal()})
      else:                    # an alternative naming the report also reads
        rows.append({"step": s, "rewards/format": fmt, "rewards/accuracy": acc, "rewards/total": 0.5 * fmt + acc})
    write_metrics(tmp_path / stage / "metrics.jsonl", rows, torn_tail=stage == "final_rl")
  dpo = []
  for s in range(25):
    chosen, rejected = 0.05 * s + 0.02 * rng.standard_normal(), -0.08 * s + 0.02 * rng.standard_normal()
    dpo.append({"step": s, "rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
                "loss/dpo": 0.69 - 0.02 * s, "loss/sft": 1.2 - 0.01 * s})
  write_metrics(tmp_path / "coldstart" / "metrics.jsonl", dpo)
  return tmp_path


def assert_real_png(path, min_colours=20):
  data = path.read_bytes()
  assert data[:8] == PNG_SIGNATURE, path
  with Image.open(path) as im:
    im.verify()
  with Image.open(path) as im:
    arr = np.asarray(im.convert("RGB"))
  assert arr.shape[0] >= 300 and arr.shape[1] >= 400, arr.shape
  colours = np.unique(arr.reshape(-1, 3), axis=0)
  non_white = (arr < 250).any(-1).mean()
  assert len(colours) >= min_colours and non_white > 0.02, (path, len(colours), non_white)


def test_render_report_from_fixture_summary(tmp_path):
  workdir = fixture_workdir(tmp_path)
  summary = fixture_summary()
  (workdir / "summary.json").write_text(json.dumps(summary))
  md = report.render_report(json.loads((workdir / "summary.json").read_text()), workdir)
  assert (workdir / "report.md").read_text() == md

  lines = md.splitlines()
  head = next(i for i, ln in enumerate(lines) if ln.startswith("| Model | ID | OOD | MMMU | MathVista | Avg. |"))
  # Rows in paper order (base, zero, final), whatever the summary's order; percentages, one decimal.
  assert lines[head + 2] == "| Base (instruct) | 50.0 | 30.0 | 54.2 | 63.7 | 49.5 |"     # (50+30+54.2+63.7)/4
  assert lines[head + 3] == "| Ours-zero (GRPO only) | 80.0 | 50.0 | 54.3 | – | 61.4* |"   # averaged over 3
  assert lines[head + 4] == "| SPECS (cold start + GRPO) | 90.0 | 70.0 | 56.8 | 75.9 | 73.2 |"
  assert lines[head + 5] == "| Δ final − base | +40.0 | +40.0 | +2.6 | +12.2 | +23.7 |"
  assert "## Format-following rate (%)" in md and "| Base (instruct) | 41.0 | 20.0 | 40.0 | 45.0 | 36.5 |" in md
  assert "| Base (instruct) | MMMU | 54.2 | 60.0 | 64.0 | 66.9 |" in md                       # pass@k table
  assert "| dpo_sft | 25 |" in md and "| sft | 25 |" in md
  assert "| final_rl | running | 40 | 33.0 |" in md
  assert "`final_rl/metrics.jsonl`: skipped 1 unreadable line(s)." in md                   # the torn tail

  for name in ("grpo_curves", "dpo_rewards", "gf", "pass_at_k"):
    assert f"![" in md and f"(plots/{name}.png)" in md
    assert_real_png(workdir / "plots" / f"{name}.png")


def test_missing_inputs_are_skipped_with_notes(tmp_path):
  md = report.render_report({}, tmp_path)
  assert "No evaluation results" in md
  for name in ("grpo_curves", "dpo_rewards", "gf", "pass_at_k"):
    assert f"Plot `{name}.png` skipped" in md
    assert not (tmp_path / "plots" / f"{name}.png").exists()

  # Malformed pieces: a non-dict checkpoint, a GF row of the wrong length, an empty metrics file, a metrics
  # file without any known key.
  (tmp_path / "zero_rl").mkdir()
  (tmp_path / "zero_rl" / "metrics.jsonl").write_text("")
  write_metrics(tmp_path / "final_rl" / "metrics.jsonl", [{"step": 1, "loss": 0.1}])
  summary = {"eval": {"base": {"id": {"accuracy": 0.5, "format_rate": float("nan"), "n": 4}}, "zero": "oops"},
             "gf": {"sft": [[0, 0.5, 0.2], [5, 0.9, 0.6, 0.69]]}, "stages": {"base": None}}
  md = report.render_report(summary, tmp_path)
  assert "| Base (instruct) | 50.0 | 50.0 |" in md and "| Base (instruct) | – | – |" in md   # NaN format rate
  assert "GF `sft`: skipped 1 malformed point(s)" in md and "(plots/gf.png)" in md
  assert "Plot `grpo_curves.png` skipped" in md
  assert_real_png(tmp_path / "plots" / "gf.png", min_colours=10)


def test_read_metrics_skips_bad_lines(tmp_path):
  p = tmp_path / "m.jsonl"
  p.write_text('{"step": 0, "x": 1}\n\n[1, 2]\nnot json\n{"step": 1, "x": NaN}\n')
  rows, bad = report.read_metrics(p)
  assert [r["step"] for r in rows] == [0, 1] and bad == 2
  xs, ys = report._series(rows, "x")
  assert xs.tolist() == [0.0] and ys.tolist() == [1.0]    # NaN values are not plotted
  with pytest.raises(OSError):
    report.read_metrics(tmp_path / "missing.jsonl")
