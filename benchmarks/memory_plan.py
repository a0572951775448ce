r"""AOT memory plan: per-device bytes of the real-size programs, from XLA's compiled memory analysis.

    .venv/bin/python benchmarks/memory_plan.py --model 7b --devices 8 --what dpo
    .venv/bin/python benchmarks/memory_plan.py --model all --devices all --what all --markdown
    # the real TPU compiler, no TPU needed: a Python that also has libtpu (the jax[tpu] pin,
    # libtpu==0.0.42.*; docs/scaling.md shows a side venv for it)
    /tmp/tpuvenv/bin/python benchmarks/memory_plan.py --target v5p-8,v4-8,v6e-8 --what all --constrain-activations

Nothing is materialised: the Qwen2.5-VL-3B / -7B params come from `jax.eval_shape` of the init,
the train state from `jax.eval_shape` of `create_train_state`, and every program argument is a
`jax.ShapeDtypeStruct` carrying the `NamedSharding` the real run gives it (`parallel.state_shardings`
for the state, `parallel.batch_shardings` for batches). Each program is lowered and compiled in a
fresh subprocess per target, and `compiled.memory_analysis()` gives the per-device argument /
output / alias / temp bytes. Per-device peak estimate: total = argument + output − alias + temp.

Targets:
  cpu-8, cpu-64      N virtual CPU devices (`--xla_force_host_platform_device_count=N`). XLA:CPU's
                     buffer assignment is an *estimate* of an accelerator's: it fuses and lays out
                     differently, and it computes bf16 in float32 (bf16 buffers often get f32 twins).
  v5p-8, v5p-128, v4-8, v4-32, v4-128, v6e-8, v6e-16, v6e-32, v6e-64
                     the TPU compiler itself, ahead of time for that slice's topology
                     (`jax.experimental.topologies`; needs libtpu installed, not a TPU). v5p and v4
                     chips are megacore: a v5p-8 / v4-8 slice is 4 devices, v6e-8 is 8.
The argument bytes are exact either way (the shards of the inputs); every figure also carries
`analytic_argument_bytes`, the same count done from the shapes and shardings by hand (higher where
jit prunes an unread argument: decode never reads the vision params).

Programs (RECIPE.md §1 sizes):
  dpo      `steps.make_dpo_step`: 64 pairs per step (128 rows), L = P + C = 2,048 + 14,336 = 16,384,
           one image of `--image-tokens` tokens per pair, micro-batched so that each device holds
           `--rows-per-device` rows per micro-batch (M = 128 / (rows/device × data-parallel devices)).
  grpo     `grpo_step.make_grpo_update`: one optimizer update on the whole 128 × 8 = 1,024-row step
           (the recipe's ppo_epochs = minibatches = 1), L = 2,048 + 10,240 = 12,288; frozen tower,
           so the image features come precomputed, as `grpo_train_step` passes them.
  prefill  `Sampler._prefill` for `--sampler-prompts` prompts of 2,048 tokens, n = 8, a bf16 KV cache
           of 2,048 + 10,240 slots; `decode`: `Sampler._decode` (the whole `lax.while_loop`) on it.

Attention: "blocked" (default) is a pure-JAX stand-in registered here under the "splash" name
(queries in blocks of 256 under `jax.checkpoint`: [256, T] scores at a time), close to a flash
kernel's memory (TPU splash, cuDNN); "xla" is the registry's dense [S, T] path. `--constrain-activations`
applies the proposed sharding fix (decoder input and vision slots split over the batch axes; see
docs/scaling.md) by wrapping two model methods in the child process. One JSON line per figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

GB, GIB = 1e9, 2**30
# Usable HBM per device: on TPU what the TPU compiler reports as available ("exceeds available HBM
# (95.74G)"; v4 and v6e keep ≈ 1 GiB of their 32 GiB); H100: ≈ 78 of its 80 GiB.
HBM_BYTES = {"v5p": 95.74 * GIB, "v4": 30.75 * GIB, "v6e": 31.25 * GIB, "h100": 78 * GIB}
MODELS = ("3b", "7b")
PROGRAMS = ("dpo", "grpo", "prefill", "decode")
# name -> (platform, device count, TPU topology, chip config). v5p/v4 topologies as axlearn and maxtext
# describe the slices: megacore chips, one device per chip.
TARGETS = {
    "cpu-8": ("cpu", 8, None, None),
    "cpu-64": ("cpu", 64, None, None),
    "v5p-8": ("tpu", 4, "v5:2x2x1", "megacore"),
    "v5p-128": ("tpu", 64, "v5:4x4x4", "megacore"),
    "v4-8": ("tpu", 4, "v4:2x2x1", "megacore"),
    "v4-32": ("tpu", 16, "v4:2x2x4", "megacore"),
    "v4-128": ("tpu", 64, "v4:4x4x4", "megacore"),
    "v6e-8": ("tpu", 8, "v6e:2x4", "default"),
    "v6e-16": ("tpu", 16, "v6e:4x4", "default"),
    "v6e-32": ("tpu", 32, "v6e:4x8", "default"),
    "v6e-64": ("tpu", 64, "v6e:8x8", "default"),
}
DEFAULT_MESHES = {64: ("fsdp=-1", "data=8,fsdp=8")}      # otherwise ("fsdp=-1",): FSDP over all devices


# ---------------------------------------------------------------------------------- the parent

def parse_mesh(spec: str) -> dict[str, int]:
  """"data=8,fsdp=8" → {"data": 8, "fsdp": 8} (a size may be -1: the remaining devices)."""
  return {k: int(v) for k, v in (part.split("=") for part in spec.split(","))}


def child_command(args: argparse.Namespace, target: str, mesh: str) -> list[str]:
  cmd = [sys.executable, os.path.abspath(__file__), "--child", "--target", target, "--mesh", mesh,
         "--model", args.model, "--what", args.what, "--param-dtype", args.param_dtype,
         "--remat", args.remat, "--attention", args.attention, "--rows-per-device", args.rows_per_device,
         "--image-tokens", str(args.image_tokens), "--sampler-prompts", args.sampler_prompts,
         "--prompt-len", str(args.prompt_len), "--dpo-completion", str(args.dpo_completion),
         "--grpo-completion", str(args.grpo_completion), "--chunk-size", str(args.chunk_size)]
  return cmd + (["--no-scan"] if args.no_scan else []) + (["--constrain-activations"] if args.constrain_activations
                                                          else [])


def child_env(target: str) -> dict[str, str]:
  platform, n, _, _ = TARGETS[target]
  env = dict(os.environ, JAX_PLATFORMS="cpu")        # TPU targets compile for a topology: no TPU backend
  if platform == "cpu":
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={n}"])
  else:
    env |= {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost"}
  return env


def run_children(args: argparse.Namespace, targets: list[str]) -> list[dict]:
  """One subprocess per (target, mesh): the fake CPU device count is fixed when jax starts."""
  figures = []
  for target in targets:
    for mesh in ([args.mesh] if args.mesh else DEFAULT_MESHES.get(TARGETS[target][1], ("fsdp=-1",))):
      proc = subprocess.Popen(child_command(args, target, mesh), env=child_env(target), stdout=subprocess.PIPE,
                              text=True)
      for line in proc.stdout:
        if line.startswith("{"):
          figures.append(json.loads(line))
          if args.json or not args.markdown:
            print(line, end="", flush=True)
      if proc.wait():
        raise SystemExit(f"the {target} child ({mesh}) failed with exit code {proc.returncode}")
  return figures


def _variant(f: dict) -> str:
  """How a figure departs from the defaults (fix on, f32 params, blocked attention, remat full, scan)."""
  out = [name for name, on in (("as built", not f["constrain_activations"]),
                               ("bf16 params", f["param_dtype"] == "bfloat16"),
                               ("dense attention", f["attention"] == "xla"),
                               (f"remat {f['remat']}", f["remat"] != "full"),
                               ("unscanned", not f["scan_layers"])) if on]
  if f["program"] in ("prefill", "decode"):
    out.append(f"{f['prompts']} prompts")
  return ", ".join(out) or "—"


def markdown_table(figures: list[dict]) -> str:
  """The figures as the tables of docs/scaling.md (GB = 1e9 bytes, per device)."""
  head = "| model | target (devices) | mesh | program | rows/dev | variant | arg | temp | total | fits |"
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for f in figures:
    mesh = ",".join(f"{k}={v}" for k, v in f["mesh"].items() if v > 1)
    fits = " ".join(chip for chip, ok in f["fits"].items() if ok) or "—"
    if "compile_error" in f:
      fits = "— (compiler: out of HBM)"
    lines.append(f"| {f['model']} | {f['target']} ({f['devices']}) | {mesh} | {f['program']} | {f['rows_per_device']} | "
                 f"{_variant(f)} | {f['argument_bytes'] / GB:.1f} | {f['temp_bytes'] / GB:.1f} | "
                 f"**{f['total_bytes'] / GB:.1f}** | {fits} |")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------- the child
# Everything below runs in the child, whose environment fixes the devices before jax starts.

DPO_PAIRS = 64                              # RECIPE.md §1: DPO batch 64 pairs, max length 16,384
GRPO_PROMPTS, GRPO_GROUP = 128, 8           # 128 prompts × 8 samples, response 10,240
ATTENTION_BLOCK = 256                       # query block of the "blocked" stand-in


def target_devices(target: str):
  import jax

  platform, n, topology, chip_config = TARGETS[target]
  if platform == "cpu":
    devices = jax.devices()
  else:
    from jax.experimental import topologies
    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology, chip_config_name=chip_config,
                                           chips_per_host_bounds=(2, 2, 1) if n > 1 else (1, 1, 1),
                                           num_slices=1).devices
  if len(devices) != n:
    raise RuntimeError(f"target {target} wants {n} devices, got {len(devices)} "
                       "(a cpu target needs the child's XLA_FLAGS)")
  return devices


def blocked_attention(q, k, v, mask):
  """`attention.xla_attention` over query blocks of ATTENTION_BLOCK under `jax.checkpoint`: scores
  are [B, H, block, T] at a time in both directions, as in a flash kernel's memory profile (a real
  kernel also tiles T). Same signature and result as the registry's impls (attention.py)."""
  import jax
  import jax.numpy as jnp

  from specs_jax.models.qwen2_5_vl import attention as attention_lib

  b, s, hq, d = q.shape
  if s <= ATTENTION_BLOCK or s % ATTENTION_BLOCK:
    return attention_lib.xla_attention(q, k, v, mask)
  n = s // ATTENTION_BLOCK
  qs = jnp.moveaxis(q.reshape(b, n, ATTENTION_BLOCK, hq, d), 1, 0)                            # [n, B, C, Hq, D]
  ms = jnp.moveaxis(mask.reshape(*mask.shape[:2], n, ATTENTION_BLOCK, mask.shape[-1]), 2, 0)  # [n, B, 1|Hq, C, T]
  one = jax.checkpoint(lambda qm: attention_lib.xla_attention(qm[0], k, v, qm[1]))
  return jnp.moveaxis(jax.lax.map(one, (qs, ms)), 0, 1).reshape(b, s, hq, d)


