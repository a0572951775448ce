"""The whole pipeline on configs/test.py, as a user runs it (`python -m specs_jax.main`), plus the
stage-graph rules: skip finished stages, refuse a workdir of another config, clear errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _main(workdir, *extra, timeout=900, devices=1):
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one device, as `make demo` runs
  if devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  cmd = [sys.executable, "-m", "specs_jax.main", "--config=configs/test.py", f"--workdir={workdir}",
         "--config.run.progress=False", *extra]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  wd = tmp_path_factory.mktemp("pipeline")
  out = _main(wd)
  assert out.returncode == 0, out.stderr[-4000:]
  return wd, out


def test_every_stage_runs_and_writes_the_documented_outputs(finished_run):
  wd, _ = finished_run
  summary = json.loads((wd / "summary.json").read_text())
  stages = ["base", "zero_rl", "distill", "coldstart", "final_rl", "sft_coldstart", "sft_final", "eval"]
  assert [s for s in stages if summary["stages"][s]["status"] == "done"] == stages
  assert set(summary["eval"]) == {"base", "zero", "coldstart", "final", "sft_coldstart", "sft_final"}
  for ckpt in summary["eval"].values():
    assert set(ckpt) == {"id", "ood_format", "ood_task"}
    for split in ckpt.values():
      assert 0.0 <= split["accuracy"] <= 1.0 and 0.0 <= split["format_rate"] <= 1.0 and split["n"] == 8
  assert set(summary["gf"]) == {"dpo_sft", "sft"}
  for rows in summary["gf"].values():
    assert rows[0][0] == 0 and all(len(r) == 4 for r in rows)
  for stage in ("base", "zero_rl", "coldstart", "final_rl", "sft_coldstart", "sft_final"):
    assert (wd / stage / "hf" / "model.safetensors").exists(), stage
    assert (wd / stage / "hf" / "tokenizer.json").exists(), stage
    assert (wd / stage / "metrics.jsonl").read_text().strip(), stage
  assert (wd / "distill" / "pairs.jsonl").exists() and (wd / "distill" / "stats.json").exists()
  assert (wd / "report.md").read_text().startswith("# SPECS run report")
  assert (wd / "plots" / "grpo_curves.png").exists()
  assert json.loads((wd / "config.json").read_text())["seed"] == 0


def test_export_loads_in_transformers(finished_run):
  import torch
  from transformers import Qwen2_5_VLForConditionalGeneration

  wd, _ = finished_run
  m = Qwen2_5_VLForConditionalGeneration.from_pretrained(wd / "final_rl" / "hf", dtype=torch.float32)
  assert m.config.text_config.hidden_size == 48


def test_rerun_skips_finished_stages(finished_run):
  wd, _ = finished_run
  before = (wd / "base" / "DONE").read_text()
  out = _main(wd, "--stages=base,eval", timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "stage base: done" in out.stderr and "skipped" in out.stderr
  assert (wd / "base" / "DONE").read_text() == before


def test_refuses_a_workdir_of_another_config(finished_run):
  wd, _ = finished_run
  out = _main(wd, "--config.coldstart.beta=0.5", "--stages=eval", timeout=300)
  assert out.returncode != 0 and "different config" in out.stderr


def test_config_typo_and_unknown_stage_are_errors(tmp_path):
  out = _main(tmp_path / "a", "--config.coldstart.betta=0.5", timeout=120)
  assert out.returncode != 0 and "betta" in out.stderr
  out = _main(tmp_path / "b", "--stages=coldstart,warmup", timeout=120)
  assert out.returncode != 0 and "unknown stage" in out.stderr


def test_missing_input_is_a_clear_error(tmp_path):
  out = _main(tmp_path / "c", "--stages=coldstart", timeout=300)
  assert out.returncode != 0
  assert "stage coldstart needs" in out.stderr and "does not exist" in out.stderr
  summary = json.loads((tmp_path / "c" / "summary.json").read_text())
  assert summary["stages"]["coldstart"]["status"] == "failed"


def test_sigterm_mid_stage_then_resume_equals_uninterrupted(finished_run, tmp_path):
  """SIGTERM in the middle of the base stage (the train loop saves and exits cleanly), re-run:
  the stage resumes from its checkpoint and ends with the same weights, byte for byte, as the
  uninterrupted run of the same config."""
  import signal
  import time

  wd_ref, _ = finished_run
  wd = tmp_path / "interrupted"
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  cmd = [sys.executable, "-m", "specs_jax.main", "--config=configs/test.py", f"--workdir={wd}",
         "--config.run.progress=False", "--stages=base"]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  metrics = wd / "base" / "metrics.jsonl"
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 60:
      proc.send_signal(signal.SIGTERM)
      break
    time.sleep(0.2)
  proc.wait(timeout=300)
  assert proc.returncode == 0, proc.stderr.read()[-3000:]
  steps_before = len(metrics.read_text().splitlines())
  assert 60 <= steps_before < 150 and not (wd / "base" / "DONE").exists()
  out = _main(wd, "--stages=base", timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed at step" in out.stderr
  a = (wd / "base" / "hf" / "model.safetensors").read_bytes()
  b = (wd_ref / "base" / "hf" / "model.safetensors").read_bytes()
  assert a == b


def test_grpo_stage_sigterm_and_resume_equals_uninterrupted(finished_run, tmp_path):
  """The same for a GRPO stage (zero_rl, 6 steps): prompts and sampling keys are functions of the
  step, so the resumed run samples and updates exactly as the uninterrupted one."""
  import shutil
  import signal
  import time

  wd_ref, _ = finished_run
  extra = ["--stages=zero_rl", "--config.zero_rl.steps=6", "--config.zero_rl.checkpoint_every=1"]
  runs = {}
  for name in ("straight", "interrupted"):
    wd = tmp_path / name
    shutil.copytree(wd_ref / "base", wd / "base")  # the same base model, no config.json yet
    if name == "straight":
      out = _main(wd, *extra, timeout=600)
      assert out.returncode == 0, out.stderr[-3000:]
    else:
      env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
      env.pop("XLA_FLAGS", None)
      cmd = [sys.executable, "-m", "specs_jax.main", "--config=configs/test.py", f"--workdir={wd}",
             "--config.run.progress=False", *extra]
      proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
      metrics = wd / "zero_rl" / "metrics.jsonl"
      deadline = time.time() + 600
      while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
          proc.send_signal(signal.SIGTERM)
          break
        time.sleep(0.1)
      proc.wait(timeout=300)
      assert proc.returncode == 0, proc.stderr.read()[-3000:]
      assert len(metrics.read_text().splitlines()) < 6 and not (wd / "zero_rl" / "DONE").exists()
      out = _main(wd, *extra, timeout=600)
      assert out.returncode == 0 and "resumed at step" in out.stderr, out.stderr[-3000:]
    runs[name] = (wd / "zero_rl" / "hf" / "model.safetensors").read_bytes()
  assert runs["straight"] == runs["interrupted"]


def test_stages_on_an_8_device_mesh_match_one_device(finished_run, tmp_path):
  """config.mesh wired through the stages: a GRPO stage (sampler, rewards, update) and the DPO+SFT
  cold start (reference pass, DPO steps, GF hook) run on 8 fake devices as data=2 × fsdp=4 and on
  one device, from the same inputs, and agree: the same rollouts, and the same cold-start weights up
  to float rounding. (The test config's briefly trained base earns no reward, so its GRPO updates
  are zero; the sharded GRPO update itself is compared in tests/training/test_grpo_step.py.)"""
  import shutil

  from safetensors.numpy import load_file

  wd_ref, _ = finished_run
  extra = ["--stages=zero_rl,coldstart", "--config.zero_rl.steps=3", "--config.zero_rl.group_size=4",
           "--config.coldstart.epochs=6"]
  for name, devices in (("one", 1), ("mesh", 8)):
    for stage in ("base", "distill"):
      shutil.copytree(wd_ref / stage, tmp_path / name / stage)
    out = _main(tmp_path / name, *extra, f"--config.mesh.data={2 if devices > 1 else 1}", devices=devices,
                timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
  assert "mesh {'data': 2, 'fsdp': 4, 'tensor': 1} over 8 devices" in out.stderr

  def rollouts(name):
    rows = [json.loads(line) for line in (tmp_path / name / "zero_rl" / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k.startswith("rollout/")} for r in rows]
  one, mesh = rollouts("one"), rollouts("mesh")
  assert len(one) == len(mesh) == 3
  for a, b in zip(one, mesh):
    assert a == pytest.approx(b, rel=1e-5)

  base = load_file(wd_ref / "base" / "hf" / "model.safetensors")
  ref = load_file(tmp_path / "one" / "coldstart" / "hf" / "model.safetensors")
  got = load_file(tmp_path / "mesh" / "coldstart" / "hf" / "model.safetensors")
  assert ref.keys() == got.keys()
  worst = max(float(np.max(np.abs(got[k] - ref[k]))) for k in ref)
  moved = max(float(np.max(np.abs(ref[k] - base[k]))) for k in ref)
  assert moved > 1e-3, moved  # the cold start trained: not a comparison of two copies of base
  assert worst < 1e-4 * max(1.0, moved), (worst, moved)
