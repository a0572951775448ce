"""specs_jax.data.pipeline: determinism, exact resume, sharding, skip/fail accounting, batch layouts.

Layouts are checked against `chat.encode_prompt` / `encode_response` called directly on the example, not
against the pipeline's own earlier output.
"""

import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

import hf_fixtures
from specs_jax.data import pipeline, records, synthetic
from specs_jax.data.types import DataError, Example, ImageRef, PreferencePair, user_message
from specs_jax.processing import chat
from specs_jax.processing import image as image_lib
from specs_jax.processing.batching import OverlongError
from specs_jax.processing.image import ImageConfig
from specs_jax.processing.tokenizer import build_tokenizer

IMG = ImageConfig(min_pixels=56 * 56, max_pixels=28 * 28 * 64)  # synthetic images: <= 64 patches each
PAD = 0  # <|endoftext|> in the built tokenizer


@pytest.fixture(scope="module")
def tok():
  return build_tokenizer(hf_fixtures.tokenizer_corpus())


@pytest.fixture(scope="module")
def pool():
  return synthetic.make_split("train", 24, seed=0)


def config(**kw):
  base = dict(batch_size=4, prompt_buckets=(128, 256, 512), completion_buckets=(64, 128, 256, 512),
              patch_buckets=(256, 512, 1024), max_images=3, image=IMG, num_threads=1)
  return pipeline.PromptPipelineConfig(**{**base, **kw})


def batches(fn, source, tok, cfg, shard=(0, 1)):
  return list(fn(source, tok, cfg, shard_index=shard[0], shard_count=shard[1]))


def digest(batch) -> str:
  """SHA-256 over every key: arrays as dtype + shape + bytes, host lists as JSON."""
  h = hashlib.sha256()
  for k in sorted(batch):
    v = batch[k]
    h.update(k.encode())
    if isinstance(v, np.ndarray):
      h.update(f"{v.dtype}{v.shape}".encode() + v.tobytes())
    else:
      h.update(json.dumps(v, sort_keys=True).encode())
  return h.hexdigest()


def ids_of(bs):
  return [i for b in bs for i, m in zip(b["example_id"], b["example_mask"]) if m]


def image_example(ident: str, sizes=((56, 56),), question: str = "How many circles?", images=None) -> Example:
  images = images if images is not None else [Image.new("RGB", s, (40 * k, 90, 200)) for k, s in enumerate(sizes)]
  return Example(ident, [user_message(question, len(images))], images, "3", "integer", "test",
                 {"question": question, "format": None})


def broken(ident: str) -> Example:
  return image_example(ident, images=[ImageRef(data=b"GIF89a but not really")])


# ----------------------------------------------------------------------------------------------------------
# Must show 1: determinism


def test_same_seed_gives_byte_identical_batches_and_another_seed_differs(tok, pool):
  a = batches(pipeline.prompt_batches, pool, tok, config(seed=5))
  b = batches(pipeline.prompt_batches, pool, tok, config(seed=5))
  c = batches(pipeline.prompt_batches, pool, tok, config(seed=6))
  assert len(a) == len(b) == len(c) == 6
  assert [digest(x) for x in a] == [digest(x) for x in b]
  assert [digest(x) for x in a] != [digest(x) for x in c]
  assert ids_of(a) != ids_of(c) and sorted(ids_of(a)) == sorted(ids_of(c)) == sorted(e.id for e in pool)
  assert ids_of(batches(pipeline.prompt_batches, pool, tok, config(shuffle=False))) == [e.id for e in pool]


def test_epochs_are_each_a_permutation_and_reshuffled(tok, pool):
  bs = batches(pipeline.prompt_batches, pool, tok, config(seed=1, num_epochs=2, batch_size=6))
  ids = ids_of(bs)
  first, second = ids[:24], ids[24:]
  assert len(bs) == 8 and sorted(first) == sorted(second) == sorted(e.id for e in pool)
  assert first != second  # grain folds the epoch into the shuffle seed


