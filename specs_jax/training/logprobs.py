"""Per-token log-probabilities of given target tokens, from logits or from final hidden states.

Axes: B batch, L tokens, D hidden, V vocab, C chunk of tokens.

Convention (as TRL, tunix and verl): logits are divided by the sampling `temperature` before the
log-softmax, so the log-probs of a GRPO update refer to the distribution the sampler drew from.
`targets[b, t]` is the token whose log-prob is read at position t, i.e. the caller has already
shifted: `targets[:, t] = input_ids[:, t + 1]`. Masking is the caller's business; padded positions
get a finite log-prob that the loss multiplies by 0 (out-of-range ids such as -100 are clipped
into [0, V) first).

`token_logprobs_from_hidden` never holds the float32 [B, L, V] logits: it walks the sequence in
chunks of C tokens, and `jax.checkpoint` on the chunk makes the backward pass recompute each chunk's
logits instead of storing them, so peak temporary memory is O(B·C·V) in both directions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = [
    "token_logprobs_from_logits",
    "token_logprobs_from_hidden",
    "sequence_logps",
]


def _logps_and_entropy(
    logits: jax.Array, targets: jax.Array, compute_entropy: bool, lse: jax.Array | None = None
) -> tuple[jax.Array, jax.Array | None]:
  """logits [..., V] float32 (already temperature-scaled), targets [...] int -> logps [...], entropy."""
  if lse is None:
    lse = jax.nn.logsumexp(logits, axis=-1)                                 # [...]
  # Clip ids into [0, V): an ignore label such as -100 would otherwise gather NaN ("fill" mode),
  # and NaN·0 stays NaN after masking.
  t = jnp.clip(targets.astype(jnp.int32), 0, logits.shape[-1] - 1)
  target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
  logps = target_logit - lse
  if not compute_entropy:
    return logps, None
  # H = -Σ p log p = lse - Σ p·z, with p = softmax(z); avoids materialising log p separately.
  probs = jnp.exp(logits - lse[..., None])
  entropy = lse - jnp.sum(probs * logits, axis=-1)
  return logps, entropy


def _chunk_logits(kernel: jax.Array, h: jax.Array, temperature) -> jax.Array:
  """[B, C, D] @ [D, V] -> temperature-scaled float32 logits [B, C, V]."""
  return jnp.einsum("BCD,DV->BCV", h, kernel, preferred_element_type=jnp.float32) / temperature


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunk_logps(kernel, h, targets, temperature, compute_entropy: bool):
  """One chunk: (kernel [D, V], h [B, C, D], targets [B, C]) -> logps [B, C] (, entropy [B, C]).

  A custom VJP rather than `jax.checkpoint` + autodiff, for two reasons measured on XLA:CPU
  (config S DPO step, `benchmarks/train_step.py`):
  - autodiff writes the kernel's gradient as dot(dlogits, h) -> [V, D] followed by a transpose,
    which XLA folds into a transposed copy of dlogits and a dot whose operands are both
    transposed: 130 GFLOP/s against 300 for the same product as `h^T @ dlogits`;
  - the target logit's gradient is a scatter into a zero [B, C, V] array; here it is a select
    against an iota that fuses with the softmax term.
  The backward pass recomputes the chunk's logits, as `jax.checkpoint` did, so only h, the
  targets and the logsumexp are kept. Products run in the same dtypes as autodiff's: float32
  accumulation, with the float32 cotangent against the (possibly bf16) kernel and hidden states.
  """
  return _chunk_fwd(kernel, h, targets, temperature, compute_entropy)[0]


def _chunk_fwd(kernel, h, targets, temperature, compute_entropy):
  logits = _chunk_logits(kernel, h, temperature)
  lse = jax.nn.logsumexp(logits, axis=-1)
  logps, entropy = _logps_and_entropy(logits, targets, compute_entropy, lse=lse)
  out = (logps, entropy) if compute_entropy else logps
  return out, (kernel, h, targets, temperature, lse, entropy)


def _chunk_bwd(compute_entropy, residuals, cotangent):
  kernel, h, targets, temperature, lse, entropy = residuals
  g_logps, g_entropy = cotangent if compute_entropy else (cotangent, None)
  logits = _chunk_logits(kernel, h, temperature)                        # recomputed, [B, C, V]
  shifted = logits - lse[..., None]                                     # log p
  probs = jnp.exp(shifted)
  t = jnp.clip(targets.astype(jnp.int32), 0, logits.shape[-1] - 1)
  hit = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == t[..., None]
  # d logp_t / dz = onehot(t) - p
  d_logits = jnp.where(hit, g_logps[..., None], 0.0) - g_logps[..., None] * probs
  if compute_entropy:
    # H = -Σ p log p:  dH / dz_j = -p_j (log p_j + H)
    d_logits = d_logits - g_entropy[..., None] * probs * (shifted + entropy[..., None])
  d_logits = d_logits / temperature
  f32 = jnp.float32
  # [B, C, V] x [D, V] -> [B, C, D];  [B, C, D] x [B, C, V] -> [D, V] (already in kernel layout)
  d_h = jax.lax.dot_general(d_logits, kernel, (((2,), (1,)), ((), ())), preferred_element_type=f32)
  d_kernel = jax.lax.dot_general(h, d_logits, (((0, 1), (0, 1)), ((), ())), preferred_element_type=f32)
  d_temperature = jnp.zeros_like(temperature)      # not differentiated: the sampler's setting
  return d_kernel.astype(kernel.dtype), d_h.astype(h.dtype), None, d_temperature


_chunk_logps.defvjp(_chunk_fwd, _chunk_bwd)


def token_logprobs_from_logits(
    logits: jax.Array,
    targets: jax.Array,
    temperature: float = 1.0,
    *,
    compute_entropy: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """log softmax(logits / temperature)[targets], computed in float32.

  Args:
    logits: [B, L, V], any float dtype (bf16 is upcast before the log-softmax).
    targets: [B, L] int, the token whose log-prob is wanted at each position (already shifted).
    temperature: logits are divided by it first (sampling temperature).
    compute_entropy: also return the entropy of the temperature-scaled distribution.

  Returns:
    logps [B, L] float32; with `compute_entropy`, (logps, entropy [B, L] float32).
  """
  z = logits.astype(jnp.float32) / temperature
  logps, entropy = _logps_and_entropy(z, targets, compute_entropy)
  return (logps, entropy) if compute_entropy else logps


def token_logprobs_from_hidden(
    hidden: jax.Array,
    lm_head_kernel: jax.Array,
    targets: jax.Array,
    *,
    chunk_size: int = 256,
    temperature: float = 1.0,
    compute_entropy: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Target-token log-probs from final hidden states without materialising [B, L, V] logits.

  logits = hidden @ lm_head_kernel is computed C = `chunk_size` positions at a time
  (`jax.lax.map` over chunks), accumulated in float32 (`preferred_element_type`) even when `hidden`
  and the kernel are bf16, and reduced to logsumexp and the target logit before the next chunk.
  A chunk keeps only its hidden states, targets and logsumexp for the backward pass, which
  recomputes that chunk's logits (`_chunk_logps`): neither direction stores more than a few
  [B, C, V] float32 buffers.

  Args:
    hidden: [B, L, D], the decoder's final (normed) hidden states; f32 or bf16.
    lm_head_kernel: [D, V] (for tied embeddings pass `embedding.T`).
    targets: [B, L] int, already shifted (see module docstring).
    chunk_size: C; L is padded up to a multiple of C internally (the padding is dropped again).
    temperature: logits are divided by it before the softmax.
    compute_entropy: also return the per-token entropy.

  Returns:
    logps [B, L] float32; with `compute_entropy`, (logps, entropy [B, L] float32).
  """
  b, l, d = hidden.shape
  c = max(1, min(chunk_size, l))
  n = -(-l // c)                                                # ceil(L / C)
  pad = n * c - l
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
  hidden_chunks = hidden.reshape(b, n, c, d).transpose(1, 0, 2, 3)           # [n, B, C, D]
  target_chunks = targets.reshape(b, n, c).transpose(1, 0, 2)                # [n, B, C]

  # The kernel is closed over (not mapped), so its cotangent is summed across chunks by the scan.
  out = jax.lax.map(lambda xs: _chunk_logps(lm_head_kernel, *xs, temperature, compute_entropy),
                    (hidden_chunks, target_chunks))

  def unchunk(x: jax.Array) -> jax.Array:                        # [n, B, C] -> [B, L]
    return x.transpose(1, 0, 2).reshape(b, n * c)[:, :l]

  if compute_entropy:
    logps, entropy = out
    return unchunk(logps), unchunk(entropy)
  return unchunk(out)


def sequence_logps(token_logps: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Summed completion log-prob and completion length per sequence.

  Args:
    token_logps: [B, L] float.
    mask: [B, L] bool/0-1, 1 on completion tokens.

  Returns:
    (logps [B] float32 = Σ_t mask·logp, i.e. *summed*, not length-normalised, as DPO wants;
     lengths [B] float32 = Σ_t mask).
  """
  m = mask.astype(jnp.float32)
  return jnp.sum(token_logps.astype(jnp.float32) * m, axis=-1), jnp.sum(m, axis=-1)
