"""specs_jax.data.records: ArrayRecord round trips through tensorflow-datasets, determinism, bad records."""

import filecmp
import io
import os
import pickle
import sys

import grain
import numpy as np
import pytest
from PIL import Image

from specs_jax.data import records, synthetic
from specs_jax.data.types import DataError, Example, ImageRef, PreferencePair, example_fingerprint


@pytest.fixture(scope="module")
def examples():
  return synthetic.make_split("train", 40, seed=3)


def make_pairs(examples):
  return [PreferencePair(id=f"pair/{i}", messages=ex.messages, images=ex.images,
                         chosen=synthetic.reasoning_text(ex), rejected=f"<think>no</think><answer>{i}</answer>",
                         meta={"family": ex.meta["family"], "i": i})
          for i, ex in enumerate(examples)]


def files_of(root):
  out = {}
  for d, _, names in os.walk(root):
    for n in names:
      p = os.path.join(d, n)
      out[os.path.relpath(p, root)] = p
  return out


def test_examples_round_trip_in_order(tmp_path, examples):
  path = records.write_examples(examples, tmp_path, "pool")
  assert path == records.dataset_dir(tmp_path, "pool", "examples")
  assert any(n.startswith("specs_records-train.array_record-") for n in os.listdir(path))
  src = records.open_examples(tmp_path, "pool")
  assert len(src) == len(examples)
  for i in (0, 1, 17, 39, -1):
    got, want = src[i], examples[i]
    assert got.id == want.id  # record i is input i (tfds shuffling disabled)
    # Every field, images compared as decoded pixels (synthetic images went through PNG: lossless).
    assert example_fingerprint(got) == example_fingerprint(want)
    assert all(isinstance(im, ImageRef) and im.data[:4] == b"\x89PNG" for im in got.images)
  assert [e.id for e in src.__getitems__([5, 2, 5])] == [examples[5].id, examples[2].id, examples[5].id]
  assert [e.id for e in src[3:6]] == [e.id for e in examples[3:6]]
  with pytest.raises(IndexError, match="out of range for 40 records"):
    src[40]


def test_same_input_gives_byte_identical_files(tmp_path, examples):
  a = records.write_examples(examples, tmp_path / "a", "pool")
  b = records.write_examples(iter(examples), tmp_path / "b", "pool")  # a generator works too
  fa, fb = files_of(tmp_path / "a"), files_of(tmp_path / "b")
  assert sorted(fa) == sorted(fb) and len(fa) >= 3
  for rel in fa:
    assert filecmp.cmp(fa[rel], fb[rel], shallow=False), rel
  # ... and the check can fail: one changed gold changes the shard.
  changed = list(examples)
  e = changed[7]
  changed[7] = Example(e.id, e.messages, e.images, e.gold + "0", e.answer_type, e.source, e.meta)
  c = records.write_examples(changed, tmp_path / "c", "pool")
  shard = [n for n in os.listdir(a) if "array_record" in n][0]
  assert not filecmp.cmp(a / shard, c / shard, shallow=False)
  assert b.relative_to(tmp_path / "b") == a.relative_to(tmp_path / "a")


def test_pairs_round_trip_with_reference_logps(tmp_path, examples):
  pairs = make_pairs(examples[:10])
  ref = np.stack([-np.arange(10) * 1.1 - 0.123456789012345, -np.arange(10) * 2.0 - 1e-9], axis=1)
  records.write_pairs(pairs, tmp_path, "pairs", ref_logps=ref)
  src = records.open_pairs(tmp_path, "pairs")
  assert len(src) == 10
  for i in (0, 9):
    got = src[i]
    assert (got.id, got.chosen, got.rejected) == (pairs[i].id, pairs[i].chosen, pairs[i].rejected)
    assert got.meta["i"] == i
    # float64 survives JSON exactly.
    assert got.meta[records.REF_CHOSEN_KEY] == ref[i, 0] and got.meta[records.REF_REJECTED_KEY] == ref[i, 1]
    assert [np.asarray(im.load()).tobytes() for im in got.images] == [
        np.asarray(im.load()).tobytes() for im in pairs[i].images]
  # Without ref_logps, pairs keep none.
  records.write_pairs(pairs[:2], tmp_path, "plain")
  assert records.REF_CHOSEN_KEY not in records.open_pairs(tmp_path, "plain")[0].meta
  with pytest.raises(ValueError, match=r"ref_logps must have shape \[10, 2\]"):
    records.write_pairs(pairs, tmp_path, "bad", ref_logps=ref[:, :1])


