"""Row machinery shared by the dataset readers: files to rows, bad-row errors, image references.

`read_rows(path, convert, ...)` walks parquet / JSON-lines files row by row and calls `convert(row, ctx)`;
`ctx` (a `RowContext`) builds `DataError`s that name the file, row and field, and turns image fields
(HF `{"bytes", "path"}` dicts, base64 strings in JSON, relative paths) into checked `ImageRef`s, refusing
paths that are absolute or resolve outside the image root. The readers themselves are in `sources.py`
(RL prompts, benchmarks) and `llamafactory.py` (preference pairs).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePath
from typing import Any

from specs_jax.data.types import IMAGE_TOKEN, DataError, ImageRef, ReadResult, count_image_parts, iter_files, last_boxed

log = logging.getLogger("specs_jax.data.sources")  # one logger for every reader

DATA_SUFFIXES = (".parquet", ".jsonl", ".json")
LOGGED_ERRORS = 10


def _parse_json(text: str) -> Any:
  """json.loads, with every way arbitrary text can fail it turned into one ValueError: a bad document
  (JSONDecodeError), an integer over Python's 4,300-digit limit (ValueError), nesting deeper than the
  C parser's recursion limit (RecursionError)."""
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{e.msg} at column {e.colno}") from e
  except (ValueError, RecursionError) as e:
    raise ValueError(f"{type(e).__name__}: {str(e)[:120]}") from e


def _iter_parquet(path: Path) -> Iterator[tuple[int, int | None, Any]]:
  import pyarrow.parquet as pq  # lazy: pyarrow takes ~0.3 s to import

  try:
    pf = pq.ParquetFile(path)
  except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
    raise DataError(path, None, None, "bad_value", f"cannot read parquet file: {e}") from e
  i = 0
  batches = pf.iter_batches(batch_size=64)
  while True:
    try:  # a corrupt page surfaces here, mid-file, as a bare OSError / ArrowInvalid
      batch = next(batches, None)
    except Exception as e:
      raise DataError(path, None, None, "bad_value", f"cannot read parquet file after row {i}: {e}") from e
    if batch is None:
      return
    for row in batch.to_pylist():
      yield i, None, row
      i += 1


def iter_rows(path: Path) -> Iterator[tuple[int, int | None, Any]]:
  """(row index, JSON line number or None, row or DataError) for every row of a data file.

  JSON lines are split on "\n" only (JSON strings may hold U+2028, NEL, ... unescaped, which
  `str.splitlines` would split on) and decoded one by one, so a line that is not UTF-8 is one bad row.
  A UTF-8 byte-order mark at the start of the file is ignored.
  """
  if path.suffix == ".parquet":
    yield from _iter_parquet(path)
    return
  if path.suffix not in (".jsonl", ".json"):
    raise DataError(path, None, None, "bad_value", f"unsupported file type {path.suffix!r}; expected {DATA_SUFFIXES}")
  data = path.read_bytes()
  if data.startswith(codecs.BOM_UTF8):
    data = data[len(codecs.BOM_UTF8):]
  if path.suffix == ".json" and data.lstrip().startswith(b"["):
    try:
      rows = _parse_json(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
      raise DataError(path, None, None, "bad_json", f"invalid JSON array: {e}") from e
    for i, row in enumerate(rows):
      yield i, None, row if isinstance(row, dict) else DataError(path, i, None, "bad_json", "row is not a JSON object")
    return
  i = 0
  for line_no, raw in enumerate(data.split(b"\n"), start=1):
    if not raw.strip():
      continue
    try:
      row = _parse_json(raw.decode("utf-8"))
      if not isinstance(row, dict):
        row = DataError(path, i, None, "bad_json", "row is not a JSON object", line=line_no)
    except UnicodeDecodeError as e:
      row = DataError(path, i, None, "bad_json", f"line is not valid UTF-8 ({e.reason} at byte {e.start})",
                      line=line_no)
    except ValueError as e:
      row = DataError(path, i, None, "bad_json", f"invalid JSON: {e}", line=line_no)
    yield i, line_no, row
    i += 1


class RowContext:
  """Context for converting one row: builds `DataError`s that name the file, row and field."""

  def __init__(self, path: Path, index: int, line: int | None, image_root: Path, check_images: bool):
    self.path, self.index, self.line = path, index, line
    self.image_root, self.check_images = image_root, check_images

  def error(self, field: str | None, reason: str, detail: str) -> DataError:
    return DataError(self.path, self.index, field, reason, detail, line=self.line)

  def require(self, row: Mapping, key: str, field: str | None = None, types: tuple = ()) -> Any:
    field = field or key
    if not isinstance(row, Mapping) or row.get(key) is None:
      raise self.error(field, "missing_field", "required field is missing or null")
    value = row[key]
    if types and not isinstance(value, types):
      names = "/".join(t.__name__ for t in types)
      raise self.error(field, "bad_value", f"expected {names}, got {type(value).__name__}")
    return value

  def image(self, value: Any, field: str) -> ImageRef:
    """An `ImageRef` for an image field value (bytes dict, path dict or path string), checked."""
    if isinstance(value, Mapping):
      data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray)):
      data, path = value, None
    else:
      data, path = None, value
    if data is not None:
      if isinstance(data, str):  # JSON files carry bytes as base64
        try:
          data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as e:
          raise self.error(field, "bad_image", f"image bytes are not valid base64: {e}") from e
      if not isinstance(data, (bytes, bytearray)):
        raise self.error(field, "bad_image", f"image bytes have type {type(data).__name__}")
      ref = ImageRef(data=bytes(data))
    elif isinstance(path, str) and path:
      ref = ImageRef(path=str(self._resolve(path, field)))
    else:
      raise self.error(field, "bad_image", f"no image bytes or path (got {type(value).__name__})")
    if self.check_images:
      try:
        ref.load()
      except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise self.error(field, "bad_image", f"cannot decode image ({type(e).__name__}: {e})") from e
    return ref

  def _resolve(self, rel: str, field: str) -> Path:
    if PurePath(rel).is_absolute() or os.path.isabs(rel):
      raise self.error(field, "image_outside_root",
                       f"absolute image path {rel!r} refused; give paths relative to the image root {self.image_root}")
    if "\x00" in rel:
      raise self.error(field, "bad_image", f"image path {rel[:80]!r} contains a NUL character")
    root = self.image_root.resolve()
    try:
      resolved = (root / rel).resolve()  # follows symlinks
      if not resolved.is_relative_to(root):
        raise self.error(field, "image_outside_root", f"image path {rel!r} resolves to {resolved}, outside {root}")
      is_file = resolved.is_file()
    except (OSError, RuntimeError) as e:  # a name too long; a symlink loop (RuntimeError before Python 3.13)
      detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)[:120]
      raise self.error(field, "bad_image", f"image path {rel[:80]!r} cannot be resolved: {detail}") from e
    if not is_file:
      raise self.error(field, "bad_image", f"image file {rel!r} not found under {root}")
    return resolved


