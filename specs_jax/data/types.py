"""The normalised example type shared by every data source, and the error / result types of the readers.

Every reader (synthetic tasks, ViRL39K / Orsta RL prompts, MathVista-style benchmarks) produces `Example`s;
the preference-pair reader produces `PreferencePair`s. Both use the HF / Qwen chat content format:

    [{"role": "system", "content": [{"type": "text", "text": "..."}]},              # optional
     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}]

with one `{"type": "image"}` part per entry of `images`, in order. Images are either decoded
`PIL.Image.Image`s or lazy references (anything with a `load() -> PIL.Image.Image` method, such as
`ImageRef`), so a large dataset is not decoded at read time.

This module is pure Python + PIL: no JAX, no pyarrow.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from PIL import Image

IMAGE_TOKEN = "<image>"  # LLaMA-Factory / verl placeholder for one image inside a text message

ANSWER_TYPES = (
    "integer",  # "12", "-3"
    "float",  # "7.5"; meta["precision"] may give the decimals to compare
    "fraction",  # "3/4" (lowest terms)
    "multiple_choice",  # a single option letter "A".."Z"
    "yes_no",  # "yes" / "no"
    "expression",  # LaTeX or symbolic math ("2\\sqrt{3}", "x^2+1")
    "list",  # MathVista "list" answers
    "text",  # free text
    "detection",  # Orsta detection / grounding rows (JSON boxes), not scored by the math verifier
)


@runtime_checkable
class LazyImage(Protocol):
  """An image that is decoded (or rendered) only when `load()` is called."""

  def load(self) -> Image.Image:
    ...


@dataclasses.dataclass(frozen=True, eq=True)
class ImageRef:
  """A lazy image: encoded bytes in memory, or a file path already checked to lie inside its root.

  Exactly one of `data` and `path` is set. `load()` decodes to RGB each time it is called.
  """

  data: bytes | None = None
  path: str | None = None

  def __post_init__(self):
    if (self.data is None) == (self.path is None):
      raise ValueError("ImageRef needs exactly one of data= and path=")

  def load(self) -> Image.Image:
    src = io.BytesIO(self.data) if self.data is not None else self.path
    with Image.open(src) as im:
      return im.convert("RGB")

  def __repr__(self) -> str:  # never dump megabytes of bytes into a log line
    if self.path is not None:
      return f"ImageRef(path={self.path!r})"
    return f"ImageRef(<{len(self.data)} bytes>)"


def load_image(image: Image.Image | LazyImage) -> Image.Image:
  """Returns a decoded RGB PIL image for a PIL image or a lazy reference."""
  if isinstance(image, Image.Image):
    return image if image.mode == "RGB" else image.convert("RGB")
  if isinstance(image, LazyImage):
    return image.load()
  raise TypeError(f"not an image or lazy image: {type(image).__name__}")


@dataclasses.dataclass(frozen=True)
class Example:
  """One prompt with its images and verifiable gold answer, whatever its source.

  Attributes:
    id: unique within its source, stable across runs.
    messages: chat messages in the HF content-list format (see the module docstring); the prompt only,
      no assistant turn. One `{"type": "image"}` part per image, in the order of `images`.
    images: PIL images or lazy references (`load()`), in order of appearance.
    gold: the gold answer as a string ("12", "3/4", "B", "yes", ...).
    answer_type: one of `ANSWER_TYPES`.
    source: where it came from ("synthetic", "virl39k", "orsta:<data_source>", "mathvista", ...).
    meta: JSON-serialisable extras. Always has "question" (the task text without any output-format
      instruction) and "format" (the format spec the prompt asks for, or None when the prompt carries none
      of ours); synthetic examples also have "instruction", "family", "level", "task" and "scene".
  """

  id: str
  messages: list[dict]
  images: list[Any]
  gold: str
  answer_type: str
  source: str
  meta: dict = dataclasses.field(default_factory=dict)

  def load_images(self) -> list[Image.Image]:
    """Decodes or renders every image (RGB)."""
    return [load_image(im) for im in self.images]

  @property
  def question(self) -> str:
    return self.meta.get("question", user_text(self.messages))


@dataclasses.dataclass(frozen=True)
class PreferencePair:
  """A DPO pair: a prompt (messages + images) with a chosen and a rejected assistant response.

  `messages` holds the prompt only (optional system message, then user / assistant turns ending with a
  user turn), in the same content-list format as `Example.messages`.
  """

  id: str
  messages: list[dict]
  images: list[Any]
  chosen: str
  rejected: str
  meta: dict = dataclasses.field(default_factory=dict)

  def load_images(self) -> list[Image.Image]:
    return [load_image(im) for im in self.images]


# ----------------------------------------------------------------------------------------------------------
# Messages


def user_message(text: str, num_images: int = 0) -> dict:
  """A user message with `num_images` image parts followed by one text part (Qwen-VL's usual order)."""
  content: list[dict] = [{"type": "image"} for _ in range(num_images)]
  content.append({"type": "text", "text": text})
  return {"role": "user", "content": content}


def text_to_content(text: str) -> list[dict]:
  """Splits a string with `<image>` placeholders into content parts, keeping their order.

  "<image>\\nWhat is x?" -> [{"type": "image"}, {"type": "text", "text": "\\nWhat is x?"}]. Empty text
  pieces are dropped, so `content_to_text(text_to_content(s)) == s`.
  """
  parts: list[dict] = []
  for i, piece in enumerate(text.split(IMAGE_TOKEN)):
    if i > 0:
      parts.append({"type": "image"})
    if piece:
      parts.append({"type": "text", "text": piece})
  return parts


def content_to_text(content: str | list[dict]) -> str:
  """Inverse of `text_to_content`: image parts become `<image>`, text parts are concatenated as is."""
  if isinstance(content, str):
    return content
  out = []
  for part in content:
    kind = part.get("type")
    if kind == "image":
      out.append(IMAGE_TOKEN)
    elif kind == "text":
      out.append(part["text"])
    else:
      raise ValueError(f"unsupported content part type {kind!r}")
  return "".join(out)


def count_image_parts(messages: Sequence[dict]) -> int:
  n = 0
  for m in messages:
    content = m["content"]
    if isinstance(content, str):
      n += content.count(IMAGE_TOKEN)
    else:
      n += sum(1 for p in content if p.get("type") == "image")
  return n


def user_text(messages: Sequence[dict]) -> str:
  """The text of the last user message, image placeholders removed and whitespace stripped."""
  for m in reversed(messages):
    if m["role"] == "user":
      return content_to_text(m["content"]).replace(IMAGE_TOKEN, "").strip()
  return ""


# ----------------------------------------------------------------------------------------------------------
# Determinism helpers


def example_fingerprint(ex: Example | PreferencePair) -> str:
  """SHA-256 over every field, images included as decoded pixels: equal iff byte-identical examples."""
  h = hashlib.sha256()
  fields = {f.name: getattr(ex, f.name) for f in dataclasses.fields(ex) if f.name != "images"}
  h.update(json.dumps(fields, sort_keys=True, ensure_ascii=False).encode())
  for im in ex.images:
    im = load_image(im)
    h.update(f"{im.mode}{im.size}".encode())
    h.update(im.tobytes())
  return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Errors and read results

ERROR_REASONS = (
    "bad_json",  # a JSONL line that does not parse, or a row that is not an object
    "missing_field",  # a required field is absent or null
    "bad_image",  # the image cannot be read or decoded, or its file does not exist
    "image_outside_root",  # an image path that is absolute or resolves (.., symlinks) outside the root
    "image_count_mismatch",  # number of <image> placeholders != number of images
    "bad_answer_type",  # gold of the wrong type / not matching its declared answer_type / not a choice
    "bad_value",  # any other malformed field (roles, options, ...)
)


class DataError(ValueError):
  """A bad row in a data file. The message names the file, the row and the field."""

  def __init__(self, path: str | os.PathLike, row: int | None, field: str | None, reason: str, detail: str,
               line: int | None = None):
    if reason not in ERROR_REASONS:
      raise ValueError(f"unknown DataError reason {reason!r}")
    self.path = str(path)
    self.row = row
    self.line = line
    self.field = field
    self.reason = reason
    self.detail = detail
    where = [self.path]
    if row is not None:
      where.append(f"row {row}" + (f" (line {line})" if line is not None else ""))
    if field is not None:
      where.append(f"field {field!r}")
    super().__init__(f"{': '.join(where)}: {detail} [{reason}]")


T = TypeVar("T")


@dataclasses.dataclass
class ReadResult(Generic[T]):
  """What a reader returns: the good rows, and how many rows were skipped for which reason.

  Attributes:
    examples: the rows that were read, in file order.
    skipped: reason -> count of skipped rows (empty when nothing was skipped).
    errors: the first `MAX_KEPT_ERRORS` errors, for display.
    files: the files that were read.
    filtered: rows left out by a caller's `keep` filter (not errors).
  """

  MAX_KEPT_ERRORS = 100

  examples: list[T] = dataclasses.field(default_factory=list)
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  errors: list[DataError] = dataclasses.field(default_factory=list)
  files: list[str] = dataclasses.field(default_factory=list)
  filtered: int = 0

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())

  def add_error(self, err: DataError) -> None:
    self.skipped[err.reason] += 1
    if len(self.errors) < self.MAX_KEPT_ERRORS:
      self.errors.append(err)

  def summary(self) -> str:
    """One line: "read 98 rows from 2 file(s); skipped 2 (bad_image: 1, missing_field: 1)"."""
    s = f"read {len(self.examples)} rows from {len(self.files)} file(s)"
    if self.skipped:
      counts = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
      s += f"; skipped {self.num_skipped} ({counts})"
    else:
      s += "; skipped 0"
    if self.filtered:
      s += f"; filtered out {self.filtered}"
    return s

  def __len__(self) -> int:
    return len(self.examples)

  def __iter__(self):
    return iter(self.examples)

  def __getitem__(self, i):
    return self.examples[i]


