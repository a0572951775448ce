"""Stage "eval": every checkpoint of the run on the evaluation sets, then the report.

Checkpoints: base, zero, coldstart, final, sft_coldstart, sft_final (those that exist). Sets: the
synthetic held-out splits (`eval_id`; `eval_ood_format`, other output formats; `eval_ood_task`,
unseen task families) and any local benchmark files in `config.eval.benchmarks` ("style:path").
Per-item results go to DIR/eval/<checkpoint>/<set>.json; aggregates to summary["eval"]; the
paper-shaped tables and plots to DIR/report.md and DIR/plots/.
"""

from __future__ import annotations

import os

import ml_collections

from specs_jax.eval import benchmarks, report
from specs_jax.pipeline import CHECKPOINT_OF, load_summary
from specs_jax.stages import common


def checkpoints(config: ml_collections.ConfigDict, wd) -> dict[str, str]:
  out = {}
  base = config.model.hf_dir or wd.hf("base")
  if os.path.exists(base):
    out["base"] = base
  for stage, name in CHECKPOINT_OF.items():
    if stage != "base" and os.path.exists(wd.hf(stage)):
      out[name] = wd.hf(stage)
  return out


def eval_sets(config: ml_collections.ConfigDict) -> dict[str, list]:
  e, d = config.eval, config.data
  sets = {}
  if d.source == "synthetic":
    for split in e.splits:
      sets[split.replace("eval_", "")] = common.rl_examples(config, split, int(e.num_examples), seed_offset=1000)
  for entry in e.benchmarks:
    style, _, path = entry.partition(":")
    sets[os.path.splitext(os.path.basename(path))[0]] = benchmarks.load_benchmark(path, style)
  return sets


def run(config: ml_collections.ConfigDict, wd) -> dict:
  e = config.eval
  stage = wd.stage("eval")
  sets = eval_sets(config)
  results: dict[str, dict] = {}
  mesh = common.stage_mesh(config)
  for ckpt, hf_dir in checkpoints(config, wd).items():
    policy = common.load_policy(hf_dir, config, mesh)
    results[ckpt] = {}
    for name, examples in sets.items():
      res = benchmarks.run_benchmark(
          policy.model, policy.params, policy.tokenizer, examples, image_config=policy.image_config,
          system_prompt=common.system_prompt(config), format_instruction=None, n=int(e.n),
          temperature=float(e.temperature), max_new_tokens=int(e.max_new_tokens), batch_size=int(e.batch_size),
          name=name, seed=int(config.seed))
      benchmarks.write_results(os.path.join(stage, ckpt, f"{name}.json"), res)
      results[ckpt][name] = benchmarks.summary_entry(res)
  summary = load_summary(wd)
  summary.setdefault("eval", {}).update(results)
  report.render_report(summary, wd.root)
  return {"eval": results, "checkpoints": sorted(results)}