def test_records_source_gives_the_same_batches_as_the_list(tmp_path, tok, pool):
  records.write_examples(pool, tmp_path, "pool")
  from_records = batches(pipeline.prompt_batches, records.open_examples(tmp_path, "pool"), tok, config(seed=2))
  from_list = batches(pipeline.prompt_batches, pool, tok, config(seed=2))
  assert [digest(x) for x in from_records] == [digest(x) for x in from_list]


# ----------------------------------------------------------------------------------------------------------
# Batch layouts, against direct encoding


def test_prompt_batch_layout(tok, pool):
  (b, *_) = batches(pipeline.prompt_batches, pool, tok, config(shuffle=False))
  encs = [chat.encode_prompt(tok, ex.messages, ex.load_images(), IMG) for ex in pool[:4]]
  longest = max(len(e.input_ids) for e in encs)
  p = min(s for s in (128, 256, 512) if s >= longest)
  assert b["input_ids"].shape == b["attention_mask"].shape == (4, p) and b["input_ids"].dtype == np.int32
  for i, e in enumerate(encs):
    n = len(e.input_ids)
    np.testing.assert_array_equal(b["input_ids"][i, p - n:], e.input_ids)  # left-padded
    assert (b["input_ids"][i, :p - n] == PAD).all()
    assert b["attention_mask"][i].tolist() == [0] * (p - n) + [1] * n and b["prompt_lengths"][i] == n
  pv = np.concatenate([e.pixel_values for e in encs])
  grid = np.concatenate([e.image_grid_thw for e in encs])
  nb = min(s for s in (256, 512, 1024) if s >= len(pv))
  assert b["pixel_values"].shape == (nb, 1176) and b["patch_valid"].sum() == len(pv)
  np.testing.assert_array_equal(b["pixel_values"][:len(pv)], pv)
  assert not b["pixel_values"][len(pv):].any()
  assert b["image_grid_thw"].shape == (12, 3)  # batch_size * max_images rows
  np.testing.assert_array_equal(b["image_grid_thw"][:len(grid)], grid)
  assert not b["image_grid_thw"][len(grid):].any()
  assert b["num_images"].tolist() == [len(ex.images) for ex in pool[:4]]
  assert b["example_id"] == [ex.id for ex in pool[:4]] and b["gold"] == [ex.gold for ex in pool[:4]]
  assert b["answer_type"] == [ex.answer_type for ex in pool[:4]]
  assert b["format"] == [ex.meta["format"] for ex in pool[:4]] and b["example_mask"].all()
  assert set(pipeline.device_arrays(b)) == set(b) - pipeline.HOST_KEYS


def test_transparent_images_are_converted_as_transformers_does(tok):
  rgba = np.zeros((56, 84, 4), np.uint8)
  rgba[..., 0], rgba[:, :40, 3] = 200, 255  # red, left part opaque, the rest fully transparent
  buf = io.BytesIO()
  Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
  ex = image_example("rgba", images=[ImageRef(data=buf.getvalue())])
  (b,) = batches(pipeline.prompt_batches, [ex], tok, config(batch_size=1))
  want, _ = image_lib.preprocess(buf.getvalue(), **IMG.kwargs())  # alpha composited onto white, as HF
  dropped, _ = image_lib.preprocess(ImageRef(data=buf.getvalue()).load(), **IMG.kwargs())  # convert("RGB")
  np.testing.assert_array_equal(b["pixel_values"][:len(want)], want)
  assert not np.array_equal(want, dropped)


def test_last_partial_batch_is_filled_and_masked(tok, pool):
  bs = batches(pipeline.prompt_batches, pool[:10], tok, config(shuffle=False, drop_remainder=False))
  assert len(bs) == 3 and [b["input_ids"].shape[0] for b in bs] == [4, 4, 4]
  assert bs[2]["example_mask"].tolist() == [True, True, False, False]
  assert bs[2]["example_id"] == [pool[8].id, pool[9].id, "", ""]
  assert ids_of(bs) == [e.id for e in pool[:10]]
  assert len(batches(pipeline.prompt_batches, pool[:10], tok, config(shuffle=False))) == 2  # dropped


