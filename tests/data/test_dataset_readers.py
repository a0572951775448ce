"""Real-format readers on fixture files written here in each dataset's schema, good rows and bad ones."""

import base64
import io
import json
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from specs_jax.data import sources, synthetic
from specs_jax.data.types import DataError, PreferencePair, count_image_parts, user_text


def png(colour=(200, 30, 30), size=(12, 8)) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", size, colour).save(buf, format="PNG")
  return buf.getvalue()


def write_parquet(rows, path):
  pq.write_table(pa.Table.from_pylist(rows), path)
  return path


def write_jsonl(rows, path):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return path


@pytest.fixture
def root(tmp_path):
  """A dataset root with images/, plus files outside it that bad rows try to reach."""
  d = tmp_path / "ds"
  (d / "images").mkdir(parents=True)
  (d / "images" / "a.png").write_bytes(png((200, 30, 30)))
  (d / "images" / "b.png").write_bytes(png((30, 200, 30), (6, 6)))
  (d / "images" / "broken.png").write_bytes(b"\x89PNG not really")
  (tmp_path / "outside.png").write_bytes(png((1, 2, 3)))
  os.symlink(tmp_path / "outside.png", d / "images" / "link.png")
  return d


def pixels(image) -> tuple:
  im = image.load()
  return im.size, im.getpixel((0, 0))


# ----------------------------------------------------------------------------------------------------------
# ViRL39K

VIRL_GOOD = [
    {"question": "<image>How many red circles are there?", "answer": "\\boxed{3}", "image": ["images/a.png"],
     "qid": "q0", "category": "Spatial Reasoning", "source": "MM-Eureka", "PassRate_32BTrained": 0.5,
     "PassRate_7BBase": 0.25},
    {"question": "Which one is bigger?\nChoices:\n(A) left\n(B) right", "answer": "\\boxed{B}",
     "image": ["images/a.png", "images/b.png"], "qid": "q1", "category": "Chart", "source": "R1-OneVision",
     "PassRate_32BTrained": 1.0, "PassRate_7BBase": None},
    {"question": "What is 3/4 of 1?", "answer": "\\boxed{\\frac{3}{4}}", "image": [], "qid": "q2",
     "category": "Math", "source": "DeepScaleR", "PassRate_32BTrained": 0.9, "PassRate_7BBase": None},
]


def virl_row(**kw):
  return {**VIRL_GOOD[0], **kw}


def test_virl39k(root):
  res = sources.read_rl_prompts(write_parquet(VIRL_GOOD, root / "39Krelease.parquet"), on_error="fail")
  assert res.num_skipped == 0 and len(res) == 3
  a, b, c = res.examples
  assert (a.id, a.gold, a.answer_type, a.source) == ("virl39k/q0", "3", "integer", "virl39k")
  assert a.messages == [{"role": "user", "content": [{"type": "image"},
                                                      {"type": "text", "text": "How many red circles are there?"}]}]
  assert a.meta["raw_gold"] == "\\boxed{3}" and a.meta["category"] == "Spatial Reasoning"
  assert a.meta["question"] == "How many red circles are there?" and a.meta["format"] is None
  assert pixels(a.images[0]) == ((12, 8), (200, 30, 30))
  # No placeholder in the text: the image parts are prepended, in order.
  assert b.messages[0]["content"][:2] == [{"type": "image"}, {"type": "image"}]
  assert [pixels(im)[1] for im in b.images] == [(200, 30, 30), (30, 200, 30)]
  assert (b.gold, b.answer_type) == ("B", "multiple_choice")
  assert (c.gold, c.answer_type, c.images) == ("\\frac{3}{4}", "fraction", [])


