"""Readers (and one writer) for the real dataset formats, from local files only.

| reader                   | rows                                                            | gives            |
|--------------------------|-----------------------------------------------------------------|------------------|
| `read_rl_prompts`        | Orsta-Data-47k (verl rows: data_source, images, prompt, ability, | `Example`        |
|                          | reward_model{ground_truth, verifier, ...}, extra_info) and raw   |                  |
|                          | ViRL39K (qid, question, answer "\\boxed{..}", image [paths], ...)  |                  |
| `read_eval_benchmark`    | MathVista / MathVerse / MathVision / MMMU rows, or "generic"     | `Example`        |
|                          | (id, question, images, choices, answer, answer_type, precision,  |                  |
|                          | category)                                                        |                  |
| `read_preference_pairs`  | LLaMA-Factory pairwise ShareGPT rows (conversations, chosen,     | `PreferencePair` |
| `write_preference_pairs` | rejected, images)                                                |                  |

Files are parquet (read in record batches with pyarrow) or JSON lines (`.jsonl`, or `.json` holding either
lines or one array). `path` may be a file, a directory (all such files in it, sorted) or a list of them.

Images are HF-datasets dicts `{"bytes": ..., "path": ...}` (bytes win; in JSON, bytes are base64), or
relative paths resolved inside `image_root` (default: the data file's directory). A path that is absolute,
or that resolves outside the root (through `..` or a symlink), is refused. By default each image is decoded
once at read time so that unreadable ones are caught here (`check_images=False` skips that); examples keep
lazy `ImageRef`s.

A bad row raises `DataError` (naming file, row, field) with `on_error="fail"`, or is skipped and counted by
reason with `on_error="skip"`; `ReadResult.summary()` reports the counts, and is logged at the end.

The row machinery is in `rows.py`; the preference-pair reader and writer are in `llamafactory.py` and are
re-exported here.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from specs_jax.data.llamafactory import pair_to_sharegpt, read_preference_pairs, write_preference_pairs
from specs_jax.data.rows import RowContext, attach_images, gold_string, image_list, read_rows
from specs_jax.data.types import (DataError, Example, ReadResult, infer_answer_type, matches_answer_type,
                                  text_to_content, user_message, user_text)

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# ----------------------------------------------------------------------------------------------------------
# RL prompts: Orsta-Data-47k (verl rows) and ViRL39K


def _orsta_row(row: dict, ctx: RowContext) -> Example:
  prompt = ctx.require(row, "prompt", types=(list,))
  if not prompt:
    raise ctx.error("prompt", "bad_value", "empty prompt")
  messages = []
  for j, m in enumerate(prompt):
    if not isinstance(m, Mapping) or m.get("role") not in ("system", "user", "assistant") \
        or not isinstance(m.get("content"), str):
      raise ctx.error(f"prompt[{j}]", "bad_value", "expected {'role': system|user|assistant, 'content': str}")
    messages.append({"role": m["role"], "content": text_to_content(m["content"])})
  if messages[-1]["role"] != "user":
    raise ctx.error("prompt", "bad_value", "the last prompt message must be from the user")
  images = image_list(row.get("images"), ctx, "images")
  attach_images(messages, len(images), ctx, "prompt")
  rm = ctx.require(row, "reward_model", types=(Mapping,))
  raw = ctx.require(rm, "ground_truth", "reward_model.ground_truth")
  gold = gold_string(raw, ctx, "reward_model.ground_truth")
  verifier = rm.get("verifier")
  question = user_text(messages)
  if (isinstance(verifier, str) and ("det" in verifier or "ground" in verifier)) or \
      (gold.startswith("[") and "bbox" in gold):
    answer_type = "detection"
  else:
    answer_type = infer_answer_type(gold, question)
  data_source = row.get("data_source") or "orsta"
  extra = row.get("extra_info") if isinstance(row.get("extra_info"), Mapping) else {}
  ident = extra.get("id") if extra.get("id") is not None else f"{ctx.path.stem}/{ctx.index}"
  meta = {"question": question, "format": None, "schema": "orsta", "ability": row.get("ability"),
          "data_source": data_source, "verifier": verifier, "raw_gold": str(raw),
          "accuracy_ratio": rm.get("accuracy_ratio"), "format_ratio": rm.get("format_ratio")}
  return Example(f"{data_source}/{ident}", messages, images, gold, answer_type, str(data_source), meta)


def _virl_row(row: dict, ctx: RowContext) -> Example:
  question = ctx.require(row, "question", types=(str,))
  raw = ctx.require(row, "answer")
  gold = gold_string(raw, ctx, "answer")
  images = image_list(row.get("image"), ctx, "image")
  messages = [{"role": "user", "content": text_to_content(question)}]
  attach_images(messages, len(images), ctx, "question")
  qid = row.get("qid")
  meta = {"question": user_text(messages), "format": None, "schema": "virl39k", "raw_gold": str(raw),
          "category": row.get("category"), "origin": row.get("source"),
          "pass_rate_32b_trained": row.get("PassRate_32BTrained"), "pass_rate_7b_base": row.get("PassRate_7BBase")}
  ident = str(qid) if qid is not None else f"{ctx.path.stem}/{ctx.index}"
  return Example(f"virl39k/{ident}", messages, images, gold, infer_answer_type(gold, meta["question"]),
                 "virl39k", meta)


def _detect_rl_schema(row: dict, ctx: RowContext) -> Example:
  if "prompt" in row or "reward_model" in row:
    return _orsta_row(row, ctx)
  if "question" in row or "answer" in row:
    return _virl_row(row, ctx)
  raise ctx.error(None, "missing_field", "neither an Orsta/verl row (prompt, reward_model) nor a ViRL39K row "
                  f"(question, answer); keys: {sorted(row)[:12]}")


def read_rl_prompts(path: str | os.PathLike | Sequence[str | os.PathLike], image_root: str | os.PathLike | None = None,
                    on_error: str = "skip", *, schema: str = "auto", check_images: bool = True) -> ReadResult[Example]:
  """Reads RL prompt rows (ViRL39K or Orsta-Data-47k) into `Example`s.

  Args:
    path: parquet / JSONL file(s) or a directory of them.
    image_root: root that relative image paths resolve inside (default: each data file's directory).
    on_error: "skip" bad rows (counted in the result) or "fail" on the first one with a `DataError`.
    schema: "orsta" (verl rows: prompt, images, reward_model.ground_truth, ...), "virl39k" (question,
      answer, image paths, qid, ...), or "auto" (per row, from its keys).
    check_images: decode every image once now, so unreadable images are bad rows here.

  Returns:
    A `ReadResult`: examples with gold = the ground truth with any `\\boxed{}` removed (the raw one is in
    meta["raw_gold"]), answer_type inferred from it ("detection" for Orsta detection/grounding rows), and
    image parts prepended to the first user turn when the text has fewer `<image>` placeholders than images.
  """
  convert = {"auto": _detect_rl_schema, "orsta": _orsta_row, "verl": _orsta_row, "virl39k": _virl_row}.get(schema)
  if convert is None:
    raise ValueError(f"schema must be 'auto', 'orsta' or 'virl39k', got {schema!r}")
  return read_rows(path, convert, image_root, on_error, check_images, what="RL prompts")


# ----------------------------------------------------------------------------------------------------------
# Evaluation benchmarks


def _choices_text(choices: Sequence[str]) -> str:
  return "Choices:\n" + "\n".join(f"({_LETTERS[i]}) {c}" for i, c in enumerate(choices))


def _choice_list(value: Any, ctx: RowContext, field: str) -> list[str] | None:
  if value is None:
    return None
  if isinstance(value, str):  # MMMU stores options as a Python list literal
    try:
      value = ast.literal_eval(value)
    # literal_eval evaluates no code, but bad literals fail in several ways: "{[]: 1}" is a TypeError,
    # deep nesting a RecursionError or MemoryError.
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
      raise ctx.error(field, "bad_value", f"options are not a list literal: {value[:80]!r}") from e
  if not isinstance(value, (list, tuple)) or not all(isinstance(c, (str, int, float)) for c in value):
    raise ctx.error(field, "bad_value", f"expected a list of strings, got {type(value).__name__}")
  if len(value) > len(_LETTERS):
    raise ctx.error(field, "bad_value", f"{len(value)} choices (at most {len(_LETTERS)})")
  return [str(c) for c in value] or None


def _mc_gold(answer: str, choices: list[str] | None, ctx: RowContext, field: str,
             letter_only: bool = False) -> str:
  """The option letter for a multiple-choice answer given as a letter or (unless letter_only) as a choice text."""
  a = answer.strip()
  n = len(choices) if choices else None
  if len(a) == 1 and a.upper() in _LETTERS and (n is None or _LETTERS.index(a.upper()) < n):
    return a.upper()
  if not letter_only and choices and a in choices:
    return _LETTERS[choices.index(a)]
  raise ctx.error(field, "bad_answer_type", f"multiple-choice answer {a[:40]!r} is not an option letter"
                  + ("" if letter_only or not choices else " or one of the choices"))


def _first_image(row: dict, keys: Sequence[str]) -> tuple[Any, str]:
  for k in keys:
    if row.get(k) is not None:
      return row[k], k
  return None, keys[-1]


def _optional_str(row: dict, key: str, ctx: RowContext) -> str | None:
  value = row.get(key)
  if value is not None and not isinstance(value, str):
    raise ctx.error(key, "bad_value", f"expected str, got {type(value).__name__}")
  return value


def _fields_mathvista(row: dict, ctx: RowContext) -> dict:
  choices = _choice_list(row.get("choices"), ctx, "choices")
  question = ctx.require(row, "question", types=(str,))
  text = _optional_str(row, "query", ctx) or (question + ("\n" + _choices_text(choices) if choices else ""))
  image, key = _first_image(row, ("decoded_image", "image"))
  answer = str(ctx.require(row, "answer"))
  mc = row.get("question_type") == "multi_choice"
  meta = row.get("metadata") if isinstance(row.get("metadata"), Mapping) else {}
  return {"id": ctx.require(row, "pid"), "text": text, "images": [(image, key)] if image is not None else [],
          "choices": choices, "answer": answer, "mc": mc, "declared": None if mc else row.get("answer_type"),
          "precision": row.get("precision"), "category": meta.get("category"),
          "extra": {"unit": row.get("unit"), "task": meta.get("task"), "skills": meta.get("skills")}}


def _fields_mathverse(row: dict, ctx: RowContext) -> dict:
  text = _optional_str(row, "query_cot", ctx) or ctx.require(row, "question", types=(str,))
  meta = row.get("metadata") if isinstance(row.get("metadata"), Mapping) else {}
  image = row.get("image")
  return {"id": ctx.require(row, "sample_index"), "text": text,
          "images": [(image, "image")] if image is not None else [], "choices": None,
          "answer": str(ctx.require(row, "answer")), "mc": row.get("question_type") == "multi-choice",
          "letter_only": True, "declared": None, "precision": None, "category": meta.get("subject"),
          "extra": {"problem_version": row.get("problem_version"), "subfield": meta.get("subfield")}}


def _fields_mathvision(row: dict, ctx: RowContext) -> dict:
  choices = _choice_list(row.get("options"), ctx, "options")
  question = ctx.require(row, "question", types=(str,))
  image, key = _first_image(row, ("decoded_image", "image"))
  return {"id": ctx.require(row, "id"), "text": question + ("\n" + _choices_text(choices) if choices else ""),
          "images": [(image, key)] if image is not None else [], "choices": choices,
          "answer": str(ctx.require(row, "answer")), "mc": bool(choices), "letter_only": True, "declared": None,
          "precision": None, "category": row.get("subject"), "extra": {"level": row.get("level")}}


def _fields_mmmu(row: dict, ctx: RowContext) -> dict:
  ident = str(ctx.require(row, "id"))
  choices = _choice_list(row.get("options"), ctx, "options")
  question = ctx.require(row, "question", types=(str,))
  images = [(row[f"image_{k}"], f"image_{k}") for k in range(1, 8) if row.get(f"image_{k}") is not None]
  parts = ident.split("_")
  category = row.get("subfield") or ("_".join(parts[1:-1]) if len(parts) > 2 else None)
  return {"id": ident, "text": question + ("\n" + _choices_text(choices) if choices else ""), "images": images,
          "choices": choices, "answer": str(ctx.require(row, "answer")),
          "mc": row.get("question_type") == "multiple-choice", "letter_only": True, "declared": None,
          "precision": None, "category": category, "extra": {"img_type": row.get("img_type")}}


def _fields_generic(row: dict, ctx: RowContext) -> dict:
  choices = _choice_list(row.get("choices"), ctx, "choices")
  question = ctx.require(row, "question", types=(str,))
  raw_images = row.get("images", row.get("image"))
  raw_images = [] if raw_images is None else (raw_images if isinstance(raw_images, list) else [raw_images])
  declared = row.get("answer_type")
  return {"id": ctx.require(row, "id"), "text": question + ("\n" + _choices_text(choices) if choices else ""),
          "images": [(v, f"images[{k}]") for k, v in enumerate(raw_images)], "choices": choices,
          "answer": str(ctx.require(row, "answer")), "mc": declared == "multiple_choice", "declared":
          None if declared == "multiple_choice" else declared, "precision": row.get("precision"),
          "category": row.get("category"), "extra": {}}


_EVAL_STYLES = {"mathvista": _fields_mathvista, "mathverse": _fields_mathverse, "mathvision": _fields_mathvision,
                "mmmu": _fields_mmmu, "generic": _fields_generic}
_DECLARED_TYPES = {"integer": "integer", "float": "float", "text": "text", "list": "list", "fraction": "fraction",
                   "yes_no": "yes_no", "expression": "expression"}


def _eval_row(style: str) -> Callable[[dict, RowContext], Example]:
  def convert(row: dict, ctx: RowContext) -> Example:
    f = _EVAL_STYLES[style](row, ctx)
    images = [ctx.image(v, field) for v, field in f["images"]]
    if f["mc"]:
      gold = _mc_gold(f["answer"], f["choices"], ctx, "answer", letter_only=f.get("letter_only", False))
      answer_type = "multiple_choice"
    else:
      gold = gold_string(f["answer"], ctx, "answer")
      declared = f["declared"]
      if declared is None:
        answer_type = infer_answer_type(gold, f["text"])
      elif not isinstance(declared, str) or declared not in _DECLARED_TYPES:
        raise ctx.error("answer_type", "bad_answer_type", f"unknown answer_type {declared!r}")
      else:
        answer_type = _DECLARED_TYPES[declared]
        if not matches_answer_type(gold, answer_type):
          raise ctx.error("answer", "bad_answer_type", f"answer {gold[:40]!r} is not a valid {answer_type}")
    precision = f["precision"]
    if precision is not None and (isinstance(precision, bool) or not isinstance(precision, (int, float))):
      raise ctx.error("precision", "bad_value", f"expected a number, got {type(precision).__name__}")
    if precision is not None and not 0 <= precision <= 1000:  # also NaN and ±Infinity, which JSON readers accept
      raise ctx.error("precision", "bad_value", f"expected a number of decimal places in [0, 1000], got {precision}")
    meta = {"question": f["text"], "format": None, "choices": f["choices"], "answer_text": f["answer"],
            "precision": None if precision is None else int(precision), "category": f["category"],
            "benchmark": style, **{k: v for k, v in f["extra"].items() if v is not None}}
    return Example(f"{style}/{f['id']}", [user_message(f["text"], len(images))], images, gold, answer_type, style,
                   meta)

  return convert


def read_eval_benchmark(path: str | os.PathLike | Sequence[str | os.PathLike], style: str,
                        image_root: str | os.PathLike | None = None, on_error: str = "skip", *,
                        check_images: bool = True, keep: Callable[[dict], bool] | None = None) -> ReadResult[Example]:
  """Reads benchmark rows into `Example`s (images first, then the question text, no format instruction).

  Field mapping by `style`:
    mathvista:  pid; query (or question + choices); decoded_image or image; choices; answer (for
                question_type "multi_choice" the choice text, turned into its letter); answer_type
                (integer/float/text/list, checked); precision; metadata.category.
    mathverse:  sample_index; query_cot (or question); image; answer (a letter for "multi-choice");
                metadata.subject; problem_version in meta.
    mathvision: id; question + options; decoded_image or image; answer (a letter when there are options);
                subject; level in meta.
    mmmu:       id; question + options (a Python list literal); image_1..image_7; answer (a letter for
                "multiple-choice"); subfield (or the subject in the id).
    generic:    id, question, images (or image), choices, answer, answer_type, precision, category.

  Args:
    keep: optional filter on the raw row (e.g. MathVerse's problem_version == "Vision Only"); rows it
      rejects are counted in `result.filtered`, not as errors.
  Other args as `read_rl_prompts`.
  """
  if style not in _EVAL_STYLES:
    raise ValueError(f"style must be one of {sorted(_EVAL_STYLES)}, got {style!r}")
  return read_rows(path, _eval_row(style), image_root, on_error, check_images, keep=keep, what=f"{style} rows")


__all__ = ["read_rl_prompts", "read_eval_benchmark", "read_preference_pairs", "write_preference_pairs",
           "pair_to_sharegpt", "DataError", "ReadResult"]
