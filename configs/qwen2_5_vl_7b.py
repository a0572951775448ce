r"""SPECS on Qwen2.5-VL-7B-Instruct with the paper's hyperparameters (RECIPE.md §1), per accelerator.

    python -m specs_jax.main --config=configs/qwen2_5_vl_7b.py:v5p-8,data_root=/mnt/data \
        --config.model.hf_dir=/mnt/ckpt/Qwen2.5-VL-7B-Instruct --workdir=/mnt/runs/specs_7b

`model.hf_dir` is required: a local HF directory of Qwen2.5-VL-7B-Instruct (nothing is downloaded at
run time). The config arg is `PRESET[,data_root=DIR]`:

  PRESET     the accelerator (`PRESETS` below; default v5p-8): sets the mesh, the attention kernel
             ("splash" on TPU, "cudnn" on GPU) and the micro-batching (`plan_micro_batches`).
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

Micro-batches are from a memory estimate, not a measurement (no accelerator run yet): see
`plan_micro_batches`. Override any of them with --config.<stage>.micro_batches=N.
"""

from __future__ import annotations

import dataclasses
import math

from specs_jax.config_defaults import base_config

DEFAULT_PRESET = "v5p-8"
DEFAULT_DATA_ROOT = "/data"
PROMPT_TOKENS = 2048  # prompt budget of a GRPO row in the estimate (text + up to ~1,280 image tokens)
HBM_USABLE = 0.85     # share of device memory the estimate lets the program use (XLA, fragmentation)


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


def plan_micro_batches(model: ModelSize, preset: Preset, *, grpo_rows: int, grpo_tokens: int,
                       dpo_pairs: int, dpo_tokens: int) -> MemoryPlan:
  """Micro-batches from a back-of-envelope memory estimate (bytes per device):

    state    (4·params + 12·trainable) / devices: float32 params, and float32 grads + Adam m, v
             for the trainable ones, sharded over every device (fsdp × tensor).
    row      tokens × (layers·hidden·2 + (6·hidden + 4·intermediate)·2 / tensor): with remat
             "full" each layer keeps its bfloat16 input; one layer's recompute + backward (q, k, v,
             out, MLP gate / up / product and their grads, bfloat16) is the transient; tensor
             parallelism splits the latter, not the former.

  A row is one GRPO sample (prompt + response), one DPO pair is two rows (chosen, rejected), one
  SFT example one row. Each data-parallel group (devices / tensor) takes as many units as fit in
  HBM_USABLE·hbm − state, rounded down to a power of two; the micro-batch count is what is left,
  rounded up to a power of two. The smallest tensor size (1, 2, 4) with which one unit fits is used.

  Raises:
    ValueError: the training state alone, or one unit per device at tensor 4, does not fit.
  """
  state = (4 * model.params + 12 * model.trainable) / preset.devices
  free = HBM_USABLE * preset.hbm_bytes - state
  if free <= 0:
    raise ValueError(f"the training state alone needs ≈{state / 1e9:.0f} GB per device, more than "
                     f"{HBM_USABLE:.0%} of the {preset.hbm_bytes / 1e9:.0f} GB each of the {preset.devices} "
                     "devices have: use a larger slice (more devices) or a smaller model")

  def row_bytes(tokens: int, tensor: int) -> float:
    return tokens * (model.layers * model.hidden * 2 + (6 * model.hidden + 4 * model.intermediate) * 2 / tensor)

  def micro_batches(units: int, unit_bytes: float, groups: int) -> int | None:
    per_group = int(free // unit_bytes)
    if per_group < 1:
      return None
    per_group = 2 ** int(math.log2(per_group))
    return max(1, 2 ** math.ceil(math.log2(units / (per_group * groups))))

  for tensor in (1, 2, 4):
    groups = preset.devices // tensor
    m = [micro_batches(grpo_rows, row_bytes(grpo_tokens, tensor), groups),
         micro_batches(dpo_pairs, 2 * row_bytes(dpo_tokens, tensor), groups),
         micro_batches(dpo_pairs, row_bytes(dpo_tokens, tensor), groups)]
    if None not in m:
      # at least one unit per data-parallel group in every micro-batch
      return MemoryPlan(tensor, *(min(x, max(1, n // groups)) for x, n in zip(m, (grpo_rows, dpo_pairs,
                                                                                    dpo_pairs))))
  raise ValueError(f"one {dpo_tokens}-token DPO pair or {grpo_tokens}-token GRPO row per device does not "
                   f"fit in the estimate even at tensor=4 ({preset.devices} devices of "
                   f"{preset.hbm_bytes / 1e9:.0f} GB): use a larger slice or shorter sequences")


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
  _, preset, data_root = parse_arg(arg)
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

  plan = plan_micro_batches(model, preset, grpo_rows=c.final_rl.prompts_per_step * c.final_rl.group_size,
                            grpo_tokens=PROMPT_TOKENS + c.final_rl.max_response_len,
                            dpo_pairs=c.coldstart.batch_size, dpo_tokens=c.coldstart.max_length)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, plan.tensor
  c.zero_rl.micro_batches = c.final_rl.micro_batches = plan.grpo
  c.coldstart.micro_batches = plan.dpo
  c.sft_coldstart.micro_batches = plan.sft
  return c