# ----------------------------------------------------------------------------------------------------------
# Answer helpers shared by readers and tasks

_INT_RE = re.compile(r"[+-]?\d+")
_FLOAT_RE = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?")
_FRACTION_RE = re.compile(r"[+-]?\d+\s*/\s*\d+")
_LATEX_FRACTION_RE = re.compile(r"[+-]?\\d?frac\{\s*\d+\s*\}\{\s*\d+\s*\}")
_LETTER_RE = re.compile(r"[A-Z]")


def last_boxed(text: str) -> str | None:
  """Content of the last `\\boxed{...}` (balanced braces), or None if there is none or it is unclosed."""
  start = text.rfind("\\boxed{")
  while start != -1:
    i = start + len("\\boxed{")
    depth = 1
    while i < len(text):
      c = text[i]
      if c == "{":
        depth += 1
      elif c == "}":
        depth -= 1
        if depth == 0:
          return text[start + len("\\boxed{"):i]
      i += 1
    start = text.rfind("\\boxed{", 0, start)  # unclosed: try an earlier one
  return None


def matches_answer_type(gold: str, answer_type: str, num_choices: int | None = None) -> bool:
  """Whether a gold string is well-formed for its declared answer type."""
  g = gold.strip()
  if not g:
    return False
  if answer_type == "integer":
    return bool(_INT_RE.fullmatch(g))
  if answer_type == "float":
    return bool(_FLOAT_RE.fullmatch(g))
  if answer_type == "fraction":
    return bool(_FRACTION_RE.fullmatch(g) or _LATEX_FRACTION_RE.fullmatch(g) or _INT_RE.fullmatch(g))
  if answer_type == "multiple_choice":
    if not _LETTER_RE.fullmatch(g):
      return False
    return num_choices is None or ord(g) - ord("A") < num_choices
  if answer_type == "yes_no":
    return g.lower() in ("yes", "no")
  return answer_type in ANSWER_TYPES