def test_encoded_images_are_stored_as_is(tmp_path, examples):
  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), np.uint8)).save(buf, format="JPEG")
  jpeg = buf.getvalue()
  (tmp_path / "img.jpg").write_bytes(jpeg)
  ex = examples[0]
  rows = [Example("jpeg-bytes", ex.messages[:1], [ImageRef(data=jpeg)] * len(ex.images), "1", "integer", "t", {}),
          Example("jpeg-path", ex.messages[:1], [ImageRef(path=os.fspath(tmp_path / "img.jpg"))] * len(ex.images),
                  "1", "integer", "t", {}),
          Example("broken", ex.messages[:1], [ImageRef(data=b"not an image")] * len(ex.images), "1", "integer", "t",
                  {})]
  records.write_examples(rows, tmp_path, "raw")
  src = records.open_examples(tmp_path, "raw")
  assert src[0].images[0].data == jpeg and src[1].images[0].data == jpeg  # JPEG not re-encoded
  # Undecodable bytes are kept, and fail when the image is loaded (the pipeline counts or raises it).
  assert src[2].images[0].data == b"not an image"
  with pytest.raises(OSError):
    src[2].images[0].load()


def test_bad_records_name_file_row_and_field(tmp_path, examples):
  with pytest.raises(DataError, match=r"shard\.ar: row 3: not a specs_jax record .*\[bad_value\]"):
    records.decode_example(b"junk", "shard.ar", 3)
  good = records.encode_example(examples[0])
  with pytest.raises(DataError, match=r"row 4: field 'kind': expected a pair record, got 'example'"):
    records.decode_pair(good, "shard.ar", 4)
  n = int.from_bytes(good[4:8], "little")
  with pytest.raises(DataError, match=r"row 5: field 'images\[0\]': record is truncated"):
    records.decode_example(good[:8 + n + 10], "shard.ar", 5)
  header = good[8:8 + n].replace(b'"gold":', b'"gilt":')
  with pytest.raises(DataError, match=r"row 6: field 'gold': field is missing \[missing_field\]"):
    records.decode_example(good[:8] + header + good[8 + n:], "shard.ar", 6)
  with pytest.raises(DataError, match=r"\[bad_json\]"):
    records.decode_example(good[:8] + b"{" * n + good[8 + n:], "shard.ar", 7)
  # A field that JSON cannot hold is refused at write time, naming the example.
  e = examples[0]
  bad = Example("unjsonable", e.messages, e.images, e.gold, e.answer_type, e.source, {"x": object()})
  with pytest.raises(ValueError, match="example 'unjsonable': a field is not JSON-serialisable"):
    records.encode_example(bad)


def test_names_kinds_and_overwrite(tmp_path, examples):
  records.write_examples(examples[:3], tmp_path, "pool")
  with pytest.raises(FileExistsError, match="overwrite=True"):
    records.write_examples(examples[:3], tmp_path, "pool")
  records.write_examples(examples[3:5], tmp_path, "pool", overwrite=True)
  assert [e.id for e in records.open_examples(tmp_path, "pool")] == [examples[3].id, examples[4].id]
  with pytest.raises(FileNotFoundError, match="holds examples: open it with open_examples"):
    records.open_pairs(tmp_path, "pool")
  with pytest.raises(FileNotFoundError, match="no examples record set 'nope'"):
    records.open_examples(tmp_path, "nope")
  with pytest.raises(ValueError, match="no examples to write"):
    records.write_examples([], tmp_path, "empty")
  for bad in ("", "a/b", "../x", ".hidden"):
    with pytest.raises(ValueError, match="record set name"):
      records.write_examples(examples[:1], tmp_path, bad)


def test_source_feeds_grain_and_pickles(tmp_path, examples):
  records.write_examples(examples[:12], tmp_path, "pool")
  src = records.open_examples(tmp_path, "pool")
  clone = pickle.loads(pickle.dumps(src))  # what grain does when it sends the source to a worker
  assert clone[4].id == examples[4].id and len(clone) == 12
  ds = grain.MapDataset.source(src).seed(0).shuffle().map(lambda e: e.id)
  ids = list(ds)
  assert sorted(ids) == sorted(e.id for e in examples[:12]) and ids != [e.id for e in examples[:12]]
  assert "tensorflow" not in sys.modules  # tfds reads and writes without TensorFlow
