"""Config files: each loads as `main` loads it, has exactly the schema's fields, and the real-model
configs carry the paper's numbers (RECIPE.md §1) and a mesh that fits each accelerator preset."""

import glob
import importlib.util
import json
import os
import sys

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from specs_jax.config_defaults import base_config
from specs_jax.parallel import mesh as mesh_lib

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
REAL = ["qwen2_5_vl_7b", "qwen2_5_vl_3b"]
# ml_collections' config file loader still calls the deprecated importlib load_module().
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")


def load(name: str):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
  spec.loader.exec_module(module)
  return module


def flat_keys(c: ml_collections.ConfigDict, prefix: str = "") -> set[str]:
  out = set()
  for k, v in c.items():
    out |= flat_keys(v, f"{prefix}{k}.") if isinstance(v, ml_collections.ConfigDict) else {prefix + k}
  return out


def parse_cli(*argv: str) -> ml_collections.ConfigDict:
  """The config as `python -m specs_jax.main` sees it (config_flags, locked)."""
  fv = flags.FlagValues()
  argv = ["main", *argv]  # config_flags finds the `--config.a.b` override flags in sys_argv at definition
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  return holder.value


PRESETS = ["v5p-8", "v4-8", "v4-32", "v5p-64", "v6e-8", "8xh100"]


def test_there_are_configs_and_presets():
  assert {os.path.basename(p) for p in CONFIGS} >= {"demo.py", "test.py", "qwen2_5_vl_7b.py", "qwen2_5_vl_3b.py"}
  assert sorted(load("qwen2_5_vl_7b").PRESETS) == sorted(PRESETS)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_loads_with_exactly_the_schema_fields(path):
  c = parse_cli(f"--config={path}")
  assert isinstance(c, ml_collections.ConfigDict) and c.is_locked
  # a field the schema does not declare would be read by no stage: a silent typo
  assert flat_keys(c) == flat_keys(base_config())
  json.loads(c.to_json_best_effort())  # serialisable: it becomes DIR/config.json
  with pytest.raises(AttributeError):
    c.coldstart.betta = 0.5


@pytest.mark.parametrize("name", REAL)
def test_paper_hyperparameters(name):
  c = load(name).get_config()
  for rl in (c.zero_rl, c.final_rl):
    assert rl.group_size == 8
    assert rl.prompts_per_step == 128
    assert rl.learning_rate == 1e-6
    assert rl.kl_coef == 0.0
    assert rl.agg == "token-mean"
    assert rl.max_response_len == 10240
  assert c.final_rl.steps == 800
  cs = c.coldstart
  assert (cs.batch_size, cs.learning_rate, cs.beta, cs.sft_weight, cs.max_length, cs.epochs) == \
      (64, 1e-6, 0.1, 1.0, 16384, 1)
  sft = c.sft_coldstart
  assert (sft.batch_size, sft.learning_rate, sft.max_length, sft.epochs) == (64, 1e-6, 16384, 1)
  assert c.distill.max_pairs == 9000
  assert (c.model.dtype, c.model.param_dtype, c.model.remat, c.model.scan_layers) == \
      ("bfloat16", "float32", "full", True)
  assert c.model.hf_dir == ""  # a required override, documented in the module docstring
  assert "--config.model.hf_dir=" in load(name).__doc__
  assert c.data.source == "files"
  assert c.data.rl_prompts == ("/data/ViRL39K/39Krelease.parquet", "/data/Orsta-Data-47k")


