"""Shared fixtures for the evaluation tests: the tiny random model in JAX and its image settings."""

import jax.numpy as jnp
import pytest

from specs_jax.models import qwen2_5_vl
from specs_jax.processing import image as image_lib


@pytest.fixture(scope="session")
def jax_model(hf_dir):
  """(model, params) of the tiny random Qwen2.5-VL from the `hf_dir` fixture, float32."""
  return qwen2_5_vl.from_pretrained(hf_dir, dtype=jnp.float32)


@pytest.fixture(scope="session")
def image_config(hf_dir):
  return image_lib.ImageConfig.from_preprocessor_config(hf_dir)
