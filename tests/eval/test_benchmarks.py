"""The harness end to end on fixture files in each benchmark style, with the tiny random model; scoring
against the rewards module; the judge fallback; RBF from a model forward."""

import io
import json

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from specs_jax import data, rewards, sampling
from specs_jax.eval import benchmarks, branching, metrics
from specs_jax.models import qwen2_5_vl
from specs_jax.processing import batching, chat

# One static shape for every run in this file: the sampler compiles once per (batch, n, buckets).
BUCKETS = dict(prompt_buckets=(512,), patch_buckets=(64,))
BATCH = 2
NEW_TOKENS = 6
HINT = "Hint: Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, 3, at the end."


def png_bytes(colour, size=(56, 56)) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", size, colour).save(buf, format="PNG")
  return buf.getvalue()


def write_jsonl(rows, path):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


@pytest.fixture(scope="module")
def bench_files(tmp_path_factory):
  """Three rows per style, in each benchmark's own schema (cf. tests/data/test_dataset_readers.py)."""
  root = tmp_path_factory.mktemp("bench")
  (root / "images").mkdir()
  for name, colour in (("a", (200, 30, 30)), ("b", (30, 200, 30)), ("c", (30, 30, 200))):
    (root / "images" / f"{name}.png").write_bytes(png_bytes(colour))
  meta = {"category": "math-targeted-vqa", "task": "geometry problem solving", "skills": ["geometry reasoning"]}
  vista = {"pid": "1", "question": "Find x.", "image": "images/a.png", "decoded_image": None, "choices": None,
           "unit": None, "precision": None, "answer": "3", "question_type": "free_form", "answer_type": "integer",
           "metadata": meta, "query": f"{HINT}\nQuestion: Find x."}
  vista_rows = [vista,
                {**vista, "pid": "2", "choices": ["145°", "135°"], "answer": "135°", "question_type": "multi_choice",
                 "answer_type": "text", "query": None, "metadata": {**meta, "category": "general-vqa"}},
                {**vista, "pid": "3", "answer": "1.45", "answer_type": "float", "precision": 2.0,
                 "query": "Hint: two decimals.\nQuestion: Find y."}]
  pq.write_table(pa.Table.from_pylist(vista_rows), root / "mathvista.parquet")
  verse = {"sample_index": "1", "problem_index": "1", "problem_version": "Vision Only", "question": "",
           "image": "images/b.png", "answer": "A", "question_type": "multi-choice",
           "metadata": {"subject": "plane geometry", "subfield": "angle"},
           "query_cot": "According to the question shown in the image, please first conduct reasoning."}
  write_jsonl([verse, {**verse, "sample_index": "2", "answer": "5", "question_type": "free-form"},
               {**verse, "sample_index": "3", "answer": "C", "metadata": {"subject": "solid geometry"}}],
              root / "mathverse.jsonl")
  vision = {"id": "7", "question": "<image1>Which area is the largest?", "options": ["1", "2", "3", "4", "5"],
            "image": "images/c.png", "answer": "C", "level": 3, "subject": "metric geometry - area"}
  write_jsonl([vision, {**vision, "id": "8", "options": [], "answer": "12", "subject": "algebra"},
               {**vision, "id": "9", "answer": "E"}], root / "mathvision.jsonl")
  mmmu = {"id": "validation_Art_Theory_1", "question": "<image 1> and <image 2>: which painting is older?",
          "options": "['the first', 'the second', 'same age', 'unknown']", "image_1": "images/a.png",
          "image_2": "images/b.png", "answer": "B", "question_type": "multiple-choice", "subfield": "Art History"}
  write_jsonl([mmmu, {**mmmu, "id": "validation_Math_2", "options": "[]", "answer": "12", "question_type": "open",
                      "image_2": None, "subfield": None},
               {**mmmu, "id": "validation_Math_3", "image_2": None, "answer": "D", "subfield": None}],
              root / "mmmu.jsonl")
  return {"mathvista": root / "mathvista.parquet", "mathverse": root / "mathverse.jsonl",
          "mathvision": root / "mathvision.jsonl", "mmmu": root / "mmmu.jsonl"}


