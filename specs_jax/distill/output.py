"""Writing the distilled pairs: LLaMA-Factory JSONL + images, ArrayRecord, stats.json, length histograms.

    paths = write_outputs(pairs, stats, "DIR/distill", config=config)

    DIR/distill/pairs.jsonl                           LLaMA-Factory pairwise ShareGPT rows (+ "meta" JSON string)
    DIR/distill/dataset_info.json                     entry "specs_pairs" so LLaMA-Factory can load it
    DIR/distill/images/<sha>.png                      the prompts' images, content-addressed
    DIR/distill/pairs/specs_records/pairs/1.0.0/      ArrayRecord via `data.records.write_pairs` (images inside)
    DIR/distill/stats.json                            `DistillStats.to_dict()` (+ the config)
    DIR/distill/lengths.png                           length histograms of the kept chosen / rejected

The JSONL is written by `data.sources.write_preference_pairs` (read it back with
`data.read_preference_pairs`), the ArrayRecord set by `data.records.write_pairs` (read it back with
`data.records.open_pairs(DIR/distill, "pairs")`). Both carry the same pairs: prompt messages, images,
chosen, rejected, and a meta with the gold, the corruption kind, the source models and the raw samples;
reference log-probs go into the records' meta when given (`ref_logps`), else the DPO stage adds them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from specs_jax.data import records
from specs_jax.data.sources import write_preference_pairs
from specs_jax.data.types import PreferencePair
from specs_jax.distill.stats import DistillStats

__all__ = ["DistillOutputs", "PAIRS_NAME", "write_outputs"]

log = logging.getLogger(__name__)

PAIRS_NAME = "pairs"   # records.open_pairs(DIR/distill, PAIRS_NAME)


@dataclasses.dataclass(frozen=True)
class DistillOutputs:
  """Paths of everything `write_outputs` wrote."""

  jsonl: Path
  array_record: Path | None   # the tfds dataset directory of the ArrayRecord shard (None: no pairs)
  stats: Path
  image_dir: Path
  plot: Path | None


def _plot_lengths(stats: DistillStats, path: Path) -> Path | None:
  names = [n for n in ("chosen_tokens", "rejected_tokens") if stats.lengths.get(n)] or \
      [n for n in ("chosen_chars", "rejected_chars") if stats.lengths.get(n)]
  if not names:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 3.5))
  for name in names:
    ax.hist(stats.lengths[name], bins=20, alpha=0.6, label=name.replace("_", " "))
  ax.set_xlabel("length (tokens)" if names[0].endswith("tokens") else "length (characters)")
  ax.set_ylabel("pairs")
  ax.set_title(f"Preference pairs: response lengths ({stats.pairs} pairs)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def write_outputs(pairs: Sequence[PreferencePair], stats: DistillStats, out_dir: str | os.PathLike, *,
                  config: Any = None, ref_logps: np.ndarray | None = None, dataset_name: str = "specs_pairs",
                  plot: bool = True) -> DistillOutputs:
  """Writes the JSONL (+ images, dataset_info.json), the ArrayRecord set, stats.json and lengths.png.

  Args:
    pairs: from `build_pairs`.
    stats: from `build_pairs`.
    out_dir: the stage directory (DIR/distill). An earlier ArrayRecord set there is replaced; with no
      pairs none is written (tfds cannot write an empty split).
    config: the DistillConfig (anything with `to_dict()`), stored in stats.json under "config".
    ref_logps: optional [N, 2] (chosen, rejected) reference log-probs, stored in the records' meta
      (`records.REF_CHOSEN_KEY` / `REF_REJECTED_KEY`); the DPO stage can also add them later.
    dataset_name: the dataset_info.json entry for LLaMA-Factory.
    plot: also write lengths.png.
  """
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  jsonl = write_preference_pairs(pairs, out_dir / "pairs.jsonl", out_dir / "images", dataset_name=dataset_name,
                                 write_meta=True)
  if pairs:
    array_record = records.write_pairs(pairs, out_dir, PAIRS_NAME, ref_logps=ref_logps, overwrite=True)
  else:  # tfds cannot write an empty split; the JSONL (empty) and stats.json still say what happened
    array_record = None
    shutil.rmtree(records.dataset_dir(out_dir, PAIRS_NAME, "pairs"), ignore_errors=True)   # no stale set
    log.warning("distill: no pairs were built; no ArrayRecord set written (see %s)", out_dir / "stats.json")
  report = stats.to_dict()
  if config is not None:
    report["config"] = config.to_dict() if hasattr(config, "to_dict") else config
  stats_path = out_dir / "stats.json"
  stats_path.write_text(json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n")
  plot_path = _plot_lengths(stats, out_dir / "lengths.png") if plot else None
  log.info("distill: wrote %d pairs to %s (%s, %s)", len(pairs), out_dir, jsonl.name, array_record)
  return DistillOutputs(jsonl=jsonl, array_record=array_record, stats=stats_path, image_dir=out_dir / "images",
                        plot=plot_path)
