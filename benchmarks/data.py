r"""Data pipeline throughput: examples/s from ArrayRecord to padded batches, with 0 and 2 grain workers.

    python benchmarks/data.py [--n 768] [--batch-size 8] [--image-size 224 448] [--workers 0 2]

The full prompt pipeline (`specs_jax.data.pipeline.prompt_batches`): read a record, decode its PNG
images, smart-resize + normalise + patchify them, render the chat template and tokenize, check the
budgets, then pad to buckets and batch. The data are synthetic training prompts (1-3 images of
--image-size px sides), written once with `records.write_examples`. Prints one JSON line per figure:
- data_pipeline: examples/s in the steady state (from the first batch to the end), plus the time to
  the first batch (worker start-up: spawned processes import transformers etc.) and end-to-end examples/s.
- data_write: examples/s of `records.write_examples` (render + PNG encode + ArrayRecord).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--n", type=int, default=768, help="examples per run")
  ap.add_argument("--batch-size", type=int, default=8)
  ap.add_argument("--image-size", type=int, nargs=2, default=(224, 448), metavar=("LO", "HI"))
  ap.add_argument("--workers", type=int, nargs="+", default=(0, 2))
  args = ap.parse_args()

  from common import emit  # also puts tests/ on sys.path

  import hf_fixtures

  from specs_jax.data import pipeline, records, synthetic
  from specs_jax.processing.batching import Buckets
  from specs_jax.processing.image import ImageConfig
  from specs_jax.processing.tokenizer import build_tokenizer

  tok = build_tokenizer(hf_fixtures.tokenizer_corpus())
  examples = synthetic.make_split("train", args.n, seed=0, image_size=tuple(args.image_size))
  img = ImageConfig()  # Qwen2.5-VL hub pixel limits: these images are not downscaled
  patches = 3 * img.num_image_tokens(args.image_size[1], args.image_size[1]) * img.merge_size**2
  with tempfile.TemporaryDirectory(prefix="bench_data_") as d:
    t0 = time.perf_counter()
    records.write_examples(examples, d, "pool")
    emit(benchmark="data_write", examples=args.n, examples_per_s=round(args.n / (time.perf_counter() - t0), 1))
    source = records.open_examples(d, "pool")
    for workers in args.workers:
      cfg = pipeline.PromptPipelineConfig(
          batch_size=args.batch_size, prompt_buckets=(256, 512, 1024, 2048, 4096),
          patch_buckets=Buckets.powers_of_two(1024, args.batch_size * patches), max_images=3,
          image=img, seed=0, num_epochs=1, worker_count=workers, num_threads=2)
      t0 = time.perf_counter()
      it = pipeline.prompt_batches(source, tok, cfg, shard_index=0, shard_count=1)
      first = next(it)
      t1 = time.perf_counter()
      n_rest = sum(int(b["example_mask"].sum()) for b in it)
      t2 = time.perf_counter()
      it.close()
      used = n_rest + int(first["example_mask"].sum())
      emit(benchmark="data_pipeline", workers=workers, examples_per_s=round(n_rest / (t2 - t1), 1),
           end_to_end_examples_per_s=round(used / (t2 - t0), 1), first_batch_s=round(t1 - t0, 2),
           examples=used, batch_size=args.batch_size, image_size=list(args.image_size),
           source="array_record", skipped=it.counters.num_skipped)


if __name__ == "__main__":
  main()