def assert_consistent_with_rewards(res, examples):
  """Every recorded score is what the rewards module gives for the recorded response."""
  for rec, ex in zip(res["records"], examples):
    cfg = rewards.GradeConfig(float_rounding=ex.meta["precision"]) if ex.meta.get("precision") is not None \
        else rewards.GradeConfig()
    for text, extracted, correct, fmt in zip(rec["responses"], rec["extracted"], rec["correct"], rec["format_ok"]):
      assert extracted == rewards.extract_answer(text)
      assert correct == (rewards.accuracy_reward(text, ex.gold, cfg) == 1.0)
      assert fmt == (rewards.format_reward(text) == 1.0)
    assert rec["accuracy"] == pytest.approx(np.mean(rec["correct"]))


def test_harness_on_each_style_greedy_then_sampled(jax_model, tokenizer, image_config, bench_files, tmp_path):
  model, params = jax_model
  for style, path in bench_files.items():
    examples = benchmarks.load_benchmark(path, style)
    assert [ex.source for ex in examples] == [style] * 3, style
    res = benchmarks.run_benchmark(model, params, tokenizer, examples, image_config=image_config,
                                   system_prompt="Solve the question.", format_instruction=data.SPECS_INSTRUCTION,
                                   n=1, temperature=0.0, max_new_tokens=NEW_TOKENS, batch_size=BATCH, name=style,
                                   **BUCKETS)
    assert res["benchmark"] == style and res["n"] == 3 and res["n_samples"] == 1 and "pass@k" not in res
    assert [r["id"] for r in res["records"]] == [ex.id for ex in examples]
    for rec, ex in zip(res["records"], examples):
      assert len(rec["responses"]) == len(rec["correct"]) == len(rec["format_ok"]) == len(rec["num_tokens"]) == 1
      assert 1 <= rec["num_tokens"][0] <= NEW_TOKENS and rec["gold"] == ex.gold and rec["error"] is None
      # The benchmark's own text (MathVista's hint) is kept and the format instruction follows it.
      assert rec["prompt"].startswith(ex.question) and rec["prompt"].endswith(data.SPECS_INSTRUCTION)
    assert_consistent_with_rewards(res, examples)
    assert res["accuracy"] == pytest.approx(np.mean([r["correct"][0] for r in res["records"]]))
    assert sum(c["n"] for c in res["by_category"].values()) == 3
    if style == "mathvista":
      assert HINT in res["records"][0]["prompt"]
      assert set(res["by_category"]) == {"math-targeted-vqa", "general-vqa"}
    benchmarks.write_results(tmp_path / f"{style}.json", res)
    assert json.loads((tmp_path / f"{style}.json").read_text())["records"][2]["id"] == examples[2].id

  # Static shapes: a second pass over the same benchmarks compiles nothing new, and greedy is deterministic.
  compiles = sampling.compile_counts()
  for style, path in bench_files.items():
    again = benchmarks.run_benchmark(model, params, tokenizer, benchmarks.load_benchmark(path, style),
                                     image_config=image_config, system_prompt="Solve the question.",
                                     format_instruction=data.SPECS_INSTRUCTION, max_new_tokens=NEW_TOKENS,
                                     batch_size=BATCH, **BUCKETS)
    first = json.loads((tmp_path / f"{style}.json").read_text())
    assert [r["responses"] for r in again["records"]] == [r["responses"] for r in first["records"]]
  assert sampling.compile_counts() == compiles

  # n = 2 samples at temperature 1 (MMMU: two images in the first prompt), with the branching factor.
  examples = benchmarks.load_benchmark(bench_files["mmmu"], "mmmu")
  res = benchmarks.run_benchmark(model, params, tokenizer, examples, image_config=image_config, system_prompt=None,
                                 format_instruction=data.SPECS_INSTRUCTION, n=2, temperature=1.0,
                                 max_new_tokens=NEW_TOKENS, batch_size=BATCH, seed=3, rbf_top_p=0.95, **BUCKETS)
  assert set(res["pass@k"]) == {"1", "2"}
  assert all(len(r["responses"]) == 2 for r in res["records"])
  assert res["pass@k"]["1"] == pytest.approx(res["accuracy"])
  assert res["pass@k"]["2"] == pytest.approx(np.mean([any(r["correct"]) for r in res["records"]]))
  assert_consistent_with_rewards(res, examples)
  # A random tiny model spreads its mass widely: the nucleus holds many tokens (exact values: the RBF test).
  assert 10.0 < res["rbf"] <= model.config.text.vocab_size
  # Two samples of one prompt differ (the rng is used) in at least one prompt.
  assert any(r["responses"][0] != r["responses"][1] for r in res["records"])
  summary = benchmarks.summary_entry(res)
  assert "records" not in summary and summary["n"] == 3 and json.dumps(summary)