_OPTION_LINE_RE = re.compile(r"(^|\n)\s*\(?[A-E][\).:]\s")


def infer_answer_type(gold: str, question: str = "") -> str:
  """Best-effort answer type of a gold string (RL prompt rows carry none)."""
  g = gold.strip()
  if _INT_RE.fullmatch(g):
    return "integer"
  if _FLOAT_RE.fullmatch(g):
    return "float"
  if _FRACTION_RE.fullmatch(g) or _LATEX_FRACTION_RE.fullmatch(g):
    return "fraction"
  if _LETTER_RE.fullmatch(g) and _OPTION_LINE_RE.search(question):
    return "multiple_choice"
  if g.lower() in ("yes", "no"):
    return "yes_no"
  if any(c in g for c in "\\^_{}=") or re.search(r"\d", g):
    return "expression"
  return "text"


def iter_files(path: str | os.PathLike | Sequence[str | os.PathLike], suffixes: Iterable[str]) -> list[Path]:
  """A file, a directory (its files with the given suffixes, sorted), or a list of either."""
  suffixes = tuple(suffixes)
  if isinstance(path, (str, os.PathLike)):
    paths = [Path(path)]
  else:
    paths = [Path(p) for p in path]
  out: list[Path] = []
  for p in paths:
    if p.is_dir():
      found = sorted(q for q in p.iterdir() if q.is_file() and q.name.endswith(suffixes))
      if not found:
        raise FileNotFoundError(f"{p}: no {'/'.join(suffixes)} files in this directory")
      out.extend(found)
    elif p.is_file():
      out.append(p)
    else:
      raise FileNotFoundError(f"{p}: no such file or directory")
  return out
