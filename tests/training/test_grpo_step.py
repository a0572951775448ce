"""GRPO rollouts and updates on the tiny Qwen2.5-VL: packing, the ratio at the first update, a toy
problem GRPO must solve, 8 fake devices vs one, compile counts, the online filter and DAPO refill.

The references here do not use the machinery under test: the training forward's log-probs are
compared with the sampler's (a different program: KV-cache decode), the M-RoPE positions with
`get_rope_index` run over the packed rows with every image repeated per row, the advantages with
`grpo.group_advantages`.
"""

from __future__ import annotations

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from specs_jax import sampling
from specs_jax.models import qwen2_5_vl
from specs_jax.parallel import mesh as mesh_lib
from specs_jax.processing import chat
from specs_jax.rewards.pool import BatchRewards
from specs_jax.training import grpo, grpo_step, rollout, steps
from specs_jax.training.state import create_train_state

G = 4                     # samples per prompt
NEW = 12                  # max new tokens
PROMPT_BUCKETS = (32, 64)
GEN = dict(gen_buckets=(16,))


def _prompt(config, rng: np.random.Generator, n_text: int, grids=()) -> chat.EncodedPrompt:
  """Random text ids around `<|vision_start|><|image_pad|>*k<|vision_end|>` blocks and random patches."""
  ids = list(rng.integers(10, 300, size=n_text))
  pvs = []
  for t, h, w in grids:
    ids += [config.vision_start_token_id] + [config.image_token_id] * (t * h * w // 4) + [config.vision_end_token_id]
    pvs.append(rng.standard_normal((t * h * w, 1176)).astype(np.float32))
  ids += list(rng.integers(10, 300, size=3))
  grid = np.asarray(grids, np.int32).reshape(-1, 3)
  return chat.EncodedPrompt(input_ids=np.asarray(ids, np.int32),
                            pixel_values=np.concatenate(pvs) if pvs else np.zeros((0, 1176), np.float32),
                            image_grid_thw=grid, num_image_tokens=grid.prod(-1) // 4, text="")


def _rewards(total, accuracy=None) -> BatchRewards:
  total = np.asarray(total, np.float32)
  acc = total if accuracy is None else np.asarray(accuracy, np.float32)
  return BatchRewards(total=total, format=np.zeros_like(total), accuracy=acc, status=("ok",) * len(total))


def even_token_reward(inputs: rollout.RewardInputs):
  """Fraction of even token ids: varies within every group, so advantages are non-zero."""
  return _rewards([float(np.mean(c % 2 == 0)) if len(c) else 0.0 for c in inputs.completion_ids]), {}


@pytest.fixture(scope="module")
def sampler(tiny):
  return sampling.Sampler(tiny[0])


@pytest.fixture(scope="module")
def mm_rollout(tiny, sampler, tokenizer, pad_id):
  """4 prompts (one image; none; two images of different sizes; one image) × G samples at T = 1."""
  model, params = tiny
  rng = np.random.default_rng(0)
  cfg = model.config
  items = [rollout.RLPrompt(_prompt(cfg, rng, 5, [(1, 4, 4)]), "1", uid="a"),
           rollout.RLPrompt(_prompt(cfg, rng, 9), "2", uid="b"),
           rollout.RLPrompt(_prompt(cfg, rng, 4, [(1, 4, 6), (1, 4, 4)]), "3", uid="c"),
           rollout.RLPrompt(_prompt(cfg, rng, 7, [(1, 6, 4)]), "4", uid="d")]
  batch = rollout.collect_rollouts(sampler, params, items, even_token_reward, n=G, max_new_tokens=NEW,
                                   rng=jax.random.key(0), pad_id=pad_id, tokenizer=tokenizer, filter_bounds=None,
                                   prompt_buckets=PROMPT_BUCKETS, completion_buckets=(16,), sampler_kwargs=GEN)
  return items, batch


def _fresh_state(params, cfg: grpo_step.GRPOConfig, mesh=None):
  """A step-0 state on a *copy* of the params: the update donates its state, and the session's params
  (also used as the reference policy) must survive."""
  params = jax.tree.map(lambda x: x.copy(), params)
  return steps.init_train_state(params, cfg.optimizer_config(), jax.random.key(1), mesh=mesh)


def _rows(batch: rollout.RolloutBatch) -> dict:
  rows = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "position_ids": batch.position_ids,
          "loss_mask": batch.loss_mask.astype(np.float32)}
  if batch.has_images:
    rows["image_index"] = batch.image_index
  return rows


# ---------------------------------------------------------------------------------- rollouts

def test_rollout_layout_positions_and_advantages(tiny, mm_rollout, pad_id):
  model, _ = tiny
  cfg = model.config
  items, b = mm_rollout
  n_rows, p_len, c_len = 4 * G, b.prompt_len, b.completion_len
  assert b.input_ids.shape == (n_rows, p_len + c_len) and (p_len, c_len) == (32, 16)
  assert b.completion_mask.shape == (n_rows, c_len) and b.image_index.shape == (n_rows, p_len)
  np.testing.assert_array_equal(b.group_ids, np.repeat(np.arange(4), G))
  for i, it in enumerate(items):                     # prompt-major rows, prompt ending in column P-1
    rows = b.input_ids[i * G:(i + 1) * G]
    np.testing.assert_array_equal(rows[:, p_len - len(it.prompt.input_ids):p_len],
                                  np.broadcast_to(it.prompt.input_ids, (G, len(it.prompt.input_ids))))
    assert (b.attention_mask[i * G:(i + 1) * G, :p_len - len(it.prompt.input_ids)] == 0).all()
  lengths = b.completion_mask.sum(1)
  np.testing.assert_array_equal(b.attention_mask[:, p_len:], b.completion_mask)
  for r in range(n_rows):                            # the mask is a prefix; EOS is inside it
    assert (b.completion_mask[r, :lengths[r]] == 1).all() and (b.completion_mask[r, lengths[r]:] == 0).all()
    assert (b.input_ids[r, p_len + lengths[r]:] == pad_id).all()
    if b.finished[r]:
      assert b.input_ids[r, p_len + lengths[r] - 1] == cfg.eos_token_id
    assert cfg.image_token_id not in b.input_ids[r, p_len:]
  # positions: get_rope_index over the packed rows, each row carrying its prompt's images again
  # (sampled <|video_pad|> tokens are text to the sampler and the model; blank them for the reference)
  row_grid = np.concatenate([np.asarray(it.prompt.image_grid_thw).reshape(-1, 3) for it in items for _ in range(G)])
  ids = b.input_ids.copy()
  ids[:, p_len:][ids[:, p_len:] == cfg.video_token_id] = 11
  want, _ = qwen2_5_vl.get_rope_index(cfg, ids, b.attention_mask, row_grid)
  real = b.attention_mask.astype(bool)
  np.testing.assert_array_equal(b.position_ids[:, real], want[:, real])
  # image_index: the k-th <|image_pad|> of the B prompts (row-major) ↔ feature k; rows of a group share it
  n_img_tokens = sum(int(it.prompt.num_image_tokens.sum()) for it in items)
  assert b.image_index.max() == n_img_tokens - 1
  np.testing.assert_array_equal(b.image_index >= 0, b.input_ids[:, :p_len] == cfg.image_token_id)
  np.testing.assert_array_equal(b.image_index[0], b.image_index[G - 1])
  # rewards and advantages
  # (graded on the sampled completion; a completion cut at a sampled <|image_pad|> is shorter here)
  packed = np.array([np.mean(b.input_ids[r, p_len:p_len + lengths[r]] % 2 == 0) for r in range(n_rows)])
  assert (~np.isclose(b.rewards, packed, rtol=1e-6)).sum() <= b.metrics["rollout/image_token_cut"]
  np.testing.assert_allclose(b.advantages, grpo.group_advantages(b.rewards, G), rtol=1e-6)
  assert b.keep.all() and len(b.texts) == n_rows and b.uids == ["a", "b", "c", "d"]
  assert b.metrics["filter/kept_groups"] == 4 and b.metrics["rollout/samples"] == n_rows
  assert b.metrics["rollout/response_length_mean"] == pytest.approx(lengths.mean() + 0.0, abs=2.0)


def test_training_forward_equals_sampler_logprobs(tiny, mm_rollout):
  """The packed batch (positions, per-row image features from the unique table, completion columns)
  reproduces the log-probs the KV-cache sampler drew the tokens with (T = 1, no top-p / top-k)."""
  model, params = tiny
  _, b = mm_rollout
  feats = grpo_step.make_encode_images_fn(model)(params, b.pixel_values, b.vision)
  old = np.asarray(grpo_step.make_old_logps_fn(model, 1.0, chunk_size=8)(params, _rows(b), feats))
  m = b.completion_mask > 0
  np.testing.assert_allclose(old[m], b.sampler_logps[m], atol=1e-4)
  # a different temperature gives different log-probs (so the test above could fail)
  hot = np.asarray(grpo_step.make_old_logps_fn(model, 2.0, chunk_size=8)(params, _rows(b), feats))
  assert np.abs(hot[m] - b.sampler_logps[m]).max() > 0.1


# ------------------------------------------------------------------------------------ updates

# Two epochs over one minibatch of 16 rows in 2 micro-batches of 8 (one row per device on the 8-device
# mesh), KL to the initial policy: update 1 runs on the initial params, update 2 on moved ones.
MULTI = grpo_step.GRPOConfig(group_size=G, prompts_per_step=4, max_response_len=NEW, learning_rate=1e-4,
                             ppo_epochs=2, minibatches=1, micro_batches=2, filter_lower=None, filter_upper=None,
                             kl_coef=0.1, chunk_size=8)


@pytest.fixture(scope="module")
def multi_run(tiny, mm_rollout):
  """MULTI on one device: (final state, metrics)."""
  model, params = tiny
  _, b = mm_rollout
  state, _ = _fresh_state(params, MULTI)
  return grpo_step.grpo_train_step(state, b, MULTI, jax.random.key(2), fns=grpo_step.make_grpo_functions(model, MULTI),
                                   ref_params=params)


def test_first_update_ratio_exactly_one(mm_rollout, multi_run):
  """The first update has ρ = 1 exactly (clip fraction 0, ppo_kl 0); the recomputed old log-probs
  agree with that update's own forward to float rounding; the second update sees a moved policy
  (ppo_kl ≠ 0); with the initial policy as reference the KL term starts at ≈ 0 and then grows."""
  _, b = mm_rollout
  state, m = multi_run
  assert m["first_update/clip_frac"] == 0.0
  assert m["first_update/ppo_kl"] == 0.0
  assert m["first_update/ratio/mean"] == 1.0
  assert m["old_logps_recomputed"] == 1.0 and m["first_update/logp_abs_diff/old"] < 1e-5
  assert m["updates"] == 2 and int(state.step) == 2
  # update 2 ran on a moved policy (measured: clip fraction 0.03, ratio 1.015, KL to the reference 0.006)
  assert abs(m["ppo_kl"]) > 1e-4 and m["clip_frac"] > 0 and m["logp_abs_diff/old"] > 1e-4
  assert m["first_update/kl"] < 1e-9 and 1e-4 < m["kl"] < 0.05
  assert m["tokens"] == 2 * b.loss_mask.sum()                           # every row once per epoch
  assert m["l2_grads"] > 0 and np.isfinite(m["loss"]) and m["entropy"] > 0
  assert m["time/logps_s"] > 0 and m["time/update_s"] > 0
  with pytest.raises(ValueError, match="ref_params"):
    grpo_step.grpo_train_step(state, b, MULTI, jax.random.key(2), fns=None)


def _assert_same_run(run, ref, metric_names):
  """Two MULTI runs agree: metrics to rtol 2e-5 / atol 1e-6; 99.9% of param elements within 1e-6 and
  none beyond 20% of one update (see the sharding test for why)."""
  (state, m), (state_ref, m_ref) = run, ref
  for k in metric_names:
    np.testing.assert_allclose(m[k], m_ref[k], rtol=2e-5, atol=1e-6, err_msg=k)
  diffs = np.concatenate([np.abs(np.asarray(a) - np.asarray(c)).ravel()
                          for a, c in zip(jax.tree.leaves(state_ref.params), jax.tree.leaves(state.params))])
  assert diffs.max() < 0.2 * MULTI.learning_rate, diffs.max()
  assert np.mean(diffs < 1e-6) > 0.999, np.mean(diffs < 1e-6)


@pytest.mark.parametrize("axes", [{"data": 2, "fsdp": 4}, {"fsdp": 4, "tensor": 2}],
                         ids=["data2_fsdp4", "fsdp4_tensor2"])
def test_sharded_8_devices_equals_one_device(tiny, mm_rollout, multi_run, axes):
  """MULTI on a mesh of 8 fake CPU devices (params and Adam moments sharded by the rules: fsdp on the
  embedding dims, tensor on heads / MLP / vocab; rows over data×fsdp) matches the one-device run,
  with the DPO step's tolerances
  (tests/training/test_sharding.py): metrics rtol 2e-5, atol 1e-6; 99.9% of param elements within
  1e-6. The DPO test bounds the rest by 2e-4 = 10% of its lr; at this 20× smaller lr that would be
  vacuous, so the bound here is 20% of one update (Adam divides each gradient by its own RMS, which
  amplifies rounding for the few elements whose gradient is ≈ 0)."""
  assert jax.device_count() == 8
  model, params = tiny
  _, b = mm_rollout
  state1, m1 = multi_run
  mesh = mesh_lib.make_mesh(axes)
  state8, shardings = _fresh_state(params, MULTI, mesh)
  fns8 = grpo_step.make_grpo_functions(model, MULTI, mesh=mesh, state_sharding=shardings)
  state8, m8 = grpo_step.grpo_train_step(state8, b, MULTI, jax.random.key(2), fns=fns8, ref_params=params, mesh=mesh)
  q = state8.params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert len(q.sharding.device_set) == 8 and q.addressable_shards[0].data.shape[0] < q.shape[0]
  assert int(state8.step) == 2
  # measured: 3 of 219,744 elements beyond 1e-6, the largest 1.5e-5 (15% of one update)
  _assert_same_run((state8, m8), (state1, m1), ("loss", "loss/pg", "loss/kl", "ppo_kl", "kl", "entropy",
                                                "l2_grads", "tokens"))


def test_update_gradient_equals_naive_full_batch(tiny, mm_rollout):
  """One update with SGD(lr=1) exposes −gradient. Reference: the plain model forward over all 16 rows
  with each row's images passed again (HF-style), full [R, L, V] logits / T, log-softmax, and the
  token-mean loss at ρ = 1, −Σ A·m·log π / Σ m (∇ρ = ∇log π there). Ours: each prompt's images encoded
  once with a trainable tower (jax.vjp), features gathered per row, LM head in chunks on the completion
  columns, 2 micro-batches, rows shuffled, temperature 0.7 in the loss."""
  model, params = tiny
  cfg_m = model.config
  items, b = mm_rollout
  temp = 0.7
  b = dataclasses.replace(b, sampling={"temperature": temp, "top_p": 1.0, "top_k": 0.0})
  cfg = grpo_step.GRPOConfig(group_size=G, prompts_per_step=4, max_response_len=NEW, temperature=temp,
                             micro_batches=2, freeze_vision=False, filter_lower=None, filter_upper=None, chunk_size=8)

  # reference inputs: every row carries its prompt's patches; positions from get_rope_index (sampled
  # <|video_pad|> tokens are text to the model: blanked only for the position computation)
  pv_rows = np.concatenate([it.prompt.pixel_values for it in items for _ in range(G)])
  grid_rows = np.concatenate([it.prompt.image_grid_thw.reshape(-1, 3) for it in items for _ in range(G)])
  ids_pos = b.input_ids.copy()
  ids_pos[ids_pos == cfg_m.video_token_id] = 11
  prep = qwen2_5_vl.prepare_inputs(cfg_m, ids_pos, b.attention_mask, grid_rows, slot_size="auto", pixel_values=pv_rows)
  p_len, mask, adv = b.prompt_len, jnp.asarray(b.loss_mask, jnp.float32), jnp.asarray(b.advantages)

  def naive(p):
    logits = model.apply({"params": p}, jnp.asarray(b.input_ids), jnp.asarray(b.attention_mask),
                         pixel_values=jnp.asarray(prep.pixel_values), position_ids=prep.position_ids,
                         vision=prep.vision)
    logp = jax.nn.log_softmax(logits[:, p_len - 1:-1].astype(jnp.float32) / temp, -1)
    lp = jnp.take_along_axis(logp, jnp.asarray(b.input_ids[:, p_len:, None]), -1)[..., 0]
    return -jnp.sum(adv[:, None] * lp * mask) / jnp.sum(mask)

  want = jax.jit(jax.grad(naive))(params)
  state = create_train_state(jax.tree.map(lambda x: x.copy(), params), optax.sgd(1.0), jax.random.key(0))
  new, m = grpo_step.grpo_train_step(state, b, cfg, jax.random.key(5), fns=grpo_step.make_grpo_functions(model, cfg))
  got = jax.tree.map(lambda a, c: a - c, params, new.params)                 # SGD(1): θ − θ' = ∇L
  for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
    scale = float(jnp.max(jnp.abs(w)))
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * scale + 1e-9, err_msg=jax.tree_util.keystr(path))
  assert float(jnp.max(jnp.abs(got["visual"]["patch_embed"]["proj"]["kernel"]))) > 0     # the tower is trained
  assert m["loss"] == pytest.approx(-float(jnp.sum(adv[:, None] * mask) / jnp.sum(mask)), abs=1e-6)


