"""KV-cache sampler for Qwen2.5-VL: one jitted prefill, one jitted `lax.while_loop` decode.

    out = sampling.generate(model, params, input_ids, attention_mask, pixel_values=pv,
                            image_grid_thw=thw, max_new_tokens=256, temperature=1.0, top_p=1.0,
                            top_k=0, eos_token_id=eos, rng=jax.random.key(0), n=8)
    out.tokens [B*n, N]   out.logprobs [B*n, N]   out.lengths [B*n]   out.finished [B*n]

Shapes are static per bucket: the prompt is left-padded to a prompt-length bucket, the patches to
a patch bucket, the generation buffer to a length bucket (the real `max_new_tokens` is a runtime
scalar), so repeated calls with the same buckets never recompile (`compile_counts()` tells).

Prefill runs the vision tower once and the prompt once; `n` samples per prompt (a GRPO group) copy
the prompt's KV cache n times instead of re-running either. Decode stops as soon as every
sequence has produced EOS. Positions of new tokens follow Qwen2.5-VL's M-RoPE rule: the t-th new
token of a sequence with `r` real prompt tokens sits at r + t + rope_delta on all three axes.

Log-probs: `logprobs` are under the sampling distribution (temperature, top-k, top-p applied;
for greedy, the untempered softmax); `untempered_logprobs` (optional) under softmax(logits).

Top-p is found without sorting the vocabulary (bisection on the logit threshold,
`process_logits`), and top_p = 1 compiles a decode without it (the flag is static: switching
between top_p = 1 and top_p < 1 compiles a second decode).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from specs_jax.models.qwen2_5_vl import text as text_lib
from specs_jax.models.qwen2_5_vl.model import Qwen2_5_VL, prepare_inputs
from specs_jax.parallel import mesh as mesh_lib

log = logging.getLogger(__name__)

DEFAULT_PROMPT_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
DEFAULT_GEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 10240, 16384)
DEFAULT_PATCH_BUCKETS = tuple(2**i for i in range(4, 17))  # patches per image slot
DEFAULT_IMAGE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # image slots per batch

_COMPILES: collections.Counter = collections.Counter()


def compile_counts() -> dict[str, int]:
  """How many times each jitted sampler function was traced (= compiled) in this process."""
  return dict(_COMPILES)


def _bucket(n: int, buckets: Sequence[int], what: str) -> int:
  for b in sorted(buckets):
    if b >= n:
      return b
  raise ValueError(f"{what} {n} exceeds the largest bucket {max(buckets)}")


@dataclasses.dataclass
class SampleOutput:
  tokens: np.ndarray  # [B*n, N] int32, pad_token_id after EOS
  logprobs: np.ndarray  # [B*n, N] float32, 0 after EOS
  lengths: np.ndarray  # [B*n] int32: generated tokens including EOS
  finished: np.ndarray  # [B*n] bool: EOS (or a stop string) was produced
  untempered_logprobs: np.ndarray | None = None
  group_index: np.ndarray | None = None  # [B*n]: which prompt each row samples (rows are prompt-major)


# ------------------------------------------------------------------------------ token selection


def _ordered_keys(x: jax.Array) -> jax.Array:
  """float32 → uint32 with the same order and equalities (−inf < … < 0 < … < inf; −0 and +0 get
  one key, as they compare equal)."""
  bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, jnp.float32(0), x.astype(jnp.float32)), jnp.uint32)
  return jnp.where((bits >> 31) == 1, ~bits, bits | jnp.uint32(0x80000000))


def _nucleus_threshold_keys(x: jax.Array, top_p) -> jax.Array:
  """The ordered key (`_ordered_keys`) of the smallest logit top-p keeps, per row [B, 1].

  Top-p keeps the tokens of the sorted distribution while the mass strictly above them is below
  top_p; that set is {x ≥ t} for t the largest logit with mass(x ≥ t) ≥ top_p (ties at t kept).
  That t is found by bisection over the 32-bit keys (32 rounds of one masked sum over [B, V])
  instead of sorting the vocabulary: XLA:CPU's sort of [32, 8192] took 43 ms, the whole decode
  step 31 ms.
  """
  probs = jax.nn.softmax(x, axis=-1)
  keys = _ordered_keys(x)
  lo = jnp.min(keys, axis=-1, keepdims=True)            # mass(x ≥ lo) = 1 ≥ top_p
  hi = jnp.max(keys, axis=-1, keepdims=True) + 1        # mass(x ≥ hi) = 0 < top_p

  def bisect(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    enough = jnp.sum(jnp.where(keys >= mid, probs, 0.0), axis=-1, keepdims=True) >= top_p
    return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

  lo, _ = jax.lax.fori_loop(0, 32, bisect, (lo, hi))
  return lo


def process_logits(logits, temperature, top_k: int, top_p):
  """Applies temperature, then top-k, then top-p (HF's order) → float32 logits with -inf outside.

  logits [B, V]. temperature > 0 (a traced scalar is fine); top_k static (0 = off); top_p scalar in
  (0, 1] (1 = off; a Python 1.0 skips the top-p computation). The most likely token always survives.
  """
  x = logits.astype(jnp.float32) / temperature
  if top_k:
    kth = jax.lax.top_k(x, top_k)[0][..., -1:]
    x = jnp.where(x < kth, -jnp.inf, x)
  if isinstance(top_p, (int, float)) and top_p >= 1.0:
    return x
  return jnp.where(_ordered_keys(x) < _nucleus_threshold_keys(x, top_p), -jnp.inf, x)


def select_tokens(logits, rng, temperature, top_k: int, top_p, greedy: bool):
  """→ (tokens [B], logprob under the sampling distribution [B], untempered logprob [B])."""
  raw_lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  if greedy:
    tok = jnp.argmax(logits, axis=-1)
    lp = jnp.take_along_axis(raw_lp, tok[:, None], axis=-1)[:, 0]
    return tok.astype(jnp.int32), lp, lp
  x = process_logits(logits, temperature, top_k, top_p)
  logp = jax.nn.log_softmax(x, axis=-1)
  tok = _inverse_cdf_sample(rng, jnp.exp(logp))
  lp = jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
  raw = jnp.take_along_axis(raw_lp, tok[:, None], axis=-1)[:, 0]
  return tok.astype(jnp.int32), lp, raw


def _inverse_cdf_sample(rng, probs: jax.Array) -> jax.Array:
  """One draw per row of `probs` [B, V]: the first token whose cumulative mass exceeds u·total,
  u ~ U[0, 1). One uniform per row instead of the V Gumbel variates of `jax.random.categorical`
  (4.3 of a 35 ms decode step at [32, 8192]). A token of probability 0 is never drawn: its
  cumulative mass is masked out rather than trusted to equal its predecessor's."""
  cdf = jnp.where(probs > 0, jnp.cumsum(probs, axis=-1), -jnp.inf)
  u = jax.random.uniform(rng, (probs.shape[0], 1), jnp.float32) * jnp.max(cdf, axis=-1, keepdims=True)
  above = cdf > u
  return jnp.where(jnp.any(above, axis=-1), jnp.argmax(above, axis=-1), jnp.argmax(probs, axis=-1))


# ------------------------------------------------------------------------------ the sampler


class Sampler:
  """Holds the jitted prefill and decode functions of one model (reuse it across calls)."""

  def __init__(self, model: Qwen2_5_VL, cache_dtype=None):
    self.model = model
    self.cache_dtype = cache_dtype or model.dtype
    self._prefill = jax.jit(self._prefill_impl, static_argnames=("n", "total_len"))
    self._decode = jax.jit(self._decode_impl, static_argnames=("gen_len", "top_k", "greedy", "nucleus"),
                           donate_argnames=("cache", "kv_mask"))

  def _prefill_impl(self, params, input_ids, kv_prompt, position_ids, pixel_values, vision, *, n: int,
                    total_len: int):
    _COMPILES["prefill"] += 1
    log.info("sampler: compiling prefill for input %s, cache length %d, n=%d", input_ids.shape, total_len, n)
    b, length = input_ids.shape
    image_embeds = None
    if pixel_values is not None:
      image_embeds = self.model.apply({"params": params}, pixel_values, vision, method="encode_images")
    cache = text_lib.init_cache(self.model.config, b, total_len, self.cache_dtype)
    kv_mask = jnp.zeros((b, total_len), jnp.int32).at[:, :length].set(kv_prompt)
    logits, cache = self.model.apply({"params": params}, input_ids, position_ids, kv_mask, cache, 0,
                                     image_embeds=image_embeds, last_only=True, method="extend")
    if n > 1:  # a GRPO group: copy the prompt's cache instead of recomputing it
      cache = text_lib.repeat_cache(cache, n)
      kv_mask = jnp.repeat(kv_mask, n, axis=0)
      logits = jnp.repeat(logits, n, axis=0)
    return logits, cache, kv_mask

  def _decode_impl(self, params, logits, cache, kv_mask, next_pos, rng, max_new, temperature, top_p, eos_ids,
                   pad_id, *, gen_len: int, top_k: int, greedy: bool, nucleus: bool = True):
    _COMPILES["decode"] += 1
    log.info("sampler: compiling decode for batch %d, generation bucket %d", logits.shape[0], gen_len)
    b = logits.shape[0]
    prompt_len = kv_mask.shape[1] - gen_len
    tokens = jnp.full((b, gen_len), pad_id, jnp.int32)
    lps = jnp.zeros((b, gen_len), jnp.float32)
    raw_lps = jnp.zeros((b, gen_len), jnp.float32)
    done = jnp.zeros((b,), bool)

    def cond(state):
      step, _, _, _, _, _, _, done = state
      return (step < max_new) & ~jnp.all(done)

    def body(state):
      step, logits, cache, kv_mask, tokens, lps, raw_lps, done = state
      tok, lp, raw = select_tokens(logits, jax.random.fold_in(rng, step), temperature, top_k,
                                   top_p if nucleus else 1.0, greedy)
      tok = jnp.where(done, pad_id, tok)
      lp, raw = jnp.where(done, 0.0, lp), jnp.where(done, 0.0, raw)
      tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, step))
      lps = jax.lax.dynamic_update_slice(lps, lp[:, None], (0, step))
      raw_lps = jax.lax.dynamic_update_slice(raw_lps, raw[:, None], (0, step))
      slot = prompt_len + step
      kv_mask = jax.lax.dynamic_update_slice(kv_mask, (~done).astype(jnp.int32)[:, None], (0, slot))
      done = done | jnp.isin(tok, eos_ids)
      pos = jnp.broadcast_to((next_pos + step)[None, :, None], (3, b, 1))
      logits, cache = self.model.apply({"params": params}, tok[:, None], pos, kv_mask, cache, slot,
                                       last_only=True, method="extend")
      return step + 1, logits, cache, kv_mask, tokens, lps, raw_lps, done

    state = (jnp.int32(0), logits, cache, kv_mask, tokens, lps, raw_lps, done)
    step, _, cache, kv_mask, tokens, lps, raw_lps, done = jax.lax.while_loop(cond, body, state)
    is_eos = jnp.isin(tokens, eos_ids)
    first_eos = jnp.argmax(is_eos, axis=-1)
    lengths = jnp.where(done, first_eos + 1, step).astype(jnp.int32)
    # The cache is returned (and dropped by the caller) so that its donated input buffer is aliased
    # to the output: the loop then updates one cache in place instead of holding two.
    return tokens, lps, raw_lps, lengths, done, cache, kv_mask

  # ---------------------------------------------------------------------------- host API

  def generate(self, params, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, *,
               max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
               eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None, rng=None,
               n: int = 1, return_untempered_logprobs: bool = False,
               prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS,
               gen_buckets: Sequence[int] = DEFAULT_GEN_BUCKETS,
               patch_buckets: Sequence[int] = DEFAULT_PATCH_BUCKETS,
               image_buckets: Sequence[int] = DEFAULT_IMAGE_BUCKETS,
               data_sharding: jax.sharding.Sharding | None = None) -> SampleOutput:
    cfg = self.model.config
    ids = np.asarray(input_ids)
    mask = np.asarray(attention_mask).astype(np.int32)
    if ids.ndim != 2 or ids.shape != mask.shape:
      raise ValueError(f"input_ids {ids.shape} and attention_mask {mask.shape} must both be [B, L]")
    if (mask[:, -1] == 0).any():
      raise ValueError("prompts must be left-padded (attention_mask[:, -1] must be 1 for every row)")
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
      raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
    greedy = temperature == 0.0
    if not greedy and rng is None:
      raise ValueError("sampling (temperature > 0) needs rng=jax.random.key(...)")
    eos = eos_token_id if eos_token_id is not None else cfg.eos_token_id
    eos_ids = jnp.asarray(np.atleast_1d(np.asarray(eos if eos is not None else -1, np.int32)))
    pad = pad_token_id if pad_token_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else 0)
    b, length = ids.shape
    lp_len = _bucket(length, prompt_buckets, "prompt length")
    gen_len = _bucket(max_new_tokens, gen_buckets, "max_new_tokens")
    # Left-pad further to the prompt bucket.
    ids_p = np.full((b, lp_len), pad, np.int32)
    ids_p[:, lp_len - length:] = ids
    mask_p = np.zeros((b, lp_len), np.int32)
    mask_p[:, lp_len - length:] = mask
    pv = vision = None
    if pixel_values is not None:
      # One attention block (slot) per image: slot size and slot count bucketed.
      from specs_jax.models.qwen2_5_vl.rope import slot_size_for
      slot = _bucket(slot_size_for(image_grid_thw), patch_buckets, "patches of the largest image")
      n_img = _bucket(len(np.asarray(image_grid_thw).reshape(-1, 3)), image_buckets, "number of images")
      prep = prepare_inputs(cfg, ids_p, mask_p, image_grid_thw, slot_size=slot, num_slots=n_img,
                            pixel_values=pixel_values)
      pv, vision = prep.pixel_values, prep.vision
    else:
      prep = prepare_inputs(cfg, ids_p, mask_p, None)
    next_pos = np.repeat(mask.sum(-1) + prep.rope_deltas, n).astype(np.int32)

    def shard(x):
      return jax.device_put(x, data_sharding) if data_sharding is not None else x

    logits, cache, kv_mask = self._prefill(params, shard(ids_p), shard(mask_p), prep.position_ids, pv, vision, n=n,
                                           total_len=lp_len + gen_len)
    rng = jax.random.key(0) if rng is None else rng
    tokens, lps, raw, lengths, done, _, _ = self._decode(
        params, logits, cache, kv_mask, shard(next_pos), rng, jnp.int32(max_new_tokens),
        jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p), eos_ids, jnp.int32(pad), gen_len=gen_len,
        top_k=int(top_k), greedy=greedy, nucleus=bool(top_p < 1.0))
    tokens, lps, raw, lengths, done = mesh_lib.to_host((tokens, lps, raw, lengths, done))  # every host: all rows
    tokens, lps, raw = (x[:, :max_new_tokens] for x in (tokens, lps, raw))
    return SampleOutput(tokens=tokens, logprobs=lps, lengths=lengths, finished=done,
                        untempered_logprobs=raw if return_untempered_logprobs else None,
                        group_index=np.repeat(np.arange(b), n))


