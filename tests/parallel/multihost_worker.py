"""One process of the multi-host test (run by tests/parallel/test_multihost.py as a script).

    python multihost_worker.py OUT --hf-dir D --devices 4 --num-processes 2 --process-id I --coordinator H:P
    python multihost_worker.py OUT --hf-dir D --devices 8                      # the single-process reference

Both runs build the same ("data": 2, "fsdp": 4) mesh over 8 CPU devices and run, on the tiny
Qwen2.5-VL from `--hf-dir`:
  * DPO: two `steps.make_dpo_step` steps on preference pairs with images, read through the project's
    grain pipeline (`data.pipeline.pair_batches`), sharded per host (host k reads rows k, k+2, ...
    of each epoch's shuffle). Multi-host: each host collates its own 4 pairs (and their images), and
    `parallel.host_local_to_global` assembles 8 pairs (row_groups=2). Reference: one process reads
    both shards and collates the same 8 pairs in the same order.
  * GRPO: one `grpo_step.grpo_train_step` (the recipe's one update per step, 2 micro-batches) on
    text-only prompts sharded by grain (`MapDataset` slice per process), completions from a scripted
    sampler (a function of the prompt), rows put per host by `grpo_train_step(mesh=...)`.
  * GRPO with images, through the update function with the host-local rows and image tables made
    global by `host_local_to_global` (image_index offset into the gathered features).
Process 0 (or the single process) writes OUT.npz: metrics as "m/<run>/<name>" and the final params as
"p/<run>/<path>", gathered to the host.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _args():
  ap = argparse.ArgumentParser()
  ap.add_argument("out")
  ap.add_argument("--hf-dir", required=True)
  ap.add_argument("--devices", type=int, required=True)
  ap.add_argument("--num-processes", type=int, default=1)
  ap.add_argument("--process-id", type=int, default=0)
  ap.add_argument("--coordinator", default="")
  return ap.parse_args()


ARGS = _args()
# Before jax is imported: fake CPU devices of this process.
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ARGS.devices}"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["HF_HUB_OFFLINE"] = "1"
sys.path[:0] = [os.path.join(HERE, ".."), os.path.join(HERE, "..", "training")]

import grain  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

# Cross-process collectives on CPU need an implementation (the default has none): gloo over TCP.
jax.config.update("jax_cpu_collectives_implementation", "gloo")
flags.FLAGS.mark_as_parsed()

from dpo_fixtures import OPT, make_pairs  # noqa: E402

from specs_jax.data import pipeline  # noqa: E402
from specs_jax.data.types import PreferencePair, user_message  # noqa: E402
from specs_jax.models import qwen2_5_vl  # noqa: E402
from specs_jax.parallel import mesh as mesh_lib  # noqa: E402
from specs_jax.parallel import sharding  # noqa: E402
from specs_jax.processing import chat  # noqa: E402
from specs_jax.processing import image as image_lib  # noqa: E402
from specs_jax.training import batches, grpo_step, rollout, steps  # noqa: E402

MULTI = ARGS.num_processes > 1
PAIRS_PER_HOST = 4
DPO_STEPS = 2
DPO_BUCKETS = batches.BatchBuckets.make(prompt=64, completion=24, patches=32, images=(8, 16))
G = 4                       # GRPO samples per prompt
PROMPTS_PER_HOST = 4
GRPO = grpo_step.GRPOConfig(group_size=G, prompts_per_step=PROMPTS_PER_HOST * 2, max_response_len=8,
                            learning_rate=1e-4, ppo_epochs=1, minibatches=1, micro_batches=2, filter_lower=None,
                            filter_upper=None, kl_coef=0.0, chunk_size=8)
ROLLOUT_KW = dict(n=G, max_new_tokens=8, filter_bounds=None, prompt_buckets=(32,),
                  completion_buckets=(8,), image_buckets=(8,))


# ---------------------------------------------------------------------------------- helpers


def _gather(tree):
  """Global (possibly cross-process) arrays → host numpy, identical on every process."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(one, tree)


