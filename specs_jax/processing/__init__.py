"""Host-side input processing (numpy + PIL, no jax): `image` (pixels -> Qwen2.5-VL patches),
`chat` (messages -> prompt ids with image tokens), `batching` (padding to static buckets),
`tokenizer` (Qwen special tokens, chat template, offline BPE)."""
