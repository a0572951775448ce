"""Shared fixtures for the evaluation tests (the tiny model itself is `jax_model` in tests/conftest.py)."""

import pytest

from specs_jax.processing import image as image_lib


@pytest.fixture(scope="session")
def image_config(hf_dir):
  return image_lib.ImageConfig.from_preprocessor_config(hf_dir)
