"""The prompts pairs are built from: a seeded subset of the RL pool, with the SPECS format instruction."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import random
from collections.abc import Sequence

from specs_jax.data import formats as formats_lib
from specs_jax.data.types import Example, load_image
from specs_jax.distill.config import DistillConfig
from specs_jax.distill.stats import DistillStats
from specs_jax.rewards import accuracy

__all__ = ["prepare_prompts"]

log = logging.getLogger(__name__)


def _with_format_instruction(ex: Example) -> Example:
  messages = copy.deepcopy(ex.messages)
  user = next(m for m in reversed(messages) if m["role"] == "user")
  if isinstance(user["content"], str):
    user["content"] = f"{user['content']}\n{formats_lib.SPECS_INSTRUCTION}"
  else:
    texts = [p for p in user["content"] if p.get("type") == "text"]
    if texts:
      texts[-1]["text"] = f"{texts[-1]['text']}\n{formats_lib.SPECS_INSTRUCTION}"
    else:
      user["content"].append({"type": "text", "text": formats_lib.SPECS_INSTRUCTION})
  meta = {**ex.meta, "format": dict(formats_lib.DEFAULT_FORMAT), "instruction": formats_lib.SPECS_INSTRUCTION}
  return dataclasses.replace(ex, messages=messages, meta=meta)


def _with_system_prompt(ex: Example, system_prompt: str) -> Example:
  if ex.messages and ex.messages[0]["role"] == "system":
    raise ValueError(f"{ex.id}: DistillConfig.system_prompt is set but the prompt already has a system message")
  system = {"role": "system", "content": [{"type": "text", "text": system_prompt}]}
  return dataclasses.replace(ex, messages=[system, *copy.deepcopy(ex.messages)])


def _prompt_key(ex: Example) -> str:
  h = hashlib.sha256(json.dumps([ex.messages, ex.gold], sort_keys=True, ensure_ascii=False).encode())
  for im in ex.images:
    im = load_image(im)
    h.update(f"{im.mode}{im.size}".encode())
    h.update(im.tobytes())
  return h.hexdigest()


def prepare_prompts(examples: Sequence[Example], config: DistillConfig,
                    stats: DistillStats | None = None) -> list[Example]:
  """The prompts pairs are built from: a (seeded) subset of `examples` with the SPECS format instruction.

  Skipped, and counted in `stats.prompts`: a gold the grader cannot read ("bad_gold"), a prompt that asks
  for another output format or, with add_format_instruction=False, for none ("other_format"), a repeat
  ("duplicate", with dedupe). Prompts past `num_prompts` are counted as "beyond_subset".
  """
  stats = stats if stats is not None else DistillStats()
  order = list(range(len(examples)))
  if config.shuffle:
    random.Random(f"specs_jax.distill.subset:{config.seed}").shuffle(order)
  stats.prompts["given"] += len(examples)
  out: list[Example] = []
  seen: set[str] = set()
  for n_seen, i in enumerate(order):
    if config.num_prompts is not None and len(out) >= config.num_prompts:
      stats.prompts["beyond_subset"] += len(order) - n_seen
      break
    ex = examples[i]
    try:
      accuracy.parse_gold(ex.gold, config.grade)
    except accuracy.GoldError as e:
      log.warning("distill: skipping %s: %s", ex.id, e)
      stats.prompts["bad_gold"] += 1
      continue
    fmt = ex.meta.get("format")
    if fmt is None and config.add_format_instruction:
      ex = _with_format_instruction(ex)
    elif not formats_lib.is_default_format(fmt):
      stats.prompts["other_format"] += 1
      continue
    if config.system_prompt is not None:
      ex = _with_system_prompt(ex, config.system_prompt)
    if config.dedupe:
      key = _prompt_key(ex)
      if key in seen:
        stats.prompts["duplicate"] += 1
        continue
      seen.add(key)
    out.append(ex)
  stats.prompts["used"] += len(out)
  return out