def make_pairs(examples, refs=True):
  out = []
  for i, ex in enumerate(examples):
    meta = {records.REF_CHOSEN_KEY: -10.0 - i, records.REF_REJECTED_KEY: -20.0 - i} if refs else {}
    out.append(PreferencePair(f"pair/{i}", ex.messages, ex.images, synthetic.reasoning_text(ex),
                              f"<answer>{i}</answer>", meta))
  return out


def test_pair_batch_layout(tok, pool):
  pairs = make_pairs(pool[:3])
  (b,) = batches(pipeline.pair_batches, pairs, tok, config(shuffle=False, batch_size=3))
  prompts = [chat.encode_prompt(tok, p.messages, p.load_images(), IMG) for p in pairs]
  chosen = [chat.encode_response(tok, p.chosen) for p in pairs]
  rejected = [chat.encode_response(tok, p.rejected) for p in pairs]
  assert all(c[-1] == tok.convert_tokens_to_ids("<|im_end|>") for c in chosen)
  p = min(s for s in (128, 256, 512) if s >= max(len(x.input_ids) for x in prompts))
  c = min(s for s in (64, 128, 256, 512) if s >= max(len(x) for x in chosen + rejected))
  assert b["input_ids"].shape == b["completion_mask"].shape == (6, p + c)
  for row, (prompt, resp) in enumerate(zip(prompts + prompts, chosen + rejected)):  # chosen rows, then rejected
    n, m = len(prompt.input_ids), len(resp)
    np.testing.assert_array_equal(b["input_ids"][row, p - n:p], prompt.input_ids)
    np.testing.assert_array_equal(b["input_ids"][row, p:p + m], resp)
    assert (b["input_ids"][row, p + m:] == PAD).all() and (b["input_ids"][row, :p - n] == PAD).all()
    assert b["completion_mask"][row].tolist() == [0] * p + [1] * m + [0] * (c - m)
    assert b["attention_mask"][row].tolist() == [0] * (p - n) + [1] * (n + m) + [0] * (c - m)
    assert (b["prompt_lengths"][row], b["completion_lengths"][row]) == (n, m)
  # Images once per pair, not once per row.
  n_patches = sum(len(x.pixel_values) for x in prompts)
  assert b["patch_valid"].sum() == n_patches and b["image_grid_thw"].shape == (9, 3)
  np.testing.assert_array_equal(b["pixel_values"][:n_patches], np.concatenate([x.pixel_values for x in prompts]))
  np.testing.assert_array_equal(b["ref_logps"], [-10, -11, -12, -20, -21, -22])
  assert b["example_id"] == ["pair/0", "pair/1", "pair/2"]


def test_pairs_without_refs_and_mixed_refs(tok, pool):
  (b,) = batches(pipeline.pair_batches, make_pairs(pool[:2], refs=False), tok,
                 config(shuffle=False, batch_size=2))
  assert "ref_logps" not in b
  mixed = make_pairs(pool[:1]) + make_pairs(pool[1:2], refs=False)
  with pytest.raises(ValueError, match="pair 'pair/0' has no reference log-probs but others in its batch do"):
    batches(pipeline.pair_batches, mixed, tok, config(shuffle=False, batch_size=2))


def test_sft_batches(tok, pool):
  ex = pool[0]
  with_response = Example(ex.id, ex.messages, ex.images, ex.gold, ex.answer_type, ex.source,
                          {**ex.meta, "response": "<answer>7</answer>"})
  rows = [make_pairs(pool[1:2])[0], with_response, pool[2]]  # pool[2] has no response
  it = pipeline.sft_batches(rows, tok, config(shuffle=False, batch_size=2), shard_index=0, shard_count=1)
  (b,) = list(it)
  assert it.counters.skipped["missing_field"] == 1
  prompts = [chat.encode_prompt(tok, r.messages, r.load_images(), IMG).input_ids for r in rows[:2]]
  p = min(s for s in (128, 256, 512) if s >= max(len(x) for x in prompts))
  for row, (prompt, text) in enumerate(zip(prompts, [synthetic.reasoning_text(pool[1]), "<answer>7</answer>"])):
    resp = chat.encode_response(tok, text)
    np.testing.assert_array_equal(b["input_ids"][row, p - len(prompt):p], prompt)
    np.testing.assert_array_equal(b["input_ids"][row, p:p + len(resp)], resp)
    assert b["completion_mask"][row].tolist() == [0] * p + [1] * len(resp) + [0] * (
        b["input_ids"].shape[1] - p - len(resp))
  assert b["example_id"] == [rows[0].id, rows[1].id] and b["image_grid_thw"].shape == (6, 3)