_SAMPLERS: dict[int, tuple[Qwen2_5_VL, Sampler]] = {}


def get_sampler(model: Qwen2_5_VL) -> Sampler:
  """One Sampler (hence one set of compiled functions) per model object."""
  hit = _SAMPLERS.get(id(model))
  if hit is None or hit[0] is not model:
    hit = (model, Sampler(model))
    _SAMPLERS[id(model)] = hit
  return hit[1]


def generate(model: Qwen2_5_VL, params, input_ids, attention_mask, pixel_values=None, image_grid_thw=None,
             **kwargs) -> SampleOutput:
  """See the module docstring and `Sampler.generate`."""
  return get_sampler(model).generate(params, input_ids, attention_mask, pixel_values, image_grid_thw, **kwargs)


# ------------------------------------------------------------------------------ text


def decode_responses(tokenizer, out: SampleOutput, stop_strings: Sequence[str] = (),
                     skip_special_tokens: bool = True) -> list[str]:
  """Response texts cut at EOS (exclusive) and at the first stop string (inclusive of the stop
  string, as vLLM's `include_stop_str_in_output=True`). Sets out.finished for sequences cut by a
  stop string; out.tokens / out.lengths keep what was sampled (the cut is on the text)."""
  texts = []
  for i in range(out.tokens.shape[0]):
    n_tok = int(out.lengths[i])
    toks = out.tokens[i, :n_tok].tolist()
    if out.finished[i] and toks:
      toks = toks[:-1]  # drop EOS
    text = tokenizer.decode(toks, skip_special_tokens=skip_special_tokens)
    for s in stop_strings:
      j = text.find(s)
      if j >= 0:
        text = text[:j + len(s)]
        out.finished[i] = True
    texts.append(text)
  return texts