def test_virl39k_bad_rows_are_skipped_and_counted(root, caplog):
  bad = [
      VIRL_GOOD[0],
      virl_row(qid="missing", answer=None),  # row 1
      virl_row(qid="dotdot", image=["../outside.png"]),  # row 2
      virl_row(qid="abs", image=[str(root.parent / "outside.png")]),  # row 3
      virl_row(qid="symlink", image=["images/link.png"]),  # row 4
      virl_row(qid="broken", image=["images/broken.png"]),  # row 5
      virl_row(qid="nofile", image=["images/nope.png"]),  # row 6
      virl_row(qid="unbalanced", answer="\\boxed{3"),  # row 7
      virl_row(qid="twoph", question="<image><image>Two?"),  # row 8
  ]
  path = write_parquet(bad, root / "bad.parquet")
  with caplog.at_level(logging.INFO, logger="specs_jax.data.sources"):
    res = sources.read_rl_prompts(path, on_error="skip")
  assert [ex.id for ex in res] == ["virl39k/q0"]
  assert dict(res.skipped) == {"missing_field": 1, "image_outside_root": 3, "bad_image": 2, "bad_answer_type": 1,
                               "image_count_mismatch": 1}
  messages = [str(e) for e in res.errors]
  assert messages[0].startswith(f"{path}: row 1: field 'answer': ")
  assert f"{path}: row 2: field 'image[0]': " in messages[1] and "outside" in messages[1]
  assert "absolute image path" in messages[2]
  assert "row 4" in messages[3] and "outside" in messages[3]  # the symlink is followed, then refused
  assert "cannot decode image" in messages[4] and "not found" in messages[5]
  assert "skipped 8" in res.summary() and "skipped 8" in caplog.text
  # on_error="fail" stops at the first bad row with the same message.
  with pytest.raises(DataError, match=r"bad\.parquet: row 1: field 'answer': required field is missing"):
    sources.read_rl_prompts(path, on_error="fail")


def test_virl39k_jsonl_and_image_root(root, tmp_path):
  # Data file elsewhere, images resolved inside an explicit image_root.
  path = write_jsonl([VIRL_GOOD[0], "{not json", json.dumps([1, 2]), virl_row(qid="list", answer=[3])],
                     tmp_path / "virl.jsonl")
  res = sources.read_rl_prompts(path, image_root=root)
  assert len(res) == 1 and dict(res.skipped) == {"bad_json": 2, "bad_answer_type": 1}
  assert "row 1 (line 2)" in str(res.errors[0])
  # Without the image root, the relative path is looked up next to the data file and is not found.
  assert dict(sources.read_rl_prompts(path, check_images=False).skipped)["bad_image"] == 1


# ----------------------------------------------------------------------------------------------------------
# Orsta-Data-47k (verl rows)


def orsta_row(**kw):
  row = {
      "data_source": "mm_math",
      "images": [{"bytes": png((10, 20, 30)), "path": "51284809.png"}],
      "prompt": [{"content": "You are a helpful assistant.", "role": "system"},
                 {"content": "<image>As shown in the figure, BD = 1 cm. What is the length of AB?", "role": "user"}],
      "ability": "math",
      "reward_model": {"answer": "4", "ground_truth": "\\boxed{4}", "accuracy_ratio": 1.0, "format_ratio": 0.0,
                       "verifier": "mathverify",
                       "verifier_parm": {"det_verifier_normalized": None,
                                         "det_reward_ratio": {"iou_max_label_first": None, "map50": None}}},
      "extra_info": {"id": None, "image_path": "images/51284809.png"},
  }
  row.update(kw)
  return row


def test_orsta(root):
  det = orsta_row(data_source="coco2017", ability="detection",
                  reward_model={**orsta_row()["reward_model"], "verifier": "detection",
                                "ground_truth": "[{'bbox_2d': [3, 219, 998, 987], 'label': 'truck'}]"},
                  extra_info={"id": "17", "image_path": "x.png"})
  res = sources.read_rl_prompts(write_parquet([orsta_row(), det], root / "train-00000.parquet"), on_error="fail")
  a, b = res.examples
  assert (a.id, a.gold, a.answer_type, a.source) == ("mm_math/train-00000/0", "4", "integer", "mm_math")
  assert a.messages[0] == {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]}
  assert a.messages[1]["content"][0] == {"type": "image"}
  assert a.meta["question"].startswith("As shown in the figure") and a.meta["verifier"] == "mathverify"
  assert pixels(a.images[0]) == ((12, 8), (10, 20, 30))
  assert (b.id, b.answer_type) == ("coco2017/17", "detection")


def test_orsta_bad_rows(root):
  rm = orsta_row()["reward_model"]
  rows = [
      orsta_row(),
      orsta_row(images=[{"bytes": b"garbage", "path": None}]),  # row 1
      orsta_row(reward_model={**rm, "ground_truth": None}),  # row 2
      orsta_row(prompt=[{"content": "hi", "role": "assistant"}]),  # row 3
  ]
  path = write_parquet(rows, root / "bad.parquet")
  res = sources.read_rl_prompts(path, schema="orsta")
  assert len(res) == 1 and dict(res.skipped) == {"bad_image": 1, "missing_field": 1, "bad_value": 1}
  assert "row 1: field 'images[0]'" in str(res.errors[0])
  assert "row 2: field 'reward_model.ground_truth'" in str(res.errors[1])
  # JSONL: bytes as base64; wrong answer types.
  b64 = base64.b64encode(png()).decode()
  rows = [orsta_row(),
          orsta_row(images=[{"bytes": "%%%", "path": None}]),
          orsta_row(reward_model={**rm, "ground_truth": [1, 2]}),
          orsta_row(reward_model={**rm, "ground_truth": True})]
  rows = [{**r, "images": [{"bytes": b64, "path": None}]} if i != 1 else r for i, r in enumerate(rows)]
  res = sources.read_rl_prompts(write_jsonl(rows, root / "o.jsonl"), schema="orsta")
  assert len(res) == 1 and dict(res.skipped) == {"bad_image": 1, "bad_answer_type": 2}
  assert "expected a string or number, got list" in str(res.errors[1])


