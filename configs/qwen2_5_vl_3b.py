r"""SPECS on Qwen2.5-VL-3B-Instruct: the 7B recipe (configs/qwen2_5_vl_7b.py) on the smaller backbone.

    python -m specs_jax.main --config=configs/qwen2_5_vl_3b.py:v4-8,data_root=/mnt/data \
        --config.model.hf_dir=/mnt/ckpt/Qwen2.5-VL-3B-Instruct --workdir=/mnt/runs/specs_3b

`model.hf_dir` is required (a local HF directory of Qwen2.5-VL-3B-Instruct). The arg, the data layout
and the hyperparameters are those of the 7B config (the paper's, RECIPE.md §1; the paper itself ran
only 7B); the presets differ only in the micro-batching, which the smaller model's memory estimate
sets (it fits a v4-8, where 7B does not).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from qwen2_5_vl_7b import ModelSize  # noqa: E402
from qwen2_5_vl_7b import get_config as recipe_config  # noqa: E402

# From the HF config.json: 36 layers of width 2,048, tied embeddings (151,936 × 2,048), vision 0.67B.
QWEN2_5_VL_3B = ModelSize(params=3.75e9, trainable=3.09e9, layers=36, hidden=2048, intermediate=11008)


def get_config(arg: str | None = None):
  """The paper's recipe for Qwen2.5-VL-3B on the preset named in `arg` (`PRESET[,data_root=DIR]`)."""
  c = recipe_config(arg, model=QWEN2_5_VL_3B)
  c.model.hf_dir = ""  # required: --config.model.hf_dir=/path/Qwen2.5-VL-3B-Instruct (local HF directory)
  return c
