"""build_pairs with a scripted sampler: every pair's invariants, stats that add up, and each knob."""

import collections
import dataclasses

import jax
import pytest
from distill_helpers import check_pair, scripted_sampler

from specs_jax.data import formats, synthetic
from specs_jax.distill import DistillConfig, build_pairs, prepare_prompts
from specs_jax.distill.stats import CHOSEN_FILTERS, REJECTED_FILTERS, SELECTION, DistillStats
from specs_jax.rewards import OpenAIJudge, RuleJudge, Verdict

B = "\\boxed"


def run(examples, sample_fn=None, judge_obj=None, **kw):
  config = DistillConfig(**{"batch_size": 8, "max_pairs": None, **kw})
  return build_pairs(None, None, None, None, None, examples, config, jax.random.key(0), judge=judge_obj,
                     sample_fn=sample_fn or scripted_sampler())


def assert_adds_up(stats, k_chosen=4, k_rejected=4):
  d = stats.to_dict()
  for side, filters in (("chosen", CHOSEN_FILTERS), ("rejected", REJECTED_FILTERS)):
    s = d[side]
    assert s["candidates"] == s["kept"] + sum(s["dropped"].values()), s        # must-show 3
    assert set(s["dropped"]) == set(filters) | set(SELECTION)
    survivors = s["candidates"]
    for f in filters:                                            # each filter sees the previous one's survivors
      assert s["entered"][f] == survivors
      if survivors:
        assert s["pass_rate"][f] == pytest.approx((survivors - s["dropped"][f]) / survivors)
      survivors -= s["dropped"][f]
    assert survivors == s["passed_filters"]
    assert s["kept"] == d["pairs"]
  assert sum(d["corruptions"].values()) == d["pairs"]
  sampled = d["prompts"]["used"] - d["prompts"].get("not_sampled", 0)
  assert d["chosen"]["candidates"] == sampled * k_chosen and d["rejected"]["candidates"] == sampled * k_rejected
  assert sum(m["samples"] for m in d["models"].values()) == sampled * (k_chosen + k_rejected)
  assert sum(d["corruptions_all"].values()) == d["rejected"]["passed_filters"]


@pytest.mark.parametrize("mode", ["decoupled", "coupled"])
def test_every_pair_satisfies_the_invariants(train_examples, mode):
  sample_fn = scripted_sampler(base_error=0.2 if mode == "decoupled" else 0.7)
  pairs, stats = run(train_examples, sample_fn, pair_mode=mode)
  assert len(pairs) >= (25 if mode == "decoupled" else 15), stats.to_dict()
  by_id = {ex.id: ex for ex in train_examples}
  for pair in pairs:                                                             # must-show 1, on every pair
    check_pair(pair, by_id[pair.id], mode)
    assert pair.meta["chosen_model"] == "policy" and pair.meta["rejected_model"] == "base"
  assert len({p.id for p in pairs}) == len(pairs)
  assert_adds_up(stats)
  assert set(stats.corruptions) <= set(("remove_all_tags", "remove_answer_tags", "remove_think_tags", "answer_line",
                                        "misplace_tags"))
  assert stats.chosen.dropped["answer"] > 0 and stats.rejected.dropped["answer"] > 0   # the filters did work


def test_deterministic(train_examples):
  a, _ = run(train_examples[:16])
  b, _ = run(train_examples[:16])
  assert [(p.id, p.chosen, p.rejected) for p in a] == [(p.id, p.chosen, p.rejected) for p in b]


def _one_prompt(gold="12"):
  ex = synthetic.make_split("train", 1, seed=3)[0]
  return dataclasses.replace(ex, gold=gold)


def test_each_filter_drops_what_it_should():
  """Hand-written candidates, one per way to fail, so every count is known (must-show 3)."""
  canon = f"<think>3 + 9 = 12, so the total is 12.</think>\n<answer> The answer is ${B}{{12}}$</answer>"
  chosen = [
      canon,
      canon,                                                                      # duplicate
      f"<think>3 + 8 = 11.</think>\n<answer> The answer is ${B}{{11}}$</answer>",  # wrong answer
      f"<think>3 + 8 = 11, so the answer is 11.</think>\n<answer> The answer is ${B}{{12}}$</answer>",  # inconsistent
      "3 + 9 = 12. Thus, the answer is 12.",                                       # untagged: supplement refuses
      f"<think>3 + 9 = 12, so the total is twelve: 12.</think>\n<answer>12</answer>",  # repaired by the supplement
  ]
  rejected = ["3 + 9 = 12. Thus, the answer is 12.", "3 + 9 = 12. Thus, the answer is 12.",
              "3 + 8 = 11. Thus, the answer is 11.", "I am not sure.", "Adding: 12. The answer is 12."]

  def sample_fn(name, prompts, k, key):
    return [list(chosen if name == "policy" else rejected) for _ in prompts]

  pairs, stats = run([_one_prompt()], sample_fn, k_chosen=len(chosen), k_rejected=len(rejected), pick="longest",
                     corruption_weights={"remove_all_tags": 1.0})
  assert stats.chosen.candidates == 6 and stats.rejected.candidates == 5
  assert dict(+stats.chosen.dropped) == {"duplicate": 1, "answer": 1, "judge": 1, "supplement": 1, "not_picked": 1}
  assert dict(+stats.rejected.dropped) == {"duplicate": 1, "answer": 2, "not_picked": 1}
  assert stats.chosen.kept == stats.rejected.kept == len(pairs) == 1
  assert_adds_up(stats, len(chosen), len(rejected))
  # "longest" picks by the final text: the repaired candidate is longer than the canonical one
  assert pairs[0].meta["chosen_index"] == 5 and pairs[0].meta["chosen_repairs"] == ["answer_rewritten"]
  assert pairs[0].meta["rejected_index"] == 0

  # coupled: the wrong rejected answer is the one that passes
  pairs, stats = run([_one_prompt()], sample_fn, k_chosen=len(chosen), k_rejected=len(rejected), pair_mode="coupled")
  assert dict(+stats.rejected.dropped) == {"duplicate": 1, "answer": 3}
  assert pairs[0].meta["rejected_answer"] == "11"

  # no verification (the ablation): the inconsistent response is no longer dropped
  _, stats = run([_one_prompt()], sample_fn, k_chosen=len(chosen), k_rejected=len(rejected), judge="none")
  assert stats.chosen.dropped["judge"] == 0 and stats.chosen.entered["judge"] == 4


