"""ArrayRecord storage of prompt pools (`Example`s) and preference pairs, through tensorflow-datasets.

    records.write_examples(examples, "DIR/pools", "train")        # -> DIR/pools/train/specs_records/examples/1.0.0/
    pool = records.open_examples("DIR/pools", "train")           # random access: len(pool), pool[i] -> Example
    records.write_pairs(pairs, "DIR/distill", "pairs", ref_logps=ref)   # ref: [N, 2] (chosen, rejected), optional
    pairs = records.open_pairs("DIR/distill", "pairs")           # -> PreferencePair, refs in pair.meta

Writing goes through a tensorflow-datasets `GeneratorBasedBuilder` with `file_format="array_record"` and
reading through `tfds.data_source`; neither imports TensorFlow (ENVIRONMENT.md §1). The sources returned
by `open_*` have `__len__` / `__getitem__`, pickle, and plug straight into `grain.MapDataset.source` (and
`pipeline.prompt_batches`).

Each record is one bytes feature, so the builder stays trivial:

    b"SPJX" | uint32 little-endian header length | header JSON (utf-8) | image 0 bytes | image 1 bytes | ...

The header holds every field of the example or pair (messages, gold, answer_type, source, meta, ...) and
`image_bytes`, the length of each image. Images are stored encoded: an `ImageRef` keeps its original file
bytes (JPEG stays JPEG, and bytes that do not decode stay as they are, to fail at load time like the
original would); any other image (PIL, rendered synthetic images) is stored as PNG. Read back, images are
lazy `ImageRef(data=...)`s, decoded only when the pipeline loads them.

Order and determinism: record i is the i-th input (tfds shuffling is disabled), and the same inputs give
byte-identical files (JSON with sorted keys, PNG without timestamps, tfds metadata without dates).
Reference log-probs of pairs live in `pair.meta[REF_CHOSEN_KEY]` / `pair.meta[REF_REJECTED_KEY]` (summed
log-probs of the response under the frozen reference model, as floats; JSON keeps float64 exactly).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import os
import re
import shutil
import struct
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from specs_jax.data.types import DataError, Example, ImageRef, LazyImage, PreferencePair
from specs_jax.data.types import load_image as load_lazy_image
from specs_jax.processing import image as image_lib

log = logging.getLogger("specs_jax.data.records")

MAGIC = b"SPJX"
BUILDER_NAME = "specs_records"
KINDS = ("examples", "pairs")
REF_CHOSEN_KEY = "ref_chosen_logps"
REF_REJECTED_KEY = "ref_rejected_logps"
_HEADER_LEN = struct.Struct("<I")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

T = TypeVar("T", Example, PreferencePair)


# ----------------------------------------------------------------------------------------------------------
# One record <-> bytes


def _image_bytes(image: Any, what: str) -> bytes:
  """Encoded bytes of one image: an `ImageRef`'s own bytes, anything else as PNG."""
  if isinstance(image, ImageRef):
    if image.data is not None:
      return bytes(image.data)
    try:
      return Path(image.path).read_bytes()
    except OSError as e:
      raise ValueError(f"{what}: cannot read image file {image.path!r}: {e}") from e
  if isinstance(image, (bytes, bytearray, memoryview)):
    return bytes(image)
  try:
    pil = load_lazy_image(image) if isinstance(image, (Image.Image, LazyImage)) else image_lib.load_image(image)
  except (OSError, ValueError, TypeError) as e:
    raise ValueError(f"{what}: cannot encode image {image!r}: {type(e).__name__}: {e}") from e
  buf = io.BytesIO()
  pil.save(buf, format="PNG")  # no optimize / no text chunks: same pixels -> same bytes
  return buf.getvalue()