def test_shared_prompt_packing_equals_separate_rows(tiny, mm_rollout, multi_run):
  """GRPO with each group's G completions packed after one copy of its prompt (the default for the
  xla attention: MULTI packs) against separate rows (share_prompt=False): same old log-probs and
  same two updates (2 epochs, 2 micro-batches, KL) to float32 rounding. Images are in 3 of the 4
  prompts (one with two images), so the packed rows take their features from the group's prompt."""
  model, params = tiny
  _, b = mm_rollout
  fns = grpo_step.make_grpo_functions(model, MULTI)
  assert fns.copies == G                                       # multi_run used the packed path
  feats = fns.encode_images(params, b.pixel_values, b.vision)
  packed = np.asarray(fns.old_logps(params, _rows(b), feats))
  separate = np.asarray(grpo_step.make_old_logps_fn(model, 1.0, chunk_size=8)(params, _rows(b), feats))
  m = b.completion_mask > 0
  np.testing.assert_allclose(packed[m], separate[m], atol=2e-5)

  cfg = dataclasses.replace(MULTI, share_prompt=False)
  fns1 = grpo_step.make_grpo_functions(model, cfg)
  assert fns1.copies == 1
  state1, m1 = grpo_step.grpo_train_step(_fresh_state(params, cfg)[0], b, cfg, jax.random.key(2), fns=fns1,
                                         ref_params=params)
  _assert_same_run(multi_run, (state1, m1), ("loss", "loss/pg", "loss/kl", "ppo_kl", "kl", "entropy", "l2_grads",
                                             "tokens", "clip_frac"))


