"""Shared-prompt packing (`forward.pack_units`, `text.causal_mask(branch_ids=...)`): the layout and
mask by hand, and the switch's resolution. That the packed log-probs and gradients equal separate
rows' (against a plain full forward) is in test_steps.py, parametrized over `share_prompt`."""

import jax.numpy as jnp
import numpy as np
import pytest

from specs_jax.models.qwen2_5_vl import text
from specs_jax.training import forward, steps


def test_pack_units_layout():
  # 2 units × 2 copies, prompt 3 (left-padded in unit 1), completions 2
  ids = np.array([[0, 5, 6, 7, 8],     # unit 0 chosen
                  [0, 5, 6, 9, 0],     # unit 0 rejected (right-padded completion)
                  [0, 0, 4, 1, 2],     # unit 1 chosen
                  [0, 0, 4, 3, 0]])    # unit 1 rejected
  mask = (ids > 0).astype(np.int32)
  mask[0, 0] = 1  # token id 0 may be real: the mask, not the id, says so
  pos = np.stack([np.array([[0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [0, 0, 0, 1, 2], [0, 0, 0, 1, 2]])] * 3)
  src = np.zeros_like(ids)
  src[2, 2] = 7
  src[3, 2] = 7
  mb = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "position_ids": jnp.asarray(pos),
        "image_src": jnp.asarray(src)}
  out = forward.pack_units(mb, prompt_len=3, copies=2)
  np.testing.assert_array_equal(out["input_ids"], [[0, 5, 6, 7, 8, 9, 0], [0, 0, 4, 1, 2, 3, 0]])
  np.testing.assert_array_equal(out["attention_mask"], [[1, 1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1, 0]])
  # each completion continues from the prompt: the rejected one restarts at the chosen one's positions
  np.testing.assert_array_equal(out["position_ids"][0], [[0, 1, 2, 3, 4, 3, 4], [0, 0, 0, 1, 2, 1, 2]])
  np.testing.assert_array_equal(out["branch_ids"], [[0, 0, 0, 1, 1, 2, 2]] * 2)
  np.testing.assert_array_equal(out["image_src"], [[0, 0, 0, 0, 0, 0, 0], [0, 0, 7, 0, 0, 0, 0]])


def test_branch_mask_by_hand():
  branch = jnp.asarray([[0, 0, 1, 1, 2, 2]])
  kv = jnp.asarray([[0, 1, 1, 1, 1, 1]])  # slot 0 is padding
  m = np.asarray(text.causal_mask(kv, 6, 0, branch))[0, 0].astype(int)
  want = np.array([[0, 0, 0, 0, 0, 0],    # padding query: sees nothing
                   [0, 1, 0, 0, 0, 0],    # prompt
                   [0, 1, 1, 0, 0, 0],    # chosen: prompt + itself
                   [0, 1, 1, 1, 0, 0],
                   [0, 1, 0, 0, 1, 0],    # rejected: prompt + itself, never the chosen tokens
                   [0, 1, 0, 0, 1, 1]])
  np.testing.assert_array_equal(m, want)
  with pytest.raises(ValueError, match="full forward"):
    text.causal_mask(kv[:, :6], 1, 5, branch)


def test_share_prompt_resolution(tiny):
  model, _ = tiny
  assert steps.resolve_share_prompt(model, None) is True
  assert steps.resolve_share_prompt(model, False) is False
  splash = model.clone(config=model.config.replace(attention_impl="splash"))
  assert steps.resolve_share_prompt(splash, None) is False
  with pytest.raises(ValueError, match="splash"):
    steps.resolve_share_prompt(splash, True)


def test_coldstart_setting_parses():
  from specs_jax.stages import coldstart

  assert coldstart._share_prompt_setting("auto") is None
  assert coldstart._share_prompt_setting("False") is False and coldstart._share_prompt_setting(True) is True
  with pytest.raises(ValueError, match="share_prompt"):
    coldstart._share_prompt_setting("sometimes")