def test_prompt_messages_system_prompt_and_instruction():
  ex = data.Example("x/1", [{"role": "system", "content": "own system"},
                            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}],
                    [None], "3", "integer", "x", {"question": "Q?"})
  kept = benchmarks.prompt_messages(ex, None, None)
  assert kept == ex.messages and kept is not ex.messages
  msgs = benchmarks.prompt_messages(ex, "SYS", "FORMAT")
  assert msgs[0] == {"role": "system", "content": "SYS"} and len(msgs) == 2
  assert msgs[1]["content"] == [{"type": "image"}, {"type": "text", "text": "Q?\nFORMAT"}]
  assert ex.messages[1]["content"][1]["text"] == "Q?"                     # the example is not modified


def _examples():
  mk = lambda i, gold, **meta: data.Example(f"t/{i}", [], [], gold, "integer", "t", {"question": f"q{i}", **meta})  # noqa: E731
  return [mk(0, "3"), mk(1, "B"), mk(2, "1.45", precision=2), mk(3, "12"), mk(4, "red cube"), mk(5, "not a gold \\frac{")]


RESPONSES = [
    ["<think>x</think>\n<answer> The answer is $\\boxed{3}$</answer>",   # tags + box: correct, format ok
     "I think it is \\boxed{3}.",                                          # box without tags: correct, format not ok
     "<think>x</think><answer>\\boxed{3} or \\boxed{4}</answer>"],         # two boxes: no answer
    ["<think>x</think><answer>(B)</answer>", "<think>x</think><answer>A</answer>", "B"],
    ["<answer>\\boxed{1.4499}</answer>", "<answer>1.46</answer>", "nothing"],  # precision 2: 1.4499 -> 1.45
    ["after counting, the answer is 12", "<answer>11</answer>", ""],        # untagged: judge may rescue
    ["<answer>the red cube</answer>", "<answer>blue</answer>", "<answer>red cube</answer>"],
    ["<answer>1</answer>", "<answer>2</answer>", "<answer>3</answer>"],
]


def test_score_responses_by_rule_and_with_judge():
  exs = _examples()
  got = benchmarks.score_responses(exs, RESPONSES)
  assert [s["correct"] for s in got] == [[True, True, False], [True, False, False], [True, False, False],
                                         [False, False, False], [False, False, True], [False, False, False]]
  assert got[0]["format_ok"] == [True, False, True] and got[0]["extracted"] == ["3", "3", None]  # tags fine, answer ambiguous
  assert got[5]["error"] is not None and "cannot be parsed" in got[5]["error"]
  for ex, texts, s in zip(exs[:5], RESPONSES, got):
    cfg = rewards.GradeConfig(float_rounding=ex.meta.get("precision", 6))
    assert s["correct"] == [rewards.accuracy_reward(t, ex.gold, cfg) == 1.0 for t in texts]
  # Without the item's precision the default 6-decimal comparison rejects 1.4499.
  assert benchmarks.score_responses(exs[2:3], RESPONSES[2:3], use_precision=False)[0]["correct"][0] is False

  judged = benchmarks.score_responses(exs, RESPONSES, judge=rewards.make_judge("rule"))
  # Untagged "the answer is 12" (no tag, no box) and the free-form "the red cube" are judged correct; the
  # two-box response is never sent to the judge, nor is a wrong tagged number.
  assert judged[3]["correct"] == [True, False, False] and judged[3]["judged"] == [True, False, False]
  assert judged[4]["correct"] == [True, False, True] and judged[4]["judged"] == [True, True, False]
  assert judged[0]["judged"] == [False, False, False] and judged[5]["judged"] == [False] * 3