def test_shared_prompt_settings_and_refusals(tiny, mm_rollout):
  model, params = tiny
  _, b = mm_rollout
  base = dict(group_size=G, prompts_per_step=4, max_response_len=NEW, filter_lower=None, filter_upper=None,
              chunk_size=8)
  # auto: on when micro-batches hold whole groups (4 prompts / (1 × 2)), off when not (4 / 3)
  assert grpo_step.packing_copies(model, grpo_step.GRPOConfig(**base, micro_batches=2)) == G
  assert grpo_step.packing_copies(model, grpo_step.GRPOConfig(**base, micro_batches=3)) == 1
  with pytest.raises(ValueError, match="whole groups"):
    grpo_step.packing_copies(model, grpo_step.GRPOConfig(**base, micro_batches=3, share_prompt=True))
  assert grpo_step.GRPOConfig(**base, share_prompt="false").share_prompt is False
  assert grpo_step.GRPOConfig.from_mapping(base | {"share_prompt": "auto"}).share_prompt is None
  with pytest.raises(ValueError, match="share_prompt"):
    grpo_step.GRPOConfig(**base, share_prompt="sometimes")
  splash = dataclasses.replace(model, config=dataclasses.replace(model.config, attention_impl="splash"))
  assert grpo_step.packing_copies(splash, grpo_step.GRPOConfig(**base)) == 1
  with pytest.raises(ValueError, match="splash"):
    grpo_step.packing_copies(splash, grpo_step.GRPOConfig(**base, share_prompt=True))
  # a rollout whose group rows do not share the prompt is refused, naming the row
  cfg = grpo_step.GRPOConfig(**base)
  fns = grpo_step.make_grpo_functions(model, cfg)
  ids = b.input_ids.copy()
  ids[G + 2, b.prompt_len - 1] += 1
  bad = dataclasses.replace(b, input_ids=ids)
  with pytest.raises(ValueError, match=r"row 6 of group 1 .*input_ids"):
    grpo_step.grpo_train_step(_fresh_state(params, cfg)[0], bad, cfg, jax.random.key(0), fns=fns)
  # functions built for another group size
  other = grpo_step.GRPOConfig(**(base | {"group_size": 2, "prompts_per_step": 8}))
  with pytest.raises(ValueError, match="group_size"):
    grpo_step.grpo_train_step(_fresh_state(params, cfg)[0], b, cfg, jax.random.key(0),
                              fns=grpo_step.make_grpo_functions(model, other))


