r"""Evaluation: benchmark harness, pass@k, generalisation factor, rollout branching factor, run report.

    from specs_jax.eval import benchmarks, hooks, metrics, report
    examples = benchmarks.load_benchmark(path, "mathvista")
    res = benchmarks.run_benchmark(model, params, tokenizer, examples, image_config=ic, system_prompt=None,
                                   format_instruction=data.SPECS_INSTRUCTION, max_new_tokens=1024, batch_size=8)
    benchmarks.write_results(out_path, res); summary["eval"][ckpt][split] = benchmarks.summary_entry(res)
    metrics.pass_at_k(n, c, k); metrics.generalization_factor(id_rate, ood_rate, beta=2.0)
    metrics.rollout_branching_factor(logits, mask, top_p=0.95); branching.rbf_from_model(model, params, ...)
    hook = hooks.make_gf_hook(every_k, hooks.GFTracker.synthetic(...), hooks.greedy_generate_fn(model, tok, ...))
    report.render_report(summary, workdir)       # DIR/report.md + DIR/plots/*.png

Modules: metrics.py (numpy only), report.py (numpy + matplotlib), branching.py (JAX: nucleus sizes and RBF
from a model forward), benchmarks.py (the harness), hooks.py (GF tracking during the cold start). This file
imports none of them, so `report` and `metrics` can be used without loading JAX.
"""
