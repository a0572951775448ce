r"""Reward grading throughput: graded items per second for a batch of typical responses.

    python benchmarks/rewards.py [--n 1024] [--workers 2] [--repeats 3]

Prints one JSON line per figure:
- pool_start_s: seconds until a fresh RewardPool has graded its first item (spawn + imports).
- grade_batch_typical: items/s of `grade_batch` on N responses to N independent problems.
- grade_batch_grpo: items/s on N = P x 8 responses shaped like a GRPO batch (8 samples per prompt,
  so answers repeat within a group and are graded once).
- in_process: items/s of `accuracy_reward` + `format_reward` in this process, one thread, no timeouts.
Typical responses: the SPECS format (`<think>` of ~400 characters, `<answer> The answer is
$\boxed{X}$</answer>`) with integers, decimals, LaTeX fractions, square roots, intervals and choice
letters, about 60% correct, 10% with broken tags. Figures are medians over --repeats fresh batches.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time


def _problem(rng: random.Random) -> tuple[str, str, str]:
  """(gold, a right answer in another spelling, a wrong answer)."""
  kind = rng.choice(["int", "int", "decimal", "frac", "sqrt", "interval", "choice", "choice"])
  a, b = rng.randint(1, 99), rng.randint(2, 12)
  if kind == "int":
    return str(a), str(a), str(a + rng.randint(1, 5))
  if kind == "decimal":
    return f"{a / 4:g}", f"\\frac{{{a}}}{{4}}", f"{a / 4 + 0.5:g}"
  if kind == "frac":
    return f"\\frac{{{a}}}{{{b}}}", f"{a}/{b}", f"\\frac{{{a + 1}}}{{{b}}}"
  if kind == "sqrt":
    return f"{b}\\sqrt{{{a}}}", f"\\sqrt{{{b * b * a}}}", f"{b + 1}\\sqrt{{{a}}}"
  if kind == "interval":
    return f"[{a}, {a + b})", f"[{a},{a + b})", f"({a}, {a + b})"
  gold = rng.choice("ABCD")
  return gold, gold, rng.choice([c for c in "ABCD" if c != gold])


def _response(rng: random.Random, answer: str) -> str:
  steps = " ".join(f"Step {i}: {rng.randint(1, 99)} + {rng.randint(1, 99)} gives an intermediate value."
                   for i in range(rng.randint(5, 9)))
  text = f"<think> {steps} So the answer is {answer}. </think>\n<answer> The answer is $\\boxed{{{answer}}}$</answer>"
  if rng.random() < 0.1:
    text = text.replace("</think>", "")                     # broken format
  return text


def typical_batch(n: int, seed: int) -> tuple[list[str], list[str]]:
  """n independent problems, one response each (60% right)."""
  rng = random.Random(seed)
  texts, golds = [], []
  for _ in range(n):
    gold, right, wrong = _problem(rng)
    texts.append(_response(rng, right if rng.random() < 0.6 else wrong))
    golds.append(gold)
  return texts, golds


def grpo_batch(n: int, group: int, seed: int) -> tuple[list[str], list[str]]:
  """n // group problems with `group` responses each; a response is right or wrong (60/40), so the
  (answer, gold) pairs repeat within a group while the texts differ."""
  rng = random.Random(seed)
  texts, golds = [], []
  for _ in range(n // group):
    gold, right, wrong = _problem(rng)
    for _ in range(group):
      texts.append(_response(rng, right if rng.random() < 0.6 else wrong))
      golds.append(gold)
  return texts, golds


def _emit(metric: str, value: float, unit: str, **context) -> None:
  print(json.dumps({"bench": "rewards", "metric": metric, "value": round(value, 3), "unit": unit, **context}),
        flush=True)


def main() -> None:
  from specs_jax import rewards

  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--n", type=int, default=1024)
  ap.add_argument("--workers", type=int, default=2)
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()
  ctx = {"n": args.n, "workers": args.workers, "cpus": os.cpu_count(), "python": platform.python_version()}
  config = rewards.RewardConfig(num_workers=args.workers, deadline_s=600.0)

  t0 = time.perf_counter()
  with rewards.RewardPool(args.workers) as pool:
    rewards.grade_batch(*typical_batch(args.workers, seed=-1), config, pool=pool)
    _emit("pool_start_s", time.perf_counter() - t0, "s", **ctx)

    rates, timeouts = [], 0
    for r in range(args.repeats):
      texts, golds = typical_batch(args.n, seed=r)
      out, stats = rewards.grade_batch(texts, golds, config, pool=pool)
      rates.append(stats.items_per_s)
      timeouts += stats.timeouts + stats.crashes + stats.deadline
    _emit("grade_batch_typical", statistics.median(rates), "items/s", runs=[round(x) for x in rates],
          unique=stats.unique, mean_reward=round(float(out.total.mean()), 3), failures=timeouts, **ctx)

    rates = []
    for r in range(args.repeats):
      texts, golds = grpo_batch(args.n, group=8, seed=100 + r)
      _, stats = rewards.grade_batch(texts, golds, config, pool=pool)
      rates.append(stats.items_per_s)
    _emit("grade_batch_grpo", statistics.median(rates), "items/s", runs=[round(x) for x in rates], unique=stats.unique,
          group=8, **ctx)

  texts, golds = typical_batch(args.n, seed=7)
  t0 = time.perf_counter()
  for t, g in zip(texts, golds):
    rewards.format_reward(t)
    rewards.accuracy_reward(t, g)
  _emit("in_process", args.n / (time.perf_counter() - t0), "items/s", threads=1, **ctx)


if __name__ == "__main__":
  main()
