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
  cudnn = model.clone(config=model.config.replace(attention_impl="cudnn"))
  assert steps.resolve_share_prompt(cudnn, None) is False and steps.resolve_share_prompt(cudnn, True) is True
  splash = model.clone(config=model.config.replace(attention_impl="splash"))
  assert steps.resolve_share_prompt(splash, None) is False
  with pytest.raises(ValueError, match="splash"):
    steps.resolve_share_prompt(splash, True)


def test_config_setting_parses():
  """coldstart.share_prompt and the GRPO config both go through steps.parse_share_prompt."""
  assert steps.parse_share_prompt("auto") is None and steps.parse_share_prompt(None) is None
  assert steps.parse_share_prompt("False") is False and steps.parse_share_prompt(True) is True
  assert steps.parse_share_prompt(" on ") is True
  with pytest.raises(ValueError, match="coldstart.share_prompt"):
    steps.parse_share_prompt("sometimes", "coldstart.share_prompt")


@pytest.mark.parametrize("copies", [2, 3])
def test_packed_attention_equals_dense_branch_mask(copies):
  """`text.PackedMask` blocks give the dense branch-masked attention at every real query, values
  and gradients (padding queries see no key in either; their outputs are unused)."""
  import jax

  from specs_jax.models.qwen2_5_vl import attention

  b, p, c, hq, hkv, d = 2, 5, 4, 4, 2, 8
  s = p + copies * c
  ks = jax.random.split(jax.random.key(3), 4)
  q = jax.random.normal(ks[0], (b, s, hq, d))
  k = jax.random.normal(ks[1], (b, hkv, s, d))
  v = jax.random.normal(ks[2], (b, hkv, s, d))
  kv = np.ones((b, s), np.int32)
  kv[1, :2] = 0                      # left-padded prompt
  kv[0, p + c - 1] = 0               # copy 1 of row 0 is one token shorter (right padding)
  kv[1, s - 2:] = 0                  # the last copy of row 1 is two tokens shorter
  kv = jnp.asarray(kv)
  branch = jnp.broadcast_to(jnp.concatenate([jnp.zeros(p, jnp.int32), jnp.repeat(jnp.arange(1, copies + 1), c)]),
                            (b, s))
  dense_mask = text.causal_mask(kv, s, 0, branch)
  packed_mask = text.PackedMask.build(kv, p, copies)
  real = np.asarray(kv, bool)
  g = jax.random.normal(ks[3], (b, s, hq, d)) * real[:, :, None, None]

  def dense(q, k, v):
    return attention.xla_attention(q, k, v, dense_mask)

  def packed(q, k, v):
    return text._packed_attention(attention.xla_attention, q, k, v, packed_mask)

  out_d, vjp_d = jax.vjp(dense, q, k, v)
  out_p, vjp_p = jax.vjp(packed, q, k, v)
  np.testing.assert_allclose(np.asarray(out_p)[real], np.asarray(out_d)[real], rtol=1e-5, atol=1e-6)
  for name, a, r in zip("qkv", vjp_p(g), vjp_d(g)):
    np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5, err_msg=name)
  with pytest.raises(ValueError, match="equal copies"):
    text.PackedMask.build(kv[:, :-1], p, copies)


@pytest.mark.parametrize("scan,remat", [(True, "dots"), (False, "full")])
def test_packed_dpo_gradients_with_scan_and_remat(hf_dir, ref_pairs, pad_id, scan, remat):
  """The GPU/TPU layouts (scanned layers, rematerialised blocks) with packing: the same loss and
  gradients as separate rows."""
  import jax

  from dpo_fixtures import BUCKETS, NUM_PAIRS

  from specs_jax.models import qwen2_5_vl
  from specs_jax.training import batches

  model, params = qwen2_5_vl.from_pretrained(hf_dir, scan_layers=scan, remat=remat)
  batch = batches.collate_dpo(ref_pairs[:3], model.config, BUCKETS, pad_id, num_pairs=NUM_PAIRS)
  batch["ref_chosen_logps"] = batch["ref_chosen_logps"] + np.float32(2.0)

  def run(share):
    return jax.jit(lambda p: steps.dpo_loss_and_grads(model, p, batch, micro_batches=2, share_prompt=share))(params)

  loss_p, grads_p, _ = run(True)
  loss_s, grads_s, _ = run(False)
  np.testing.assert_allclose(loss_p, loss_s, rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads_s), jax.tree.leaves(grads_p)):
    scale = float(np.max(np.abs(a)))
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * scale + 1e-9, err_msg=jax.tree_util.keystr(path))


def test_copies_with_different_prompts_are_refused(tiny, ref_pairs, pad_id):
  """Packing gives every copy the first copy's prompt, so a batch whose copies differ there (not
  one `collate_dpo` builds) is an error naming the pair, before anything runs."""
  from dpo_fixtures import BUCKETS, NUM_PAIRS, OPT

  from specs_jax.training import batches

  model, params = tiny
  batch = batches.collate_dpo(ref_pairs[:3], model.config, BUCKETS, pad_id, num_pairs=NUM_PAIRS)
  p = batch["prompt_len"]
  bad = dict(batch, input_ids=batch["input_ids"].copy())
  bad["input_ids"][NUM_PAIRS + 1, p - 1] += 1              # pair 1's rejected row: last prompt token
  with pytest.raises(ValueError, match=r"unit 1 .*copy 1 \(input_ids"):
    steps.make_logps_fn(model)(params, bad)
  with pytest.raises(ValueError, match="unit 1"):
    steps.make_dpo_step(model, OPT)(None, bad)              # refused before the state is touched
  steps.make_logps_fn(model, share_prompt=False)(params, bad)   # separate rows: no constraint
  forward.check_shared_prompts(batch, p, 2, 1)             # the collated batch passes
