"""Shared fixtures for the model-running training tests: the tiny Qwen2.5-VL, preference pairs with
small images, their reference log-probs, and one uninterrupted DPO run (reused by several tests so
that the step compiles once per session)."""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.dirname(__file__))

from dpo_fixtures import (BUCKETS, NUM_PAIRS, OPT, RUN_STEPS, collate, data_iterator, fresh_state,  # noqa: E402
                          make_pairs)

from specs_jax.models import qwen2_5_vl  # noqa: E402
from specs_jax.processing import image as image_lib  # noqa: E402
from specs_jax.training import batches, steps  # noqa: E402


@pytest.fixture(scope="session")
def tiny(hf_dir):
  """(model, params) of the tiny random Qwen2.5-VL, float32."""
  return qwen2_5_vl.from_pretrained(hf_dir)


@pytest.fixture(scope="session")
def image_config(hf_dir):
  return image_lib.ImageConfig.from_preprocessor_config(f"{hf_dir}/preprocessor_config.json")


@pytest.fixture(scope="session")
def encoded_pairs(tokenizer, image_config):
  return [batches.encode_pair(tokenizer, p, image_config) for p in make_pairs()]


@pytest.fixture(scope="session")
def pad_id(tokenizer):
  return int(tokenizer.pad_token_id)


@pytest.fixture(scope="session")
def logps_fn(tiny):
  return steps.make_logps_fn(tiny[0])


@pytest.fixture(scope="session")
def ref_pairs(tiny, encoded_pairs, logps_fn, pad_id):
  """The encoded pairs with reference log-probs of the initial params (computed once, stored)."""
  model, params = tiny
  out = []
  for i in range(0, len(encoded_pairs), NUM_PAIRS):
    chunk = encoded_pairs[i:i + NUM_PAIRS]
    batch = batches.collate_dpo(chunk, model.config, BUCKETS, pad_id, num_pairs=NUM_PAIRS, require_ref=False)
    rc, rr = steps.reference_logps(logps_fn, params, batch)
    out += [dataclasses.replace(p, ref_chosen_logps=float(c), ref_rejected_logps=float(r))
            for p, c, r in zip(chunk, rc, rr)]
  return out


@pytest.fixture(scope="session")
def dpo_step(tiny):
  """The DPO step all unsharded runs share (so it compiles once per session)."""
  return steps.make_dpo_step(tiny[0], OPT, beta=0.1, sft_weight=1.0, micro_batches=2, chunk_size=32)


@pytest.fixture(scope="session")
def dpo_run(tiny, ref_pairs, dpo_step, pad_id):
  """RUN_STEPS uninterrupted DPO steps from the initial params: per-step metrics, final state, and
  the number of compilations the run caused."""
  model, params = tiny
  before = steps.compile_counts().get("dpo_step", 0)
  state = fresh_state(params)
  it = data_iterator()
  history = []
  for _ in range(RUN_STEPS):
    state, m = dpo_step(state, collate(ref_pairs, next(it), model, pad_id))
    history.append(jax.device_get(m))
  return {"state": state, "history": history, "iterator_state": it.get_state(),
          "compiles": steps.compile_counts().get("dpo_step", 0) - before}