def test_shared_prompt_shuffles_whole_groups(tiny, mm_rollout):
  """With packing and 2 minibatches of 2 groups each, every update sees whole groups: its token
  count is the sum over 2 complete groups' loss masks."""
  model, params = tiny
  _, b = mm_rollout
  cfg = grpo_step.GRPOConfig(group_size=G, prompts_per_step=4, max_response_len=NEW, minibatches=2,
                             filter_lower=None, filter_upper=None, chunk_size=8, learning_rate=1e-5)
  fns = grpo_step.make_grpo_functions(model, cfg)
  assert fns.copies == G
  per_group = b.loss_mask.reshape(4, G, -1).sum(axis=(1, 2))
  pair_sums = {float(per_group[i] + per_group[j]) for i in range(4) for j in range(i + 1, 4)}
  seen = []
  orig = fns.update

  def spy(state, rows, vision_inputs, first):
    seen.append(float(np.asarray(rows["loss_mask"]).sum()))
    return orig(state, rows, vision_inputs, first)

  state, m = grpo_step.grpo_train_step(_fresh_state(params, cfg)[0], b, cfg, jax.random.key(7),
                                       fns=dataclasses.replace(fns, update=spy))
  assert m["updates"] == 2 and len(seen) == 2
  assert all(t in pair_sums for t in seen) and sum(seen) == float(b.loss_mask.sum())


