"""TPU splash attention (Pallas) as `attention_impl="splash"`.

    model, params = qwen2_5_vl.from_pretrained(hf_dir, attention_impl="splash")   # on TPU
    with splash.options(interpret=True, max_block=128):                           # tests, off TPU
      logits = model.apply({"params": params}, ...)

The model calls every attention implementation as `fn(q, k, v, mask)` (attention.py) with a dense
boolean mask. The splash kernel (`jax.experimental.pallas.ops.tpu.splash_attention`) reads no dense
mask: it takes a static block mask (`CausalMask` / `FullMask`) and-ed with per-token segment ids,
and skips the blocks where nothing is attended. Both masks the model builds have exactly that form:

  text     mask[b, 0, i, j] = j <= i and kv_mask[b, j]       (`text.causal_mask`, no KV cache, S == T)
  vision   mask[s, 0, i, j] = seg[s, i] == seg[s, j]          (window / full-attention segments per slot)

`mask_segments` recovers segment ids from the mask: token i gets the index of the first key it may
attend (argmax over its row), or -1 if it is not a key anyone may attend (mask[i, i] false, i.e.
padding). On the vision mask that is a relabelling of the segments (exact on every row, padding
patches included); on the text mask every real token gets the index of its row's first real token
and padding gets -1, so a real query attends exactly the real keys at or before it (exact on every
real row, holes in kv_mask included). Whether the mask is causal (nothing above the diagonal) is
decided on the device, and `lax.cond` runs the causal or the full kernel: the choice costs one
reduction over the mask and a second compiled kernel, because the call signature carries no
static hint (see "Known limits").

Differences from the "xla" implementation, all outside what the model reads:
  * padding query rows of the text mask are fully masked, so "xla" returns the mean of all values
    there (uniform softmax over -1e30); here they attend the padding keys at or before them. Real
    queries never attend padding keys, so logits at real positions are unaffected.
  * q is scaled by D**-0.5 before the kernel (it takes unscaled logits), not the scores after.

Falls back to `attention.xla_attention`, explicitly, when the kernel cannot express the call:
  * S != T: a KV-cache prefill or decode (`Qwen2_5_VL.extend`). The causal offset is the traced
    `cache_index`, and `CausalMask` needs a static offset; a decode step is one query row, nothing
    for a flash kernel to tile. The sampler's decode therefore runs "xla" attention; its vision
    tower and every training forward run splash.
  * a per-head mask ([B, Hq, S, T]); the model never builds one.

Shapes: sequences are padded to a multiple of the block (a multiple of 128, at most
`options.max_block`, chosen to pad least); the padding tokens get their own segment (-2), so they
attend each other and nothing real attends them (no empty softmax rows: the kernel would divide by
zero). GQA is native: the kernel maps query head h to key/value head h // (Hq / Hkv). Batch is
`vmap`-ed. Under a context mesh (`jax.set_mesh`) with several devices the call runs in a
`shard_map` over the batch axes (and "tensor" over heads where it divides them): Mosaic kernels
cannot be partitioned by GSPMD.

Known limits: the kernel is chosen by the mask's contents, so a mask of neither family above
(e.g. a causal mask with a non-zero offset) would be computed wrongly; the model builds no such
mask. Passing the structure from text.py / vision.py (segment ids + a static causal flag) would
remove the inference, the `lax.cond` and the second kernel; `splash_attention` already takes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa
from jax.sharding import PartitionSpec as P

from specs_jax.models.qwen2_5_vl import attention
from specs_jax.parallel.mesh import BATCH_AXES, divisible_axes

__all__ = ["SplashOptions", "attention_from_mask", "block_size", "mask_is_causal", "mask_segments", "options",
           "splash_attention"]

log = logging.getLogger(__name__)

NOT_A_KEY = -1  # segment of tokens no query may attend (text padding)
BLOCK_PAD = -2  # segment of the tokens added to reach a block multiple
LANES = 128     # the kernel's kv compute block must be a multiple of the TPU lane count


@dataclasses.dataclass(frozen=True)
class SplashOptions:
  """Kernel switches, read when a function using the kernel is traced (jit caches what it saw).

  interpret: run the kernel in Pallas interpret mode (any backend, slow; for tests). None: compiled
    on TPU, an error on other backends (a silent interpreter on GPU would be orders slower).
  max_block: the largest q / kv block (128, 256 or 512); 512 suits long TPU sequences.
  """

  interpret: bool | None = None
  max_block: int = 512


_OPTIONS = SplashOptions()


@contextlib.contextmanager
def options(**changes) -> Iterator[SplashOptions]:
  """Sets `SplashOptions` fields inside the `with` block (restored after)."""
  global _OPTIONS
  old = _OPTIONS
  _OPTIONS = dataclasses.replace(old, **changes)
  try:
    yield _OPTIONS
  finally:
    _OPTIONS = old


def _interpret(opts: SplashOptions) -> bool:
  if opts.interpret is not None:
    return opts.interpret
  backend = jax.default_backend()
  if backend == "tpu":
    return False
  raise ValueError(f"attention_impl='splash' is a TPU kernel and the backend is {backend!r}: use "
                   "attention_impl='xla' (or 'cudnn' on GPU), or specs_jax.kernels.splash.options(interpret=True) "
                   "to run it in Pallas interpret mode (slow; for tests)")


def block_size(n: int, max_block: int = 512) -> int:
  """The q/kv block for a sequence of n tokens: the multiple of 128 up to `max_block` that pads n
  least, the largest on ties (n=600 → 128: 640 tokens; n=1000 → 512: 1024)."""
  cands = [b for b in (512, 256, 128) if b <= max_block]
  if not cands:
    raise ValueError(f"max_block {max_block} is below the kernel's minimum block of {LANES}")
  return min(cands, key=lambda b: (-(-n // b) * b, -b))


def _kernel(causal: bool, num_heads: int, length: int, block: int, interpret: bool) -> sa.SplashAttentionKernel:
  """One splash kernel (forward + fused backward) over `length` tokens. Built per trace and not
  cached here: its block tables become constants of the calling trace (a cached kernel built in one
  trace or mesh context would carry that context into the next); the numpy mask processing behind
  them is cached by the splash library (`process_mask`)."""
  shape = (length, length)
  head_mask = sa.CausalMask(shape) if causal else sa.FullMask(shape)
  sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                        block_kv_dkv=block, block_kv_dkv_compute=block, use_fused_bwd_kernel=True)
  return sa.make_splash_mha(sa.MultiHeadMask([head_mask] * num_heads), block_sizes=sizes, head_shards=1,
                            q_seq_shards=1, interpret=interpret)


# ------------------------------------------------------------------------------ mask → structure


def mask_segments(mask: jax.Array) -> jax.Array:
  """Segment ids [B, S] int32 of a self-attention mask [B, 1, S, S] (see the module docstring):
  the first key each token may attend, or NOT_A_KEY where mask[b, 0, i, i] is false."""
  m = mask[:, 0]
  first = jnp.argmax(m, axis=-1).astype(jnp.int32)  # [B, S]
  return jnp.where(jnp.diagonal(m, axis1=-2, axis2=-1), first, NOT_A_KEY)


def mask_is_causal(mask: jax.Array) -> jax.Array:
  """Scalar bool: no query attends a later key (nothing above the diagonal) anywhere in the batch."""
  s, t = mask.shape[-2:]
  upper = jnp.arange(t)[None, :] > jnp.arange(s)[:, None]  # [S, T]
  return ~jnp.any(mask & upper)


# ------------------------------------------------------------------------------------ the kernel


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *, causal: bool,
                     opts: SplashOptions | None = None) -> jax.Array:
  """Self-attention with the splash kernel on one device (no mesh handling).

  Args:
    q: [B, S, Hq, D]; k, v: [B, Hkv, S, D] (head-major, as attention.py); Hq a multiple of Hkv.
    segment_ids: [B, S] int: token i attends key j iff their ids are equal (and j <= i if causal).
      Every token must be able to attend at least one key (itself, with equal ids).
    causal: static.
  Returns:
    [B, S, Hq, D] in q's dtype; softmax in float32, scale D**-0.5.
  """
  opts = _OPTIONS if opts is None else opts
  b, s, hq, d = q.shape
  block = block_size(s, opts.max_block)
  length = -(-s // block) * block
  pad = length - s
  qh = (q * jnp.asarray(d**-0.5, q.dtype)).transpose(0, 2, 1, 3)  # [B, Hq, S, D]; the kernel does not scale
  seg = segment_ids.astype(jnp.int32)
  if pad:
    qh = jnp.pad(qh, ((0, 0), (0, 0), (0, pad), (0, 0)))
    k = jnp.pad(k, ((0, 0), (0, 0), (0, pad), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, 0), (0, pad), (0, 0)))
    seg = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=BLOCK_PAD)
  kernel = _kernel(bool(causal), hq, length, block, _interpret(opts))
  out = jax.vmap(kernel)(qh, k, v, sa.SegmentIds(q=seg, kv=seg))  # [B, Hq, S', D]
  return out[:, :, :s].transpose(0, 2, 1, 3).astype(q.dtype)


def _from_mask_local(q, k, v, mask, opts: SplashOptions):
  seg = mask_segments(mask)
  return jax.lax.cond(mask_is_causal(mask),
                      lambda: splash_attention(q, k, v, seg, causal=True, opts=opts),
                      lambda: splash_attention(q, k, v, seg, causal=False, opts=opts))


def _context_mesh():
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or mesh.size == 1 else mesh


def attention_from_mask(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """The registered "splash" implementation: attention.py's signature and contract.

  q [B, S, Hq, D], k/v [B, Hkv, T, D], mask [B, 1|Hq, S, T] bool → [B, S, Hq, D]. Falls back to
  `attention.xla_attention` when S != T (KV cache) or the mask is per head (module docstring).
  """
  opts = _OPTIONS
  s, t = q.shape[1], k.shape[2]
  if s != t or mask.shape[1] != 1:
    log.debug("splash: XLA fallback for q %s, k %s, mask %s", q.shape, k.shape, mask.shape)
    return attention.xla_attention(q, k, v, mask)
  _interpret(opts)  # fail early, outside any shard_map, off TPU
  mesh = _context_mesh()
  if mesh is None:
    return _from_mask_local(q, k, v, mask, opts)
  # Mosaic kernels are not partitioned by GSPMD: split rows over the batch axes and heads over
  # "tensor" where they divide, replicate the rest.
  rows = divisible_axes(q.shape[0], [a for a in BATCH_AXES if a in mesh.axis_names], mesh)
  rows = rows if len(rows) > 1 else (rows[0] if rows else None)
  heads = "tensor" if ("tensor" in mesh.axis_names and k.shape[1] % mesh.shape["tensor"] == 0) else None
  fn = jax.shard_map(functools.partial(_from_mask_local, opts=opts), mesh=mesh,
                     in_specs=(P(rows, None, heads, None), P(rows, heads, None, None), P(rows, heads, None, None),
                               P(rows, None, None, None)),
                     out_specs=P(rows, None, heads, None), check_vma=False)
  return fn(q, k, v, mask)


attention.register("splash", attention_from_mask)