# ----------------------------------------------------------------------------------------------------------
# Evaluation benchmarks


def test_mathvista(root):
  meta = {"category": "math-targeted-vqa", "context": "geometry diagram", "grade": "high school", "img_height": 8,
          "img_width": 12, "language": "english", "skills": ["geometry reasoning"], "source": "Geometry3K",
          "split": "testmini", "task": "geometry problem solving"}
  base = {"pid": "1", "question": "Find x.", "image": "images/a.png",
          "decoded_image": {"bytes": png(), "path": "1.jpg"}, "choices": None, "unit": None, "precision": None,
          "answer": "3", "question_type": "free_form", "answer_type": "integer", "metadata": meta,
          "query": "Hint: Please answer the question requiring an integer answer and provide the final value, "
                   "e.g., 1, 2, 3, at the end.\nQuestion: Find x."}
  rows = [
      {**base, "pid": "1"},
      {**base, "pid": "2", "choices": ["145°", "135°", "125°", "115°"], "answer": "135°",
       "question_type": "multi_choice", "answer_type": "text", "query": None},
      {**base, "pid": "3", "decoded_image": None, "answer": "1.45", "answer_type": "float", "precision": 2.0},
      {**base, "pid": "4", "answer": "abc"},  # integer expected
      {**base, "pid": "5", "choices": ["1", "2"], "answer": "3", "question_type": "multi_choice"},  # not a choice
  ]
  res = sources.read_eval_benchmark(write_parquet(rows, root / "testmini.parquet"), "mathvista")
  a, b, c = res.examples
  assert (a.id, a.gold, a.answer_type, a.source) == ("mathvista/1", "3", "integer", "mathvista")
  assert a.meta["question"].startswith("Hint:") and a.meta["category"] == "math-targeted-vqa"
  assert (b.gold, b.answer_type, b.meta["answer_text"]) == ("B", "multiple_choice", "135°")
  assert user_text(b.messages) == "Find x.\nChoices:\n(A) 145°\n(B) 135°\n(C) 125°\n(D) 115°"
  assert (c.gold, c.answer_type, c.meta["precision"]) == ("1.45", "float", 2)
  assert pixels(c.images[0])[1] == (200, 30, 30)  # from the image path, decoded_image being null
  assert dict(res.skipped) == {"bad_answer_type": 2}
  assert "row 3: field 'answer': answer 'abc' is not a valid integer" in str(res.errors[0])
  assert "not an option letter or one of the choices" in str(res.errors[1])


def test_mathverse_with_filter(root):
  base = {"sample_index": "1", "problem_index": "1", "problem_version": "Vision Only", "question": "",
          "image": "images/a.png", "answer": "A", "question_type": "multi-choice",
          "metadata": {"split": "testmini", "source": "GeoQA", "subject": "plane geometry", "subfield": "angle"},
          "query_wo": "Please directly answer...", "query_cot": "Please first conduct reasoning, then answer."}
  rows = [base, {**base, "sample_index": "2", "problem_version": "Text Dominant"},
          {**base, "sample_index": "3", "answer": "5", "question_type": "free-form"},
          {**base, "sample_index": "4", "answer": "A or B"}]
  path = write_jsonl(rows, root / "mathverse.jsonl")
  res = sources.read_eval_benchmark(path, "mathverse", keep=lambda r: r["problem_version"] == "Vision Only")
  assert [ex.id for ex in res] == ["mathverse/1", "mathverse/3"] and res.filtered == 1
  assert res[0].meta["question"] == "Please first conduct reasoning, then answer."
  assert (res[0].gold, res[0].answer_type, res[1].gold, res[1].answer_type) == ("A", "multiple_choice", "5", "integer")
  assert res[0].meta["problem_version"] == "Vision Only" and res[0].meta["category"] == "plane geometry"
  assert dict(res.skipped) == {"bad_answer_type": 1} and "filtered out 1" in res.summary()


