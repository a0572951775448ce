"""The SPECS stage graph: order, hand-off of checkpoints through the workdir, skip and resume.

    base (demo only) → zero_rl → distill → coldstart → final_rl → eval
                                         ↘ sft_coldstart → sft_final ↗   (the SFT baseline branch)

Each stage writes under `DIR/<stage>/` and ends by writing `DIR/<stage>/DONE` (JSON: seconds,
steps, stats); a stage with DONE is skipped on re-run; one without resumes from its own
checkpoints. `DIR/summary.json` is rewritten after every stage. `DIR/config.json` holds the
resolved config; a workdir made by a different config is refused (fields under `run.*` — stages,
progress display —, the per-host `distributed.*` and the `mesh` may differ). On several hosts, all share one
workdir (a shared filesystem) and process 0 writes the bookkeeping files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Sequence

import ml_collections

log = logging.getLogger(__name__)

STAGE_ORDER = ("base", "zero_rl", "distill", "coldstart", "final_rl", "sft_coldstart", "sft_final", "eval")
# Checkpoint names used in the summary and report for each policy-producing stage.
CHECKPOINT_OF = {"base": "base", "zero_rl": "zero", "coldstart": "coldstart", "final_rl": "final",
                 "sft_coldstart": "sft_coldstart", "sft_final": "sft_final"}


# Config sections that may differ between runs on one workdir: display options, the per-host
# multi-host settings (process_id differs between the hosts of one job), and the mesh (a preempted
# run may resume on another slice; Orbax restores into the new shardings; results then agree to
# float rounding instead of bit for bit).
FREE_SECTIONS = ("run", "distributed", "mesh")


def is_writer() -> bool:
  """Whether this process writes the workdir's bookkeeping files (config.json, summary.json, DONE):
  process 0 of a multi-host job, which shares one workdir; always True on one host."""
  import sys

  jax = sys.modules.get("jax")
  return jax is None or jax.process_index() == 0


class PipelineError(RuntimeError):
  """A stage cannot run: a missing input, a mismatched workdir, a failed stage."""


class NonFiniteError(PipelineError, FloatingPointError):
  """A stage stopped on non-finite numbers: `run.max_nonfinite_in_a_row` NaN / inf updates in a row,
  or a non-finite metric after an applied update. The state of the failing step is not saved; the
  stage's latest checkpoint is the last good one, and a re-run resumes from it."""


@dataclasses.dataclass(frozen=True)
class Workdir:
  root: str

  def stage(self, name: str) -> str:
    d = os.path.join(self.root, name)
    os.makedirs(d, exist_ok=True)
    return d

  def hf(self, name: str) -> str:
    return os.path.join(self.root, name, "hf")

  def done_file(self, name: str) -> str:
    return os.path.join(self.root, name, "DONE")

  def is_done(self, name: str) -> bool:
    return os.path.exists(self.done_file(name))

  def mark_done(self, name: str, info: dict) -> None:
    if not is_writer():
      return
    tmp = self.done_file(name) + ".tmp"
    with open(tmp, "w") as f:
      json.dump(info, f, indent=2)
    os.replace(tmp, self.done_file(name))

  def read_done(self, name: str) -> dict | None:
    if not self.is_done(name):
      return None
    with open(self.done_file(name)) as f:
      return json.load(f)


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort(sort_keys=True))