def constrain_activations(mesh) -> None:
  """The proposed fix, applied by wrapping: split the decoder's input embeddings [R, L, D] and each
  vision block's slots [S, Q, ...] over the batch axes. Without it GSPMD takes the activations'
  layout from the FSDP-sharded embedding table (hidden dim split, rows whole on every device) and
  runs the vision tower on every image on every device."""
  import jax
  from jax.sharding import NamedSharding

  from specs_jax.models.qwen2_5_vl import text as text_lib
  from specs_jax.models.qwen2_5_vl import vision as vision_lib
  from specs_jax.parallel import mesh as mesh_lib

  def split_rows(x):
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, mesh_lib.batch_partition_spec(x.shape, mesh)))

  text_call, block_call = text_lib.TextModel.__call__, vision_lib.VisionBlock.__call__
  text_lib.TextModel.__call__ = lambda self, x, *a, **k: text_call(self, split_rows(x), *a, **k)
  vision_lib.VisionBlock.__call__ = lambda self, x, cos, sin, mask: split_rows(
      block_call(self, split_rows(x), split_rows(cos), split_rows(sin), split_rows(mask)))


def _abstract(tree, shardings):
  import jax
  return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree, shardings)


def _leaf_bytes(x) -> int:
  """Bytes of x's shard on one device (all splits here are even, so every shard has this size)."""
  import jax
  import numpy as np

  shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
  itemsize = 8 if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else np.dtype(x.dtype).itemsize
  return int(np.prod(shape, dtype=np.int64)) * itemsize


