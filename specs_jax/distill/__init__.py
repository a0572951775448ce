r"""Stage 1b: self-distilled preference pairs (RECIPE.md §2).

    from specs_jax import distill
    pairs, stats = distill.build_pairs(zero_model, zero_params, base_model, base_params, tokenizer,
                                       examples, distill.DistillConfig(), jax.random.key(0))
    distill.write_outputs(pairs, stats, "DIR/distill", config=config)

    distill.supplement.supplement("<think>…</think><answer>12</answer>")   # -> Supplemented, or None
    distill.pollute(text, random.Random(0))                       # -> Corruption(text, kind, variant)
    distill.final_answer("… Thus, the answer is 12.")             # -> "12"

Modules: parse.py (tolerant reading of responses), supplement.py (chosen), pollution.py (rejected),
config.py (DistillConfig), prompts.py (the prompt subset), sampler.py (the default sampler and the hook),
preference.py (build_pairs: filters, pick, pairs), stats.py (filter counts, histograms), output.py
(JSONL + images, ArrayRecord through `data.records`, stats.json, lengths.png).
"""

from specs_jax.distill import parse, pollution, supplement
from specs_jax.distill.output import PAIRS_NAME, DistillOutputs, write_outputs
from specs_jax.distill.parse import Parts, final_answer, split_response, strip_tags
from specs_jax.distill.pollution import KINDS as CORRUPTIONS
from specs_jax.distill.pollution import Corruption, corrupt, pollute
from specs_jax.distill.preference import (CHOSEN_SOURCES, PAIR_MODES, PICK_RULES, DistillConfig, ModelSampler,
                                          build_pairs, prepare_prompts)
from specs_jax.distill.stats import DistillStats, SideStats
from specs_jax.distill.supplement import Supplemented, canonical, judge_view

__all__ = [
    "CHOSEN_SOURCES", "CORRUPTIONS", "Corruption", "DistillConfig", "DistillOutputs", "DistillStats", "ModelSampler",
    "PAIRS_NAME", "PAIR_MODES", "PICK_RULES", "Parts", "SideStats", "Supplemented", "build_pairs", "canonical",
    "corrupt", "final_answer", "judge_view", "parse", "pollute", "pollution", "prepare_prompts", "split_response",
    "strip_tags", "supplement", "write_outputs",
]
