"""Helpers for the pair-building tests: scripted samplers (synthetic tasks answered by the reasoning-text
writer) and the pair invariants. Imported by name: conftest.py puts this directory on sys.path."""

import random

import jax
import numpy as np

from specs_jax.data import reasoning
from specs_jax.data.types import load_image
from specs_jax.distill import parse
from specs_jax.rewards import accuracy, format_reward


def seed_of(key) -> int:
  return int(jax.random.randint(key, (), 0, 2**31 - 1))


def scripted_sampler(policy_error=0.2, base_error=0.2, base_tagged=0.3, defects=0.2, log=None):
  """A `sample_fn` writing synthetic-task responses: π_zero ("policy", "teacher") answers in the SPECS tags
  (sometimes with a small tag defect), the base model mostly in plain prose; both wrong at the given rates."""

  def sample_fn(model_name, prompts, k, key):
    rng = random.Random(seed_of(key))
    if log is not None:
      log.append((model_name, [ex.id for ex in prompts], k))
    out = []
    for ex in prompts:
      texts = []
      for _ in range(k):
        if model_name in ("policy", "teacher"):
          text = reasoning.reasoning_text(ex, "tagged", error_rate=policy_error, rng=rng)
          if rng.random() < defects:   # a small defect for the supplement to repair
            text = rng.choice([text.replace("</answer>", ""), text.replace("</think>", "", 1),
                               "Sure! " + text, text + " Hope this helps."])
        else:
          style = "tagged" if rng.random() < base_tagged else "plain"
          text = reasoning.reasoning_text(ex, style, error_rate=base_error, rng=rng)
        texts.append(text)
      out.append(texts)
    return out

  return sample_fn


def same_images(a, b) -> bool:
  if len(a) != len(b):
    return False
  for x, y in zip(a, b):
    x, y = load_image(x), load_image(y)
    if x.size != y.size or not np.array_equal(np.asarray(x), np.asarray(y)):
      return False
  return True


def check_pair(pair, example, mode="decoupled"):
  """Every invariant a pair must satisfy (must-show 1)."""
  gold = example.gold
  assert format_reward(pair.chosen) == 1.0, pair.chosen
  assert accuracy.accuracy_reward(pair.chosen, gold) == 1.0, (pair.chosen, gold)
  assert format_reward(pair.rejected) == 0.0, pair.rejected
  answer = parse.final_answer(pair.rejected)
  assert answer is not None and answer in pair.rejected, pair.rejected
  assert accuracy.grade_answer(answer, gold) == (1.0 if mode == "decoupled" else 0.0), (pair.rejected, gold)
  assert pair.messages == example.messages                 # same prompt (with the format instruction) ...
  assert same_images(pair.images, example.images)          # ... and the same images
  assert pair.meta["gold"] == gold and pair.meta["pair_mode"] == mode
  assert pair.chosen != pair.rejected
