r"""Generalisation-factor tracking during the cold start (RECIPE.md §4): a tracker and a training-loop hook.

    tracker = hooks.GFTracker.synthetic(method="dpo_sft", n_id=64, n_ood=64, seed=0,
                                        path=f"{DIR}/coldstart/gf.jsonl")
    hook = hooks.make_gf_hook(every_k=5, tracker=tracker,
                              make_generate_fn=hooks.greedy_generate_fn(model, tokenizer, image_config=ic,
                                                                        max_new_tokens=256, batch_size=16))
    for step in range(num_steps + 1):
      hook(step, state.params)       # evaluates at steps 0, 5, 10, ... (and at last_step if given)
      ...
    summary["gf"]["dpo_sft"] = tracker.history          # [[step, id_rate, ood_rate, gf], ...]

ID and OOD are format-following rates: the fraction of greedy responses that follow the output format
their prompt asked for (`data.format_follows(text, example.meta["format"])`). The ID set asks for the
training format (SPECS tags, `eval_id`); the OOD set asks the same kind of tasks for other formats
(`eval_ood_format`: other tag names, an "Answer:" line, JSON, a bare \boxed{}). Γ (`metrics.
generalization_factor`, β = 2) is computed on the two rates of the same step. The prompt sets are
fixed at construction, so every step is scored on the same prompts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from specs_jax.data import formats as formats_lib
from specs_jax.data.synthetic import DEFAULT_IMAGE_SIZE, LEVELS, make_split
from specs_jax.data.types import Example
from specs_jax.eval import benchmarks, metrics

__all__ = ["GFTracker", "GenerateFn", "greedy_generate_fn", "make_gf_hook"]

log = logging.getLogger(__name__)

GenerateFn = Callable[[Sequence[Example]], Sequence[str]]
"""examples -> one response text per example, in order (greedy for GF)."""


@dataclasses.dataclass
class GFTracker:
  """ID / OOD format-following rates and Γ at cold-start checkpoints.

  Attributes:
    id_examples: the in-distribution prompt set (fixed).
    ood_examples: the out-of-distribution prompt set (fixed).
    method: the cold-start method these points belong to ("sft", "dpo", "dpo_sft"), summary["gf"]'s key.
    beta: Γ's β.
    default_format: the spec used for an example whose meta["format"] is None.
    path: if set, a JSONL file that gets one {"method", "step", "id", "ood", "gf"} line per evaluation and
      from which an existing history is read at construction (so a resumed run keeps its points).
    history: [[step, id_rate, ood_rate, gf], ...] sorted by step; re-evaluating a step replaces its row.
  """

  id_examples: Sequence[Example]
  ood_examples: Sequence[Example]
  method: str = "dpo_sft"
  beta: float = 2.0
  default_format: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(formats_lib.DEFAULT_FORMAT))
  path: str | None = None
  history: list[list[float]] = dataclasses.field(default_factory=list)

  def __post_init__(self):
    if not self.id_examples or not self.ood_examples:
      raise ValueError(f"GFTracker needs non-empty ID and OOD prompt sets, got {len(self.id_examples)} and "
                       f"{len(self.ood_examples)}")
    for ex in [*self.id_examples, *self.ood_examples]:
      formats_lib.validate_format_spec(self._spec(ex))
    if self.path and os.path.exists(self.path) and not self.history:
      self.history = self.read(self.path, self.method)

  def _spec(self, ex: Example) -> Mapping[str, str]:
    return ex.meta.get("format") or self.default_format

  @classmethod
  def synthetic(cls, method: str = "dpo_sft", n_id: int = 64, n_ood: int = 64, seed: int = 0,
                ood_splits: Sequence[str] = ("eval_ood_format",), *, levels: Sequence[int] = LEVELS,
                image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE, **kwargs: Any) -> "GFTracker":
    """A tracker on the synthetic held-out splits: `eval_id` for ID, `ood_splits` (n_ood examples in all,
    split evenly) for OOD; `levels` and `image_size` go to `data.make_split`, other kwargs to the
    constructor (path, beta, ...)."""
    per = [n_ood // len(ood_splits) + (i < n_ood % len(ood_splits)) for i in range(len(ood_splits))]
    split = lambda name, k: make_split(name, k, seed, levels=levels, image_size=image_size)  # noqa: E731
    ood = [ex for name, k in zip(ood_splits, per) for ex in split(name, k)]
    return cls(split("eval_id", n_id), ood, method=method, **kwargs)

  def rates(self, id_responses: Sequence[str], ood_responses: Sequence[str]) -> tuple[float, float]:
    """(ID rate, OOD rate) of responses to the ID and OOD sets, in order."""
    for name, exs, resp in (("ID", self.id_examples, id_responses), ("OOD", self.ood_examples, ood_responses)):
      if len(resp) != len(exs):
        raise ValueError(f"{len(resp)} {name} responses for {len(exs)} {name} prompts")
    follow = lambda exs, resp: sum(formats_lib.format_follows(t, self._spec(e)) for e, t in zip(exs, resp))  # noqa: E731
    return (follow(self.id_examples, id_responses) / len(id_responses),
            follow(self.ood_examples, ood_responses) / len(ood_responses))

  def evaluate(self, step: int, generate_fn: GenerateFn) -> list[float]:
    """Generates responses for both sets with one `generate_fn` call, records and returns
    [step, id_rate, ood_rate, gf]."""
    examples = [*self.id_examples, *self.ood_examples]
    texts = list(generate_fn(examples))
    if len(texts) != len(examples):
      raise ValueError(f"generate_fn returned {len(texts)} responses for {len(examples)} prompts")
    n_id = len(self.id_examples)
    id_rate, ood_rate = self.rates(texts[:n_id], texts[n_id:])
    return self.record(step, id_rate, ood_rate)

  def record(self, step: int, id_rate: float, ood_rate: float) -> list[float]:
    """Adds a point computed elsewhere; returns [step, id_rate, ood_rate, gf]."""
    row = [int(step), float(id_rate), float(ood_rate), metrics.generalization_factor(id_rate, ood_rate, self.beta)]
    self.history = sorted([r for r in self.history if r[0] != row[0]] + [row], key=lambda r: r[0])
    if self.path:
      os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
      with open(self.path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"method": self.method, "step": row[0], "id": row[1], "ood": row[2], "gf": row[3]}) + "\n")
    log.info("GF %s step %d: ID %.1f%%, OOD %.1f%%, Γ %.1f%%", self.method, row[0], 100 * row[1], 100 * row[2],
             100 * row[3])
    return row

  @staticmethod
  def read(path: str, method: str | None = None) -> list[list[float]]:
    """History rows from a tracker's JSONL file (the last line per step wins), optionally one method's."""
    by_step: dict[int, list[float]] = {}
    with open(path, encoding="utf-8") as f:
      for line in f:
        try:
          d = json.loads(line)
          if method is None or d.get("method") == method:
            by_step[int(d["step"])] = [int(d["step"]), float(d["id"]), float(d["ood"]), float(d["gf"])]
        except (ValueError, KeyError, TypeError):
          continue                         # a torn last line from an interrupted run
    return [by_step[s] for s in sorted(by_step)]


def make_gf_hook(every_k: int, tracker: GFTracker, make_generate_fn: Callable[[Any], GenerateFn], *,
                 last_step: int | None = None) -> Callable[[int, Any], list[float] | None]:
  """A hook the cold-start loop calls as `hook(step, params)` after each step (and once before: step 0).

  Args:
    every_k: evaluate when step % every_k == 0.
    tracker: where the points go.
    make_generate_fn: params -> GenerateFn (e.g. `greedy_generate_fn(model, tokenizer, ...)`).
    last_step: also evaluate at this step (the end of training) when it is off the every_k grid.
  Returns:
    hook(step, params) -> the new [step, id, ood, gf] row, or None when the step is not evaluated.
  """
  if every_k < 1:
    raise ValueError(f"every_k must be >= 1, got {every_k}")

  def hook(step: int, params: Any) -> list[float] | None:
    if step % every_k and step != last_step:
      return None
    return tracker.evaluate(step, make_generate_fn(params))

  return hook


def greedy_generate_fn(model, tokenizer, *, image_config, max_new_tokens: int, batch_size: int,
                       system_prompt: str | None = None, **generate_kwargs: Any) -> Callable[[Any], GenerateFn]:
  """params -> GenerateFn that answers each example greedily with `benchmarks.generate_responses`.

  The examples' own messages are used as they are (synthetic ones already carry their format
  instruction), so no format instruction is appended.
  """
  def for_params(params: Any) -> GenerateFn:
    def generate(examples: Sequence[Example]) -> list[str]:
      gen = benchmarks.generate_responses(model, params, tokenizer, examples, image_config=image_config,
                                          system_prompt=system_prompt, format_instruction=None,
                                          max_new_tokens=max_new_tokens, batch_size=batch_size, n=1,
                                          temperature=0.0, **generate_kwargs)
      return [t[0] for t in gen.texts]
    return generate

  return for_params