@pytest.mark.parametrize("name", REAL)
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_mesh_fills_the_slice_and_micro_batches_split_evenly(name, preset):
  m7 = load("qwen2_5_vl_7b")
  spec = m7.PRESETS[preset]
  model = load(name).QWEN2_5_VL_3B if name == "qwen2_5_vl_3b" else m7.QWEN2_5_VL_7B
  if m7.MEASURED_ROWS_PER_DEVICE[model.params][preset] is None:  # docs/scaling.md: does not fit
    with pytest.raises(ValueError, match="larger slice"):
      load(name).get_config(preset)
    return
  c = load(name).get_config(preset)
  sizes = mesh_lib.mesh_shape(c.mesh.to_dict(), spec.devices)
  assert sizes["data"] * sizes["fsdp"] * sizes["tensor"] == spec.devices
  assert c.model.attention_impl == ("cudnn" if preset == "8xh100" else "splash")
  groups = sizes["data"] * sizes["fsdp"]  # devices that take different rows
  for units, m in ((c.final_rl.prompts_per_step * c.final_rl.group_size, c.final_rl.micro_batches),
                   (2 * c.coldstart.batch_size, c.coldstart.micro_batches),
                   (c.sft_coldstart.batch_size, c.sft_coldstart.micro_batches)):
    assert m >= 1 and units % m == 0 and (units // m) % groups == 0, (units, m, groups)
    assert units // m // groups == 1  # the measured-to-fit one row per device per micro-batch
  assert c.zero_rl.micro_batches == c.final_rl.micro_batches


def test_micro_batches_follow_the_measured_plan():
  m7 = load("qwen2_5_vl_7b")
  # 7B on v5p-8 (4 devices, 1 row each, docs/scaling.md: DPO 77.5 GB, GRPO 71.4 GB as built):
  # GRPO 1,024 rows / 4 = 256; DPO 64 pairs = 128 rows / 4 = 32; SFT 64 rows / 4 = 16.
  plan = m7.plan_micro_batches(m7.QWEN2_5_VL_7B, "v5p-8", m7.PRESETS["v5p-8"], grpo_rows=1024, dpo_pairs=64)
  assert plan == m7.MemoryPlan(tensor=1, grpo=256, dpo=32, sft=16)
  plan = m7.plan_micro_batches(m7.QWEN2_5_VL_7B, "8xh100", m7.PRESETS["8xh100"], grpo_rows=1024, dpo_pairs=64)
  assert plan == m7.MemoryPlan(tensor=1, grpo=128, dpo=16, sft=8)
  with pytest.raises(ValueError, match=r"v6e-8: the 7B needs 42 GB .*docs/scaling.md"):
    m7.plan_micro_batches(m7.QWEN2_5_VL_7B, "v6e-8", m7.PRESETS["v6e-8"], grpo_rows=1024, dpo_pairs=64)


@pytest.mark.parametrize("name", REAL)
def test_arg_sets_data_root_and_unknown_presets_or_keys_are_clear_errors(name):
  c = load(name).get_config("8xh100,data_root=/mnt/d/")
  assert c.data.rl_prompts == ("/mnt/d/ViRL39K/39Krelease.parquet", "/mnt/d/Orsta-Data-47k")
  assert load(name).get_config("data_root=/x").model.attention_impl == "splash"  # default preset v5p-8
  with pytest.raises(ValueError, match=r"unknown accelerator preset 'v9-8'.*known: .*v5p-8"):
    load(name).get_config("v9-8")
  with pytest.raises(ValueError, match="unknown config arg 'root'"):
    load(name).get_config("v5p-8,root=/x")


def test_command_line_overrides_of_a_real_config():
  path = os.path.join(ROOT, "configs", "qwen2_5_vl_7b.py")
  c = parse_cli(f"--config={path}:8xh100", "--config.model.hf_dir=/ckpt/Qwen2.5-VL-7B-Instruct",
                "--config.data.rl_prompts=('/d/a.parquet', '/d/orsta')", "--config.final_rl.micro_batches=64")
  assert c.model.hf_dir == "/ckpt/Qwen2.5-VL-7B-Instruct"
  assert c.data.rl_prompts == ("/d/a.parquet", "/d/orsta")
  assert c.final_rl.micro_batches == 64 and c.mesh.tensor == 1 and c.coldstart.micro_batches == 16
  with pytest.raises(AttributeError, match="hf_dirr"):  # main exits with the message
    parse_cli(f"--config={path}", "--config.model.hf_dirr=/x")


def test_rl_examples_reads_every_listed_file_and_requires_some(tmp_path):
  from specs_jax.stages import common

  a, b = tmp_path / "virl.jsonl", tmp_path / "more.jsonl"
  a.write_text(json.dumps({"question": "What is 1+1?", "answer": "\\boxed{2}", "qid": "a"}) + "\n")
  b.write_text(json.dumps({"question": "What is 2+2?", "answer": "4", "qid": "b"}) + "\n")
  c = base_config()
  c.data.source = "files"
  c.data.rl_prompts = (str(a), str(b))
  assert [e.gold for e in common.rl_examples(c, "train", 10)] == ["2", "4"]
  c.data.rl_prompts = ()
  with pytest.raises(ValueError, match="needs data.rl_prompts"):
    common.rl_examples(c, "train", 10)


@pytest.mark.parametrize("name", REAL)
def test_rollout_is_sampled_in_calls_that_fit(name):
  c = load(name).get_config("v5p-8")
  assert c.zero_rl.prompts_per_call == c.final_rl.prompts_per_call == 32
  assert c.final_rl.prompts_per_step % c.final_rl.prompts_per_call == 0  # one compiled sampler shape
