"""Accelerator kernels behind the model's pluggable pieces.

  splash   TPU splash attention (Pallas), registered as attention_impl="splash" (`splash.py`).

A kernel module registers itself on import; `models.qwen2_5_vl.attention.get` imports it lazily,
so the Pallas TPU code is only imported when a config asks for it.
"""
