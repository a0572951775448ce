"""Bookkeeping for pair building: what each filter dropped, and the numbers of the stats report.

Every sampled candidate ends in exactly one place: kept (it is in a pair) or dropped by one filter or
one selection step, so for each side

    candidates == kept + sum(dropped.values())

which `SideStats.check` asserts. The filters, in the order they run (RECIPE.md §2):

  chosen:   duplicate -> answer -> judge -> supplement
  rejected: duplicate -> answer -> pollution
  then, for candidates that passed every filter: no_partner (the other side of the prompt has no
  passing candidate), not_picked (the pick rule took another one), max_pairs (the cap was reached).

Pure Python + numpy.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = ["CHOSEN_FILTERS", "DistillStats", "REJECTED_FILTERS", "SELECTION", "SideStats", "length_histogram"]

CHOSEN_FILTERS = ("duplicate", "answer", "judge", "supplement")
REJECTED_FILTERS = ("duplicate", "answer", "pollution")
SELECTION = ("no_partner", "not_picked", "max_pairs")


def length_histogram(values: Sequence[int], bins: int = 10) -> dict[str, Any]:
  """Summary and histogram of lengths: n, min, max, mean, median, edges [bins+1], counts [bins]."""
  a = np.asarray(list(values), np.float64)
  if a.size == 0:
    return {"n": 0, "min": None, "max": None, "mean": None, "median": None, "edges": [], "counts": []}
  counts, edges = np.histogram(a, bins=bins)
  return {"n": int(a.size), "min": int(a.min()), "max": int(a.max()), "mean": float(a.mean()),
          "median": float(np.median(a)), "edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


@dataclasses.dataclass
class SideStats:
  """Candidate counts of one side (chosen or rejected).

  Attributes:
    filters: the filter names in the order they run.
    candidates: responses sampled.
    entered: filter -> candidates that reached it.
    dropped: filter or selection step -> candidates it removed.
    kept: candidates in a pair (= number of pairs).
  """

  filters: tuple[str, ...]
  candidates: int = 0
  entered: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  kept: int = 0

  def record(self, name: str, entered: int, dropped: int) -> None:
    if name not in self.filters:
      raise KeyError(f"unknown filter {name!r}; this side's filters are {self.filters}")
    if not 0 <= dropped <= entered:
      raise ValueError(f"filter {name!r}: dropped {dropped} of {entered}")
    self.entered[name] += entered
    self.dropped[name] += dropped

  def drop_selected(self, reason: str, n: int) -> None:
    if reason not in SELECTION:
      raise KeyError(f"unknown selection step {reason!r}; expected one of {SELECTION}")
    self.dropped[reason] += n

  @property
  def passed(self) -> int:
    """Candidates that passed every filter."""
    return self.candidates - sum(self.dropped[f] for f in self.filters)

  def pass_rates(self) -> dict[str, float | None]:
    """filter -> fraction of the candidates reaching it that passed (None when none reached it)."""
    return {f: (1.0 - self.dropped[f] / self.entered[f]) if self.entered[f] else None for f in self.filters}

  def check(self) -> None:
    """Raises AssertionError unless candidates == kept + every drop, and each filter's entries equal
    the previous filter's survivors."""
    total = self.kept + sum(self.dropped.values())
    if self.candidates != total:
      raise AssertionError(f"candidates {self.candidates} != kept {self.kept} + drops {dict(self.dropped)}")
    expect = self.candidates
    for f in self.filters:
      if self.entered[f] != expect:
        raise AssertionError(f"filter {f!r} saw {self.entered[f]} candidates, expected {expect}")
      expect -= self.dropped[f]

  def to_dict(self) -> dict[str, Any]:
    return {"candidates": self.candidates, "kept": self.kept, "passed_filters": self.passed,
            "dropped": {k: int(self.dropped[k]) for k in (*self.filters, *SELECTION)},
            "entered": {k: int(self.entered[k]) for k in self.filters}, "pass_rate": self.pass_rates()}


@dataclasses.dataclass
class DistillStats:
  """Everything the stats report holds; `to_dict()` is what stats.json gets.

  Attributes:
    prompts: given, used, bad_gold, duplicate, other_format, beyond_subset, not_sampled.
    models: model name -> {"role", "prompts", "samples"} (the candidates per model).
    chosen, rejected: per-side filter counts.
    pairs: pairs built.
    corruptions: corruption kind -> kept pairs; corruptions_all: over every polluted candidate.
    misplace_variants: misplacement variant -> kept pairs.
    repairs: supplement repair -> kept chosen responses ("none" for canonical ones).
    judge_no_verdict: chosen candidates dropped because the judge gave no verdict.
    lengths: name -> list of lengths (chars, and tokens when a tokenizer was given).
    seconds, sampling_seconds: wall time in total and inside the sampler.
  """

  prompts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  models: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
  chosen: SideStats = dataclasses.field(default_factory=lambda: SideStats(CHOSEN_FILTERS))
  rejected: SideStats = dataclasses.field(default_factory=lambda: SideStats(REJECTED_FILTERS))
  pairs: int = 0
  corruptions: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  corruptions_all: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  misplace_variants: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  repairs: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  judge_no_verdict: int = 0
  lengths: dict[str, list[int]] = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
  seconds: float = 0.0
  sampling_seconds: float = 0.0

  def count_samples(self, model: str, role: str, prompts: int, samples: int) -> None:
    entry = self.models.setdefault(model, {"roles": [], "prompts": 0, "samples": 0})
    if role not in entry["roles"]:
      entry["roles"].append(role)
    entry["prompts"] += prompts
    entry["samples"] += samples

  def add_lengths(self, name: str, values: Iterable[int]) -> None:
    self.lengths[name].extend(int(v) for v in values)

  def check(self) -> None:
    """Raises AssertionError unless both sides add up and each kept one candidate per pair."""
    self.chosen.check()
    self.rejected.check()
    if not self.chosen.kept == self.rejected.kept == self.pairs:
      raise AssertionError(f"kept chosen {self.chosen.kept}, kept rejected {self.rejected.kept}, pairs {self.pairs}")
    if sum(self.corruptions.values()) != self.pairs:
      raise AssertionError(f"corruption mix {dict(self.corruptions)} does not sum to {self.pairs} pairs")

  def to_dict(self, bins: int = 10) -> dict[str, Any]:
    return {
        "pairs": self.pairs,
        "prompts": dict(sorted(self.prompts.items())),
        "models": self.models,
        "chosen": self.chosen.to_dict(),
        "rejected": self.rejected.to_dict(),
        "corruptions": dict(sorted(self.corruptions.items())),
        "corruptions_all": dict(sorted(self.corruptions_all.items())),
        "misplace_variants": dict(sorted(self.misplace_variants.items())),
        "repairs": dict(sorted(self.repairs.items())),
        "judge_no_verdict": self.judge_no_verdict,
        "lengths": {k: length_histogram(v, bins) for k, v in sorted(self.lengths.items())},
        "seconds": self.seconds,
        "sampling_seconds": self.sampling_seconds,
    }