# -------------------------------------------------------------------------------- toy problem

def test_toy_grpo_raises_reward_and_compiles_once(tiny, sampler, pad_id):
  """Text-only prompts, reward = fraction of response tokens equal to a target id (278, about 1% of
  the initial samples). 12 GRPO steps (8 prompts × 8 samples, 16 new tokens, lr 1e-2, one update per
  step) must lift the mean reward from < 0.05 to > 0.5 over the last two steps. Measured:
  0.001 0.003 0.010 0.015 0.031 0.043 0.191 0.393 0.682 0.776 0.953 1.000.
  The update, prefill and decode compile once each, in step 1 (one bucket), never again."""
  model, params = tiny
  target, steps_n, b, n, new = 278, 12, 8, 8, 16
  rng = np.random.default_rng(0)
  pool = [rollout.RLPrompt(_prompt(model.config, rng, int(rng.integers(3, 9))), "x") for _ in range(32)]

  def reward_fn(inputs):
    return _rewards([float(np.mean(c == target)) if len(c) else 0.0 for c in inputs.completion_ids]), {}

  cfg = grpo_step.GRPOConfig(group_size=n, prompts_per_step=b, max_response_len=new, learning_rate=1e-2,
                             filter_lower=None, filter_upper=None)
  fns = grpo_step.make_grpo_functions(model, cfg)
  state, _ = _fresh_state(params, cfg)
  curve, compiles = [], []
  counts = lambda: (grpo_step.compile_counts().get("grpo_update", 0), sampling.compile_counts().get("prefill", 0),
                    sampling.compile_counts().get("decode", 0))
  before = counts()
  for s in range(steps_n):
    items = [pool[(s * b + i) % len(pool)] for i in range(b)]
    batch = rollout.collect_rollouts(sampler, state.params, items, reward_fn, rng=jax.random.key(1000 + s),
                                     pad_id=pad_id, prompt_buckets=(16,), completion_buckets=(new,),
                                     sampler_kwargs=dict(gen_buckets=(new,)), **cfg.rollout_kwargs())
    state, m = grpo_step.grpo_train_step(state, batch, cfg, jax.random.key(s), fns=fns)
    # one update per step: no old log-prob pass, and ρ = 1 exactly at that update
    assert m["old_logps_recomputed"] == 0.0 and (m["clip_frac"], m["ppo_kl"], m["ratio/mean"]) == (0.0, 0.0, 1.0)
    assert m["logp_abs_diff/sampler"] < 1e-5
    curve.append(batch.metrics["rollout/reward_mean"])
    compiles.append(counts())
  print("toy reward curve", [round(c, 3) for c in curve])
  assert max(curve[:2]) < 0.05, curve
  assert np.mean(curve[-2:]) > 0.5, curve
  # one compilation each (update, prefill, decode) for the one bucket, all in step 1
  assert compiles[0] == tuple(c + 1 for c in before) and compiles[-1] == compiles[0], (before, compiles)


