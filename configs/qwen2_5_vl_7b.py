r"""SPECS on Qwen2.5-VL-7B-Instruct with the paper's hyperparameters (RECIPE.md §1), per accelerator.

    python -m specs_jax.main --config=configs/qwen2_5_vl_7b.py:v5p-8,data_root=/mnt/data \
        --config.model.hf_dir=/mnt/ckpt/Qwen2.5-VL-7B-Instruct --workdir=/mnt/runs/specs_7b

`model.hf_dir` is required: a local HF directory of Qwen2.5-VL-7B-Instruct (nothing is downloaded at
run time). The config arg is `PRESET[,data_root=DIR]`:

  PRESET     the accelerator (`PRESETS` below; default v5p-8): sets the mesh, the attention kernel
             ("splash" on TPU, "cudnn" on GPU) and the micro-batching (`plan_micro_batches`).
             v4-8, v4-32 (7B) and v6e-8 (7B) do not fit and are refused with the reason.
             The number in a TPU v4 / v5p name counts TensorCores, two per chip, and JAX sees one
             device per chip: v5p-8 is 4 devices, v4-32 is 16. v6e names count chips.
  data_root  where the RL prompt sets live (default /data):
               DIR/ViRL39K/39Krelease.parquet   TIGER-Lab/ViRL39K, with images.zip unpacked beside it
               DIR/Orsta-Data-47k/              One-RL-to-See-Them-All/Orsta-Data-47k parquet files
             Relative image paths resolve inside each data file's own directory. Other files:
             --config.data.rl_prompts="('/a.parquet', '/b/')".

The paper's numbers (RECIPE.md §1):
  GRPO (zero_rl, final_rl): 128 prompts × 8 samples per step, lr 1e-6, no KL, token-mean loss, max
    response 10,240 tokens; final GRPO ≈800 steps (project-page figure). The zero-RL step count is not
    reported (the default 100 is kept). The online accuracy filter [0.1, 0.9] is MM-EUREKA's default.
  DPO + λ·SFT (coldstart): batch 64, lr 1e-6, β 0.1 (LLaMA-Factory default; not reported), λ 1, max
    length 16,384, one epoch over ≈9K pairs (distill.max_pairs). The SFT baseline uses the same data.
Precision: bfloat16 compute over float32 parameters (the updates at lr 1e-6 are far below bfloat16's
resolution of a weight, so the master copy stays float32); full rematerialisation; scanned layers.

Micro-batches come from the AOT memory plan (docs/scaling.md: the TPU compiler run ahead of time
for each slice; no accelerator run yet): see `plan_micro_batches`. Override any of them with --config.<stage>.micro_batches=N.
"""

from __future__ import annotations

import dataclasses

from specs_jax.config_defaults import base_config

DEFAULT_PRESET = "v5p-8"
DEFAULT_DATA_ROOT = "/data"


@dataclasses.dataclass(frozen=True)
class Preset:
  """An accelerator slice: what the mesh and the memory estimate need to know."""

  platform: str   # "tpu" | "gpu"
  devices: int    # JAX devices in all (one per chip)
  hosts: int
  hbm_bytes: float  # memory per device


PRESETS: dict[str, Preset] = {
    "v4-8": Preset("tpu", devices=4, hosts=1, hbm_bytes=32 * 2**30),
    "v4-32": Preset("tpu", devices=16, hosts=4, hbm_bytes=32 * 2**30),
    "v5p-8": Preset("tpu", devices=4, hosts=1, hbm_bytes=95e9),
    "v5p-64": Preset("tpu", devices=32, hosts=8, hbm_bytes=95e9),
    "v6e-8": Preset("tpu", devices=8, hosts=1, hbm_bytes=32e9),
    "8xh100": Preset("gpu", devices=8, hosts=1, hbm_bytes=80e9),
}


@dataclasses.dataclass(frozen=True)
class ModelSize:
  """The sizes of a Qwen2.5-VL checkpoint that the memory estimate uses."""

  params: float     # all parameters (vision tower included)
  trainable: float  # the language model (the vision tower is frozen: freeze_vision)
  layers: int
  hidden: int
  intermediate: int


