"""Templated reasoning texts: correct by default, wrong at the requested rate, in the requested format."""

import random

import pytest

from specs_jax.data import formats, synthetic
from specs_jax.data.reasoning import corpus, reasoning_sample, reasoning_text
from specs_jax.data.types import Example

ALL_FAMILIES = synthetic.ID_FAMILIES + synthetic.OOD_FAMILIES


def examples(family, n=150, seed=5):
  split = "eval_ood_task" if family in synthetic.OOD_FAMILIES else "train"
  return synthetic.make_split(split, n, seed, families=[family])


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_correct_texts(family):
  for ex in examples(family):
    tagged = reasoning_text(ex, "tagged")
    assert formats.format_follows(tagged, formats.DEFAULT_FORMAT), tagged
    assert tagged.startswith("<think>") and tagged.endswith(f"\n<answer> The answer is $\\boxed{{{ex.gold}}}$</answer>")
    assert formats.extract_answer_for_format(tagged) == ex.gold
    plain = reasoning_text(ex, "plain")
    assert plain.endswith(f" Thus, the answer is {ex.gold}.")
    assert "<think>" not in plain and not formats.format_follows(plain)
    # The two styles share the chain of reasoning.
    assert reasoning_sample(ex, "tagged").chain == reasoning_sample(ex, "plain").chain


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_errors_give_wrong_answers_consistently(family):
  for ex in examples(family, 100):
    r = reasoning_sample(ex, "tagged", error_rate=1.0)
    assert not r.correct and r.answer != ex.gold
    assert formats.extract_answer_for_format(r.text) == r.answer  # the wrong answer is the one given
    assert r.answer in r.chain  # the chain argues for the answer it gives


def test_error_rate_is_respected():
  exs = synthetic.make_split("train", 1000, seed=6)
  rng = random.Random(0)
  wrong = sum(not reasoning_sample(ex, "plain", error_rate=0.3, rng=rng).correct for ex in exs)
  assert 255 <= wrong <= 345  # 300 +- 3 sd of Binomial(1000, 0.3)


@pytest.mark.parametrize("spec", formats.OOD_FORMATS, ids=formats.format_name)
def test_other_formats(spec):
  for ex in synthetic.make_split("eval_ood_format", 20, seed=7):
    text = reasoning_text(ex, spec)
    assert formats.format_follows(text, spec) and not formats.format_follows(text, formats.DEFAULT_FORMAT)
    assert formats.extract_answer_for_format(text, spec) == ex.gold


def test_deterministic():
  ex = synthetic.make_split("train", 3, seed=8)[2]
  assert reasoning_text(ex, "plain", 0.5) == reasoning_text(ex, "plain", 0.5)  # default rng seeded by example id
  a = [reasoning_text(ex, "tagged", 0.5, random.Random(1)) for _ in range(3)]
  assert a[0] == a[1] == a[2]


def test_rejects_non_synthetic_examples_and_bad_styles():
  ex = Example("x/1", [{"role": "user", "content": [{"type": "text", "text": "q"}]}], [], "1", "integer", "x", {})
  with pytest.raises(ValueError, match="synthetic"):
    reasoning_text(ex)
  syn = synthetic.make_split("train", 1)[0]
  with pytest.raises(ValueError):
    reasoning_text(syn, "shouting")
  with pytest.raises(ValueError):
    reasoning_text(syn, "plain", error_rate=1.5)


def test_corpus():
  texts = list(corpus(300, seed=0))
  assert texts == list(corpus(300, seed=0)) and texts != list(corpus(300, seed=1))
  assert len(texts) == 300 and all(isinstance(t, str) and t for t in texts)
  joined = "\n".join(texts)
  for needle in ("<think>", "Thus, the answer is", "How many", "Answer:", '"reasoning"', "<final>",
                 "The response need to enclose"):
    assert needle in joined, needle
