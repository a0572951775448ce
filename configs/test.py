r"""The demo pipeline, small enough for an end-to-end test in `make test` (every stage runs).

    python -m specs_jax.main --config=configs/test.py --workdir=/tmp/specs_test
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from demo import get_config as demo_config  # noqa: E402


def get_config(arg: str | None = None):
  c = demo_config()
  c.data.levels = [1]
  # Two-way (yes/no) and four-way (A-D) answers: a briefly trained tiny model is right often enough
  # by chance for the distillation's answer filter to keep pairs, so every stage gets data.
  c.data.families = ["yes_no", "compare"]
  c.base.tagged_families = ["yes_no"]
  c.model.tiny.hidden_size = 48
  c.model.tiny.num_hidden_layers = 2
  c.model.tiny.intermediate_size = 96
  c.model.tiny.mrope_section = [2, 2, 2]
  c.model.tiny.vision_hidden_size = 32
  c.model.tiny.vision_intermediate_size = 64
  c.base.vocab_size = 512
  c.base.tokenizer_corpus = 1000
  c.base.num_examples = 400
  c.base.steps = 150
  c.base.batch_size = 8
  c.base.checkpoint_every = 50
  for rl in (c.zero_rl, c.final_rl):
    rl.steps = 2
    rl.prompts_per_step = 4
    rl.group_size = 2
    rl.max_response_len = 128
    rl.checkpoint_every = 1
  c.distill.num_prompts = 48
  c.distill.max_pairs = 16
  c.distill.max_new_tokens = 128
  c.distill.batch_size = 8
  for cs in (c.coldstart, c.sft_coldstart):
    cs.epochs = 1
    cs.batch_size = 4
    cs.gf_every = 2
    cs.gf_examples = 4
    cs.checkpoint_every = 2
  c.eval.num_examples = 8
  c.eval.max_new_tokens = 128
  c.eval.batch_size = 8
  return c