def read_rows(path, convert: Callable[[dict, RowContext], Any], image_root, on_error: str, check_images: bool,
              keep: Callable[[dict], bool] | None = None, what: str = "rows") -> ReadResult:
  """Converts every row of every file with `convert(row, ctx)`, skipping or failing on bad rows.

  A `DataError` raised by `convert` is a bad row: re-raised with on_error="fail", else counted in the
  result (the first `LOGGED_ERRORS` are logged one by one, the counts once at the end). A file that cannot
  be read at all (not parquet, not JSON, unknown suffix) raises whatever `on_error` says.
  """
  if on_error not in ("skip", "fail"):
    raise ValueError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
  result: ReadResult = ReadResult()
  for file in iter_files(path, DATA_SUFFIXES):
    result.files.append(str(file))
    root = Path(image_root) if image_root is not None else file.parent
    for index, line, row in iter_rows(file):
      try:
        if isinstance(row, DataError):
          raise row
        if keep is not None and not keep(row):
          result.filtered += 1
          continue
        result.examples.append(convert(row, RowContext(file, index, line, root, check_images)))
      except DataError as e:
        if on_error == "fail":
          raise
        if result.num_skipped < LOGGED_ERRORS:
          log.warning("skipping a bad row: %s", e)
        result.add_error(e)
  (log.warning if result.skipped else log.info)("%s: %s", what, result.summary())
  return result


def gold_string(value: Any, ctx: RowContext, field: str) -> str:
  """The gold answer as a string: numbers stringified, a `\\boxed{X}` answer unwrapped."""
  if isinstance(value, bool) or not isinstance(value, (str, int, float)):
    raise ctx.error(field, "bad_answer_type", f"expected a string or number, got {type(value).__name__}")
  s = str(value).strip()
  if "\\boxed{" in s:
    inner = last_boxed(s)
    if inner is None:
      raise ctx.error(field, "bad_answer_type", f"unbalanced \\boxed{{ in {s[:80]!r}")
    s = inner.strip()
  if not s:
    raise ctx.error(field, "bad_answer_type", "empty answer")
  return s


def attach_images(messages: list[dict], n_images: int, ctx: RowContext, field: str) -> None:
  """Makes the image parts match the images: missing placeholders are prepended to the first user turn."""
  n_parts = count_image_parts(messages)
  if n_parts > n_images:
    raise ctx.error(field, "image_count_mismatch", f"{n_parts} {IMAGE_TOKEN} placeholders but {n_images} images")
  if n_parts < n_images:
    first_user = next(m for m in messages if m["role"] == "user")
    first_user["content"] = [{"type": "image"} for _ in range(n_images - n_parts)] + first_user["content"]


def image_list(values: Any, ctx: RowContext, field: str) -> list[ImageRef]:
  """`ImageRef`s for an images field: a list of image values, a single one, or None (no images)."""
  if values is None:
    return []
  if isinstance(values, (str, bytes, Mapping)):
    values = [values]
  if not isinstance(values, (list, tuple)):
    raise ctx.error(field, "bad_image", f"expected a list of images, got {type(values).__name__}")
  return [ctx.image(v, f"{field}[{k}]") for k, v in enumerate(values)]