def shard_bytes(tree) -> int:
  """Σ per-device shard bytes over the array leaves of an abstract pytree (the analytic argument count)."""
  import jax
  return sum(_leaf_bytes(x) for x in jax.tree.leaves(tree) if hasattr(x, "shape"))


def build_model(model_name: str, args):
  import jax.numpy as jnp

  from specs_jax.models.qwen2_5_vl import attention as attention_lib
  from specs_jax.models.qwen2_5_vl import config as config_lib
  from specs_jax.models.qwen2_5_vl.model import Qwen2_5_VL

  impl = args.attention
  if impl == "blocked":
    attention_lib.register("splash", blocked_attention)   # no TPU kernel here: the stand-in takes its name
    impl = "splash"
  factory = {"3b": config_lib.qwen2_5_vl_3b, "7b": config_lib.qwen2_5_vl_7b}[model_name]
  cfg = factory(attention_impl=impl, remat=args.remat, scan_layers=not args.no_scan)
  return Qwen2_5_VL(cfg, dtype=jnp.bfloat16, param_dtype=jnp.dtype(args.param_dtype))


def abstract_train_state(model, mesh, opt_cfg):
  """(abstract TrainState with shardings, state shardings, abstract params) as `steps.init_train_state`
  builds them, without materialising anything."""
  import dataclasses

  import jax

  from specs_jax.models.qwen2_5_vl import weights
  from specs_jax.parallel import sharding as sharding_lib
  from specs_jax.training import steps
  from specs_jax.training.state import create_train_state, make_optimizer

  params = weights.abstract_params(model)
  cfg = dataclasses.replace(opt_cfg, frozen_prefixes=steps.effective_frozen_prefixes(opt_cfg, True))
  tx = make_optimizer(cfg, params)
  shapes = jax.eval_shape(lambda p, r: create_train_state(p, tx, r), params, jax.random.key(0))
  shardings = sharding_lib.state_shardings(shapes, mesh)
  return _abstract(shapes, shardings), shardings, params