# ------------------------------------------------------------------------- filter and refill

class ScriptedSampler:
  """A sampler whose prompt k = (first token) makes samples 0..k-1 "correct" ([7, 7, EOS]) and the
  rest wrong ([8, EOS]); sample 0 of a prompt whose second token is 99 emits an <|image_pad|>."""

  def __init__(self, config):
    self.model = types.SimpleNamespace(config=config)
    self.calls = 0

  def generate(self, params, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, *, n,
               max_new_tokens, **kw):
    self.calls += 1
    cfg = self.model.config
    rows = []
    for i in range(input_ids.shape[0]):
      real = input_ids[i][attention_mask[i] > 0]
      for j in range(n):
        toks = [7, 7, cfg.eos_token_id] if j < real[0] else [8, cfg.eos_token_id]
        if j == 0 and real[1] == 99:
          toks = [9, cfg.image_token_id, 9, cfg.eos_token_id]
        rows.append(toks)
    tokens = np.zeros((len(rows), max_new_tokens), np.int32)
    for r, t in enumerate(rows):
      tokens[r, :len(t)] = t
    return types.SimpleNamespace(tokens=tokens, logprobs=np.full(tokens.shape, -1.0, np.float32),
                                 lengths=np.array([len(t) for t in rows], np.int32),
                                 finished=np.ones(len(rows), bool))


def accuracy_reward(inputs: rollout.RewardInputs):
  acc = [float(7 in c) for c in inputs.completion_ids]
  return _rewards([0.5 + a for a in acc], acc), {"rewards/n": float(len(acc))}


