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
    logits: jax.Array, targets: jax.Array, compute_entropy: bool
) -> tuple[jax.Array, jax.Array | None]:
  """logits [..., V] float32 (already temperature-scaled), targets [...] int -> logps [...], entropy."""
  lse = jax.nn.logsumexp(logits, axis=-1)                                   # [...]
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
  Each chunk is wrapped in `jax.checkpoint`, so the backward pass recomputes that chunk's logits
  rather than keeping them: neither direction stores more than a few [B, C, V] float32 buffers.

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

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def chunk_fn(kernel: jax.Array, h: jax.Array, t: jax.Array):
    logits = jnp.einsum("BCD,DV->BCV", h, kernel, preferred_element_type=jnp.float32)
    logits = logits / temperature
    logps, entropy = _logps_and_entropy(logits, t, compute_entropy)
    return (logps, entropy) if compute_entropy else logps

  # The kernel is closed over (not mapped), so its cotangent is summed across chunks by the scan.
  out = jax.lax.map(lambda xs: chunk_fn(lm_head_kernel, *xs), (hidden_chunks, target_chunks))

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