def image_inputs(model, num_images: int, image_tokens: int):
  """(pixel_values, vision metadata) shapes for `num_images` images of `image_tokens` merged tokens each,
  in the slot layout with the default buckets (patches per slot and slot count: powers of two)."""
  import math

  import jax
  import jax.numpy as jnp
  import numpy as np

  from specs_jax.models.qwen2_5_vl.rope import vision_metadata
  from specs_jax.training.forward import VISION_META_KEYS

  m = model.config.vision.spatial_merge_size
  a = math.isqrt(image_tokens)
  grid = np.tile(np.array([[1, a * m, (image_tokens // a) * m]], np.int32), (num_images, 1))
  slot = 1 << (int(grid[0].prod()) - 1).bit_length()
  slots = 1 << (num_images - 1).bit_length()
  meta = vision_metadata(model.config.vision, grid, slot_size=slot, num_slots=slots).as_dict()
  pv = jax.ShapeDtypeStruct((slots * slot, model.config.vision.patch_dim), jnp.float32)
  return pv, {k: jax.ShapeDtypeStruct(meta[k].shape, jnp.int32) for k in VISION_META_KEYS}


def _with_batch_shardings(batch, mesh):
  from specs_jax.parallel import mesh as mesh_lib
  return _abstract(batch, mesh_lib.batch_shardings(batch, mesh))


def _micro_batches(rows: int, rows_per_device: int, mesh) -> int:
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  if rows % (rows_per_device * dp):
    raise ValueError(f"{rows} rows do not split into micro-batches of {rows_per_device} row(s) on {dp} devices")
  return rows // (rows_per_device * dp)


def dpo_program(model, mesh, rows_per_device: int, args):
  """(jitted, abstract args, settings, abstract params) of the DPO step."""
  import jax
  import jax.numpy as jnp

  from specs_jax.training import steps
  from specs_jax.training.state import OptimizerConfig

  rows, length = 2 * DPO_PAIRS, args.prompt_len + args.dpo_completion
  micro = _micro_batches(rows, rows_per_device, mesh)
  opt = OptimizerConfig(learning_rate=1e-6, total_steps=140)
  state, state_sharding, params = abstract_train_state(model, mesh, opt)
  i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  batch = {"input_ids": i32(rows, length), "attention_mask": i32(rows, length), "completion_mask": i32(rows, length),
           "position_ids": i32(3, rows, length), "ref_chosen_logps": f32(DPO_PAIRS),
           "ref_rejected_logps": f32(DPO_PAIRS), "pair_weight": f32(DPO_PAIRS)}
  if args.image_tokens:
    batch["pixel_values"], batch["vision"] = image_inputs(model, DPO_PAIRS, args.image_tokens)
  step = steps.make_dpo_step(model, opt, beta=0.1, sft_weight=1.0, micro_batches=micro, chunk_size=args.chunk_size,
                             mesh=mesh, state_sharding=state_sharding)
  settings = dict(pairs=DPO_PAIRS, rows=rows, micro_batches=micro, prompt_len=args.prompt_len,
                  completion_len=args.dpo_completion, seq_len=length)
  return step.jitted, (state, _with_batch_shardings(batch, mesh), args.prompt_len), settings, params


def grpo_program(model, mesh, rows_per_device: int, args):
  """(jitted, abstract args, settings, abstract params) of one GRPO update on the whole step."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from specs_jax.training import grpo_step

  c_len = args.grpo_completion
  rows, length = GRPO_PROMPTS * GRPO_GROUP, args.prompt_len + c_len
  micro = _micro_batches(rows, rows_per_device, mesh)
  cfg = grpo_step.GRPOConfig(group_size=GRPO_GROUP, prompts_per_step=GRPO_PROMPTS, max_response_len=c_len,
                             micro_batches=micro, chunk_size=args.chunk_size)
  state, state_sharding, params = abstract_train_state(model, mesh, cfg.optimizer_config())
  i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  batch = {"input_ids": i32(rows, length), "attention_mask": i32(rows, length), "position_ids": i32(3, rows, length),
           "loss_mask": f32(rows, c_len), "advantages": f32(rows), "old_logps": f32(rows, c_len),
           "sampler_logps": f32(rows, c_len)}
  replicated = NamedSharding(mesh, P())
  vision_inputs = {}
  if args.image_tokens:
    batch["image_index"] = i32(rows, args.prompt_len)
    pv, _ = image_inputs(model, GRPO_PROMPTS, args.image_tokens)
    feats = pv.shape[0] // model.config.vision.spatial_merge_size**2
    vision_inputs = {"image_embeds": jax.ShapeDtypeStruct((feats, model.config.text.hidden_size), model.dtype,
                                                          sharding=replicated)}
  first = jax.ShapeDtypeStruct((), jnp.bool_, sharding=replicated)
  update = grpo_step.make_grpo_update(model, cfg, mesh=mesh, state_sharding=state_sharding)
  settings = dict(prompts=GRPO_PROMPTS, group_size=GRPO_GROUP, rows=rows, micro_batches=micro,
                  prompt_len=args.prompt_len, completion_len=c_len, seq_len=length)
  return update, (state, _with_batch_shardings(batch, mesh), vision_inputs, first), settings, params


def sampler_programs(model, mesh, prompts: int, args):
  """((prefill jitted, args, static kwargs), (decode jitted, args-from-compiled-prefill fn, static kwargs), settings).

  Params: the train state's params with their FSDP shardings (the rollout samples from
  `state.params`). Prompt rows are split over the batch axes (`stages.common.rows_sharding`), the
  M-RoPE positions and the patches replicated, as `Sampler.generate` passes them. Decode takes the
  prefill's output shardings for the logits, cache and kv mask."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from specs_jax.models.qwen2_5_vl import weights
  from specs_jax.parallel import mesh as mesh_lib
  from specs_jax.parallel import sharding as sharding_lib
  from specs_jax.sampling.sampler import Sampler

  params = weights.abstract_params(model)
  params = _abstract(params, sharding_lib.param_shardings(params, mesh))
  replicated = NamedSharding(mesh, P())
  rows_sh = lambda shape: NamedSharding(mesh, mesh_lib.batch_partition_spec(shape, mesh))
  sds = lambda shape, dtype, sh=None: jax.ShapeDtypeStruct(shape, dtype, sharding=sh or rows_sh(shape))
  p_len, c_len = args.prompt_len, args.grpo_completion
  total = p_len + c_len
  ids = sds((prompts, p_len), jnp.int32)
  pos = sds((3, prompts, p_len), jnp.int32, replicated)
  pv = vision = None
  if args.image_tokens:
    pv, vision = image_inputs(model, prompts, args.image_tokens)
    pv = jax.ShapeDtypeStruct(pv.shape, pv.dtype, sharding=replicated)
    vision = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated) for k, v in vision.items()}
  sampler = Sampler(model, cache_dtype=jnp.bfloat16)
  prefill_args = (params, ids, ids, pos, pv, vision)
  prefill_static = dict(n=GRPO_GROUP, total_len=total)

  def decode_args(prefill_compiled):
    logits_sh, cache_sh, mask_sh = prefill_compiled.output_shardings
    logits, cache, kv_mask = jax.eval_shape(lambda *a: sampler._prefill_impl(*a, **prefill_static), *prefill_args)
    n = prompts * GRPO_GROUP
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=replicated)
    return (params, _abstract(logits, logits_sh), _abstract(cache, cache_sh), _abstract(kv_mask, mask_sh),
            sds((n,), jnp.int32), jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated),
            scalar(jnp.int32), scalar(jnp.float32), scalar(jnp.float32),
            jax.ShapeDtypeStruct((1,), jnp.int32, sharding=replicated), scalar(jnp.int32))

  t = model.config.text
  cache_bytes = prompts * GRPO_GROUP * total * t.num_hidden_layers * 2 * t.num_key_value_heads * t.head_dim * 2
  settings = dict(prompts=prompts, group_size=GRPO_GROUP, rows=prompts * GRPO_GROUP, prompt_len=p_len,
                  completion_len=c_len, seq_len=total, cache_dtype="bfloat16",
                  kv_cache_bytes_per_device=cache_bytes // (mesh.shape["data"] * mesh.shape["fsdp"]))
  return ((sampler._prefill, prefill_args, prefill_static),
          (sampler._decode, decode_args, dict(gen_len=c_len, top_k=0, greedy=False)), settings)


def _fits(total: int, target: str) -> dict[str, bool]:
  """Per chip whether `total` bytes per device fit its usable HBM; a TPU target is judged for its own chip."""
  chip = target.split("-")[0]
  chips = HBM_BYTES if chip == "cpu" else {chip: HBM_BYTES[chip]}
  return {name: total <= limit for name, limit in chips.items()}


def _out_of_memory(error: Exception, abstract_args, target: str) -> dict:
  """The TPU compiler refuses a program whose temporaries exceed HBM; its message gives their size."""
  match = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", str(error))
  if "RESOURCE_EXHAUSTED" not in str(error) or not match:
    raise error
  temp = int(float(match.group(1)) * 1024 ** " KMGT".index(match.group(2)))
  args = shard_bytes([a for a in abstract_args if a is not None])
  return dict(argument_bytes=args, output_bytes=0, alias_bytes=0, temp_bytes=temp, generated_code_bytes=0,
              total_bytes=args + temp, analytic_argument_bytes=args, fits=_fits(10**15, target),
              compile_error=str(error).splitlines()[0][:300])


def measure(jitted, abstract_args, target: str, static_kwargs=None) -> tuple[dict, object]:
  """Lower + compile on the abstract args → (memory figures, compiled)."""
  t0 = time.perf_counter()
  lowered = jitted.lower(*abstract_args, **(static_kwargs or {}))
  t1, c1 = time.perf_counter(), time.process_time()
  try:
    compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001 - only an out-of-HBM refusal becomes a figure
    return _out_of_memory(e, abstract_args, target) | {"lower_s": round(t1 - t0, 1), "compile_s": None}, None
  t2, c2 = time.perf_counter(), time.process_time()
  mem = compiled.memory_analysis()
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
           + mem.temp_size_in_bytes)
  return dict(argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
              alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
              generated_code_bytes=int(mem.generated_code_size_in_bytes), total_bytes=int(total),
              analytic_argument_bytes=shard_bytes([a for a in abstract_args if a is not None]),
              fits=_fits(total, target), lower_s=round(t1 - t0, 1), compile_s=round(t2 - t1, 1),
              compile_cpu_s=round(c2 - c1, 1)), compiled


