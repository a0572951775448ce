"""One entry point over the dataset readers, by the kind of file (the reliability tests feed every
reader the same bad input)."""

from specs_jax.data import sources


def read(kind: str, path, on_error: str):
  """`kind`: "rl" / "orsta" (RL prompts), "pairs" (preference pairs) or an eval benchmark style."""
  if kind in ("rl", "orsta"):
    return sources.read_rl_prompts(path, on_error=on_error)
  if kind == "pairs":
    return sources.read_preference_pairs(path, on_error=on_error)
  return sources.read_eval_benchmark(path, kind, on_error=on_error)