def test_custom_collate_gets_the_checked_items(tok, pool):
  seen = []

  def collate(items):
    seen.append(items)
    return {"ids": [it.example_id for it in items]}

  pairs = make_pairs(pool[:5])
  bs = batches(lambda *a, **k: pipeline.pair_batches(*a, **k, collate=collate), pairs, tok,
               config(shuffle=False, batch_size=2, drop_remainder=False))
  assert [b["ids"] for b in bs] == [["pair/0", "pair/1"], ["pair/2", "pair/3"], ["pair/4"]]  # last one not filled
  item = seen[0][0]
  want = chat.encode_prompt(tok, pairs[0].messages, pairs[0].load_images(), IMG)
  np.testing.assert_array_equal(item.prompt.input_ids, want.input_ids)
  np.testing.assert_array_equal(item.prompt.pixel_values, want.pixel_values)
  assert item.prompt.text == want.text and item.index == 0 and item.info["ref"] == (-10.0, -20.0)
  np.testing.assert_array_equal(item.completions[1], chat.encode_response(tok, pairs[0].rejected))


# ----------------------------------------------------------------------------------------------------------
# Must show 3: exact resume


def test_restore_resumes_at_exactly_the_next_batch(tok, pool):
  source = list(pool[:10]) + [broken("broken-a")] + list(pool[10:20]) + [broken("broken-b")]
  cfg = config(seed=3, num_epochs=2)
  it = pipeline.prompt_batches(source, tok, cfg, shard_index=0, shard_count=1)
  for _ in range(4):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # what goes into a checkpoint
  rest = [digest(b) for b in it]
  assert len(rest) == 6
  fresh = pipeline.prompt_batches(source, tok, cfg, shard_index=0, shard_count=1)
  fresh.set_state(state)
  assert fresh.counters.batches == 4 and fresh.counters.seen == state["counters"]["seen"]
  assert [digest(b) for b in fresh] == rest
  assert fresh.counters == it.counters and it.counters.skipped["bad_image"] == 4  # 2 per epoch
  assert it.counters.used == 40 and it.counters.seen == 44 and it.counters.batches == 10
  # A state is only valid for the same rows, order and shard.
  other = pipeline.prompt_batches(source, tok, config(seed=4, num_epochs=2), shard_index=0, shard_count=1)
  with pytest.raises(ValueError, match="saved with another data layout: seed saved 3, now 4"):
    other.set_state(state)


# ----------------------------------------------------------------------------------------------------------
# Sharding


def test_two_shards_partition_the_data(tok, pool):
  source = pool[:21]  # odd: one row per epoch is dropped so both hosts get 10
  cfg = config(seed=4, batch_size=2, drop_remainder=False)
  s0 = ids_of(batches(pipeline.prompt_batches, source, tok, cfg, shard=(0, 2)))
  s1 = ids_of(batches(pipeline.prompt_batches, source, tok, cfg, shard=(1, 2)))
  assert len(s0) == len(s1) == 10 and not set(s0) & set(s1)
  assert set(s0) | set(s1) <= {e.id for e in source} and len(set(s0) | set(s1)) == 20
  # Every epoch is a new global shuffle, and the shards still partition it.
  two = config(seed=4, batch_size=2, num_epochs=2)
  e0 = ids_of(batches(pipeline.prompt_batches, source, tok, two, shard=(0, 2)))
  e1 = ids_of(batches(pipeline.prompt_batches, source, tok, two, shard=(1, 2)))
  assert e0[:10] == s0 and e1[:10] == s1 and e0[10:] != s0
  assert len(e0) == len(e1) == 20 and not set(e0[10:]) & set(e1[10:])
  # Defaults come from jax: one process here, so shard 0 of 1.
  default = list(pipeline.prompt_batches(source, tok, cfg))
  assert [digest(b) for b in default] == [digest(b) for b in batches(pipeline.prompt_batches, source, tok, cfg)]
  with pytest.raises(ValueError, match="shard_index < shard_count"):
    pipeline.prompt_batches(source, tok, cfg, shard_index=2, shard_count=2)


