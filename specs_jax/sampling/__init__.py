"""KV-cache sampling for Qwen2.5-VL (rollouts, self-distillation, evaluation)."""

from specs_jax.sampling.sampler import (SampleOutput, Sampler, compile_counts, decode_responses, generate, get_sampler,
                                        process_logits, select_tokens)

__all__ = ["SampleOutput", "Sampler", "compile_counts", "decode_responses", "generate", "get_sampler",
           "process_logits", "select_tokens"]
