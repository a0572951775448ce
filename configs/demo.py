r"""The SPECS recipe in miniature on the embedded synthetic tasks, on CPU (`make demo`).

    python -m specs_jax.main --config=configs/demo.py --workdir=runs/demo

Stages: base (trains a tiny Qwen2.5-VL "instruct" model from scratch whose format following is
imperfect, ≈40% as Qwen2.5-VL-7B's) → zero_rl (GRPO) → distill (π_zero chosen, base rejected) →
coldstart (DPO + SFT) → final_rl (GRPO) → eval; plus the SFT cold-start branch (sft_coldstart →
sft_final). Writes DIR/summary.json, DIR/report.md and DIR/plots/*.png. See README for timings.
"""

from specs_jax.config_defaults import base_config


def get_config(arg: str | None = None):
  c = base_config()
  c.seed = 0
  c.run.stages = ["base", "zero_rl", "distill", "coldstart", "final_rl", "sft_coldstart", "sft_final", "eval"]
  c.data.num_train = 4000
  c.data.num_eval = 96
  c.data.max_pixels = 112 * 112
  c.data.image_min, c.data.image_max = 56, 84
  c.data.levels = [1, 2]  # responses of ≤ ~130 tokens

  c.base.num_examples = 3000
  c.base.steps = 400
  c.base.batch_size = 16

  for rl in (c.zero_rl, c.final_rl):
    rl.group_size = 4
    rl.prompts_per_step = 16
    rl.steps = 24
    rl.learning_rate = 1e-3
    rl.max_response_len = 160
    rl.filter_lower = None
    rl.filter_upper = None
    rl.checkpoint_every = 10
  c.final_rl.steps = 16
  c.final_rl.learning_rate = 3e-4  # 1e-3 made the GRPO-from-cold-start runs drift (format 0.38 → 0.27)

  c.distill.num_prompts = 512
  c.distill.max_pairs = 256
  c.distill.k_chosen = 2
  c.distill.k_rejected = 2
  c.distill.max_new_tokens = 160
  c.distill.batch_size = 32

  for cs in (c.coldstart, c.sft_coldstart):
    cs.epochs = 30  # ~25 pairs survive the filters: 30 epochs of 1-2 steps
    cs.batch_size = 16
    cs.learning_rate = 1e-3
    cs.checkpoint_every = 20
    cs.gf_every = 10
    cs.gf_examples = 32
  c.coldstart.beta = 0.1
  c.coldstart.prompt_buckets = [128, 192, 256]
  c.coldstart.completion_buckets = [64, 128, 192, 256]

  c.eval.num_examples = 64
  c.eval.max_new_tokens = 160
  c.eval.batch_size = 32
  return c