def _scripted(config, ks, second=11, image=False):
  rng = np.random.default_rng(1)
  out = []
  for k in ks:
    p = _prompt(config, rng, 4, [(1, 4, 4)] if image else ())
    ids = p.input_ids.copy()
    ids[0], ids[1] = k, second
    out.append(rollout.RLPrompt(chat.EncodedPrompt(ids, p.pixel_values, p.image_grid_thw, p.num_image_tokens, ""),
                                str(k)))
  return out


def test_online_filter_keeps_static_shapes(tiny, pad_id):
  model, params = tiny
  s = ScriptedSampler(model.config)
  b = rollout.collect_rollouts(s, None, _scripted(model.config, [0, 2, 4, 1]), accuracy_reward, n=G, max_new_tokens=8,
                               rng=jax.random.key(0), pad_id=pad_id, filter_bounds=(0.1, 0.9),
                               prompt_buckets=PROMPT_BUCKETS)
  # group accuracies 0, .5, 1, .25 → groups 0 and 2 dropped, rows kept with weight 0
  np.testing.assert_array_equal(b.keep, np.repeat([False, True, False, True], G))
  assert b.num_rows == 4 * G and (b.loss_mask[~b.keep] == 0).all() and (b.loss_mask[b.keep].sum(1) > 0).all()
  assert (b.advantages[~b.keep] == 0).all()
  # kept group 1 (.5 accuracy: rewards 1.5, 1.5, .5, .5): mean 1, std(ddof=1) 0.577 → ±0.866
  np.testing.assert_allclose(b.advantages[G:2 * G], [0.866, 0.866, -0.866, -0.866], atol=1e-3)
  assert (b.metrics["filter/kept_groups"], b.metrics["filter/dropped_groups"]) == (2.0, 2.0)
  assert b.metrics["rollout/zero_variance_groups"] == 0.5 and b.metrics["rewards/n"] == 16.0
  # batch std over the kept rows only: rewards of groups 1 and 3 = [1.5 1.5 .5 .5 1.5 .5 .5 .5]
  adv = rollout.advantages_for(b.rewards, b.keep, G, batch_std=True)
  kept = b.rewards[b.keep]
  centred = kept - np.repeat(kept.reshape(-1, G).mean(1), G)
  np.testing.assert_allclose(adv[b.keep], centred / (kept.std(ddof=1) + 1e-6), rtol=1e-5)

  # A batch whose groups were all dropped makes no update (and compiles nothing).
  cfg = grpo_step.GRPOConfig(group_size=G, prompts_per_step=4, max_response_len=8)
  b0 = rollout.collect_rollouts(s, None, _scripted(model.config, [0, 4, 0, 4]), accuracy_reward, n=G,
                                max_new_tokens=8, rng=jax.random.key(0), pad_id=pad_id, filter_bounds=(0.1, 0.9),
                                prompt_buckets=PROMPT_BUCKETS)
  state, _ = _fresh_state(params, cfg)
  state, m = grpo_step.grpo_train_step(state, b0, cfg, jax.random.key(0), fns=grpo_step.make_grpo_functions(model, cfg))
  assert (m["updates"], m["skipped_updates"], int(state.step)) == (0.0, 1.0, 0)


def test_dynamic_sampling_refills_then_tops_up(tiny, pad_id):
  model, _ = tiny
  s = ScriptedSampler(model.config)
  refills = [_scripted(model.config, [1, 3, 0, 2]), _scripted(model.config, [0, 0, 4, 4])]
  kw = dict(n=G, max_new_tokens=8, rng=jax.random.key(0), pad_id=pad_id, filter_bounds=(0.1, 0.9),
            dynamic_sampling=True, prompt_buckets=PROMPT_BUCKETS)
  b = rollout.collect_rollouts(s, None, _scripted(model.config, [0, 2, 4, 4]), accuracy_reward,
                               next_prompts=lambda k: refills.pop(0), **kw)
  # round 1 keeps k=2; round 2 keeps k=1, 3, 2 → full after 2 rounds, only kept groups in the batch
  assert b.keep.all() and s.calls == 2
  np.testing.assert_array_equal(b.accuracy_rewards.reshape(4, G).mean(1), [0.5, 0.25, 0.75, 0.5])
  assert (b.metrics["filter/rounds"], b.metrics["filter/sampled_groups"], b.metrics["filter/topped_up_groups"]) == \
      (2.0, 8.0, 0.0)
  assert b.metrics["rewards/n"] == 32.0                     # reward metrics summed over rounds

  # rounds run out: 1 group passed in 2 rounds → 3 dropped groups fill the batch with weight 0
  b2 = rollout.collect_rollouts(s, None, _scripted(model.config, [0, 2, 4, 4]), accuracy_reward,
                                next_prompts=lambda k: _scripted(model.config, [0, 0, 4, 4]),
                                max_sampling_rounds=2, **kw)
  np.testing.assert_array_equal(b2.keep, np.repeat([True, False, False, False], G))
  assert b2.metrics["filter/topped_up_groups"] == 3.0 and b2.metrics["filter/passed_groups"] == 1.0
  with pytest.raises(ValueError, match="next_prompts"):
    rollout.collect_rollouts(s, None, _scripted(model.config, [1]), accuracy_reward, **kw)


