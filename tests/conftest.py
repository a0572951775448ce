"""Test set-up: 8 fake CPU devices, offline HF, and session-wide tiny HF fixtures."""

import os

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()  # grain reads absl flags; unparsed flags raise in workers

import hf_fixtures  # noqa: E402


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory) -> str:
  """A complete offline HF directory: BPE tokenizer with Qwen specials + chat template,
  `Qwen2VLImageProcessorPil` config, tiny random Qwen2_5_VLForConditionalGeneration (float32,
  window attention + 1 full-attention block, M-RoPE, merger, GQA)."""
  return hf_fixtures.build_hf_dir(tmp_path_factory.mktemp("hf_tiny"), seed=0)


@pytest.fixture(scope="session")
def tokenizer(hf_dir):
  from transformers import AutoTokenizer

  return AutoTokenizer.from_pretrained(hf_dir)


@pytest.fixture(scope="session")
def image_processor(hf_dir):
  from transformers import AutoImageProcessor

  return AutoImageProcessor.from_pretrained(hf_dir)


@pytest.fixture(scope="session")
def hf_model(hf_dir):
  import torch
  from transformers import Qwen2_5_VLForConditionalGeneration

  return Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def jax_model(hf_dir):
  """(model, params) of the tiny HF fixture loaded by specs_jax, float32 (loaded once per session)."""
  import jax.numpy as jnp

  from specs_jax.models import qwen2_5_vl

  return qwen2_5_vl.from_pretrained(hf_dir, dtype=jnp.float32)