# ----------------------------------------------------------------------------------------------------------
# Bad rows: skip (counted, logged) or fail (clear error)


def test_undecodable_image_skip_counts_and_fail_names_the_row(tok, pool, caplog):
  source = list(pool[:6]) + [broken("broken-1")] + list(pool[6:9])
  with caplog.at_level(logging.WARNING, logger="specs_jax.data.pipeline"):
    it = pipeline.prompt_batches(source, tok, config(shuffle=False, batch_size=3), shard_index=0, shard_count=1)
    bs = list(it)
  assert ids_of(bs) == [e.id for e in pool[:9]]
  assert it.counters.skipped["bad_image"] == 1 and it.counters.num_skipped == 1
  assert (it.counters.seen, it.counters.used, it.counters.batches) == (10, 9, 3)
  assert "bad_image: 1" in it.counters.summary()
  assert any("broken-1" in r.getMessage() and "bad_image" in r.getMessage() for r in caplog.records)
  with pytest.raises(DataError, match=r"row 6: field 'images\[0\]': example 'broken-1': cannot read image <21 bytes"):
    batches(pipeline.prompt_batches, source, tok, config(shuffle=False, batch_size=3, on_error="fail"))


def test_overlong_examples_skip_counts_and_fail_names_the_example(tok):
  long_q = " ".join(["how many red circles are there"] * 120)
  source = [image_example(f"ok-{i}") for i in range(4)] + [
      image_example("long-prompt", question=long_q),
      image_example("four-images", sizes=[(56, 56)] * 4),
      image_example("big-images", sizes=[(112, 112), (112, 112)]),  # 2 x 64 patches > 400 // 4
  ]
  cfg = config(shuffle=False, patch_buckets=(200, 400))
  it = pipeline.prompt_batches(source, tok, cfg, shard_index=0, shard_count=1)
  (b,) = list(it)
  assert b["example_id"] == ["ok-0", "ok-1", "ok-2", "ok-3"]
  sk = it.counters.skipped
  assert (sk["prompt_too_long"], sk["too_many_images"], sk["too_many_patches"]) == (1, 1, 1)
  for ident, pattern in [("long-prompt", r"example 'long-prompt' prompt has length \d+, over the budget of 512"),
                         ("four-images", r"example 'four-images' images has length 4, over the budget of 3"),
                         ("big-images", r"example 'big-images' vision patches has length 128, over the budget of 100")]:
    with pytest.raises(OverlongError, match=pattern):
      batches(pipeline.prompt_batches, [e for e in source if e.id == ident], tok,
              config(shuffle=False, patch_buckets=(200, 400), on_error="fail"))


def test_overlong_completion_is_counted(tok, pool):
  pairs = make_pairs(pool[:4])
  long_one = PreferencePair("long", pairs[0].messages, pairs[0].images, "word " * 600, "short", pairs[0].meta)
  it = pipeline.pair_batches(pairs + [long_one], tok, config(shuffle=False), shard_index=0, shard_count=1)
  assert len(list(it)) == 1 and it.counters.skipped["completion_too_long"] == 1
  with pytest.raises(OverlongError, match="example 'long' chosen has length"):
    batches(pipeline.pair_batches, [long_one], tok, config(batch_size=1, on_error="fail"))