def test_image_pad_in_completion_is_cut_in_image_batches(tiny, pad_id):
  model, _ = tiny
  s = ScriptedSampler(model.config)
  kw = dict(n=G, max_new_tokens=8, rng=jax.random.key(0), pad_id=pad_id, filter_bounds=None,
            prompt_buckets=PROMPT_BUCKETS)
  b = rollout.collect_rollouts(s, None, _scripted(model.config, [2, 2], second=99, image=True), accuracy_reward, **kw)
  assert b.metrics["rollout/image_token_cut"] == 2.0
  assert b.completion_mask[0].sum() == 1 and b.input_ids[0, b.prompt_len] == 9     # [9, <|image_pad|>, ...] → [9]
  assert model.config.image_token_id not in b.input_ids[:, b.prompt_len:]
  t = rollout.collect_rollouts(s, None, _scripted(model.config, [2, 2], second=99), accuracy_reward, **kw)
  assert t.metrics["rollout/image_token_cut"] == 0.0 and t.completion_mask[0].sum() == 4   # text-only: kept


def test_config_validation_and_temperature_guard(mm_rollout):
  with pytest.raises(ValueError, match="agg"):
    grpo_step.GRPOConfig(agg="mean")
  with pytest.raises(ValueError, match="group_size"):
    grpo_step.GRPOConfig(group_size=1)
  with pytest.raises(ValueError, match="dynamic_sampling"):
    grpo_step.GRPOConfig(filter_lower=None, filter_upper=None, dynamic_sampling=True)
  with pytest.raises(ValueError, match="unknown"):
    grpo_step.GRPOConfig.from_mapping({"group_sze": 4})
  d = grpo_step.GRPOConfig()
  assert (d.group_size, d.prompts_per_step, d.learning_rate, d.kl_coef, d.agg, d.max_response_len) == \
      (8, 128, 1e-6, 0.0, "token-mean", 10240)
  assert d.optimizer_config().frozen_prefixes == ("visual",) and d.filter_bounds == (0.1, 0.9)
  with pytest.raises(ValueError, match="recompute_old_logps"):
    grpo_step.GRPOConfig(ppo_epochs=2, recompute_old_logps=False)
  _, b = mm_rollout
  cfg = grpo_step.GRPOConfig(group_size=G, prompts_per_step=4, temperature=0.7, minibatches=3)
  with pytest.raises(ValueError, match="minibatches"):
    grpo_step.grpo_train_step(None, b, cfg, jax.random.key(0), fns=None)
  cfg = grpo_step.GRPOConfig(group_size=G, prompts_per_step=4, temperature=0.7)
  with pytest.raises(ValueError, match="temperature"):
    grpo_step.grpo_train_step(None, b, cfg, jax.random.key(0), fns=None)


def test_rollout_in_several_sampler_calls_equals_one_call(tiny, pad_id):
  """prompts_per_call bounds the KV cache: 4 prompts with images sampled 2 at a time give the same
  rows (in order, with each call's own image table) as one call."""
  model, _ = tiny
  prompts = _scripted(model.config, [0, 2, 4, 1], image=True)
  kw = dict(n=G, max_new_tokens=8, rng=jax.random.key(0), pad_id=pad_id, filter_bounds=None,
            prompt_buckets=PROMPT_BUCKETS)
  seen = []

  class Recording(ScriptedSampler):
    def generate(self, params, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, **k):
      seen.append((input_ids.shape[0], None if image_grid_thw is None else len(image_grid_thw)))
      return super().generate(params, input_ids, attention_mask, pixel_values, image_grid_thw, **k)

  one = rollout.collect_rollouts(Recording(model.config), None, prompts, accuracy_reward, **kw)
  two = rollout.collect_rollouts(Recording(model.config), None, prompts, accuracy_reward, prompts_per_call=2, **kw)
  assert seen == [(4, 4), (2, 2), (2, 2)]
  for name in ("input_ids", "loss_mask", "advantages", "image_index", "pixel_values"):
    np.testing.assert_array_equal(getattr(one, name), getattr(two, name), err_msg=name)
  assert grpo_step.GRPOConfig(prompts_per_call=32).rollout_kwargs()["prompts_per_call"] == 32
