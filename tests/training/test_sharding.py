"""Mesh from config, logical-axis sharding rules, batch placement, and a sharded DPO run on 8 fake
CPU devices (data=2 × fsdp=4) against the unsharded one."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dpo_fixtures import OPT, collate, fresh_state
from jax.sharding import PartitionSpec as P

from specs_jax.parallel import mesh as mesh_lib
from specs_jax.parallel import sharding
from specs_jax.training import steps


# ------------------------------------------------------------------------------------------ mesh

def test_mesh_shape_resolves_the_rest():
  assert mesh_lib.mesh_shape({"data": 2, "fsdp": -1}, 8) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert mesh_lib.mesh_shape([("fsdp", -1)], 8) == {"data": 1, "fsdp": 8, "tensor": 1}
  assert mesh_lib.mesh_shape({"data": 2, "fsdp": 2, "tensor": 2}, 8) == {"data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(ValueError, match="unknown mesh axis"):
    mesh_lib.mesh_shape({"model": 2}, 8)
  with pytest.raises(ValueError, match="at most one"):
    mesh_lib.mesh_shape({"data": -1, "fsdp": -1}, 8)
  with pytest.raises(ValueError, match="needs 4 devices but 8"):
    mesh_lib.mesh_shape({"data": 2, "fsdp": 2}, 8)
  with pytest.raises(ValueError, match="do not divide"):
    mesh_lib.mesh_shape({"data": 3, "fsdp": -1}, 8)


def test_make_mesh_is_auto_and_ordered():
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4})
  assert mesh.axis_names == ("data", "fsdp", "tensor") and dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  sub = mesh_lib.make_mesh({"fsdp": -1}, devices=jax.devices()[:4])
  assert dict(sub.shape) == {"data": 1, "fsdp": 4, "tensor": 1}


def test_distributed_init_only_when_asked(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  for var in ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS",
              "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(var, raising=False)
  assert mesh_lib.maybe_initialize_distributed() is False and calls == []          # one host: no-op
  assert mesh_lib.maybe_initialize_distributed({"distributed": {"enabled": False}}) is False
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.1,10.0.0.2")                   # a 2-host TPU slice
  assert mesh_lib.maybe_initialize_distributed() is True and calls == [{}]           # JAX auto-detects the rest
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
  cfg = {"distributed": {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}}
  assert mesh_lib.maybe_initialize_distributed(cfg) is True
  assert calls[-1] == {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}


# ----------------------------------------------------------------------------------------- rules

def _specs(params, mesh):
  return {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(
      sharding.param_partition_specs(params, mesh), is_leaf=lambda x: isinstance(x, P))}


def test_param_rules_cover_the_model(tiny):
  _, params = tiny
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  specs = _specs(params, mesh)
  k = lambda path: "".join(f"['{x}']" for x in path.split("/"))
  assert specs[k("model/embed_tokens/embedding")] == P(None, "fsdp")        # vocab 483 is odd: tensor dropped
  assert specs[k("lm_head/kernel")] == P("fsdp")
  assert specs[k("model/layers_0/self_attn/q_proj/kernel")] == P("fsdp", "tensor")
  assert specs[k("model/layers_0/self_attn/o_proj/kernel")] == P("tensor", "fsdp")
  assert specs[k("model/layers_1/mlp/down_proj/kernel")] == P("tensor", "fsdp")
  assert specs[k("visual/blocks_0/attn/qkv/kernel")] == P("fsdp", "tensor")
  assert specs[k("visual/merger/mlp_2/kernel")] == P("tensor", "fsdp")
  assert specs[k("visual/patch_embed/proj/kernel")] == P(None, "fsdp")
  assert specs[k("model/layers_0/self_attn/q_proj/bias")] == P()
  assert specs[k("model/norm/scale")] == P()
  # every matrix has a rule that shards it (a missing rule would silently replicate a big tensor)
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    if x.ndim >= 2:
      assert specs[jax.tree_util.keystr(path)] != P(), jax.tree_util.keystr(path)


def test_param_rules_stacked_layers_and_divisibility():
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4})
  # scanned layers: a leading layer axis, replicated; the rule applies to the trailing dims
  shapes = {"model": {"layers": {"layer": {"mlp": {"gate_proj": {"kernel": jax.ShapeDtypeStruct((2, 64, 128),
                                                                                                 jnp.float32)}}}}},
            "lm_head": {"kernel": jax.ShapeDtypeStruct((62, 10), jnp.float32)}}
  specs = sharding.param_partition_specs(shapes, mesh)
  assert specs["model"]["layers"]["layer"]["mlp"]["gate_proj"]["kernel"] == P(None, "fsdp")
  assert specs["lm_head"]["kernel"] == P()                                    # 62 % 4 != 0: not sharded
  assert sharding.logical_axes("model/layers/layer/mlp/gate_proj/kernel", 3) == ("layers", "embed", "mlp")
  fn = sharding.sharding_fn(mesh)
  assert fn(("model", "layers_0", "mlp", "up_proj", "kernel"), (64, 128)).spec == P("fsdp")


def test_state_shardings_mirror_params_in_the_optimizer(tiny):
  _, params = tiny
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4})
  abstract = jax.eval_shape(lambda p: fresh_state(p), params)
  sh = sharding.state_shardings(abstract, mesh)
  want = sharding.param_partition_specs(params, mesh)
  q = ("model", "layers_0", "self_attn", "q_proj", "kernel")
  get = lambda t: t[q[0]][q[1]][q[2]][q[3]][q[4]]
  assert get(sh.params).spec == get(want) == P("fsdp")
  adam = [leaf for leaf in jax.tree_util.tree_leaves_with_path(sh.opt_state)
          if tuple(getattr(k, "key", None) for k in leaf[0][-5:]) == q]
  assert len(adam) == 2 and all(s.spec == P("fsdp") for _, s in adam)        # mu and nu
  assert sh.step.spec == P() and sh.rng.spec == P()


# ----------------------------------------------------------------------------------------- batches

def test_batch_shardings_and_host_local_to_global():
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4})
  batch = {"input_ids": np.arange(16 * 5).reshape(16, 5), "position_ids": np.zeros((3, 16, 5), np.int32),
           "pair_weight": np.ones((4,), np.float32), "pixel_values": np.ones((8, 3), np.float32),
           "vision": {"pos_h": np.zeros((2, 4), np.int32)}, "prompt_len": 3}
  out = mesh_lib.host_local_to_global(batch, mesh)
  assert out["input_ids"].sharding.spec == P(("data", "fsdp"), None)
  assert out["position_ids"].sharding.spec == P(None, ("data", "fsdp"), None)
  assert out["pair_weight"].sharding.spec == P("data")                       # 4 rows: only data divides
  assert out["pixel_values"].sharding.spec == P() and out["vision"]["pos_h"].sharding.spec == P()
  assert out["prompt_len"] == 3
  np.testing.assert_array_equal(out["input_ids"], batch["input_ids"])
  assert out["input_ids"].addressable_shards[1].data.shape == (2, 5)


def test_host_local_to_global_two_processes(tmp_path):
  """Two processes × 4 CPU devices form one 8-device mesh; each passes its own 4 rows and both see
  the global 8-row array (rows ordered by process)."""
  script = tmp_path / "worker.py"
  script.write_text(textwrap.dedent("""
      import os, sys
      os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
      os.environ["JAX_PLATFORMS"] = "cpu"
      import jax, numpy as np
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
      from specs_jax.parallel import mesh as mesh_lib
      pid = int(sys.argv[1])
      mesh_lib.maybe_initialize_distributed({"distributed": {"coordinator_address": sys.argv[2],
                                                             "num_processes": 2, "process_id": pid}})
      mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4})
      local = {"input_ids": np.full((4, 3), pid, np.int32), "pixel_values": np.ones((2, 2), np.float32)}
      g = mesh_lib.host_local_to_global(local, mesh)
      total = jax.jit(lambda x: x.sum(0), out_shardings=mesh_lib.replicated(mesh))(g["input_ids"])
      print("RESULT", g["input_ids"].shape, int(np.asarray(total)[0]), flush=True)
  """))
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    addr = f"127.0.0.1:{s.getsockname()[1]}"
  env = {**os.environ, "PYTHONPATH": os.getcwd()}
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, str(script), str(i), addr], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env) for i in range(2)]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=120)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail("multi-process workers timed out")
  for out in outs:
    assert "RESULT (8, 3) 4" in out, out                                     # 4 rows of 0 + 4 rows of 1


# --------------------------------------------------------------------------- sharded vs unsharded

@pytest.mark.parametrize("axes", [{"data": 2, "fsdp": 4}, {"fsdp": 8}, {"fsdp": 4, "tensor": 2}],
                         ids=["data2_fsdp4", "fsdp8", "fsdp4_tensor2"])
def test_sharded_dpo_equals_unsharded(axes, tiny, ref_pairs, dpo_step, pad_id):
  """Must-show 4: three DPO steps on an 8-device mesh (params and Adam moments sharded by the
  rules, batch rows over data×fsdp, heads/MLP over tensor) match the unsharded run; the sharded
  step compiles once and keeps the requested shardings."""
  model, params = tiny
  mesh = mesh_lib.make_mesh(axes)
  batches_ = [collate(ref_pairs, idx, model, pad_id) for idx in ([0, 2, 3], [1, 4, 5], [0, 2, 3])]

  state = fresh_state(params)
  ref_metrics = []
  for b in batches_:
    state, m = dpo_step(state, b)
    ref_metrics.append(jax.device_get(m))

  sstate, shardings = steps.init_train_state(jax.tree.map(jnp.copy, params), OPT, jax.random.key(7), mesh=mesh)
  sstep = steps.make_dpo_step(model, OPT, micro_batches=2, chunk_size=32, mesh=mesh, state_sharding=shardings)
  before = steps.compile_counts()["dpo_step"]
  for b, want in zip(batches_, ref_metrics):
    sstate, m = sstep(sstate, mesh_lib.host_local_to_global(b, mesh))
    for k in ("loss", "loss/dpo", "loss/sft", "rewards/margins", "l2_grads"):
      np.testing.assert_allclose(m[k], want[k], rtol=2e-5, atol=1e-6, err_msg=k)
  assert steps.compile_counts()["dpo_step"] - before == 1

  q = sstate.params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]  # [64, 64]
  want = {"data2_fsdp4": (P("fsdp"), (16, 64)), "fsdp8": (P("fsdp"), (8, 64)),
          "fsdp4_tensor2": (P("fsdp", "tensor"), (16, 32))}[
              "fsdp4_tensor2" if axes.get("tensor") else ("fsdp8" if axes.get("fsdp") == 8 else "data2_fsdp4")]
  assert q.sharding.spec == want[0] and q.addressable_shards[0].data.shape == want[1]
  # Float tolerance: gradients agree to ~1e-6 relative (l2_grads above), but Adam divides each
  # gradient by its own RMS, which amplifies rounding for the few elements whose gradient is ~0,
  # so a handful of elements may differ by up to a few % of one update (lr = 2e-3).
  diffs = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel()
                          for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(sstate.params))])
  assert diffs.max() < 2e-4, diffs.max()
  assert np.mean(diffs < 1e-6) > 0.999, np.mean(diffs < 1e-6)
  assert int(sstate.step) == 3