def check_or_write_config(config: ml_collections.ConfigDict, wd: Workdir) -> None:
  """Writes DIR/config.json, or refuses a workdir whose saved config differs outside `run.*`."""
  os.makedirs(wd.root, exist_ok=True)
  path = os.path.join(wd.root, "config.json")
  new = config_to_dict(config)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    strip = lambda d: {k: v for k, v in d.items() if k not in FREE_SECTIONS}  # noqa: E731
    if strip(old) != strip(new):
      diff = sorted(k for k in set(old) | set(new) if k not in FREE_SECTIONS and old.get(k) != new.get(k))
      raise PipelineError(f"workdir {wd.root} was made by a different config (sections differ: {diff}); "
                          "use a new --workdir or the original config")
  if not is_writer():
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(new, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _summary_path(wd: Workdir) -> str:
  return os.path.join(wd.root, "summary.json")


def load_summary(wd: Workdir) -> dict:
  if os.path.exists(_summary_path(wd)):
    with open(_summary_path(wd)) as f:
      return json.load(f)
  return {"stages": {}, "eval": {}, "gf": {}}


def write_summary(wd: Workdir, summary: dict) -> None:
  if not is_writer():
    return
  tmp = _summary_path(wd) + ".tmp"
  with open(tmp, "w") as f:
    json.dump(summary, f, indent=2, sort_keys=True)
  os.replace(tmp, _summary_path(wd))


def resolve_stages(config: ml_collections.ConfigDict, requested: Sequence[str] | None) -> list[str]:
  enabled = list(config.run.stages) if requested is None else list(requested)
  unknown = [s for s in enabled if s not in STAGE_ORDER]
  if unknown:
    raise PipelineError(f"unknown stage(s) {unknown}; stages are {list(STAGE_ORDER)}")
  return [s for s in STAGE_ORDER if s in enabled]


def stage_functions() -> dict[str, Callable]:
  from specs_jax.stages import base, coldstart, distill, evaluate, rl

  return {
      "base": base.run,
      "zero_rl": lambda c, wd: rl.run(c, wd, "zero_rl"),
      "distill": distill.run,
      "coldstart": lambda c, wd: coldstart.run(c, wd, "coldstart"),
      "final_rl": lambda c, wd: rl.run(c, wd, "final_rl"),
      "sft_coldstart": lambda c, wd: coldstart.run(c, wd, "sft_coldstart"),
      "sft_final": lambda c, wd: rl.run(c, wd, "sft_final"),
      "eval": evaluate.run,
  }


def run(config: ml_collections.ConfigDict, workdir: str, stages: Sequence[str] | None = None) -> dict:
  """Runs the requested stages in order; returns the summary."""
  from specs_jax.config_defaults import check_fields

  try:
    check_fields(config)  # a typo inside a config file; a typo in a --config.x override fails in main
  except ValueError as e:
    raise PipelineError(str(e)) from None
  wd = Workdir(os.path.abspath(workdir))
  check_or_write_config(config, wd)
  summary = load_summary(wd)
  fns = stage_functions()
  for name in resolve_stages(config, stages):
    done = wd.read_done(name)
    if done is not None:
      log.info("stage %s: done (%.1f s), skipped", name, done.get("seconds", 0.0))
      summary["stages"][name] = {"status": "done", "seconds": done.get("seconds", 0.0),
                                 "steps": done.get("steps", 0)}
      continue
    log.info("stage %s: running", name)
    summary["stages"][name] = {"status": "running", "seconds": 0.0, "steps": 0}
    write_summary(wd, summary)
    t0 = time.time()
    try:
      info = fns[name](config, wd) or {}
    except Exception:
      summary["stages"][name] = {"status": "failed", "seconds": time.time() - t0, "steps": 0}
      write_summary(wd, summary)
      raise
    info.setdefault("steps", 0)
    info["seconds"] = time.time() - t0 + float(info.get("resumed_seconds", 0.0))
    for key in ("eval", "gf"):
      if key in info:
        summary.setdefault(key, {}).update(info.pop(key))
    wd.mark_done(name, info)
    summary["stages"][name] = {"status": "done", "seconds": info["seconds"], "steps": info["steps"]}
    write_summary(wd, summary)
    log.info("stage %s: done in %.1f s", name, info["seconds"])
  if "eval" in summary["stages"] and summary["stages"]["eval"]["status"] == "done":
    from specs_jax.eval import report

    report.render_report(summary, wd.root)  # again, now that every stage's status is final
  return summary


def require(path: str, what: str, stage: str) -> str:
  """Returns `path`, or raises a PipelineError saying which stage needs which missing input."""
  if not os.path.exists(path):
    raise PipelineError(f"stage {stage} needs {what} at {path}, which does not exist; run the stage that "
                        "makes it first (see --stages) or point the config at it")
  return path
