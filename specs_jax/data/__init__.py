"""Data: the normalised `Example`, synthetic tasks, real-format readers and output-format checks.

    from specs_jax import data
    train = data.make_split("train", 1000, seed=0)              # synthetic RL prompt pool
    text = data.reasoning_text(train[0], style="tagged")         # a correct SPECS-format response
    data.format_follows(text, train[0].meta["format"])           # True
    res = data.read_rl_prompts("ViRL39K/39Krelease.parquet", image_root="ViRL39K")
    print(res.summary())                                         # "read N rows ...; skipped k (...)"

Pure Python + numpy + PIL (+ pyarrow for parquet, imported on first use); nothing here imports JAX.
The grain pipelines and ArrayRecord storage are imported on first use, since grain imports JAX and
records imports tensorflow-datasets:

    it = data.prompt_batches(data.open_examples(d, "train"), tokenizer, data.PromptPipelineConfig(batch_size=8))
"""

import importlib

from specs_jax.data.formats import (DEFAULT_FORMAT, MM_EUREKA_SYSTEM_PROMPT, OOD_FORMATS, SPECS_INSTRUCTION,
                                    extract_answer_for_format, format_follows, format_instruction, format_name,
                                    render_response, validate_format_spec)
from specs_jax.data.reasoning import Reasoning, corpus, reasoning_sample, reasoning_text
from specs_jax.data.sources import (pair_to_sharegpt, read_eval_benchmark, read_preference_pairs, read_rl_prompts,
                                    write_preference_pairs)
from specs_jax.data.synthetic import ID_FAMILIES, OOD_FAMILIES, SPLITS, make_example, make_split
from specs_jax.data.types import (ANSWER_TYPES, DataError, Example, ImageRef, PreferencePair, ReadResult,
                                  example_fingerprint, load_image)

_LAZY = {
    "pipeline": ("specs_jax.data.pipeline", None),
    "records": ("specs_jax.data.records", None),
    "Counters": ("specs_jax.data.pipeline", "Counters"),
    "PromptPipelineConfig": ("specs_jax.data.pipeline", "PromptPipelineConfig"),
    "prompt_batches": ("specs_jax.data.pipeline", "prompt_batches"),
    "pair_batches": ("specs_jax.data.pipeline", "pair_batches"),
    "sft_batches": ("specs_jax.data.pipeline", "sft_batches"),
    "write_examples": ("specs_jax.data.records", "write_examples"),
    "write_pairs": ("specs_jax.data.records", "write_pairs"),
    "open_examples": ("specs_jax.data.records", "open_examples"),
    "open_pairs": ("specs_jax.data.records", "open_pairs"),
}


def __getattr__(name: str):  # PEP 562: import the grain / tfds parts on first use
  if name in _LAZY:
    module, attr = _LAZY[name]
    mod = importlib.import_module(module)
    return mod if attr is None else getattr(mod, attr)
  raise AttributeError(f"module 'specs_jax.data' has no attribute {name!r}")


__all__ = [
    "ANSWER_TYPES", "DEFAULT_FORMAT", "DataError", "Example", "ID_FAMILIES", "ImageRef", "MM_EUREKA_SYSTEM_PROMPT",
    "OOD_FAMILIES", "OOD_FORMATS", "PreferencePair", "ReadResult", "Reasoning", "SPECS_INSTRUCTION", "SPLITS",
    "corpus", "example_fingerprint", "extract_answer_for_format", "format_follows", "format_instruction",
    "format_name", "load_image", "make_example", "make_split", "pair_to_sharegpt", "read_eval_benchmark",
    "read_preference_pairs", "read_rl_prompts", "reasoning_sample", "reasoning_text", "render_response",
    "validate_format_spec", "write_preference_pairs",
] + sorted(_LAZY)