def _flat(prefix: str, tree) -> dict[str, np.ndarray]:
  return {f"{prefix}/{jax.tree_util.keystr(p)}": np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _shards() -> list[int]:
  """The grain shards this process reads: its own, or both (the reference reads the whole data)."""
  return [jax.process_index()] if MULTI else [0, 1]


# -------------------------------------------------------------------------------------- DPO


def _preference_pairs() -> list[PreferencePair]:
  out = []
  for i, d in enumerate(make_pairs(0) + make_pairs(1)):   # 12 pairs with 0-2 images of two sizes
    msgs = d.get("messages") or [user_message(d["prompt"], len(d["images"]))]
    out.append(PreferencePair(f"pair/{i}", msgs, d["images"], d["chosen"], d["rejected"]))
  return out


def _pair_items(tok, icfg, shard: int) -> list[list]:
  """DPO_STEPS batches of this shard's encoded pairs (grain pipeline, per-host shard of the shuffle)."""
  cfg = pipeline.PromptPipelineConfig(batch_size=PAIRS_PER_HOST, prompt_buckets=(64,), completion_buckets=(24,),
                                      patch_buckets=(4096,), max_images=2, seed=3, num_epochs=None, image=icfg)
  it = pipeline.pair_batches(_preference_pairs(), tok, cfg, shard_index=shard, shard_count=2, collate=list)
  return [[batches.EncodedPair(e.prompt, e.completions[0], e.completions[1]) for e in next(it)]
          for _ in range(DPO_STEPS)]


def run_dpo(model, params, mesh, tok, icfg, pad) -> dict[str, np.ndarray]:
  per_shard = [_pair_items(tok, icfg, s) for s in _shards()]
  state, shardings = steps.init_train_state(params, OPT, jax.random.key(7), mesh=mesh)
  step = steps.make_dpo_step(model, OPT, micro_batches=2, chunk_size=32, row_groups=2 if MULTI else 1, mesh=mesh,
                             state_sharding=shardings)
  out = {}
  for k in range(DPO_STEPS):
    items = [p for shard in per_shard for p in shard[k]]   # reference: shard 0's pairs, then shard 1's
    batch = batches.collate_dpo(items, model.config, DPO_BUCKETS, pad, require_ref=False)
    if MULTI:
      batch = mesh_lib.host_local_to_global(batch, mesh)    # this host's 4 pairs → 8 global pairs
    else:
      batch = mesh_lib.global_batch_to_mesh(batch, mesh)
    state, m = step(state, batch)
    out |= {f"m/dpo/{k}/{name}": np.asarray(v) for name, v in _gather(m).items()}
  return out | _flat("p/dpo", _gather(state.params))


# ------------------------------------------------------------------------------------- GRPO


class ScriptedSampler:
  """Completions as a function of the prompt (its first token picks how many samples are "correct"),
  so a host's rollout equals its rows of the reference's rollout."""

  def __init__(self, config):
    self.model = type("M", (), {"config": config})()

  def generate(self, params, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, *, n,
               max_new_tokens, **kw):
    cfg = self.model.config
    rows = []
    for i in range(input_ids.shape[0]):
      real = input_ids[i][attention_mask[i] > 0]
      for j in range(n):
        rows.append([int(real[1]), 7, int(real[2]), cfg.eos_token_id] if j < real[0] % (n + 1) else [8, cfg.eos_token_id])
    tokens = np.zeros((len(rows), max_new_tokens), np.int32)
    for r, t in enumerate(rows):
      tokens[r, :len(t)] = t
    return type("Out", (), dict(tokens=tokens, logprobs=np.full(tokens.shape, -1.0, np.float32),
                                 lengths=np.array([len(t) for t in rows], np.int32),
                                 finished=np.ones(len(rows), bool)))()


def _reward(inputs: rollout.RewardInputs):
  from specs_jax.rewards.pool import BatchRewards

  acc = np.array([float(7 in c) for c in inputs.completion_ids], np.float32)
  return BatchRewards(total=acc + 0.1 * np.array([len(c) for c in inputs.completion_ids], np.float32),
                      format=np.zeros_like(acc), accuracy=acc, status=("ok",) * len(acc)), {}


def _rl_prompts(config, images: bool) -> list[rollout.RLPrompt]:
  """8 prompts (text, or with one or two images of different sizes), the grain shard(s) of this process."""
  rng = np.random.default_rng(5)
  grids = [[(1, 4, 4)], [], [(1, 4, 6), (1, 4, 4)], [(1, 6, 4)]] * 2 if images else [[]] * 8
  prompts = []
  for k, gs in enumerate(grids):
    ids = [k + 20] + list(rng.integers(10, 300, size=3 + k))  # ids < 7 are special tokens
    pvs = []
    for t, h, w in gs:
      ids += [config.vision_start_token_id] + [config.image_token_id] * (t * h * w // 4) + [config.vision_end_token_id]
      pvs.append(rng.standard_normal((t * h * w, 1176)).astype(np.float32))
    grid = np.asarray(gs, np.int32).reshape(-1, 3)
    enc = chat.EncodedPrompt(input_ids=np.asarray(ids, np.int32),
                             pixel_values=np.concatenate(pvs) if pvs else np.zeros((0, 1176), np.float32),
                             image_grid_thw=grid, num_image_tokens=grid.prod(-1) // 4, text="")
    prompts.append(rollout.RLPrompt(enc, "7", uid=str(k)))
  ds = grain.MapDataset.source(prompts).seed(11).shuffle()
  return [p for s in _shards() for p in ds[s::2]]


def _rollout(model, prompts, pad):
  return rollout.collect_rollouts(ScriptedSampler(model.config), None, prompts, _reward, pad_id=pad,
                                  rng=jax.random.key(0), **ROLLOUT_KW)


def run_grpo(model, params, mesh, pad) -> dict[str, np.ndarray]:
  b = _rollout(model, _rl_prompts(model.config, images=False), pad)
  state, shardings = steps.init_train_state(params, GRPO.optimizer_config(), jax.random.key(1), mesh=mesh)
  fns = grpo_step.make_grpo_functions(model, GRPO, mesh=mesh, state_sharding=shardings)
  state, m = grpo_step.grpo_train_step(state, b, GRPO, jax.random.key(2), fns=fns, mesh=mesh)
  out = {f"m/grpo/{k}": np.asarray(v) for k, v in m.items() if not k.startswith("time/")}
  return out | _flat("p/grpo", _gather(state.params))


def run_grpo_images(model, params, mesh, pad) -> dict[str, np.ndarray]:
  """One GRPO update on image prompts, each host's rows and image table made global by
  `host_local_to_global` (grpo_train_step itself puts the image table replicated, which needs one
  table for all hosts)."""
  b = _rollout(model, _rl_prompts(model.config, images=True), pad)
  state, shardings = steps.init_train_state(params, GRPO.optimizer_config(), jax.random.key(1), mesh=mesh)
  fns = grpo_step.make_grpo_functions(model, GRPO, mesh=mesh, state_sharding=shardings)
  rows = {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "position_ids": b.position_ids,
          "loss_mask": b.loss_mask.astype(np.float32), "advantages": b.advantages.astype(np.float32),
          "sampler_logps": b.sampler_logps, "old_logps": np.zeros(b.loss_mask.shape, np.float32),
          "image_index": b.image_index, "pixel_values": b.pixel_values, "vision": b.vision}
  g = (mesh_lib.host_local_to_global if MULTI else mesh_lib.global_batch_to_mesh)(rows, mesh)
  feats = fns.encode_images(state.params, g.pop("pixel_values"), g.pop("vision"))
  state, m = fns.update(state, g, {"image_embeds": feats}, jax.numpy.asarray(True))
  out = {f"m/grpo_img/{k}": np.asarray(v) for k, v in _gather(m).items()}
  return out | _flat("p/grpo_img", _gather(state.params))


def run_row_layouts(mesh) -> dict[str, np.ndarray]:
  """Rows the batch axes cannot split per process: 2 rows per host, 4 global, on a mesh whose
  process-spanning axis has 8 devices (fsdp=8: only the size-1 "data" axis divides 4, so the rows
  are replicated on every device). Each host's rows must still all arrive, in process order."""
  mesh8 = mesh_lib.make_mesh({"fsdp": 8})
  out = {}
  for s in _shards():
    local = {"input_ids": np.arange(6, dtype=np.int32).reshape(2, 3) + 100 * s,
             "position_ids": np.full((3, 2, 3), s, np.int32)}
    if MULTI:
      g = mesh_lib.host_local_to_global(local, mesh8)
      out |= {f"m/rows/{k}": v for k, v in _gather(g).items()}
    else:
      for k, v in local.items():
        key = f"m/rows/{k}"
        out[key] = np.concatenate([out[key], v], axis=1 if k == "position_ids" else 0) if key in out else v
  return out


# ------------------------------------------------------------------------------------- main


def main() -> None:
  if MULTI:
    mesh_lib.maybe_initialize_distributed({"distributed": {
        "coordinator_address": ARGS.coordinator, "num_processes": ARGS.num_processes,
        "process_id": ARGS.process_id, "initialization_timeout": 120}})
  assert jax.device_count() == 8 and jax.process_count() == ARGS.num_processes, (jax.devices(), jax.process_count())
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4})
  from transformers import AutoTokenizer

  tok = AutoTokenizer.from_pretrained(ARGS.hf_dir)
  pad = int(tok.pad_token_id)
  icfg = image_lib.ImageConfig.from_preprocessor_config(os.path.join(ARGS.hf_dir, "preprocessor_config.json"))
  # every tensor placed sharded as it is read (global arrays across the processes)
  model, params = qwen2_5_vl.from_pretrained(ARGS.hf_dir, sharding_fn=sharding.sharding_fn(mesh))
  copy = lambda: jax.tree.map(lambda x: x.copy(), params)  # noqa: E731  (the steps donate their state)
  out = run_row_layouts(mesh)
  out |= run_dpo(model, copy(), mesh, tok, icfg, pad)
  out |= run_grpo(model, copy(), mesh, pad)
  out |= run_grpo_images(model, copy(), mesh, pad)
  if jax.process_index() == 0:
    np.savez(ARGS.out, **out)
  print("WORKER DONE", jax.process_index(), flush=True)


if __name__ == "__main__":
  main()