def test_judge_without_verdict_is_dropped_and_counted():
  class Silent:
    def check_consistency(self, questions, responses):
      return [Verdict(None, "judge", error="timeout") for _ in responses]

  pairs, stats = run([_one_prompt("4")], judge_obj=Silent(),
                     sample_fn=lambda name, prompts, k, key: [[
                         f"<think>2+2=4</think>\n<answer> The answer is ${B}{{4}}$</answer>"
                         if name == "policy" else "2+2=4. Thus, the answer is 4."] * k for _ in prompts])
  assert pairs == [] and stats.judge_no_verdict == 1 and stats.chosen.dropped["judge"] == 1
  assert stats.rejected.dropped["no_partner"] == 1
  assert_adds_up(stats)


def test_judges_from_the_config():
  from specs_jax.distill.preference import _make_judge

  assert isinstance(_make_judge(DistillConfig()), RuleJudge)
  assert _make_judge(DistillConfig(judge="none")) is None
  judge = _make_judge(DistillConfig(judge="openai", judge_kwargs={"base_url": "http://127.0.0.1:9/v1", "model": "m"}))
  assert isinstance(judge, OpenAIJudge) and judge.config.model == "m"


def test_shortest_and_longest_pick_the_extremes():
  chosen = [f"<think>{'x' * n} so 4</think>\n<answer> The answer is ${B}{{4}}$</answer>" for n in (5, 1, 9, 3)]
  rejected = [f"{'y' * n}. Thus, the answer is 4." for n in (4, 8, 2)]

  def sample_fn(name, prompts, k, key):
    return [list(chosen if name == "policy" else rejected) for _ in prompts]

  for rule, ci, ri in (("shortest", 1, 2), ("longest", 2, 1)):
    pairs, _ = run([_one_prompt("4")], sample_fn, pick=rule, k_chosen=4, k_rejected=3,
                   corruption_weights={"remove_all_tags": 1.0})
    assert (pairs[0].meta["chosen_index"], pairs[0].meta["rejected_index"]) == (ci, ri), rule
  picks = {run([_one_prompt("4")], sample_fn, pick="random", k_chosen=4, k_rejected=3, seed=s)[0][0]
           .meta["chosen_index"] for s in range(12)}
  assert len(picks) > 1                                                          # random really varies with the seed


def test_max_pairs_stops_sampling(train_examples):
  log = []
  pairs, stats = run(train_examples, scripted_sampler(log=log), max_pairs=5, batch_size=4)
  assert len(pairs) == 5
  sampled = sum(len(ids) for name, ids, k in log if name == "base")
  assert sampled < len(train_examples) and stats.prompts["not_sampled"] == len(train_examples) - sampled
  assert_adds_up(stats)
  assert stats.chosen.dropped["max_pairs"] + stats.chosen.dropped["no_partner"] + stats.chosen.dropped["not_picked"] > 0


def test_batches_and_model_names(train_examples):
  log = []
  run(train_examples[:10], scripted_sampler(log=log), batch_size=4, k_chosen=2, k_rejected=3)
  assert [(n, len(ids), k) for n, ids, k in log] == [("policy", 4, 2), ("base", 4, 3)] * 2 + [("policy", 2, 2),
                                                                                            ("base", 2, 3)]
  for source, name in (("base", "base"), ("teacher", "teacher")):
    log.clear()
    pairs, stats = run(train_examples[:4], scripted_sampler(log=log), chosen_source=source)
    assert [n for n, _, _ in log] == [name, "base"]
    assert all(p.meta["chosen_model"] == name and p.meta["chosen_source"] == source for p in pairs)
    assert stats.models[name]["roles"][0] == "chosen"


