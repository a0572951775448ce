"""GRPO rollouts on the host: n samples per prompt → rewards → group advantages → online filter
(+ DAPO refill) → one static-shape `RolloutBatch` for `grpo_step.grpo_train_step`.

    batch = rollout.collect_rollouts(sampler, state.params, prompts, reward_fn, n=8, temperature=1.0,
                                     top_p=1.0, max_new_tokens=10240, rng=key, pad_id=pad, tokenizer=tok,
                                     filter_bounds=(0.1, 0.9))
    batch.input_ids [N, P+C]   batch.completion_mask [N, C]   batch.advantages [N]   batch.keep [N]

Axes: B prompts (= groups) in the batch, G samples per prompt (the sampler's `n`), N = B·G rows,
prompt-major (row b·G + j is sample j of prompt b, the order the sampler returns and the order
`grpo.group_advantages` expects), P prompt bucket, C completion bucket, L = P + C.

Packing (the convention of `processing.batching`): prompts are left-padded to P, so every prompt's
last token is in column P−1; completions start at column P and are right-padded to C. The training
forward reads the log-prob of completion token t from the logits at column P−1+t, and
`completion_mask[:, t]` is 1 for t < length (the EOS token included).

Images are not repeated n times. The batch holds each prompt's images once (`pixel_values`,
`vision`: `qwen2_5_vl.prepare_inputs` over the B prompts, one slot per image), and
`image_index[r, j]` names the row of the merged image-token features (`encode_images` output, in
prompt order) that the `<|image_pad|>` in prompt column j of row r takes (−1 in other columns). The
step thus encodes B prompts' images, not N, and gathers the features for the N rows. M-RoPE positions
are computed once per prompt and repeated; completion token t of a row whose prompt has r real tokens
sits at r + t + rope_delta on all three axes — the sampler's decoding rule — so the training forward
sees exactly the positions the samples were drawn at.

A completion that contains `<|image_pad|>` (a sampled token; only a random or broken policy does
this) would be taken for an image slot by the model's embedding lookup. In a batch with images such
a completion is cut before that token (counted in `rollout/image_token_cut`); text-only batches
keep it, as the sampler embedded it as text too.

Online filter (MM-EUREKA `--enable_accuracy_filter --accuracy_lower_bound 0.1
--accuracy_upper_bound 0.9`): a group whose mean accuracy reward lies outside [lower, upper] is
dropped. Shapes stay static: a dropped group keeps its rows with `keep` False, its advantages are 0
and its loss mask is 0, so it counts in no loss denominator. With `dynamic_sampling` (DAPO), further
prompt batches from `next_prompts` are sampled until B groups pass or `max_sampling_rounds` rounds
ran; the batch then holds kept groups only, topped up with dropped groups (keep False) if the
rounds ran out. Groups, rounds and top-ups are counted in `metrics`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from specs_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from specs_jax.models.qwen2_5_vl.model import prepare_inputs
from specs_jax.models.qwen2_5_vl.rope import slot_size_for
from specs_jax.processing import chat
from specs_jax.processing.batching import Buckets, bucket_length, pad_prompts_left
from specs_jax.rewards.config import RewardConfig
from specs_jax.rewards.pool import BatchRewards, RewardPool, grade_batch
from specs_jax.training import grpo

__all__ = [
    "DEFAULT_IMAGE_BUCKETS",
    "DEFAULT_PATCH_BUCKETS",
    "DEFAULT_PROMPT_BUCKETS",
    "RLPrompt",
    "RewardFn",
    "RewardInputs",
    "RolloutBatch",
    "collect_rollouts",
    "completion_buckets_for",
    "pool_reward_fn",
]

log = logging.getLogger(__name__)

# The sampler's defaults (`sampling.sampler`), repeated so that training does not import sampling.
DEFAULT_PROMPT_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
DEFAULT_PATCH_BUCKETS = tuple(2**i for i in range(4, 17))        # patches per image slot
DEFAULT_IMAGE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # image slots per batch


# --------------------------------------------------------------------------------- inputs

@dataclasses.dataclass(frozen=True, eq=False)
class RLPrompt:
  """One RL prompt: the encoded prompt (ids + images), its gold answer and an optional id."""

  prompt: chat.EncodedPrompt
  gold: str
  uid: str | None = None


@dataclasses.dataclass(frozen=True)
class RewardInputs:
  """What a reward function sees for N = B·G samples (rows prompt-major).

  Attributes:
    texts: N decoded responses (EOS dropped, special tokens skipped), or None without a tokenizer.
    golds: N gold answers (each prompt's gold repeated G times).
    completion_ids: N int32 arrays, the sampled tokens (EOS included when produced).
    finished: [N] bool, True where the sample ended with EOS (False: cut at max_new_tokens).
  """

  texts: Sequence[str] | None
  golds: Sequence[str]
  completion_ids: Sequence[np.ndarray]
  finished: np.ndarray


RewardFn = Callable[[RewardInputs], tuple[BatchRewards, Mapping[str, float]]]


def pool_reward_fn(pool: RewardPool | None = None, config: RewardConfig | None = None) -> RewardFn:
  """The recipe's reward (RECIPE.md §5: 0.5·format + 1.0·accuracy) graded in a process pool.

  Args:
    pool: a running `rewards.RewardPool` (start it once per stage); None starts one per call.
    config: RewardConfig (weights, graders, timeouts).
  Returns:
    fn(RewardInputs) -> (BatchRewards, `GradeStats.as_metrics()`); needs `texts`.
  """
  def fn(inputs: RewardInputs) -> tuple[BatchRewards, Mapping[str, float]]:
    if inputs.texts is None:
      raise ValueError("pool_reward_fn grades texts: pass tokenizer= to collect_rollouts")
    rewards, stats = grade_batch(inputs.texts, inputs.golds, config, pool=pool)
    return rewards, stats.as_metrics()
  return fn


class SamplerLike(Protocol):
  """What `collect_rollouts` needs from `sampling.Sampler` (duck-typed, so fakes work in tests)."""

  model: Any

  def generate(self, params: Any, input_ids: np.ndarray, attention_mask: np.ndarray,
               pixel_values: np.ndarray | None = None, image_grid_thw: np.ndarray | None = None,
               **kwargs: Any) -> Any: ...


# --------------------------------------------------------------------------------- output

@dataclasses.dataclass
class RolloutBatch:
  """One GRPO step's samples, packed with static shapes (see the module docstring for the layout).

  Row arrays (N = B·G rows, prompt-major):
    input_ids       [N, L] int32    prompt left-padded to P, completion from column P, right-padded.
    attention_mask  [N, L] int32    1 on prompt and completion tokens.
    position_ids    [3, N, L] int32 M-RoPE positions (text: the same on the three axes).
    completion_mask [N, C] int32    1 on completion tokens incl. EOS (column t ↔ input column P+t).
    sampler_logps   [N, C] float32  the sampler's log-probs of the tokens (temperature / top-p / top-k
                                    applied), 0 on padding; for diagnostics only.
    rewards, format_rewards, accuracy_rewards  [N] float32.
    advantages      [N] float32     group-normalised (see `advantages_for`), 0 where keep is False.
    keep            [N] bool        False for groups the online filter dropped.
    group_ids       [N] int32       b for the rows of prompt b (= row // G).
    finished        [N] bool        the sample produced EOS.
    image_index     [N, P] int32 or None  row of the unique image-token features per prompt column, −1 elsewhere.
  Unique-prompt vision inputs (None for a text-only batch):
    pixel_values    [S·Q, 1176] float32 each prompt's images once, one slot of Q patches per image.
    vision          dict of the slot-layout metadata (`qwen2_5_vl.vision_metadata`).
  Host data: texts (decoded responses or None), golds, uids ([B]), metrics (floats for metrics.jsonl),
  sampling (the temperature / top_p / top_k the samples were drawn with).
  """

  input_ids: np.ndarray
  attention_mask: np.ndarray
  position_ids: np.ndarray
  completion_mask: np.ndarray
  sampler_logps: np.ndarray
  rewards: np.ndarray
  format_rewards: np.ndarray
  accuracy_rewards: np.ndarray
  advantages: np.ndarray
  keep: np.ndarray
  group_ids: np.ndarray
  finished: np.ndarray
  group_size: int
  image_index: np.ndarray | None = None
  pixel_values: np.ndarray | None = None
  vision: dict[str, np.ndarray] | None = None
  texts: list[str] | None = None
  golds: list[str] = dataclasses.field(default_factory=list)
  uids: list[str | None] = dataclasses.field(default_factory=list)
  metrics: dict[str, float] = dataclasses.field(default_factory=dict)
  sampling: dict[str, float] = dataclasses.field(default_factory=dict)

  @property
  def num_rows(self) -> int:
    return int(self.input_ids.shape[0])

  @property
  def completion_len(self) -> int:
    return int(self.completion_mask.shape[1])

  @property
  def prompt_len(self) -> int:
    return int(self.input_ids.shape[1]) - self.completion_len

  @property
  def loss_mask(self) -> np.ndarray:
    """[N, C] int32: completion tokens of kept groups (what the policy loss averages over)."""
    return self.completion_mask * self.keep[:, None].astype(np.int32)

  @property
  def has_images(self) -> bool:
    return self.pixel_values is not None


# ------------------------------------------------------------------------------- advantages

def advantages_for(rewards: np.ndarray, keep: np.ndarray, group_size: int, *, scale_std: bool = True,
                   batch_std: bool = False, eps: float = 1e-6) -> np.ndarray:
  """Advantages of the kept rows, 0 elsewhere.

  Args:
    rewards: [N] float, groups contiguous. keep: [N] bool, constant within a group.
    scale_std: divide by the group std + eps (GRPO); False gives Dr.GRPO's r − mean_g.
    batch_std: divide by the std of all *kept* rewards instead (TRL `scale_rewards="batch"`).
  Returns:
    [N] float32.
  """
  keep = np.asarray(keep, bool)
  out = np.zeros(rewards.shape, np.float32)
  if not keep.any():
    return out
  r = jnp.asarray(rewards[keep])
  if batch_std:
    adv = grpo.batch_std_advantages(r, group_size, eps=eps) if scale_std else \
        grpo.group_advantages(r, group_size, eps=eps, scale_std=False)
  else:
    adv = grpo.group_advantages(r, group_size, eps=eps, scale_std=scale_std)
  out[keep] = np.asarray(adv)
  return out


# --------------------------------------------------------------------------------- sampling

@dataclasses.dataclass(eq=False)
class _Group:
  """One prompt's G samples, graded."""

  item: RLPrompt
  completions: list[np.ndarray]       # G arrays [c_j] int32 (EOS included)
  sampler_logps: list[np.ndarray]     # G arrays [c_j] float32
  finished: np.ndarray                # [G] bool
  texts: list[str] | None
  total: np.ndarray                   # [G] float32
  format: np.ndarray
  accuracy: np.ndarray
  passed: bool = True                 # inside the online filter's bounds


def _decode(tokenizer: Any, completions: Sequence[np.ndarray], finished: np.ndarray) -> list[str]:
  texts = []
  for toks, fin in zip(completions, finished):
    toks = toks[:-1] if fin and len(toks) else toks          # drop EOS
    texts.append(tokenizer.decode(toks.tolist(), skip_special_tokens=True))
  return texts


def _sample_round(sampler: SamplerLike, params: Any, items: Sequence[RLPrompt], reward_fn: RewardFn, *, n: int,
                  rng: jax.Array, pad_id: int, tokenizer: Any, prompt_buckets: Buckets,
                  gen_kwargs: Mapping[str, Any], prompts_per_call: int = 0) -> tuple[list[_Group], dict[str, float]]:
  """Samples G completions for each of the B prompts and grades them. Returns the groups and
  {"sample_s", "reward_s"} plus the reward function's metrics. With `prompts_per_call` P > 0 the
  sampler is called on P prompts at a time (call c with `fold_in(rng, c)`; one call uses `rng`
  itself), which bounds the KV cache to P·G rows: a 7B rollout of 128 × 8 rows at 12K tokens needs
  ≈721 GB of cache at once (docs/scaling.md)."""
  t0 = time.perf_counter()
  length = prompt_buckets(max(len(it.prompt.input_ids) for it in items), what="longest prompt")
  per_call = prompts_per_call if 0 < prompts_per_call < len(items) else len(items)
  outs = []
  for c, start in enumerate(range(0, len(items), per_call)):
    prompts = [it.prompt for it in items[start:start + per_call]]
    ids, mask = pad_prompts_left([p.input_ids for p in prompts], pad_id, length)
    grids = [np.asarray(p.image_grid_thw, np.int32).reshape(-1, 3) for p in prompts]
    grid = np.concatenate(grids) if grids else np.zeros((0, 3), np.int32)
    pv = thw = None
    if len(grid):
      pv = np.concatenate([np.asarray(p.pixel_values, np.float32).reshape(-1, p.pixel_values.shape[-1])
                           for p in prompts if len(p.pixel_values)])
      thw = grid
    key = rng if per_call == len(items) else jax.random.fold_in(rng, c)
    outs.append(sampler.generate(params, ids, mask, pv, thw, n=n, rng=key, pad_token_id=pad_id, **gen_kwargs))
  tokens = np.concatenate([np.asarray(o.tokens) for o in outs])
  lps = np.concatenate([np.asarray(o.logprobs, np.float32) for o in outs])
  lengths = np.concatenate([np.asarray(o.lengths) for o in outs])
  finished = np.concatenate([np.asarray(o.finished, bool) for o in outs])
  if tokens.shape[0] != len(items) * n:
    raise ValueError(f"the sampler returned {tokens.shape[0]} rows for {len(items)} prompts x n={n}")
  completions = [tokens[i, :lengths[i]].astype(np.int32) for i in range(tokens.shape[0])]
  sampler_lps = [lps[i, :lengths[i]] for i in range(tokens.shape[0])]
  t1 = time.perf_counter()
  texts = _decode(tokenizer, completions, finished) if tokenizer is not None else None
  golds = [it.gold for it in items for _ in range(n)]
  rewards, reward_metrics = reward_fn(RewardInputs(texts=texts, golds=golds, completion_ids=completions,
                                                   finished=finished))
  t2 = time.perf_counter()
  for name in ("total", "format", "accuracy"):
    if np.asarray(getattr(rewards, name)).shape != (len(golds),):
      raise ValueError(f"reward_fn returned {name} of shape {np.shape(getattr(rewards, name))}, "
                       f"expected ({len(golds)},)")
  groups = []
  for b, it in enumerate(items):
    s = slice(b * n, (b + 1) * n)
    groups.append(_Group(item=it, completions=completions[s], sampler_logps=sampler_lps[s], finished=finished[s],
                         texts=texts[s] if texts is not None else None,
                         total=np.asarray(rewards.total, np.float32)[s],
                         format=np.asarray(rewards.format, np.float32)[s],
                         accuracy=np.asarray(rewards.accuracy, np.float32)[s]))
  timings = {"sample_s": t1 - t0, "reward_s": t2 - t1}
  return groups, timings | {k: float(v) for k, v in reward_metrics.items()}


def _apply_filter(groups: Sequence[_Group], bounds: tuple[float, float] | None) -> None:
  if bounds is None:
    return
  acc = jnp.asarray(np.concatenate([g.accuracy for g in groups]))
  passed = np.asarray(grpo.online_filter_mask(acc, len(groups[0].accuracy), bounds[0], bounds[1]))
  for g, p in zip(groups, passed):
    g.passed = bool(p)


# ---------------------------------------------------------------------------------- packing

def completion_buckets_for(max_new_tokens: int, smallest: int = 16) -> Buckets:
  """Powers of two from `smallest` up to max_new_tokens (always the last bucket)."""
  return Buckets.powers_of_two(min(smallest, max_new_tokens), max_new_tokens)


def _as_buckets(b: Buckets | Sequence[int] | int) -> Buckets:
  if isinstance(b, Buckets):
    return b
  return Buckets((int(b),)) if isinstance(b, int) else Buckets(tuple(b))


def _cut_image_tokens(completions: list[np.ndarray], image_token_id: int) -> tuple[list[np.ndarray], int]:
  out, cut = [], 0
  for c in completions:
    hits = np.flatnonzero(c == image_token_id)
    if len(hits):
      c, cut = c[:hits[0]], cut + 1
    out.append(c)
  return out, cut


def _pack(groups: Sequence[_Group], keep: np.ndarray, config: Qwen2_5_VLConfig, *, n: int, pad_id: int,
          prompt_buckets: Buckets, completion_buckets: Buckets, patch_buckets: Sequence[int],
          image_buckets: Sequence[int]) -> tuple[dict[str, Any], int]:
  """Groups → the RolloutBatch arrays (module docstring). Returns (arrays, #completions cut)."""
  prompts = [g.item.prompt for g in groups]
  b = len(prompts)
  p_len = prompt_buckets(max(len(p.input_ids) for p in prompts), what="longest prompt")
  ids, mask = pad_prompts_left([p.input_ids for p in prompts], pad_id, p_len)        # [B, P]
  grid = np.concatenate([np.asarray(p.image_grid_thw, np.int32).reshape(-1, 3) for p in prompts])
  out: dict[str, Any] = {}
  if len(grid):
    pv = np.concatenate([np.asarray(p.pixel_values, np.float32).reshape(-1, p.pixel_values.shape[-1])
                         for p in prompts if len(p.pixel_values)])
    slot = bucket_length(slot_size_for(grid), tuple(patch_buckets), what="patches of the largest image")
    n_img = bucket_length(len(grid), tuple(image_buckets), what="number of images")
    prep = prepare_inputs(config, ids, mask, grid, slot_size=slot, num_slots=n_img, pixel_values=pv)
    out["pixel_values"], out["vision"] = prep.pixel_values, prep.vision
    is_img = (ids == config.image_token_id) & (mask > 0)                                # [B, P]
    # k-th image token of the batch (row-major over prompts) ↔ row k of the merged features.
    index = np.where(is_img, np.cumsum(is_img.reshape(-1)).reshape(is_img.shape) - 1, -1).astype(np.int32)
    out["image_index"] = np.repeat(index, n, axis=0)                                   # [N, P]
  else:
    prep = prepare_inputs(config, ids, mask, None)

  completions = [c for g in groups for c in g.completions]
  cut = 0
  if len(grid):
    completions, cut = _cut_image_tokens(completions, config.image_token_id)
  lengths = np.array([len(c) for c in completions], np.int32)                          # [N]
  c_len = completion_buckets(max(int(lengths.max()), 1), what="longest completion")
  rows = b * n
  comp = np.full((rows, c_len), pad_id, np.int32)
  cmask = np.zeros((rows, c_len), np.int32)
  slp = np.zeros((rows, c_len), np.float32)
  sampler_lps = [lp for g in groups for lp in g.sampler_logps]
  for i, (c, lp) in enumerate(zip(completions, sampler_lps)):
    comp[i, :len(c)], cmask[i, :len(c)], slp[i, :len(c)] = c, 1, lp[:len(c)]
  out["input_ids"] = np.concatenate([np.repeat(ids, n, axis=0), comp], axis=1)
  out["attention_mask"] = np.concatenate([np.repeat(mask, n, axis=0), cmask], axis=1)
  out["completion_mask"] = cmask
  out["sampler_logps"] = slp
  # Completion token t sits at r + t + rope_delta (r = real prompt tokens), as in the sampler.
  start = np.repeat(mask.sum(-1) + prep.rope_deltas, n).astype(np.int32)               # [N]
  comp_pos = start[:, None] + np.arange(c_len, dtype=np.int32)[None]                   # [N, C]
  prompt_pos = np.repeat(prep.position_ids, n, axis=1)                                 # [3, N, P]
  out["position_ids"] = np.concatenate([prompt_pos, np.broadcast_to(comp_pos, (3, rows, c_len))], axis=2)
  out["finished"] = np.concatenate([g.finished for g in groups]).astype(bool)
  out["keep"] = np.repeat(np.asarray(keep, bool), n)
  out["group_ids"] = np.repeat(np.arange(b, dtype=np.int32), n)
  return out, cut


# ------------------------------------------------------------------------------- the entry point

def _group_metrics(groups: Sequence[_Group]) -> dict[str, float]:
  total = np.concatenate([g.total for g in groups])
  lengths = np.array([len(c) for g in groups for c in g.completions], np.float64)
  finished = np.concatenate([g.finished for g in groups])
  n = len(groups[0].total)
  return {
      "rollout/reward_mean": float(total.mean()),
      "rollout/reward_std": float(total.std()),
      "rollout/format_reward_mean": float(np.concatenate([g.format for g in groups]).mean()),
      "rollout/accuracy_reward_mean": float(np.concatenate([g.accuracy for g in groups]).mean()),
      "rollout/response_length_mean": float(lengths.mean()),
      "rollout/response_length_max": float(lengths.max()),
      "rollout/response_length_min": float(lengths.min()),
      "rollout/truncated_fraction": float(1.0 - finished.mean()),
      "rollout/zero_variance_groups": float(grpo.zero_variance_fraction(jnp.asarray(total), n)),
      "rollout/samples": float(len(total)),
  }


def collect_rollouts(
    sampler: SamplerLike,
    params: Any,
    prompts: Sequence[RLPrompt],
    reward_fn: RewardFn,
    *,
    n: int,
    max_new_tokens: int,
    rng: jax.Array,
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    tokenizer: Any = None,
    filter_bounds: tuple[float, float] | None = (0.1, 0.9),
    dynamic_sampling: bool = False,
    next_prompts: Callable[[int], Sequence[RLPrompt]] | None = None,
    max_sampling_rounds: int = 4,
    scale_std: bool = True,
    batch_std: bool = False,
    adv_eps: float = 1e-6,
    prompt_buckets: Buckets | Sequence[int] = DEFAULT_PROMPT_BUCKETS,
    completion_buckets: Buckets | Sequence[int] | None = None,
    patch_buckets: Sequence[int] = DEFAULT_PATCH_BUCKETS,
    image_buckets: Sequence[int] = DEFAULT_IMAGE_BUCKETS,
    sampler_kwargs: Mapping[str, Any] | None = None,
    prompts_per_call: int = 0,
) -> RolloutBatch:
  """Samples, grades, filters and packs one GRPO step's batch (module docstring).

  Args:
    sampler: a `sampling.Sampler` (or anything with its `generate` and `.model.config`).
    params: the current policy params (the samples are on-policy).
    prompts: the B prompts of this step (B = prompts per step).
    reward_fn: RewardInputs -> (BatchRewards, metrics); e.g. `pool_reward_fn(pool)`.
    n: G, samples per prompt (≥ 2: a group of one has no advantage).
    max_new_tokens: the response budget (RECIPE.md: 10,240 for the real configs).
    rng: PRNG key; round k samples with `fold_in(rng, k)`.
    pad_id: padding token id.
    temperature, top_p, top_k: sampling; the step must use the same temperature for its log-probs.
    eos_token_id: stop token(s); None: the model config's.
    tokenizer: decodes responses for `RewardInputs.texts` (needed by text rewards).
    filter_bounds: (lower, upper) on a group's mean accuracy, both inclusive; None disables.
    dynamic_sampling: refill dropped groups from `next_prompts(B)` (DAPO); needs filter_bounds.
    next_prompts: B -> B fresh prompts (the data iterator), used only by dynamic sampling.
    max_sampling_rounds: most sampling rounds per step with dynamic sampling (the first included).
    scale_std, batch_std, adv_eps: see `advantages_for`.
    prompt_buckets, completion_buckets (default: powers of two up to max_new_tokens), patch_buckets
      (patches per image slot), image_buckets (image slots per batch): static sizes.
    sampler_kwargs: passed on to `sampler.generate` (e.g. gen_buckets, data_sharding).
    prompts_per_call: sample at most this many prompts (× n rows) per sampler call, to bound the KV
      cache; 0 = all of them in one call. Keep B a multiple of it, or the last call compiles again.

  Returns:
    a RolloutBatch with B·G rows. `metrics` holds rollout/* (reward, format, accuracy means over all
    sampled responses, response lengths, truncated fraction, zero-variance group fraction),
    filter/* (kept / dropped groups in the batch, sampled groups, rounds, top-ups), the reward
    function's metrics (summed over rounds) and time/sample_s, time/reward_s, time/pack_s.

  Raises:
    ValueError: n < 2, no prompts, dynamic sampling without a filter or `next_prompts`, bad bounds.
  """
  if n < 2:
    raise ValueError(f"GRPO needs n >= 2 samples per prompt, got {n}")
  if not prompts:
    raise ValueError("collect_rollouts got no prompts")
  if filter_bounds is not None and not 0.0 <= filter_bounds[0] <= filter_bounds[1] <= 1.0:
    raise ValueError(f"filter_bounds must satisfy 0 <= lower <= upper <= 1, got {filter_bounds}")
  if dynamic_sampling and (filter_bounds is None or next_prompts is None):
    raise ValueError("dynamic_sampling needs filter_bounds and next_prompts")
  if max_sampling_rounds < 1:
    raise ValueError(f"max_sampling_rounds must be >= 1, got {max_sampling_rounds}")
  config = sampler.model.config
  p_buckets = _as_buckets(prompt_buckets)
  c_buckets = completion_buckets_for(max_new_tokens) if completion_buckets is None else _as_buckets(completion_buckets)
  gen_kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                    eos_token_id=eos_token_id, prompt_buckets=p_buckets.sizes, patch_buckets=tuple(patch_buckets),
                    image_buckets=tuple(image_buckets)) | dict(sampler_kwargs or {})
  target = len(prompts)
  sampled: list[_Group] = []
  kept: list[_Group] = []
  dropped: list[_Group] = []
  extra: dict[str, float] = {}
  items = list(prompts)
  rounds = 0
  while True:
    groups, m = _sample_round(sampler, params, items, reward_fn, n=n, rng=jax.random.fold_in(rng, rounds),
                              pad_id=pad_id, tokenizer=tokenizer, prompt_buckets=p_buckets, gen_kwargs=gen_kwargs,
                              prompts_per_call=prompts_per_call)
    rounds += 1
    for k, v in m.items():
      extra[k] = extra.get(k, 0.0) + v
    _apply_filter(groups, filter_bounds)
    sampled += groups
    for g in groups:
      (kept if g.passed else dropped).append(g)
    if not dynamic_sampling or len(kept) >= target or rounds >= max_sampling_rounds:
      break
    items = list(next_prompts(target))
    if len(items) != target:
      raise ValueError(f"next_prompts({target}) returned {len(items)} prompts")

  t0 = time.perf_counter()
  if dynamic_sampling:
    # DAPO: the first B groups that passed; if the rounds ran out, top up with dropped ones.
    short = max(target - len(kept), 0)
    batch_groups = kept[:target] + dropped[len(dropped) - short:]
    keep = np.array([True] * (target - short) + [False] * short)
  else:
    short = 0
    batch_groups = sampled
    keep = np.array([g.passed for g in sampled])
  arrays, cut = _pack(batch_groups, keep, config, n=n, pad_id=pad_id, prompt_buckets=p_buckets,
                      completion_buckets=c_buckets, patch_buckets=patch_buckets, image_buckets=image_buckets)
  total = np.concatenate([g.total for g in batch_groups]).astype(np.float32)
  arrays["advantages"] = advantages_for(total, arrays["keep"], n, scale_std=scale_std, batch_std=batch_std,
                                        eps=adv_eps)
  pack_s = time.perf_counter() - t0
  texts = None if tokenizer is None else [t for g in batch_groups for t in g.texts]
  metrics = _group_metrics(sampled) | {
      "filter/kept_groups": float(keep.sum()),
      "filter/dropped_groups": float((~keep).sum()),
      "filter/sampled_groups": float(len(sampled)),
      "filter/passed_groups": float(len(kept)),
      "filter/rounds": float(rounds),
      "filter/topped_up_groups": float(short),
      "rollout/image_token_cut": float(cut),
      "time/sample_s": extra.pop("sample_s"),
      "time/reward_s": extra.pop("reward_s"),
      "time/pack_s": pack_s,
  } | extra
  if short:
    log.warning("dynamic sampling: %d of %d groups passed the filter after %d rounds; %d dropped groups fill "
                "the batch with zero weight", len(kept), target, rounds, short)
  return RolloutBatch(
      rewards=total,
      format_rewards=np.concatenate([g.format for g in batch_groups]).astype(np.float32),
      accuracy_rewards=np.concatenate([g.accuracy for g in batch_groups]).astype(np.float32),
      group_size=n, texts=texts, golds=[g.item.gold for g in batch_groups for _ in range(n)],
      uids=[g.item.uid for g in batch_groups], metrics=metrics,
      sampling={"temperature": float(temperature), "top_p": float(top_p), "top_k": float(top_k)}, **arrays)