def test_bad_record_from_records_source(tmp_path, tok, pool):
  rows = list(pool[:3]) + [broken("stored-broken")]
  records.write_examples(rows, tmp_path, "pool")
  src = records.open_examples(tmp_path, "pool")
  it = pipeline.prompt_batches(src, tok, config(shuffle=False, batch_size=3), shard_index=0, shard_count=1)
  assert ids_of(list(it)) == [e.id for e in pool[:3]] and it.counters.skipped["bad_image"] == 1
  with pytest.raises(DataError, match=r"specs_records/examples/1\.0\.0: row 3: field 'images\[0\]'"):
    batches(pipeline.prompt_batches, src, tok, config(shuffle=False, batch_size=3, on_error="fail"))


def test_all_rows_rejected_raises_instead_of_spinning_forever(tok):
  with pytest.raises(RuntimeError, match="a whole epoch of this shard"):
    next(pipeline.prompt_batches([broken("a"), broken("b")], tok, config(num_epochs=None), shard_index=0,
                                 shard_count=1))


def test_config_validation():
  with pytest.raises(ValueError, match="on_error"):
    config(on_error="ignore")
  with pytest.raises(ValueError, match="leaves no patches per example"):
    config(batch_size=8, patch_buckets=(4,))
  assert config().patches_per_example == 256 and config().max_images_per_batch == 12


# ----------------------------------------------------------------------------------------------------------
# Worker processes (spawned, so the run happens in a script with a __main__ guard and a timeout)

WORKER_SCRIPT = textwrap.dedent("""
    import hashlib, json, sys
    from absl import flags
    flags.FLAGS.mark_as_parsed()  # grain workers read absl flags

    def digest(b):
      h = hashlib.sha256()
      for k in sorted(b):
        v = b[k]
        h.update(k.encode() + (v.tobytes() if hasattr(v, "tobytes") else json.dumps(v).encode()))
      return h.hexdigest()

    if __name__ == "__main__":
      sys.path.insert(0, sys.argv[1])
      import hf_fixtures
      from specs_jax.data import pipeline, synthetic
      from specs_jax.processing.image import ImageConfig
      from specs_jax.processing.tokenizer import build_tokenizer
      tok = build_tokenizer(hf_fixtures.tokenizer_corpus())
      from specs_jax.data.types import Example, ImageRef
      pool = synthetic.make_split("train", 20, seed=0)
      bad = pool[0]
      for i in (3, 11):  # rejected rows: counted in the main process, after the workers
        pool.insert(i, Example(f"bad{i}", bad.messages, [ImageRef(data=b"junk")] * len(bad.images), "1",
                               "integer", "t", {}))
      out = {}
      for workers in (0, 2):
        cfg = pipeline.PromptPipelineConfig(batch_size=4, prompt_buckets=(128, 256, 512), patch_buckets=(1024,),
            max_images=3, image=ImageConfig(min_pixels=3136, max_pixels=50176), worker_count=workers, seed=7)
        it = pipeline.prompt_batches(pool, tok, cfg, shard_index=0, shard_count=1)
        first = [digest(next(it)) for _ in range(2)]
        state = json.loads(json.dumps(it.get_state()))
        rest = [digest(b) for b in it]
        skipped = it.counters.skipped["bad_image"]
        it.close()
        again = pipeline.prompt_batches(pool, tok, cfg, shard_index=0, shard_count=1)
        again.set_state(state)
        out[workers] = {"batches": first + rest, "resumed": [digest(b) for b in again], "skipped": skipped}
        again.close()
      print("RESULT " + json.dumps(out))
""")


@pytest.mark.slow  # 12-19 s on 2 cores: two spawns of 2 workers that import transformers
def test_two_workers_give_the_same_batches_and_resume(tmp_path):
  script = tmp_path / "run_workers.py"
  script.write_text(WORKER_SCRIPT)
  tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, os.fspath(script), tests_dir], capture_output=True, text=True,
                        timeout=120, cwd=tmp_path)  # grain workers can hang the parent: never wait forever
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
  out = json.loads(line[len("RESULT "):])
  zero, two = out["0"], out["2"]
  assert len(zero["batches"]) == 5 and zero["skipped"] == two["skipped"] == 2
  assert two["batches"] == zero["batches"]  # rejection and batching after mp_prefetch: worker count is invisible
  assert two["resumed"] == zero["batches"][2:] == zero["resumed"]
