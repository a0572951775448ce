"""Helpers for the model-running training tests (imported by tests/training/conftest.py and the tests)."""

from __future__ import annotations

import grain
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from specs_jax.training import batches, state as state_lib, steps

# One shape for every batch: slots of 32 patches (the largest image has 24), 4 image slots.
BUCKETS = batches.BatchBuckets.make(prompt=64, completion=24, patches=32, images=4)
NUM_PAIRS = 4          # pairs per batch (the last batch of a dataset may hold padding pairs)
RUN_STEPS = 4
OPT = state_lib.OptimizerConfig(learning_rate=2e-3, schedule="constant", total_steps=100, max_grad_norm=1.0,
                                weight_decay=0.01)


def _image(rng: np.random.Generator, h: int, w: int) -> Image.Image:
  return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def make_pairs(seed: int = 0) -> list[dict]:
  """Six pairs: one, none or two images (56×56, 56×84), chosen and rejected of different lengths."""
  rng = np.random.default_rng(seed)
  return [
      {"prompt": "how many red circles are there", "images": [_image(rng, 56, 56)],
       "chosen": "<think> count the red circles </think> <answer> 3 </answer>", "rejected": "the answer is 3"},
      {"prompt": "what is 2 + 3", "images": [],
       "chosen": "<think> 2 + 3 = 5 </think> <answer> 5 </answer>", "rejected": "5"},
      {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "which is larger"},
                                                 {"type": "image"}]}],
       "images": [_image(rng, 56, 56), _image(rng, 56, 84)],
       "chosen": "<think> left is larger </think> <answer> A </answer>", "rejected": "A"},
      {"prompt": "count the squares", "images": [_image(rng, 56, 56)],
       "chosen": "<think> 4 squares </think> <answer> 4 </answer>", "rejected": "there are 4 squares so 4"},
      {"prompt": "sum of digits", "images": [_image(rng, 56, 84)],
       "chosen": "<think> 1 + 2 = 3 </think> <answer> 3 </answer>", "rejected": "3"},
      {"prompt": "which option B C D", "images": [],
       "chosen": "<think> B </think> <answer> B </answer>", "rejected": "the answer is B"},
  ]


def data_iterator(seed: int = 0):
  """A checkpointable grain iterator over batches of pair indices (shuffled, repeated)."""
  ds = grain.MapDataset.range(6).seed(seed).shuffle().repeat().batch(NUM_PAIRS - 1)
  return iter(ds.to_iter_dataset())


def collate(pairs, indices, model, pad_id):
  """NUM_PAIRS - 1 real pairs + 1 padding pair (weight 0), so micro-batch denominators differ."""
  return batches.collate_dpo([pairs[int(i)] for i in indices], model.config, BUCKETS, pad_id, num_pairs=NUM_PAIRS)


def fresh_state(params):
  """A step-0 state on a copy of `params` (the steps donate the state, which would delete them)."""
  state, _ = steps.init_train_state(jax.tree.map(jnp.copy, params), OPT, jax.random.key(7))
  return state