def test_mathvision(root):
  base = {"id": "7", "question": "<image1>Which area is the largest?", "options": ["1", "2", "3", "4", "5"],
          "image": "images/a.png", "decoded_image": {"bytes": png((5, 5, 5)), "path": "images/7.jpg"}, "answer": "C",
          "solution": None, "level": 3, "subject": "metric geometry - area"}
  rows = [base, {**base, "id": "8", "options": [], "answer": "12"}, {**base, "id": "9", "answer": "F"}]
  res = sources.read_eval_benchmark(write_parquet(rows, root / "test.parquet"), "mathvision")
  a, b = res.examples
  assert (a.gold, a.answer_type, a.meta["level"], pixels(a.images[0])[1]) == ("C", "multiple_choice", 3, (5, 5, 5))
  assert "(E) 5" in a.meta["question"] and (b.gold, b.answer_type, b.meta["choices"]) == ("12", "integer", None)
  assert dict(res.skipped) == {"bad_answer_type": 1}  # F with 5 options


def test_mmmu(root):
  img = {"bytes": png((1, 1, 1)), "path": None}
  base = {"id": "validation_Art_Theory_1", "question": "<image 1> and <image 2>: which painting is older?",
          "options": "['the first', 'the second', 'same age', 'unknown']", "explanation": "", "image_1": img,
          "image_2": {"bytes": png((2, 2, 2)), "path": None}, "image_3": None, "image_4": None, "image_5": None,
          "image_6": None, "image_7": None, "img_type": "['Paintings']", "answer": "B", "topic_difficulty": "Medium",
          "question_type": "multiple-choice", "subfield": "Art History"}
  rows = [base, {**base, "id": "validation_Math_2", "options": "[]", "answer": "12", "question_type": "open",
                 "image_2": None, "subfield": None},
          {**base, "id": "validation_Math_3", "options": "not a list"}]
  res = sources.read_eval_benchmark(write_parquet(rows, root / "validation.parquet"), "mmmu")
  a, b = res.examples
  assert count_image_parts(a.messages) == 2 and [pixels(im)[1] for im in a.images] == [(1, 1, 1), (2, 2, 2)]
  assert (a.gold, a.meta["category"], a.meta["choices"][1]) == ("B", "Art History", "the second")
  assert (b.gold, b.answer_type, b.meta["category"], len(b.images)) == ("12", "integer", "Math", 1)
  assert dict(res.skipped) == {"bad_value": 1} and "field 'options'" in str(res.errors[0])


def test_generic(root):
  rows = [{"id": "g1", "question": "Sum?", "images": ["images/a.png", "images/b.png"], "choices": None, "answer": "7",
           "answer_type": "integer", "precision": None, "category": "arithmetic"},
          {"id": "g2", "question": "Pick", "image": "images/a.png", "choices": ["x", "y"], "answer": "y",
           "answer_type": "multiple_choice", "category": "mc"},
          {"id": "g3", "question": "?", "answer": "1/2", "answer_type": "probability"}]
  res = sources.read_eval_benchmark(write_jsonl(rows, root / "my_eval.jsonl"), "generic")
  a, b = res.examples
  assert (a.gold, len(a.images), b.gold, len(b.images)) == ("7", 2, "B", 1)
  assert dict(res.skipped) == {"bad_answer_type": 1} and "unknown answer_type 'probability'" in str(res.errors[0])


# ----------------------------------------------------------------------------------------------------------
# Preference pairs


def _pairs():
  exs = synthetic.make_split("train", 4, seed=0)
  out = []
  for i, ex in enumerate(exs):
    messages = [{"role": "system", "content": [{"type": "text", "text": "Solve it."}]}] + ex.messages
    out.append(PreferencePair(f"p{i}", messages, ex.images, synthetic.reasoning_text(ex, "tagged"),
                              synthetic.reasoning_text(ex, "plain"), {"gold": ex.gold}))
  # Two pairs sharing an image: stored once.
  out.append(PreferencePair("p4", exs[0].messages, exs[0].images, "<think>a</think><answer>1</answer>", "1", {}))
  return out


