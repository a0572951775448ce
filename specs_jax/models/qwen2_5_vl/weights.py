"""HF safetensors ↔ Flax params for Qwen2.5-VL.

Params mirror the HF names: `visual/blocks_0/attn/qkv/kernel` ↔ `visual.blocks.0.attn.qkv.weight`,
`model/layers_3/self_attn/q_proj/kernel` ↔ `model.layers.3.self_attn.q_proj.weight`. Linear weights
are transposed ([out, in] → [in, out]); the Conv3d patch embedding (stride = kernel) becomes a
[C*T*p*p, D] matmul kernel; norms' `weight` is `scale`; the embedding's `weight` is `embedding`.
With `scan_layers`, decoder layers are stacked under `model/layers/layer/...` with a leading axis.

Both key layouts are read: the hub names (`model.layers.*`, `visual.*`, `lm_head.*`) and the
transformers-5 in-memory names (`model.language_model.*`, `model.visual.*`). We write hub names,
which every transformers version loads.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from specs_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from specs_jax.models.qwen2_5_vl.model import Qwen2_5_VL

Path = tuple[str, ...]
SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"


class WeightsError(ValueError):
  """Checkpoint tensors that do not match the model: missing, unexpected or mis-shaped."""


def _normalise_key(key: str) -> str:
  """transformers-5 in-memory names → hub names."""
  if key.startswith("model.language_model."):
    return "model." + key[len("model.language_model."):]
  if key.startswith("model.visual."):
    return key[len("model."):]
  return key


def hf_key_to_path(key: str) -> Path:
  """'model.layers.3.mlp.up_proj.weight' → ('model', 'layers_3', 'mlp', 'up_proj', 'kernel')."""
  key = _normalise_key(key)
  parts = key.split(".")
  out: list[str] = []
  for p in parts[:-1]:
    if p.isdigit() and out:
      out[-1] = f"{out[-1]}_{p}"
    else:
      out.append(p)
  leaf = parts[-1]
  if leaf == "bias":
    return (*out, "bias")
  if leaf != "weight":
    raise WeightsError(f"unexpected tensor name {key!r}")
  if out[-1] == "embed_tokens":
    return (*out, "embedding")
  if out[-1] in ("norm", "norm1", "norm2", "ln_q", "input_layernorm", "post_attention_layernorm"):
    return (*out, "scale")
  return (*out, "kernel")


def path_to_hf_key(path: Path) -> str:
  parts: list[str] = []
  for p in path[:-1]:
    m = re.fullmatch(r"(.*)_(\d+)", p)
    parts.extend([m.group(1), m.group(2)] if m else [p])
  return ".".join(parts + ["bias" if path[-1] == "bias" else "weight"])


def hf_to_param(path: Path, tensor):
  """A torch-layout tensor → our layout (transpose Linear, flatten the Conv3d)."""
  if path[-1] != "kernel":
    return tensor
  if tensor.ndim == 5:  # Conv3d [O, C, T, H, W] → [C*T*H*W, O]
    return tensor.reshape(tensor.shape[0], -1).T
  return tensor.T


def param_to_hf(path: Path, value, config: Qwen2_5_VLConfig):
  if path[-1] != "kernel":
    return value
  if path[-2] == "proj" and path[-3] == "patch_embed":
    v = config.vision
    return value.T.reshape(v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
  return value.T


# --------------------------------------------------------------------------- shapes


def abstract_params(model: Qwen2_5_VL) -> dict:
  """Shapes/dtypes of the full param tree (nothing allocated)."""
  cfg = model.config
  v = cfg.vision
  m = v.spatial_merge_size
  n_patch = m * m

  def init(rng):
    ids = jnp.full((1, 1), cfg.image_token_id, jnp.int32)
    meta = {k: jnp.zeros((1, n_patch), jnp.int32) for k in ("pos_h", "pos_w", "window_seg", "full_seg")}
    meta["token_index"] = jnp.zeros((1,), jnp.int32)
    pv = jnp.zeros((n_patch, v.patch_dim), jnp.float32)
    return model.init(rng, ids, jnp.ones((1, 1), jnp.int32), pixel_values=pv,
                      position_ids=jnp.zeros((3, 1, 1), jnp.int32), vision=meta)["params"]

  return jax.eval_shape(init, jax.random.key(0))


def init_params(model: Qwen2_5_VL, rng) -> dict:
  """Random params (the demo's base model starts from these)."""
  shapes = abstract_params(model)
  cfg = model.config
  v = cfg.vision
  n_patch = v.spatial_merge_size**2
  ids = jnp.full((1, 1), cfg.image_token_id, jnp.int32)
  meta = {k: jnp.zeros((1, n_patch), jnp.int32) for k in ("pos_h", "pos_w", "window_seg", "full_seg")}
  meta["token_index"] = jnp.zeros((1,), jnp.int32)
  params = jax.jit(lambda r: model.init(r, ids, jnp.ones((1, 1), jnp.int32),
                                        pixel_values=jnp.zeros((n_patch, v.patch_dim)),
                                        position_ids=jnp.zeros((3, 1, 1), jnp.int32), vision=meta)["params"])(rng)
  assert jax.tree.structure(params) == jax.tree.structure(shapes)
  return params


def _stack_layers(flat: dict[Path, object], num_layers: int) -> dict[Path, object]:
  """Unscanned model/layers_i/... → scanned model/layers/layer/... with a leading layer axis."""
  out, per_layer = {}, {}
  for path, val in flat.items():
    m = re.fullmatch(r"layers_(\d+)", path[1]) if len(path) > 1 and path[0] == "model" else None
    if m:
      per_layer.setdefault(path[2:], {})[int(m.group(1))] = val
    else:
      out[path] = val
  for sub, layers in per_layer.items():
    out[("model", "layers", "layer", *sub)] = jnp.stack([layers[i] for i in range(num_layers)])
  return out


def _unstack_layers(flat: dict[Path, object]) -> dict[Path, object]:
  out = {}
  for path, val in flat.items():
    if path[:3] == ("model", "layers", "layer"):
      for i in range(val.shape[0]):
        out[("model", f"layers_{i}", *path[3:])] = val[i]
    else:
      out[path] = val
  return out


# --------------------------------------------------------------------------- reading


def _checkpoint_files(hf_dir: str) -> list[str]:
  idx = os.path.join(hf_dir, SAFE_INDEX)
  if os.path.exists(idx):
    with open(idx) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
    missing = [fn for fn in files if not os.path.exists(os.path.join(hf_dir, fn))]
    if missing:
      raise WeightsError(f"{idx} names shard files that are missing: {missing}")
    return [os.path.join(hf_dir, fn) for fn in files]
  single = os.path.join(hf_dir, SAFE_SINGLE)
  if os.path.exists(single):
    return [single]
  if any(fn.endswith((".bin", ".pt", ".pth")) for fn in os.listdir(hf_dir)):
    raise WeightsError(f"{hf_dir} has only pickle checkpoints; specs_jax loads safetensors only (never pickle)")
  raise WeightsError(f"no {SAFE_SINGLE} or {SAFE_INDEX} in {hf_dir}")


def iter_hf_tensors(hf_dir: str) -> Iterator[tuple[str, jax.Array]]:
  """Yields (hub key, tensor) one at a time, reading each safetensors file lazily."""
  from safetensors import safe_open

  for fn in _checkpoint_files(hf_dir):
    with safe_open(fn, framework="flax") as f:
      for key in f.keys():
        yield _normalise_key(key), f.get_tensor(key)


def load_params(hf_dir: str, config: Qwen2_5_VLConfig, dtype=jnp.float32,
                sharding_fn: Callable[[Path, tuple[int, ...]], jax.sharding.Sharding | None] | None = None) -> dict:
  """Reads, converts and validates every tensor of a checkpoint.

  Tensors are streamed: each is converted, cast to `dtype` and placed (with `sharding_fn(path,
  shape)` when given) before the next is read, so a 7B checkpoint is never held twice on the host.
  Raises WeightsError naming missing, unexpected and mis-shaped tensors.
  """
  model = Qwen2_5_VL(config.replace(scan_layers=False))
  expected = traverse_util.flatten_dict(abstract_params(model))
  got: dict[Path, jax.Array] = {}
  unexpected, misshaped, misshaped_paths = [], [], set()
  for key, tensor in iter_hf_tensors(hf_dir):
    if config.tie_word_embeddings and key == "lm_head.weight":
      continue  # some tied checkpoints carry a copy; the embedding is the one used
    try:
      path = hf_key_to_path(key)
    except WeightsError:
      unexpected.append(key)
      continue
    if path not in expected:
      unexpected.append(key)
      continue
    val = hf_to_param(path, tensor)
    want = tuple(expected[path].shape)
    if tuple(val.shape) != want:
      misshaped.append(f"{key}: checkpoint {tuple(tensor.shape)}, model expects {want} (in our layout)")
      misshaped_paths.add(path)
      continue
    val = jnp.asarray(val, dtype=dtype)
    sh = sharding_fn(path, want) if sharding_fn else None
    got[path] = jax.device_put(val, sh) if sh is not None else val
  missing = sorted(path_to_hf_key(p) for p in expected if p not in got and p not in misshaped_paths)
  if missing or unexpected or misshaped:
    msg = [f"checkpoint in {hf_dir} does not match the model config:"]
    if missing:
      msg.append(f"  missing ({len(missing)}): {missing[:20]}{' ...' if len(missing) > 20 else ''}")
    if unexpected:
      msg.append(f"  unexpected ({len(unexpected)}): {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
    if misshaped:
      msg.append(f"  wrong shape ({len(misshaped)}): " + "; ".join(misshaped[:10]))
    raise WeightsError("\n".join(msg))
  if config.scan_layers:
    got = _stack_layers(got, config.text.num_hidden_layers)
  return traverse_util.unflatten_dict(got)


def from_pretrained(hf_dir: str | os.PathLike, dtype=jnp.float32, param_dtype=None, **runtime):
  """Loads config.json + safetensors from a local HF directory.

  Args:
    dtype: compute dtype; params are stored in `param_dtype` (defaults to `dtype`).
    runtime: run-time config switches (attention_impl, remat, scan_layers) and `sharding_fn`.
  Returns:
    (model, params): a `Qwen2_5_VL` module and its params pytree.
  """
  hf_dir = os.fspath(hf_dir)
  sharding_fn = runtime.pop("sharding_fn", None)
  config = Qwen2_5_VLConfig.from_pretrained(hf_dir, **runtime)
  pdtype = param_dtype or dtype
  params = load_params(hf_dir, config, pdtype, sharding_fn)
  return Qwen2_5_VL(config, dtype=dtype, param_dtype=pdtype), params


# --------------------------------------------------------------------------- writing


def to_hf_state_dict(params: dict, config: Qwen2_5_VLConfig) -> dict[str, np.ndarray]:
  flat = traverse_util.flatten_dict(params)
  if config.scan_layers or any(p[:3] == ("model", "layers", "layer") for p in flat):
    flat = _unstack_layers(flat)
  return {path_to_hf_key(p): param_to_hf(p, v, config) for p, v in flat.items()}


def save_pretrained(params: dict, config: Qwen2_5_VLConfig, out_dir: str | os.PathLike, *,
                    dtype=None, max_shard_bytes: int = 4 << 30, copy_files_from: str | None = None) -> str:
  """Writes HF-format safetensors (+ index when sharded) and config.json, loadable by
  `transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained`.

  Args:
    dtype: storage dtype (default: the params' dtype).
    max_shard_bytes: shard size; above it the files are `model-0000k-of-0000n.safetensors`.
    copy_files_from: an HF dir whose tokenizer / preprocessor / chat-template files are copied.
  """
  import shutil

  from safetensors.flax import save_file

  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  sd = to_hf_state_dict(params, config)
  if dtype is not None:
    sd = {k: jnp.asarray(v, dtype) for k, v in sd.items()}
  sd = {k: jnp.asarray(v) for k, v in sd.items()}
  store_dtype = str(next(iter(sd.values())).dtype)
  shards: list[dict[str, jax.Array]] = [{}]
  size = 0
  for k in sorted(sd):
    nbytes = sd[k].size * sd[k].dtype.itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][k] = sd[k]
    size += nbytes
  for fn in os.listdir(out_dir):  # stale shards from an earlier save would confuse loaders
    if fn.startswith("model") and fn.endswith((".safetensors", ".safetensors.index.json")):
      os.remove(os.path.join(out_dir, fn))
  meta = {"format": "pt"}
  if len(shards) == 1:
    save_file(shards[0], os.path.join(out_dir, SAFE_SINGLE), metadata=meta)
  else:
    weight_map = {}
    n = len(shards)
    for i, shard in enumerate(shards):
      fn = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
      save_file(shard, os.path.join(out_dir, fn), metadata=meta)
      weight_map.update({k: fn for k in shard})
    total = sum(v.size * v.dtype.itemsize for v in sd.values())
    with open(os.path.join(out_dir, SAFE_INDEX), "w") as f:
      json.dump({"metadata": {"total_size": int(total)}, "weight_map": weight_map}, f, indent=2)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config.to_hf_dict(dtype=store_dtype), f, indent=2)
  if copy_files_from:
    for fn in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
               "special_tokens_map.json", "preprocessor_config.json", "generation_config.json", "vocab.json",
               "merges.txt"):
      src = os.path.join(os.fspath(copy_files_from), fn)
      if os.path.exists(src):
        shutil.copy(src, os.path.join(out_dir, fn))
  return out_dir