def test_score_responses_in_a_reward_pool_equals_in_process():
  exs = _examples()[:5]
  with rewards.RewardPool(num_workers=1) as pool:
    pooled = benchmarks.score_responses(exs, RESPONSES[:5], pool=pool)
  assert pooled == benchmarks.score_responses(exs, RESPONSES[:5])


def test_sampling_n_needs_temperature(jax_model, tokenizer, image_config):
  model, params = jax_model
  with pytest.raises(ValueError, match="temperature > 0"):
    benchmarks.generate_responses(model, params, tokenizer, _examples()[:1], image_config=image_config,
                                  system_prompt=None, format_instruction=None, max_new_tokens=2, batch_size=1, n=2)


def test_rbf_from_model_equals_numpy_on_full_logits(jax_model, tokenizer, image_config, bench_files):
  model, params = jax_model
  examples = benchmarks.load_benchmark(bench_files["mathverse"], "mathverse")[:2]
  enc = [chat.encode_prompt(tokenizer, ex.messages, ex.load_images(), image_config) for ex in examples]
  col = batching.collate_prompts(enc, tokenizer.pad_token_id, 512, 64)
  pv, thw = col["pixel_values"][col["patch_valid"]], col["image_grid_thw"]
  out = sampling.generate(model, params, col["input_ids"], col["attention_mask"], pixel_values=pv, image_grid_thw=thw,
                          max_new_tokens=NEW_TOKENS, temperature=1.0, rng=jax.random.key(0), eos_token_id=-1)
  lengths = np.array([NEW_TOKENS, 3])                                     # the second response counts 3 tokens
  r = branching.rbf_from_model(model, params, col["input_ids"], col["attention_mask"], out.tokens, lengths,
                               pixel_values=pv, image_grid_thw=thw, top_p=0.95)
  ids = np.concatenate([col["input_ids"], out.tokens], axis=1)
  mask = np.concatenate([col["attention_mask"], np.ones_like(out.tokens)], axis=1)
  # The reference: the model's full [B, L, V] logits (jitted, as the model docstring shows; eager takes 5 s).
  pv_pad, _, _ = batching.pad_patches(pv, thw, 64)
  prep = qwen2_5_vl.prepare_inputs(model.config, ids, mask, thw, num_patches=64)
  logits = np.asarray(jax.jit(model.apply)({"params": params}, ids, mask, pixel_values=pv_pad,
                                           position_ids=prep.position_ids, vision=prep.vision))
  p = col["input_ids"].shape[1]
  resp_logits = logits[:, p - 1:p - 1 + NEW_TOKENS]                       # [B, N, V]: logit predicting token t
  resp_mask = np.arange(NEW_TOKENS)[None] < lengths[:, None]
  want = metrics.rollout_branching_factor(resp_logits, resp_mask, top_p=0.95)
  assert r.count == NEW_TOKENS + 3 and r.rbf == pytest.approx(want, rel=1e-3)
  sizes = metrics.nucleus_size(metrics.softmax(resp_logits), 0.95)
  assert (r.per_token[resp_mask] == sizes[resp_mask]).mean() >= 0.9 and (r.per_token[~resp_mask] == 0).all()