def test_preference_pairs_round_trip(tmp_path):
  pairs = _pairs()
  path = sources.write_preference_pairs(pairs, tmp_path / "distill" / "pairs.jsonl", dataset_name="specs_pairs",
                                        write_meta=True)
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  assert rows[0]["conversations"][0] == {"from": "system", "value": "Solve it."}
  assert rows[0]["conversations"][1]["from"] == "human" and rows[0]["conversations"][1]["value"].startswith("<image>")
  assert rows[0]["chosen"]["from"] == rows[0]["rejected"]["from"] == "gpt"
  assert all(p.startswith("images/") and p.endswith(".png") for r in rows for p in r["images"])
  assert rows[4]["images"] == rows[0]["images"]
  info = json.loads((tmp_path / "distill" / "dataset_info.json").read_text())
  assert info["specs_pairs"] == {"file_name": "pairs.jsonl", "formatting": "sharegpt", "ranking": True,
                                 "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected",
                                             "images": "images"}}
  back = sources.read_preference_pairs(path, on_error="fail")
  assert len(back) == len(pairs)
  for p, q in zip(pairs, back):
    assert (q.id, q.messages, q.chosen, q.rejected, q.meta) == (p.id, p.messages, p.chosen, p.rejected, p.meta)
    for x, y in zip(p.load_images(), q.load_images()):
      assert np.array_equal(np.asarray(x), np.asarray(y))
  # Deterministic: the same pairs give the same bytes.
  again = sources.write_preference_pairs(pairs, tmp_path / "again" / "pairs.jsonl", write_meta=True)
  assert again.read_bytes() == path.read_bytes()


def test_llamafactory_json_array_and_bad_pairs(root):
  good = {"conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "<image>Q1"},
                            {"from": "gpt", "value": "A1"}, {"from": "human", "value": "<image>Q2"}],
          "chosen": {"from": "gpt", "value": "good"}, "rejected": {"from": "gpt", "value": "bad"},
          "images": ["images/a.png", "images/b.png"]}
  rows = [good,
          {**good, "conversations": good["conversations"][:3]},  # ends with gpt
          {**good, "chosen": {"from": "human", "value": "x"}},
          {**good, "images": ["images/a.png"]},  # 2 placeholders, 1 image
          {**good, "images": ["images/a.png", "../outside.png"]},
          {k: v for k, v in good.items() if k != "rejected"}]
  (root / "pairs.json").write_text(json.dumps(rows))
  res = sources.read_preference_pairs(root / "pairs.json")
  (p,) = res.examples
  assert [m["role"] for m in p.messages] == ["system", "user", "assistant", "user"]
  assert (p.chosen, p.rejected, len(p.images)) == ("good", "bad", 2)
  assert dict(res.skipped) == {"bad_value": 2, "image_count_mismatch": 1, "image_outside_root": 1,
                               "missing_field": 1}
  assert "field 'rejected'" in str(res.errors[-1])


def test_writer_refuses_what_llamafactory_would_misread(tmp_path):
  ex = synthetic.make_split("train", 1)[0]
  out = tmp_path / "p.jsonl"
  with pytest.raises(ValueError, match="contains <image>"):
    sources.write_preference_pairs([PreferencePair("x", ex.messages, ex.images, "see <image>", "b")], out)
  ends_with_assistant = ex.messages + [{"role": "assistant", "content": [{"type": "text", "text": "a"}]}]
  with pytest.raises(ValueError, match="end with a user message"):
    sources.write_preference_pairs([PreferencePair("x", ends_with_assistant, ex.images, "a", "b")], out)
  with pytest.raises(ValueError, match="image parts"):
    sources.write_preference_pairs([PreferencePair("x", ex.messages, [], "a", "b")], tmp_path / "p.jsonl")
  with pytest.raises(ValueError, match="must be inside"):
    sources.write_preference_pairs([], tmp_path / "d" / "p.jsonl", image_dir=tmp_path / "elsewhere")
  assert not list(tmp_path.glob("*.tmp*"))  # no temporary file left behind by the failed writes


def test_files_directories_and_arguments(root, tmp_path):
  d = tmp_path / "shards"
  d.mkdir()
  write_parquet(VIRL_GOOD[:2], d / "train-00000-of-00002.parquet")
  write_parquet(VIRL_GOOD[2:], d / "train-00001-of-00002.parquet")
  (d / "README.md").write_text("ignored")
  res = sources.read_rl_prompts(d, image_root=root)
  assert [ex.id for ex in res] == ["virl39k/q0", "virl39k/q1", "virl39k/q2"] and len(res.files) == 2
  with pytest.raises(FileNotFoundError):
    sources.read_rl_prompts(tmp_path / "nope.parquet")
  with pytest.raises(ValueError, match="on_error"):
    sources.read_rl_prompts(d, on_error="ignore")
  with pytest.raises(ValueError, match="style"):
    sources.read_eval_benchmark(d, "mathvista2")
  with pytest.raises(DataError, match="unsupported file type"):
    sources.read_rl_prompts(d / "README.md")