def _param_counts(params) -> dict[str, int]:
  import jax
  import numpy as np

  total = vision = 0
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    n = int(np.prod(x.shape))
    total += n
    vision += n if getattr(path[0], "key", None) == "visual" else 0
  return {"params_total": total, "params_trainable": total - vision}


def program_figures(model_name: str, programs: tuple[str, ...], args):
  """Yields one figure (a dict) per planned setting of each of `programs`."""
  from specs_jax.parallel import mesh as mesh_lib

  mesh = mesh_lib.make_mesh(parse_mesh(args.mesh), devices=target_devices(args.target))
  if args.constrain_activations:
    constrain_activations(mesh)
  model = build_model(model_name, args)
  base = dict(model=model_name, target=args.target, devices=mesh.size, mesh=dict(mesh.shape),
              param_dtype=args.param_dtype, compute_dtype="bfloat16", remat=args.remat, scan_layers=not args.no_scan,
              attention=args.attention, constrain_activations=args.constrain_activations, chunk_size=args.chunk_size,
              image_tokens=args.image_tokens)
  for program in (p for p in programs if p in ("dpo", "grpo")):
    build = dpo_program if program == "dpo" else grpo_program
    for r in (int(x) for x in args.rows_per_device.split(",")):
      jitted, abstract_args, settings, params = build(model, mesh, r, args)
      fig, _ = measure(jitted, abstract_args, args.target)
      yield base | {"program": program} | settings | {"rows_per_device": r} | _param_counts(params) | fig
  if "prefill" not in programs and "decode" not in programs:
    return
  for prompts in (int(x) for x in args.sampler_prompts.split(",")):
    (pre_fn, pre_args, pre_static), (dec_fn, dec_args, dec_static), settings = sampler_programs(
        model, mesh, prompts, args)
    settings["rows_per_device"] = prompts * GRPO_GROUP // (mesh.shape["data"] * mesh.shape["fsdp"])
    fig, compiled = measure(pre_fn, pre_args, args.target, pre_static)
    if "prefill" in programs:
      yield base | {"program": "prefill"} | settings | fig
    if "decode" in programs and compiled is not None:      # decode takes the prefill's output shardings
      fig, _ = measure(dec_fn, dec_args(compiled), args.target, dec_static)
      yield base | {"program": "decode"} | settings | fig


