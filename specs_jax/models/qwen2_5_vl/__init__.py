"""Qwen2.5-VL in Flax: config, model, weights (HF safetensors in and out)."""

from specs_jax.models.qwen2_5_vl.config import (ConfigError, Qwen2_5_VLConfig, TextConfig, VisionConfig,
                                                qwen2_5_vl_3b, qwen2_5_vl_7b)
from specs_jax.models.qwen2_5_vl.model import (PreparedInputs, Qwen2_5_VL, check_image_tokens, lm_head_kernel,
                                               prepare_inputs)
from specs_jax.models.qwen2_5_vl.rope import (VisionMeta, get_rope_index, pack_pixel_values, slot_size_for,
                                              vision_metadata)
from specs_jax.models.qwen2_5_vl.text import init_cache
from specs_jax.models.qwen2_5_vl.weights import WeightsError, from_pretrained, load_params, save_pretrained

__all__ = [
    "ConfigError", "Qwen2_5_VLConfig", "TextConfig", "VisionConfig", "qwen2_5_vl_3b", "qwen2_5_vl_7b",
    "PreparedInputs", "Qwen2_5_VL", "check_image_tokens", "lm_head_kernel", "prepare_inputs",
    "VisionMeta", "get_rope_index", "pack_pixel_values", "slot_size_for", "vision_metadata", "init_cache",
    "WeightsError", "from_pretrained", "load_params", "save_pretrained",
]
