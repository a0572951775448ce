"""specs_jax.processing.batching: padding and bucketing, checked against hand-written arrays."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specs_jax.processing import batching
from specs_jax.processing.batching import Buckets, OverlongError

PAD = 0


def test_bucket_length_by_hand():
  assert batching.bucket_length(1, (4, 8, 16)) == 4
  assert batching.bucket_length(4, (4, 8, 16)) == 4  # inclusive
  assert batching.bucket_length(5, (16, 4, 8)) == 8  # any order
  assert batching.bucket_length(0, (4, 8)) == 4
  with pytest.raises(OverlongError, match="length 17, over the budget of 16"):
    batching.bucket_length(17, (4, 8, 16))


def test_buckets():
  b = Buckets.powers_of_two(64, 1024)
  assert b.sizes == (64, 128, 256, 512, 1024) and b.max == 1024
  assert Buckets.powers_of_two(3, 20).sizes == (3, 6, 12, 20)  # the max is always a bucket
  assert b(65) == 128 and b(1024) == 1024
  assert Buckets([256, 512]).sizes == (256, 512)
  assert hash(b) == hash(Buckets((64, 128, 256, 512, 1024)))  # usable as a static jit argument
  with pytest.raises(OverlongError, match="longest prompt has length 2000, over the budget of 1024"):
    b(2000, what="longest prompt")
  for bad in [(), (8, 4), (4, 4), (0, 4)]:
    with pytest.raises(ValueError):
      Buckets(bad)


def test_pad_prompts_left_by_hand():
  ids, mask = batching.pad_prompts_left([[5, 6, 7], [8], []], PAD, 4)
  np.testing.assert_array_equal(ids, [[0, 5, 6, 7], [0, 0, 0, 8], [0, 0, 0, 0]])
  np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]])
  assert ids.dtype == np.int32 and mask.dtype == np.int32
  ids, _ = batching.pad_prompts_left([[1, 2], [3]], 9)  # length None = longest
  np.testing.assert_array_equal(ids, [[1, 2], [9, 3]])
  with pytest.raises(OverlongError, match="prompt 1 has length 5, over the budget of 4"):
    batching.pad_prompts_left([[1], [1, 2, 3, 4, 5]], PAD, 4)


def test_pad_right_by_hand():
  ids, mask = batching.pad_right([[5, 6, 7], [8]], 99, 4)
  np.testing.assert_array_equal(ids, [[5, 6, 7, 99], [8, 99, 99, 99]])
  np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 0, 0, 0]])
  with pytest.raises(OverlongError, match="sequence 0 has length 3"):
    batching.pad_right([[1, 2, 3]], PAD, 2)


def test_pack_prompt_completion_by_hand():
  out = batching.pack_prompt_completion([[11, 12], [13, 14, 15]], [[21, 22, 2], [23]], PAD,
                                        prompt_len=4, completion_len=3)
  # boundary at column 4: prompts end in column 3, completions start in column 4
  np.testing.assert_array_equal(out["input_ids"], [[0, 0, 11, 12, 21, 22, 2],
                                                   [0, 13, 14, 15, 23, 0, 0]])
  np.testing.assert_array_equal(out["attention_mask"], [[0, 0, 1, 1, 1, 1, 1],
                                                        [0, 1, 1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(out["completion_mask"], [[0, 0, 0, 0, 1, 1, 1],  # EOS (2) included
                                                         [0, 0, 0, 0, 1, 0, 0]])
  np.testing.assert_array_equal(out["prompt_lengths"], [2, 3])
  np.testing.assert_array_equal(out["completion_lengths"], [3, 1])
  assert all(v.dtype == np.int32 for v in out.values())
  with pytest.raises(OverlongError, match="completion 1 has length 4, over the budget of 3"):
    batching.pack_prompt_completion([[1], [1]], [[1], [1, 2, 3, 4]], PAD, 4, 3)
  with pytest.raises(OverlongError, match="prompt 0 has length 5"):
    batching.pack_prompt_completion([[1] * 5], [[1]], PAD, 4, 3)
  with pytest.raises(ValueError, match="2 prompts but 1 completions"):
    batching.pack_prompt_completion([[1], [2]], [[1]], PAD, 4, 3)


@settings(max_examples=100, deadline=None)
@given(rows=st.lists(st.tuples(st.lists(st.integers(1, 50), max_size=8), st.lists(st.integers(1, 50), max_size=6)),
                     min_size=1, max_size=5))
def test_pack_prompt_completion_roundtrip(rows):
  prompts, completions = [r[0] for r in rows], [r[1] for r in rows]
  out = batching.pack_prompt_completion(prompts, completions, PAD, prompt_len=8, completion_len=6)
  for i, (p, c) in enumerate(rows):
    row, att, comp = out["input_ids"][i], out["attention_mask"][i].astype(bool), out["completion_mask"][i].astype(bool)
    assert row[att].tolist() == p + c  # real tokens, in order, no gaps
    assert row[comp].tolist() == c
    assert row[:8][att[:8]].tolist() == p and row[8:][att[8:]].tolist() == c  # boundary at column P
    assert att[8 - len(p):8 + len(c)].all() and att.sum() == len(p) + len(c)  # contiguous


def test_pad_patches_by_hand():
  pv = np.arange(12 * 2, dtype=np.float32).reshape(12, 2)  # D=2 keeps it readable
  grid = [[1, 2, 2], [1, 2, 4]]  # 4 + 8 = 12 patches
  out, valid, g = batching.pad_patches(pv, grid, 16)
  assert out.shape == (16, 2) and out.dtype == np.float32
  np.testing.assert_array_equal(out[:12], pv)
  np.testing.assert_array_equal(out[12:], 0)
  np.testing.assert_array_equal(valid, [True] * 12 + [False] * 4)
  np.testing.assert_array_equal(g, grid)
  assert g.dtype == np.int32
  out2, valid2, g2 = batching.pad_patches([pv[:4], pv[4:]], grid, 16, max_images=3)  # list form
  np.testing.assert_array_equal(out2, out)
  np.testing.assert_array_equal(valid2, valid)
  np.testing.assert_array_equal(g2, [[1, 2, 2], [1, 2, 4], [0, 0, 0]])
  np.testing.assert_array_equal(batching.patch_segment_ids(g2, 16), [0] * 4 + [1] * 8 + [-1] * 4)
  with pytest.raises(OverlongError, match="vision patches has length 12, over the budget of 8"):
    batching.pad_patches(pv, grid, 8)
  with pytest.raises(ValueError, match="need 12"):
    batching.pad_patches(pv[:10], grid, 16)
  with pytest.raises(ValueError, match="image 1: 7 patches"):
    batching.pad_patches([pv[:4], pv[4:11]], grid, 16)
  with pytest.raises(OverlongError, match="images has length 2, over the budget of 1"):
    batching.pad_patches(pv, grid, 16, max_images=1)


class _Prompt:
  def __init__(self, ids, n_patches_grid):
    self.input_ids = np.asarray(ids, np.int32)
    self.image_grid_thw = np.asarray(n_patches_grid, np.int32).reshape(-1, 3)
    n = int(self.image_grid_thw.prod(axis=1).sum())
    self.pixel_values = np.full((n, 1176), float(len(ids)), np.float32)


def test_collate_prompts_by_hand():
  prompts = [_Prompt([1, 2, 3], [[1, 2, 2]]), _Prompt([4, 5, 6, 7, 8], []), _Prompt([9], [[1, 4, 2], [1, 2, 2]])]
  out = batching.collate_prompts(prompts, PAD, prompt_buckets=Buckets((4, 8, 16)), patch_buckets=(8, 32, 64))
  np.testing.assert_array_equal(out["input_ids"], [[0, 0, 0, 0, 0, 1, 2, 3],
                                                   [0, 0, 0, 4, 5, 6, 7, 8],
                                                   [0, 0, 0, 0, 0, 0, 0, 9]])
  np.testing.assert_array_equal(out["prompt_lengths"], [3, 5, 1])
  assert out["pixel_values"].shape == (32, 1176)  # 4 + 8 + 4 = 16 patches -> bucket 32
  np.testing.assert_array_equal(out["pixel_values"][:, 0], [3] * 4 + [1] * 12 + [0] * 16)  # image order kept
  np.testing.assert_array_equal(out["patch_valid"], [True] * 16 + [False] * 16)
  np.testing.assert_array_equal(out["image_grid_thw"], [[1, 2, 2], [1, 4, 2], [1, 2, 2]])
  with pytest.raises(OverlongError, match="longest prompt has length 5, over the budget of 4"):
    batching.collate_prompts(prompts, PAD, prompt_buckets=4, patch_buckets=64)