# Counted from the HF config.json files: 7B untied embeddings (152,064 × 3,584 twice), vision 0.68B.
QWEN2_5_VL_7B = ModelSize(params=8.29e9, trainable=7.62e9, layers=28, hidden=3584, intermediate=18944)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Micro-batches per stage and the tensor-parallel size they assume."""

  tensor: int
  grpo: int   # zero_rl / final_rl micro_batches
  dpo: int    # coldstart micro_batches
  sft: int    # sft_coldstart micro_batches


# Rows per device per micro-batch that the AOT memory plan measured to fit (docs/scaling.md: the
# real TPU compiler on each slice's topology; 8xh100 from the 8-device TPU figures), for the model as
# built (activations not yet constrained to the batch axes, flash attention, remat full, f32 master
# weights). None: even one row per device does not fit; the message says what does.
MEASURED_ROWS_PER_DEVICE: dict[float, dict[str, int | None]] = {
    8.29e9: {"v5p-8": 1, "v5p-64": 1, "8xh100": 1, "v4-8": None, "v4-32": None, "v6e-8": None},   # 7B
    3.75e9: {"v5p-8": 1, "v5p-64": 1, "8xh100": 1, "v4-8": None, "v4-32": 1, "v6e-8": 1},        # 3B
}
# Prompts per sampler call in the GRPO rollout (× 8 samples; docs/scaling.md, KV cache of 12,288 bf16
# slots per row): the whole 128-prompt rollout at once would need ≈721 GB (7B) of cache.
PROMPTS_PER_CALL = {"v5p-8": 32, "v5p-64": 64, "v4-8": 8, "v4-32": 16, "v6e-8": 16, "8xh100": 32}
DOES_NOT_FIT = {
    "v4-8": "one row per device does not fit 4 × 32 GiB (7B: 42 GB even with bf16 params; 3B: 33.0 GB "
            "against 33.0 usable with the activation fix of docs/scaling.md, more as built): use v4-32",
    "v4-32": "the 7B at one row per device needs ≈28 GB of 30.75 usable only with the activation fix of "
             "docs/scaling.md; as built it does not fit: use v5p-8 or v5p-64",
    "v6e-8": "the 7B needs 42 GB (DPO) / 37 GB (GRPO) per device with float32 master weights: use v6e-16 "
             "or v5p-8 (bf16 master weights would fit but lose the lr-1e-6 updates)",
}


def plan_micro_batches(model: ModelSize, preset_name: str, preset: Preset, *, grpo_rows: int,
                       dpo_pairs: int) -> MemoryPlan:
  """Micro-batches that give every device the measured-to-fit rows per micro-batch
  (`MEASURED_ROWS_PER_DEVICE`): micro_batches = rows per step / (rows per device × devices); a DPO
  pair is two rows (chosen, rejected), a GRPO sample and an SFT example one. FSDP over every device
  (tensor 1). An earlier back-of-envelope estimate planned 2–8 rows per device where the compiler
  needs about twice its per-row figure (+14.4 GB per 16K-token 7B DPO row): docs/scaling.md.

  Raises:
    ValueError: the plan measured that one row per device does not fit this slice.
  """
  rows = MEASURED_ROWS_PER_DEVICE.get(model.params, {}).get(preset_name)
  if rows is None:
    why = DOES_NOT_FIT.get(preset_name, "no measured plan for this model and slice")
    raise ValueError(f"{preset_name}: {why} (see docs/scaling.md; use a larger slice, or set the "
                     "micro_batches yourself with --config.<stage>.micro_batches)")
  per_step = rows * preset.devices
  return MemoryPlan(tensor=1, grpo=max(1, grpo_rows // per_step), dpo=max(1, 2 * dpo_pairs // per_step),
                    sft=max(1, dpo_pairs // per_step))


def parse_arg(arg: str | None) -> tuple[str, Preset, str]:
  """`PRESET[,data_root=DIR]` → (preset name, preset, data root)."""
  name, data_root = DEFAULT_PRESET, DEFAULT_DATA_ROOT
  for part in (p.strip() for p in (arg or "").split(",")):
    if not part:
      continue
    key, eq, value = part.partition("=")
    if not eq:
      name = part
    elif key == "data_root":
      data_root = value.rstrip("/") or "/"
    else:
      raise ValueError(f"unknown config arg {key!r} in {arg!r}; the arg is PRESET[,data_root=DIR]")
  if name not in PRESETS:
    raise ValueError(f"unknown accelerator preset {name!r}; known: {', '.join(sorted(PRESETS))}")
  return name, PRESETS[name], data_root


def get_config(arg: str | None = None, model: ModelSize = QWEN2_5_VL_7B):
  """The paper's recipe for `model` on the preset named in `arg` (module docstring)."""
  preset_name, preset, data_root = parse_arg(arg)
  c = base_config()

  c.model.hf_dir = ""  # required: --config.model.hf_dir=/path/Qwen2.5-VL-7B-Instruct (local HF directory)
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.attention_impl = "splash" if preset.platform == "tpu" else "cudnn"
  c.model.remat = "full"
  c.model.scan_layers = True

  c.data.source = "files"
  c.data.rl_prompts = (f"{data_root}/ViRL39K/39Krelease.parquet", f"{data_root}/Orsta-Data-47k")

  for rl in (c.zero_rl, c.final_rl):
    rl.group_size = 8
    rl.prompts_per_step = 128
    rl.learning_rate = 1e-6
    rl.kl_coef = 0.0
    rl.agg = "token-mean"
    rl.max_response_len = 10240
    rl.prompts_per_call = PROMPTS_PER_CALL[preset_name]
  c.final_rl.steps = 800

  c.coldstart.batch_size = 64
  c.coldstart.learning_rate = 1e-6
  c.coldstart.beta = 0.1
  c.coldstart.sft_weight = 1.0
  c.coldstart.max_length = 16384
  c.coldstart.epochs = 1
  c.sft_coldstart.batch_size = 64
  c.sft_coldstart.learning_rate = 1e-6
  c.sft_coldstart.max_length = 16384
  c.sft_coldstart.epochs = 1

  plan = plan_micro_batches(model, preset_name, preset,
                            grpo_rows=c.final_rl.prompts_per_step * c.final_rl.group_size,
                            dpo_pairs=c.coldstart.batch_size)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, plan.tensor
  c.zero_rl.micro_batches = c.final_rl.micro_batches = plan.grpo
  c.coldstart.micro_batches = plan.dpo
  c.sft_coldstart.micro_batches = plan.sft
  return c