def test_prompt_preparation(train_examples):
  ex = train_examples[0]
  no_instr = dataclasses.replace(ex, id="bare", messages=[{"role": "user", "content": [
      {"type": "image"}, {"type": "text", "text": "Describe the picture."}]}], meta={**ex.meta, "format": None})
  other = dataclasses.replace(ex, id="json", meta={**ex.meta, "format": {"kind": "json"}})
  bad = dataclasses.replace(ex, id="bad", gold="")
  dup = dataclasses.replace(ex, id="dup")
  stats = DistillStats()
  out = prepare_prompts([ex, no_instr, other, bad, dup] + train_examples[1:4], DistillConfig(shuffle=False,
                                                                                              num_prompts=4), stats)
  assert [e.id for e in out] == [ex.id, "bare", train_examples[1].id, train_examples[2].id]
  assert out[1].messages[0]["content"][-1]["text"].endswith(formats.SPECS_INSTRUCTION)
  assert out[1].meta["format"] == formats.DEFAULT_FORMAT
  assert no_instr.meta["format"] is None                                         # the input is not modified
  assert dict(stats.prompts) == {"given": 8, "used": 4, "other_format": 1, "bad_gold": 1, "duplicate": 1,
                                 "beyond_subset": 1}
  shuffled = prepare_prompts(train_examples, DistillConfig(num_prompts=10, seed=1))
  assert len(shuffled) == 10 and [e.id for e in shuffled] != [e.id for e in train_examples[:10]]
  sys_prompt = prepare_prompts(train_examples[:1], DistillConfig(system_prompt="Be brief."))
  assert sys_prompt[0].messages[0] == {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}


def test_bad_configs_and_samplers(train_examples):
  for kw, match in (({"chosen_source": "oracle"}, "chosen_source"), ({"pair_mode": "mixed"}, "pair_mode"),
                    ({"pick": "median"}, "pick"), ({"judge": "gpt"}, "judge"), ({"k_chosen": 0}, "k_chosen"),
                    ({"top_p": 0.0}, "top_p"), ({"corruption_weights": {"x": 1.0}}, "unknown corruption")):
    with pytest.raises(ValueError, match=match):
      DistillConfig(**kw)
  with pytest.raises(ValueError, match="returned .* responses for 2 prompts, expected 4 each"):
    run(train_examples[:2], lambda name, prompts, k, key: [["x"] * 3 for _ in prompts])
  with pytest.raises(ValueError, match="needs the model and params"):
    build_pairs(None, None, None, None, None, train_examples[:2], DistillConfig(), 0)
  with pytest.raises(ValueError, match="teacher_dir"):
    build_pairs(None, None, object(), object(), None, train_examples[:2], DistillConfig(chosen_source="teacher"), 0)


def test_corruption_mix_in_the_stats(train_examples):
  _, stats = run(train_examples, corruption_weights={"answer_line": 1.0, "misplace_tags": 1.0})
  assert set(stats.corruptions_all) == {"answer_line", "misplace_tags"}
  assert sum(stats.misplace_variants.values()) == stats.corruptions["misplace_tags"]
  report = stats.to_dict()
  assert report["lengths"]["chosen_chars"]["n"] == report["pairs"]
  assert sum(report["lengths"]["chosen_chars"]["counts"]) == report["pairs"]
  assert report["lengths"]["policy_samples_chars"]["n"] == report["chosen"]["candidates"]
  assert collections.Counter(report["repairs"])["none"] >= 1


def test_grading_in_a_reward_pool(train_examples):
  """With a pool, answers go to `RewardPool.run` once per distinct (answer, gold); a job that does not
  finish "ok" scores 0 (here a fake pool stands in for the worker processes)."""
  from specs_jax.rewards import grade_answer

  class FakePool:
    def __init__(self):
      self.jobs = []

    def run(self, jobs, grader, config, *, item_timeout_s, kill_grace_s, deadline):
      assert grader == "math" and item_timeout_s > 0
      self.jobs.extend(jobs)
      return [("ok", grade_answer(a, g, config)) if a != "13" else ("timeout", 1.0) for a, g in jobs], [""] * len(jobs)

  texts = {"policy": [f"<think>so 12</think>\n<answer> The answer is ${B}{{12}}$</answer>"] * 2,
           "base": ["So 12. Thus, the answer is 12.", "So 13. Thus, the answer is 13."]}
  pool = FakePool()
  config = DistillConfig(k_chosen=2, k_rejected=2, dedupe=False, pair_mode="coupled")
  pairs, stats = build_pairs(None, None, None, None, None, [_one_prompt("12")], config, 0, pool=pool,
                             sample_fn=lambda name, prompts, k, key: [list(texts[name]) for _ in prompts])
  assert sorted(set(pool.jobs)) == [("12", "12"), ("13", "12")] and len(pool.jobs) == 3   # chosen deduped to 1 job
  # "13" timed out: it scores 0, i.e. wrong, so in coupled mode it is the rejected answer
  assert pairs[0].meta["rejected_answer"] == "13"
  assert_adds_up(stats, 2, 2)
