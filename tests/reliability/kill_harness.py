"""Kill harness: run one pipeline stage as a user does (`python -m specs_jax.main --stages=<stage>`),
SIGKILL (or SIGTERM) it at a seeded random point, run it again, and compare what it leaves with an
uninterrupted reference run of the same config.

    ref = run_reference(tmp / "ref", ("base", "zero_rl"), overrides)       # once, every stage
    t = run_trial(ref, tmp / "t0", "zero_rl", seed=0, overrides=overrides)  # copy inputs, kill, re-run
    assert t.ok, t.problems

A trial starts from a copy of the reference's upstream stage directories (their DONE files make
the pipeline skip them) and its config.json, so only the stage under test runs. Kill points:
  after_step  k metric lines (k seeded in [1, steps − 1], so compilation is done and the stage has
              not ended), then a seeded delay in [0, 1) step times: the kill lands in a step, in the
              asynchronous checkpoint write after it, or between steps;
  in_save     the first Orbax temporary directory (`<step>.orbax-checkpoint-tmp-<t>`) after k metric
              lines: the kill lands inside a checkpoint write;
  timed       a seeded time in (10%, 90%) of the reference stage's duration after the stage starts
              (distill and eval, which write no metrics and restart from scratch);
  sigterm     SIGTERM after k metric lines: the loop must save the step it reached and exit 0.
Before the re-run a bogus, newer temporary checkpoint directory with garbage inside is planted
(`plant_tmp=True`): restore must ignore it. Compared with the reference: the exported weights
(`<stage>/hf/model.safetensors`, bytes), metrics.jsonl (the last row of each step, timing fields
dropped), the GF points (cold-start stages), the pairs and records (distill), the per-item eval
results (eval, timing fields dropped).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

TRAINING = ("base", "zero_rl", "coldstart", "final_rl", "sft_coldstart", "sft_final")
UPSTREAM = {
    "base": (),
    "zero_rl": ("base",),
    "distill": ("base", "zero_rl"),
    "coldstart": ("base", "zero_rl", "distill"),
    "sft_coldstart": ("base", "zero_rl", "distill"),
    "final_rl": ("base", "zero_rl", "distill", "coldstart"),
    "sft_final": ("base", "zero_rl", "distill", "sft_coldstart"),
    "eval": ("base", "zero_rl", "distill", "coldstart", "final_rl", "sft_coldstart", "sft_final"),
}
GF_METHOD = {"coldstart": "dpo_sft", "sft_coldstart": "sft"}
TIMING_KEYS = {"step_time_s", "elapsed_s", "tokens_per_s", "flops_per_s", "mfu", "seconds"}


def is_timing(key: str) -> bool:
  return key in TIMING_KEYS or key.startswith("time/") or key.endswith("seconds")


def env() -> dict[str, str]:
  e = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  e.pop("XLA_FLAGS", None)  # one device, as `make demo` runs
  return e


def command(workdir: str | os.PathLike, stages: Sequence[str], overrides: Sequence[str]) -> list[str]:
  return [sys.executable, "-m", "specs_jax.main", "--config=configs/test.py", f"--workdir={workdir}",
          "--config.run.progress=False", f"--stages={','.join(stages)}", *overrides]


def run_main(workdir, stages: Sequence[str], overrides: Sequence[str], timeout: float = 1200
             ) -> subprocess.CompletedProcess:
  return subprocess.run(command(workdir, stages, overrides), cwd=ROOT, env=env(), capture_output=True, text=True,
                        timeout=timeout)


# ---------------------------------------------------------------------------------- reference

@dataclasses.dataclass
class Reference:
  """An uninterrupted run: its workdir, each stage's step count and seconds, median step time
  (compiled steps only)."""
  workdir: str
  steps: dict[str, int]
  seconds: dict[str, float]
  step_time: dict[str, float]
  overrides: tuple[str, ...]


def run_reference(workdir, stages: Sequence[str], overrides: Sequence[str]) -> Reference:
  out = run_main(workdir, stages, overrides)
  if out.returncode != 0:
    raise RuntimeError(f"reference run failed:\n{out.stderr[-4000:]}")
  summary = json.loads(open(os.path.join(workdir, "summary.json")).read())["stages"]
  step_time = {}
  for s in stages:
    rows = metric_rows(os.path.join(workdir, s))
    times = sorted(r["step_time_s"] for step, r in rows.items() if step > 1)   # step 1 includes compiling
    step_time[s] = times[len(times) // 2] if times else 0.0
  return Reference(str(workdir), {s: summary[s]["steps"] for s in stages},
                   {s: summary[s]["seconds"] for s in stages}, step_time, tuple(overrides))


# ---------------------------------------------------------------------------------- comparisons

def metric_rows(stage_dir: str, drop_timing: bool = False) -> dict[int, dict]:
  """metrics.jsonl as {step: the step's last row} (a resumed run re-logs the steps it replays)."""
  path = os.path.join(stage_dir, "metrics.jsonl")
  rows: dict[int, dict] = {}
  if not os.path.exists(path):
    return rows
  with open(path) as f:
    for line in f:
      r = json.loads(line)
      rows[r["step"]] = {k: v for k, v in r.items() if not (drop_timing and is_timing(k))}
  return rows


def line_count(path: str) -> int:
  try:
    with open(path, "rb") as f:
      return f.read().count(b"\n")
  except FileNotFoundError:
    return 0


def _strip_timing(x):
  if isinstance(x, dict):
    return {k: _strip_timing(v) for k, v in x.items() if not is_timing(k)}
  if isinstance(x, list):
    return [_strip_timing(v) for v in x]
  return x


def _files(d: str) -> dict[str, bytes]:
  out = {}
  for root, _, names in os.walk(d):
    for n in names:
      p = os.path.join(root, n)
      out[os.path.relpath(p, d)] = open(p, "rb").read()
  return out


def compare_stage(ref_dir: str, got_dir: str, stage: str) -> list[str]:
  """What differs between the reference's and a trial's outputs of `stage` ([] = nothing)."""
  problems = []
  r, g = os.path.join(ref_dir, stage), os.path.join(got_dir, stage)
  if not os.path.exists(os.path.join(g, "DONE")):
    return [f"{stage}/DONE missing"]
  if stage in TRAINING:
    a = open(os.path.join(r, "hf", "model.safetensors"), "rb").read()
    b = open(os.path.join(g, "hf", "model.safetensors"), "rb").read()
    if a != b:
      problems.append("exported weights differ")
    mr, mg = metric_rows(r, True), metric_rows(g, True)
    if sorted(mr) != sorted(mg):
      problems.append(f"metrics steps differ: {sorted(mr)} vs {sorted(mg)}")
    else:
      bad = [s for s in mr if mr[s] != mg[s]]
      if bad:
        keys = sorted(k for k in mr[bad[0]] if mr[bad[0]].get(k) != mg[bad[0]].get(k))
        problems.append(f"metrics differ at steps {bad} (first: {keys})")
  if stage in GF_METHOD:
    sr = json.load(open(os.path.join(ref_dir, "summary.json")))["gf"][GF_METHOD[stage]]
    sg = json.load(open(os.path.join(got_dir, "summary.json")))["gf"][GF_METHOD[stage]]
    if sr != sg:
      problems.append(f"GF points differ: {sr} vs {sg}")
  if stage == "distill":
    fr, fg = _files(r), _files(g)
    for name in sorted(set(fr) | set(fg)):
      if name in ("DONE", "lengths.png"):
        continue
      a, b = fr.get(name), fg.get(name)
      if a is not None and b is not None and name.endswith(".json"):   # stats.json holds timings
        a, b = _strip_timing(json.loads(a)), _strip_timing(json.loads(b))
      if a != b:
        problems.append(f"distill/{name} differs")
  if stage == "eval":
    for name, data in _files(r).items():
      if name.endswith(".json"):
        other = os.path.join(g, name)
        if not os.path.exists(other):
          problems.append(f"eval/{name} missing")
        elif _strip_timing(json.loads(data)) != _strip_timing(json.load(open(other))):
          problems.append(f"eval/{name} differs")
  return problems


# ---------------------------------------------------------------------------------------- trials

@dataclasses.dataclass
class Trial:
  stage: str
  seed: int
  mode: str
  target_lines: int | None = None
  delay_s: float = 0.0
  killed: bool = False            # the signal reached a running stage
  kill_s: float = 0.0             # seconds after the stage started
  lines_at_kill: int = 0
  ckpts_at_kill: list[int] = dataclasses.field(default_factory=list)
  tmp_at_kill: list[str] = dataclasses.field(default_factory=list)
  ckpts_after: list[int] = dataclasses.field(default_factory=list)   # finalised when the process had exited
  exit_code: int | None = None
  resumed_from: int | None = None
  rerun_s: float = 0.0
  problems: list[str] = dataclasses.field(default_factory=list)

  @property
  def ok(self) -> bool:
    return self.killed and not self.problems


def _ckpt_listing(stage_dir: str) -> tuple[list[int], list[str]]:
  d = os.path.join(stage_dir, "checkpoints")
  try:
    names = os.listdir(d)
  except FileNotFoundError:
    return [], []
  return sorted(int(n) for n in names if n.isdigit()), sorted(n for n in names if "orbax-checkpoint-tmp" in n)


def prepare(ref: Reference, workdir: str, stage: str) -> None:
  """The trial workdir: the reference's config.json and upstream stage directories."""
  os.makedirs(workdir, exist_ok=True)
  shutil.copy(os.path.join(ref.workdir, "config.json"), os.path.join(workdir, "config.json"))
  for up in UPSTREAM[stage]:
    shutil.copytree(os.path.join(ref.workdir, up), os.path.join(workdir, up))


MODES = ("after_step", "in_save", "sigterm")


def plant_tmp_checkpoint(stage_dir: str) -> str | None:
  """A bogus temporary checkpoint newer than every finalised one, named as Orbax 0.12 names a save in
  progress (`<step>.orbax-checkpoint-tmp`; older versions add `-<timestamp>`): what a cut save leaves."""
  done, _ = _ckpt_listing(stage_dir)
  if not done:
    return None
  d = os.path.join(stage_dir, "checkpoints", f"{done[-1] + 1}.orbax-checkpoint-tmp")
  os.makedirs(os.path.join(d, "state"), exist_ok=True)
  with open(os.path.join(d, "state", "garbage"), "w") as f:
    f.write("half written")
  return d


def run_trial(ref: Reference, workdir, stage: str, seed: int, mode: str | None = None, plant_tmp: bool = True,
              poll_s: float = 0.002, timeout: float = 1200) -> Trial:
  """One trial: prepare, run `stage`, interrupt it per `mode` (seeded), re-run, compare."""
  workdir = str(workdir)
  rng = random.Random(f"{stage}:{seed}")
  mode = mode or ("timed" if stage not in TRAINING else "after_step")
  t = Trial(stage, seed, mode)
  total = ref.steps[stage]
  if mode != "timed":
    if total < 2:
      raise ValueError(f"stage {stage} has {total} steps: nothing to interrupt between (raise its steps)")
    t.target_lines = rng.randint(1, total - 1)
    if mode == "after_step":
      t.delay_s = rng.random() * ref.step_time[stage]
  else:
    t.delay_s = (0.1 + 0.8 * rng.random()) * ref.seconds[stage]
  prepare(ref, workdir, stage)
  stage_dir = os.path.join(workdir, stage)
  metrics = os.path.join(stage_dir, "metrics.jsonl")
  err_path = os.path.join(workdir, "killed.stderr")
  with open(err_path, "w") as err:
    proc = subprocess.Popen(command(workdir, [stage], ref.overrides), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=err)
    t0 = time.time()
    started = None
    try:
      while proc.poll() is None and time.time() - t0 < timeout:
        if mode == "timed":
          if started is None and f"stage {stage}: running" in open(err_path).read():
            started = time.time()
          if started is not None and time.time() - started >= t.delay_s:
            break
        elif line_count(metrics) >= t.target_lines:
          if started is None:
            started = time.time()
          if mode == "in_save" and not _ckpt_listing(stage_dir)[1]:
            pass
          elif time.time() - started >= t.delay_s:
            break
        time.sleep(poll_s)
      if proc.poll() is None:
        t.lines_at_kill = line_count(metrics)
        t.ckpts_at_kill, t.tmp_at_kill = _ckpt_listing(stage_dir)
        proc.send_signal(signal.SIGTERM if mode == "sigterm" else signal.SIGKILL)
        t.killed = True
        t.kill_s = time.time() - t0
      t.exit_code = proc.wait(timeout=timeout)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  if not t.killed:
    t.problems.append(f"the stage ended (exit {t.exit_code}) before the interruption point")
    return t
  t.ckpts_after, _ = _ckpt_listing(stage_dir)
  if mode == "sigterm":
    reached = line_count(metrics)
    if t.exit_code != 0:
      t.problems.append(f"SIGTERM: exit code {t.exit_code}, not 0")
    elif not t.ckpts_after or t.ckpts_after[-1] != reached:
      t.problems.append(f"SIGTERM: the latest checkpoint is {t.ckpts_after[-1:] or None}, not the step reached "
                        f"({reached})")
  elif t.exit_code != -signal.SIGKILL:
    t.problems.append(f"exit code {t.exit_code} after SIGKILL")
  if os.path.exists(os.path.join(stage_dir, "DONE")):
    t.problems.append("DONE written by the interrupted run")
  if plant_tmp and stage in TRAINING:
    plant_tmp_checkpoint(stage_dir)
  t1 = time.time()
  out = run_main(workdir, [stage], ref.overrides, timeout=timeout)
  t.rerun_s = time.time() - t1
  if out.returncode != 0:
    t.problems.append(f"re-run failed (exit {out.returncode}): {out.stderr[-2000:]}")
    return t
  m = re.search(r"resumed at step (\d+)", out.stderr)
  t.resumed_from = int(m.group(1)) if m else None
  want = t.ckpts_after[-1] if t.ckpts_after else None
  if stage in TRAINING and t.resumed_from != want:
    t.problems.append(f"the re-run resumed from {t.resumed_from}, not from the latest finalised checkpoint {want}")
  t.problems += compare_stage(ref.workdir, workdir, stage)
  return t


def plan(stages: Sequence[str], n: int, seed: int = 0) -> list[tuple[str, int, str]]:
  """n (stage, seed, mode) trials, round-robin over `stages`; a training stage's mode rotates over
  MODES, shifted by one each round (so its trials differ); the others are "timed"."""
  out = []
  for i in range(n):
    k, rnd = i % len(stages), i // len(stages)
    mode = MODES[(k + rnd) % len(MODES)] if stages[k] in TRAINING else "timed"
    out.append((stages[k], seed + i, mode))
  return out
