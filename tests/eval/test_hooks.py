"""GF tracking during the cold start: rates on fixed prompt sets, the every-k hook, persistence, a real model."""

import json

import pytest

from specs_jax import data
from specs_jax.eval import hooks, metrics


def follow(ex):
  """A response that follows the format the example asks for."""
  return data.render_response("I look at the image and count.", ex.gold, ex.meta["format"])


def scripted_generate(id_ok: int, ood_ok: int, calls: list):
  """A GenerateFn: the first id_ok ID and ood_ok OOD examples get well-formatted answers, the rest plain text."""
  def generate(examples):
    calls.append(len(examples))
    seen = {"ID": 0, "OOD": 0}
    out = []
    for ex in examples:
      kind = "ID" if ex.meta["split"] == "eval_id" else "OOD"
      ok = seen[kind] < (id_ok if kind == "ID" else ood_ok)
      seen[kind] += 1
      out.append(follow(ex) if ok else f"The answer is {ex.gold}")
    return out
  return generate


def test_tracker_rates_and_gf_by_hand(tmp_path):
  tracker = hooks.GFTracker.synthetic("sft", n_id=8, n_ood=25, seed=1, path=str(tmp_path / "gf.jsonl"))
  # OOD asks for other formats than the training tags (eval_ood_format: five OOD kinds, blocks of 5).
  assert {data.format_name(ex.meta["format"]) for ex in tracker.ood_examples} == \
      {data.format_name(f) for f in data.OOD_FORMATS}
  assert all(ex.meta["format"] == data.DEFAULT_FORMAT for ex in tracker.id_examples)
  calls = []
  row = tracker.evaluate(0, scripted_generate(id_ok=6, ood_ok=10, calls=calls))
  # ID 6/8 = .75, OOD 10/25 = .4; Γ = 5 * .75 * .4 / (4 * .75 + .4) = 1.5 / 3.4
  assert row == pytest.approx([0, 0.75, 0.4, 1.5 / 3.4]) and calls == [33]      # one generate call for both sets
  # The rule is the format each prompt asked for: a perfect training-format answer follows none of the OOD ones
  # (other tag names, an "Answer:" line, JSON, a final \boxed{} not followed by </answer>).
  id_texts = [follow(ex) for ex in tracker.id_examples]
  assert tracker.rates(id_texts, id_texts[:1] * 25) == (1.0, 0.0)


def test_hook_every_k_last_step_and_resume(tmp_path):
  path = tmp_path / "coldstart" / "gf.jsonl"
  tracker = hooks.GFTracker.synthetic("dpo_sft", n_id=4, n_ood=5, path=str(path))
  made = []

  def make_generate_fn(params):
    made.append(params)
    return scripted_generate(id_ok=min(4, params), ood_ok=min(5, params), calls=[])

  hook = hooks.make_gf_hook(5, tracker, make_generate_fn, last_step=12)
  rows = {step: hook(step, step // 3) for step in range(13)}          # "params" stand-in: quality grows with step
  assert [s for s, r in rows.items() if r is not None] == [0, 5, 10, 12]
  assert made == [0, 1, 3, 4]
  assert [r[:3] for r in tracker.history] == [[0, 0.0, 0.0], [5, 0.25, 0.2], [10, 0.75, 0.6], [12, 1.0, 0.8]]
  assert all(r[3] == pytest.approx(metrics.generalization_factor(r[1], r[2])) for r in tracker.history)
  # The JSONL survives the process: a resumed run starts from it, and re-evaluating a step replaces its point.
  lines = [json.loads(x) for x in path.read_text().splitlines()]
  assert [x["step"] for x in lines] == [0, 5, 10, 12] and {x["method"] for x in lines} == {"dpo_sft"}
  resumed = hooks.GFTracker.synthetic("dpo_sft", n_id=4, n_ood=5, path=str(path))
  assert resumed.history == tracker.history
  resumed.evaluate(10, scripted_generate(4, 5, []))
  assert [r[0] for r in resumed.history] == [0, 5, 10, 12] and resumed.history[2][1:3] == [1.0, 1.0]
  assert hooks.GFTracker.read(str(path), "dpo_sft")[2][1:3] == [1.0, 1.0]
  with pytest.raises(ValueError, match="every_k must be >= 1"):
    hooks.make_gf_hook(0, tracker, make_generate_fn)
  with pytest.raises(ValueError, match="3 responses for 9 prompts"):
    tracker.evaluate(1, lambda exs: ["x"] * 3)


def test_hook_with_the_tiny_model(jax_model, tokenizer, image_config):
  model, params = jax_model
  tracker = hooks.GFTracker.synthetic("sft", n_id=2, n_ood=2, levels=(1,), image_size=(56, 56))
  hook = hooks.make_gf_hook(2, tracker, hooks.greedy_generate_fn(
      model, tokenizer, image_config=image_config, max_new_tokens=4,
      batch_size=2, prompt_buckets=(512,), patch_buckets=(64,)))
  assert hook(1, params) is None
  step, id_rate, ood_rate, gf = hook(2, params)
  # Random weights follow no format; the point is that the loop's hook runs the real sampler end to end.
  assert step == 2 and 0 <= id_rate <= 1 and 0 <= ood_rate <= 1 and gf == metrics.generalization_factor(id_rate, ood_rate)
  assert tracker.history == [[2, id_rate, ood_rate, gf]]
