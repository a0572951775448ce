"""Puts tests/distill on sys.path (for `distill_helpers`) and provides the shared fixtures."""

import os
import sys

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
  sys.path.insert(0, _HERE)


@pytest.fixture(scope="session")
def train_examples():
  from specs_jax.data import synthetic

  return synthetic.make_split("train", 40, seed=11)