def what_programs(what: str) -> tuple[str, ...]:
  """"dpo,sampler" → ("dpo", "prefill", "decode"); "all" → PROGRAMS."""
  out: list[str] = []
  for w in what.split(","):
    out += PROGRAMS if w == "all" else ["prefill", "decode"] if w == "sampler" else [w]
  unknown = [p for p in out if p not in PROGRAMS]
  if unknown:
    raise ValueError(f"unknown programs {unknown}; choose from {PROGRAMS}, sampler, all")
  return tuple(dict.fromkeys(out))


def child_main(args: argparse.Namespace) -> None:
  models = MODELS if args.model == "all" else (args.model,)
  programs = what_programs(args.what)
  for model_name in models:
    for fig in program_figures(model_name, programs, args):
      print(json.dumps(fig), flush=True)


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", default="7b", choices=(*MODELS, "all"))
  ap.add_argument("--devices", default="8", choices=("8", "64", "all"),
                  help="virtual CPU devices (targets cpu-8 / cpu-64); ignored when --target is given")
  ap.add_argument("--target", default=None, help=f"comma-separated, from {sorted(TARGETS)}")
  ap.add_argument("--mesh", default=None, help='e.g. "fsdp=-1" or "data=8,fsdp=8" (default: per device count)')
  ap.add_argument("--what", default="dpo", help=f"comma-separated, from {PROGRAMS}, sampler (= prefill,decode), all")
  ap.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"),
                  help="master weights (and Adam moments) dtype; compute is bfloat16")
  ap.add_argument("--remat", default="full", choices=("none", "full", "dots"))
  ap.add_argument("--no-scan", action="store_true", help="unrolled decoder layers (scan_layers=False)")
  ap.add_argument("--attention", default="blocked", choices=("blocked", "xla"),
                  help="blocked: flash-like stand-in (registered as 'splash'); xla: dense scores")
  ap.add_argument("--constrain-activations", action="store_true",
                  help="apply the proposed activation-sharding fix (see the module docstring)")
  ap.add_argument("--rows-per-device", default="1",
                  help="comma-separated rows per device per micro-batch to plan (train programs)")
  ap.add_argument("--image-tokens", type=int, default=1024, help="image tokens per prompt (one image; 0: text only)")
  ap.add_argument("--prompt-len", type=int, default=2048, help="prompt bucket incl. image tokens")
  ap.add_argument("--dpo-completion", type=int, default=14336, help="DPO completion bucket (L = prompt + this)")
  ap.add_argument("--grpo-completion", type=int, default=10240, help="GRPO response bucket")
  ap.add_argument("--chunk-size", type=int, default=256, help="LM-head positions per log-prob chunk (train programs)")
  ap.add_argument("--sampler-prompts", default="128", help="comma-separated prompts per sampler call")
  ap.add_argument("--json", action="store_true", help="print the JSON lines (also with --markdown)")
  ap.add_argument("--markdown", action="store_true", help="print a Markdown table at the end")
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.child:
    child_main(args)
    return
  try:
    what_programs(args.what)
  except ValueError as e:
    ap.error(str(e))
  if args.target:
    targets = args.target.split(",")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
      ap.error(f"unknown targets {unknown}; choose from {sorted(TARGETS)}")
  else:
    targets = ["cpu-8", "cpu-64"] if args.devices == "all" else [f"cpu-{args.devices}"]
  t0 = time.perf_counter()
  figures = run_children(args, targets)
  if args.markdown:
    print(markdown_table(figures))
  print(f"# {len(figures)} figures in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
  main()
