"""The stage helpers that place work on the mesh and filter the cold-start data (in-process, on the
8 fake CPU devices of conftest)."""

import types

import jax
import numpy as np
import pytest

from specs_jax.config_defaults import base_config
from specs_jax.parallel import mesh as mesh_lib
from specs_jax.pipeline import PipelineError
from specs_jax.stages import coldstart, common


def test_stage_mesh_follows_config_mesh():
  c = base_config()
  c.mesh.data = 2
  mesh = common.stage_mesh(c)
  assert jax.device_count() == 8 and dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  c.mesh.data, c.mesh.fsdp = 3, 1
  with pytest.raises(ValueError, match="needs 3 devices but 8 are available"):
    common.stage_mesh(c)


def test_global_batch_to_mesh_places_rows_and_replicates_vision():
  mesh = common.stage_mesh(base_config())
  rng = np.random.default_rng(0)
  batch = {"input_ids": rng.integers(0, 9, (8, 5)), "position_ids": rng.integers(0, 9, (3, 8, 5)),
           "pixel_values": rng.standard_normal((12, 6)).astype(np.float32), "prompt_len": 3}
  out = common.to_mesh(batch, mesh)
  assert out["prompt_len"] == 3
  for k in ("input_ids", "position_ids", "pixel_values"):
    np.testing.assert_array_equal(np.asarray(out[k]), batch[k])
    assert out[k].sharding == mesh_lib.batch_shardings(batch, mesh)[k]
  assert out["input_ids"].sharding.spec[0] == ("data", "fsdp")
  assert out["position_ids"].sharding.spec[1] == ("data", "fsdp")
  assert out["pixel_values"].sharding.is_fully_replicated
  assert common.to_mesh(batch, None) is batch


def test_rows_sharding_only_when_the_batch_axes_divide():
  c = base_config()
  c.mesh.data = 2
  mesh = common.stage_mesh(c)
  assert common.rows_sharding(None, 8) is None
  assert common.rows_sharding(mesh, 3) is None
  assert common.rows_sharding(mesh, 2).spec[0] == "data"
  assert common.rows_sharding(mesh, 16).spec[0] == ("data", "fsdp")


def _pair(prompt_len):
  return types.SimpleNamespace(prompt=types.SimpleNamespace(input_ids=np.zeros(prompt_len, np.int32)))


def test_cold_start_drops_and_counts_pairs_over_max_length(caplog):
  encoded = [_pair(10), _pair(30), _pair(10)]
  kept, comp, dropped = coldstart.drop_too_long(encoded, [5, 5, 11], max_length=20, stage="coldstart")
  assert kept == [encoded[0]] and comp == [5] and dropped == 2
  assert "2 of 3 pairs are longer than max_length=20" in caplog.text
  kept, _, dropped = coldstart.drop_too_long(encoded, [5, 5, 10], max_length=40, stage="coldstart")
  assert len(kept) == 3 and dropped == 0
  with pytest.raises(PipelineError, match=r"all 3 pairs are longer than max_length=4 .*config.coldstart.max_length"):
    coldstart.drop_too_long(encoded, [5, 5, 5], max_length=4, stage="coldstart")


def test_splash_stages_set_the_context_mesh():
  c = base_config()
  with jax.set_mesh(jax.make_mesh((8,), ("x",))):  # restores this thread's mesh afterwards
    mesh = common.stage_mesh(c)
    assert jax.sharding.get_abstract_mesh().axis_names == ("x",)  # xla attention: left alone
    c.model.attention_impl = "splash"
    mesh = common.stage_mesh(c)
    assert jax.sharding.get_abstract_mesh() == mesh.abstract_mesh