def _dumps(header: dict, what: str) -> bytes:
  try:
    return json.dumps(header, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
  except (TypeError, ValueError) as e:
    raise ValueError(f"{what}: a field is not JSON-serialisable ({e}); messages and meta must be plain JSON") from e


def _pack(header: dict, images: Sequence[Any], what: str) -> bytes:
  blobs = [_image_bytes(im, f"{what}: images[{k}]") for k, im in enumerate(images)]
  head = _dumps({**header, "image_bytes": [len(b) for b in blobs]}, what)
  return b"".join([MAGIC, _HEADER_LEN.pack(len(head)), head, *blobs])


def encode_example(example: Example) -> bytes:
  """One `Example` -> record bytes (see the module docstring for the layout)."""
  header = {"kind": "example", "id": example.id, "messages": example.messages, "gold": example.gold,
            "answer_type": example.answer_type, "source": example.source, "meta": example.meta}
  return _pack(header, example.images, f"example {example.id!r}")


def encode_pair(pair: PreferencePair) -> bytes:
  """One `PreferencePair` -> record bytes."""
  header = {"kind": "pair", "id": pair.id, "messages": pair.messages, "chosen": pair.chosen,
            "rejected": pair.rejected, "meta": pair.meta}
  return _pack(header, pair.images, f"pair {pair.id!r}")


def _unpack(data: bytes, path: str, row: int) -> tuple[dict, list[ImageRef]]:
  if not data.startswith(MAGIC) or len(data) < len(MAGIC) + _HEADER_LEN.size:
    raise DataError(path, row, None, "bad_value", f"not a specs_jax record (starts {bytes(data[:8])!r})")
  (n,) = _HEADER_LEN.unpack_from(data, len(MAGIC))
  start = len(MAGIC) + _HEADER_LEN.size
  try:
    header = json.loads(data[start:start + n].decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DataError(path, row, None, "bad_json", f"record header does not parse: {e}") from e
  if not isinstance(header, dict):
    raise DataError(path, row, None, "bad_json", "record header is not a JSON object")
  sizes = header.pop("image_bytes", None)
  if not isinstance(sizes, list) or not all(isinstance(s, int) and s >= 0 for s in sizes):
    raise DataError(path, row, "image_bytes", "missing_field", "missing or malformed image sizes")
  offset, images = start + n, []
  for k, size in enumerate(sizes):
    if offset + size > len(data):
      raise DataError(path, row, f"images[{k}]", "bad_image", "record is truncated inside this image")
    images.append(ImageRef(data=bytes(data[offset:offset + size])))
    offset += size
  return header, images


def _field(header: dict, name: str, path: str, row: int, types: tuple[type, ...]) -> Any:
  value = header.get(name)
  if value is None:
    raise DataError(path, row, name, "missing_field", "field is missing")
  if not isinstance(value, types):
    raise DataError(path, row, name, "bad_value", f"expected {'/'.join(t.__name__ for t in types)}, "
                    f"got {type(value).__name__}")
  return value


def decode_example(data: bytes, path: str = "<bytes>", row: int = 0) -> Example:
  """Record bytes -> `Example` with lazy `ImageRef` images.

  Raises:
    DataError: naming `path`, `row` and the field, for a record that is not an example or is malformed.
  """
  header, images = _unpack(data, path, row)
  if header.get("kind") != "example":
    raise DataError(path, row, "kind", "bad_value", f"expected an example record, got {header.get('kind')!r}")
  f = lambda name, *types: _field(header, name, path, row, types or (str,))  # noqa: E731
  return Example(id=f("id"), messages=f("messages", list), images=images, gold=f("gold"),
                 answer_type=f("answer_type"), source=f("source"), meta=header.get("meta") or {})


def decode_pair(data: bytes, path: str = "<bytes>", row: int = 0) -> PreferencePair:
  """Record bytes -> `PreferencePair` with lazy `ImageRef` images (see `decode_example`)."""
  header, images = _unpack(data, path, row)
  if header.get("kind") != "pair":
    raise DataError(path, row, "kind", "bad_value", f"expected a pair record, got {header.get('kind')!r}")
  f = lambda name, *types: _field(header, name, path, row, types or (str,))  # noqa: E731
  return PreferencePair(id=f("id"), messages=f("messages", list), images=images, chosen=f("chosen"),
                        rejected=f("rejected"), meta=header.get("meta") or {})


# ----------------------------------------------------------------------------------------------------------
# The tfds builder


class SpecsRecords(tfds.core.GeneratorBasedBuilder):
  """One split ("train") of already-encoded records, one bytes feature each, in input order.

  The records to write are given to the constructor (`records=`); reading needs none. The config
  ("examples" or "pairs") says what the records hold, so a pairs file cannot be opened as a prompt pool.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "specs_jax records: MAGIC | header length | JSON header | image bytes."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=kind, description=f"specs_jax {kind}") for kind in KINDS]

  def __init__(self, *, records: Iterable[bytes] | None = None, **kwargs):
    self._records = records
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    # tfds only uses this to find a checksums file (we download nothing). Its default, for a builder
    # defined inside a package, imports `importlib_resources`, which is not installed: ModuleNotFoundError.
    return None

  # tfds prints these two lines to stdout (termcolor); library code logs instead (STYLE.md §10).
  def _log_download_bytes(self) -> None:
    log.debug("preparing %s/%s in %s", self.name, self.builder_config.name, self.data_dir)

  def _log_download_done(self) -> None:
    log.debug("prepared %s/%s in %s", self.name, self.builder_config.name, self.data_dir)

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo(builder=self, ...) rather than dataset_info_from_configs, which wants a package dir.
    return tfds.core.DatasetInfo(
        builder=self,
        description="specs_jax records (see specs_jax/data/records.py)",
        features=tfds.features.FeaturesDict({"record": tfds.features.Tensor(shape=(), dtype=np.object_)}),
        disable_shuffling=True,  # record i is input i; tfds would otherwise order by a hash of the key
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self) -> Iterator[tuple[int, dict[str, bytes]]]:
    if self._records is None:
      raise ValueError("SpecsRecords: no records given; write with records.write_examples / write_pairs")
    for i, record in enumerate(self._records):
      yield i, {"record": record}


@contextlib.contextmanager
def _quiet_tfds():
  """tfds shows tqdm bars for every split; hide them while writing and restore the previous setting."""
  from tensorflow_datasets.core.utils import tqdm_utils

  previous = getattr(tqdm_utils, "_active", True)
  tfds.display_progress_bar(False)
  try:
    yield
  finally:
    tfds.display_progress_bar(previous)


def _data_dir(out_dir: str | os.PathLike, name: str) -> Path:
  if not _NAME_RE.fullmatch(name or ""):
    raise ValueError(f"record set name {name!r} must match {_NAME_RE.pattern} (no path separators)")
  return Path(out_dir) / name


def dataset_dir(out_dir: str | os.PathLike, name: str, kind: str) -> Path:
  """The directory holding the ArrayRecord shard and tfds metadata of one record set."""
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  return _data_dir(out_dir, name) / BUILDER_NAME / kind / str(SpecsRecords.VERSION)


def _write(records: Iterable[bytes], out_dir: str | os.PathLike, name: str, kind: str, overwrite: bool) -> Path:
  data_dir = _data_dir(out_dir, name)
  target = dataset_dir(out_dir, name, kind)
  if target.exists():
    if not overwrite:
      raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    shutil.rmtree(target)
  records = iter(records)
  first = next(records, None)
  if first is None:  # tfds would fail later with "No examples were yielded"
    raise ValueError(f"no {kind} to write to {target}")
  counter = {"n": 0}

  def counted():
    for r in itertools.chain([first], records):
      counter["n"] += 1
      yield r

  builder = SpecsRecords(records=counted(), data_dir=os.fspath(data_dir), config=kind, file_format="array_record")
  with _quiet_tfds():
    builder.download_and_prepare()
  log.info("wrote %d %s to %s", counter["n"], kind, target)
  return target


def write_examples(examples: Iterable[Example], out_dir: str | os.PathLike, name: str, *,
                   overwrite: bool = False) -> Path:
  """Writes a prompt pool as ArrayRecord through tfds.

  Args:
    examples: the examples, stored in this order (record i = examples[i]); consumed lazily.
    out_dir: parent directory; the set goes to `out_dir/name/specs_records/examples/1.0.0/`.
    name: the record set's name (letters, digits, `_.-`).
    overwrite: replace an existing set of that name (otherwise FileExistsError).
  Returns:
    the dataset directory. The same examples give byte-identical files.
  Raises:
    ValueError: naming the example, for an image that cannot be read or a field that is not JSON.
  """
  return _write((encode_example(ex) for ex in examples), out_dir, name, "examples", overwrite)


def write_pairs(pairs: Iterable[PreferencePair], out_dir: str | os.PathLike, name: str, *,
                ref_logps: np.ndarray | Sequence[Sequence[float]] | None = None, overwrite: bool = False) -> Path:
  """Writes preference pairs as ArrayRecord through tfds (see `write_examples`).

  Args:
    pairs: the pairs, stored in this order.
    ref_logps: optional [N, 2] float, (chosen, rejected) summed log-probs of the responses under the
      reference model, stored in each pair's meta under `REF_CHOSEN_KEY` / `REF_REJECTED_KEY` (pairs whose
      meta already has them keep their own when this is None).
  """
  if ref_logps is None:
    return _write((encode_pair(p) for p in pairs), out_dir, name, "pairs", overwrite)
  pairs = list(pairs)
  ref = np.asarray(ref_logps, dtype=np.float64)
  if ref.shape != (len(pairs), 2):
    raise ValueError(f"ref_logps must have shape [{len(pairs)}, 2] (one (chosen, rejected) row per pair), "
                     f"got {ref.shape}")
  with_ref = (PreferencePair(p.id, p.messages, p.images, p.chosen, p.rejected,
                             {**p.meta, REF_CHOSEN_KEY: float(c), REF_REJECTED_KEY: float(r)})
              for p, (c, r) in zip(pairs, ref))
  return _write((encode_pair(p) for p in with_ref), out_dir, name, "pairs", overwrite)


# ----------------------------------------------------------------------------------------------------------
# Reading


class RecordSource(Sequence, Generic[T]):
  """Random access to a record set: `len(src)`, `src[i]` -> `Example` / `PreferencePair`.

  A grain data source (also `__getitems__` for batched reads); pickles by path, so it can be sent to
  grain worker processes. Malformed records raise `DataError` naming the shard file, the row and the field.
  """

  def __init__(self, out_dir: str | os.PathLike, name: str, kind: str):
    self.out_dir, self.name_, self.kind = os.fspath(out_dir), name, kind
    self.path = os.fspath(dataset_dir(out_dir, name, kind))
    if not os.path.isdir(self.path):
      other = [k for k in KINDS if k != kind and dataset_dir(out_dir, name, k).is_dir()]
      hint = f" (it holds {other[0]}: open it with open_{other[0]})" if other else ""
      raise FileNotFoundError(f"no {kind} record set {name!r} in {self.out_dir}: {self.path} is missing{hint}")
    self._open()

  def _open(self) -> None:
    self._source = tfds.data_source(f"{BUILDER_NAME}/{self.kind}", split="train",
                                    data_dir=os.fspath(_data_dir(self.out_dir, self.name_)), download=False)
    self._decode = decode_example if self.kind == "examples" else decode_pair

  def __getstate__(self) -> dict:
    return {"out_dir": self.out_dir, "name_": self.name_, "kind": self.kind, "path": self.path}

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._open()

  @property
  def name(self) -> str:
    """What error messages call this source: its dataset directory."""
    return self.path

  def __len__(self) -> int:
    return len(self._source)

  def _index(self, i: int) -> int:
    n = len(self)
    j = i + n if i < 0 else i
    if not 0 <= j < n:
      raise IndexError(f"record index {i} out of range for {n} records in {self.path}")
    return int(j)

  def __getitem__(self, i):  # type: ignore[override]
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    j = self._index(i)
    return self._decode(self._source[j]["record"], self.path, j)

  def __getitems__(self, indices: Sequence[int]) -> list[T]:
    idx = [self._index(i) for i in indices]
    return [self._decode(r["record"], self.path, j) for r, j in zip(self._source.__getitems__(idx), idx)]

  def __repr__(self) -> str:
    return f"RecordSource({self.kind}, {len(self)} records, {self.path})"


def open_examples(out_dir: str | os.PathLike, name: str) -> RecordSource[Example]:
  """The prompt pool written by `write_examples(..., out_dir, name)`, via `tfds.data_source`."""
  return RecordSource(out_dir, name, "examples")


def open_pairs(out_dir: str | os.PathLike, name: str) -> RecordSource[PreferencePair]:
  """The pairs written by `write_pairs(..., out_dir, name)`, via `tfds.data_source`."""
  return RecordSource(out_dir, name, "pairs")
