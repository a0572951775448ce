"""DistillConfig: every knob of pair building (RECIPE.md §2; see preference.py for the pipeline)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from specs_jax.distill import pollution
from specs_jax.processing import image as image_lib
from specs_jax.rewards.config import GradeConfig

__all__ = ["CHOSEN_SOURCES", "DistillConfig", "JUDGES", "PAIR_MODES", "PICK_RULES"]

CHOSEN_SOURCES = {"self": "policy", "base": "base", "teacher": "teacher"}   # source -> model name
PAIR_MODES = ("decoupled", "coupled")
PICK_RULES = ("random", "shortest", "longest")
JUDGES = ("rule", "openai", "none")

@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """Every knob of pair building (preference.py). Defaults follow RECIPE.md §2 where it says.

  Attributes:
    num_prompts: how many prompts of the RL pool to use (None: all); the paper kept ≈9K pairs.
    shuffle: draw the subset in a seeded random order (else in the given order).
    max_pairs: stop once this many pairs are built (None: no cap).
    k_chosen, k_rejected: samples per prompt from the chosen source and from the base model.
    chosen_source: "self" (π_zero, SPECS), "base" (base-model distillation) or "teacher" (a larger model).
    teacher_dir: HF directory of the teacher, loaded when chosen_source="teacher" and no teacher is given.
    pair_mode: "decoupled" (rejected answers are correct: the pair differs in format only, SPECS) or
      "coupled" (rejected answers are wrong: the pair differs in answer and format).
    chosen_temperature, rejected_temperature, top_p, top_k, max_new_tokens: sampling.
    batch_size: prompts per sampler call (k samples each).
    pick: which passing candidate a side uses: "random", "shortest", "longest" (by characters).
    dedupe: drop repeated prompts (same messages, images and gold) and repeated responses of a prompt.
    corruption_weights: the pollution mix, kind -> weight (`pollution.KINDS`).
    supplement_untagged: let the supplement accept chosen responses without any tag (plain prose).
    judge: "rule" (offline, default), "openai" (HTTP, `judge_kwargs` = `rewards.JudgeConfig` fields) or
      "none" (the no-verification ablation).
    judge_kwargs: keyword arguments for `rewards.make_judge`.
    add_format_instruction: append `formats.SPECS_INSTRUCTION` to prompts that carry no format
      instruction (meta["format"] is None); prompts asking for another format are skipped.
    system_prompt: if set, a system message with this text starts every prompt.
    seed: seeds the corruption mix and the random pick (per example, so independent of batching).
    grade: how answers are compared with the gold.
    grade_item_timeout_s, grade_deadline_s: per-item and per-batch limits when grading in a RewardPool.
    image: image preprocessing for the default sampler (None: `ImageConfig()`, the Qwen2.5-VL values).
    keep_raw: store the unprocessed chosen/rejected samples in each pair's meta.
  """

  num_prompts: int | None = None
  shuffle: bool = True
  max_pairs: int | None = 9000
  k_chosen: int = 4
  k_rejected: int = 4
  chosen_source: str = "self"
  teacher_dir: str | None = None
  pair_mode: str = "decoupled"
  chosen_temperature: float = 1.0
  rejected_temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  max_new_tokens: int = 4096
  batch_size: int = 8
  pick: str = "random"
  dedupe: bool = True
  corruption_weights: Mapping[str, float] = dataclasses.field(default_factory=lambda: dict(pollution.DEFAULT_WEIGHTS))
  supplement_untagged: bool = False
  judge: str = "rule"
  judge_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  add_format_instruction: bool = True
  system_prompt: str | None = None
  seed: int = 0
  grade: GradeConfig = dataclasses.field(default_factory=GradeConfig)
  grade_item_timeout_s: float = 2.0
  grade_deadline_s: float = 600.0
  image: image_lib.ImageConfig | None = None
  keep_raw: bool = True

  def __post_init__(self):
    def bad(name, value, expected):
      raise ValueError(f"DistillConfig.{name} must be {expected}, got {value!r}")

    if self.chosen_source not in CHOSEN_SOURCES:
      bad("chosen_source", self.chosen_source, f"one of {tuple(CHOSEN_SOURCES)}")
    if self.pair_mode not in PAIR_MODES:
      bad("pair_mode", self.pair_mode, f"one of {PAIR_MODES}")
    if self.pick not in PICK_RULES:
      bad("pick", self.pick, f"one of {PICK_RULES}")
    if self.judge not in JUDGES:
      bad("judge", self.judge, f"one of {JUDGES}")
    for name in ("k_chosen", "k_rejected", "batch_size", "max_new_tokens"):
      if int(getattr(self, name)) < 1:
        bad(name, getattr(self, name), ">= 1")
    for name in ("num_prompts", "max_pairs"):
      if getattr(self, name) is not None and getattr(self, name) < 0:
        bad(name, getattr(self, name), "None or >= 0")
    for name in ("chosen_temperature", "rejected_temperature"):
      if getattr(self, name) < 0:
        bad(name, getattr(self, name), ">= 0")
    if not 0 < self.top_p <= 1 or self.top_k < 0:
      raise ValueError(f"DistillConfig needs 0 < top_p <= 1 and top_k >= 0, got {self.top_p}, {self.top_k}")
    pollution.validate_weights(self.corruption_weights)

  def to_dict(self) -> dict[str, Any]:
    """A JSON-able copy (for stats.json / config.json)."""
    d = dataclasses.asdict(self)
    d["corruption_weights"] = dict(self.corruption_weights)
    d["judge_kwargs"] = dict(self.judge_kwargs)
    return d
