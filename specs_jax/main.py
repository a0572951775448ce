r"""Runs the SPECS pipeline.

    python -m specs_jax.main --config=configs/demo.py --workdir=runs/demo
    python -m specs_jax.main --config=configs/demo.py --workdir=runs/demo --stages=coldstart,eval
    python -m specs_jax.main --config=configs/demo.py --workdir=runs/x --config.dpo.beta=0.5

Configs are Python files with `get_config()` (ml_collections); `--config.a.b=value` overrides a
field, and a field that does not exist is an error (the config is locked). Config files are Python
and run with your privileges: use only config files you trust.
"""

from __future__ import annotations

import logging

from absl import app, flags
from ml_collections import config_flags

from specs_jax import host

host.configure_malloc()  # before JAX starts its CPU backend (specs_jax/host.py)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file with get_config().", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, summary, report).")
_STAGES = flags.DEFINE_list("stages", None, "Stages to run (default: config.run.stages), in pipeline order.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  from specs_jax import pipeline
  from specs_jax.parallel import mesh

  mesh.maybe_initialize_distributed(_CONFIG.value)  # before anything touches the devices
  summary = pipeline.run(_CONFIG.value, _WORKDIR.value, _STAGES.value)
  print(pipeline.json.dumps(summary, indent=2, sort_keys=True))


if __name__ == "__main__":
  app.run(main)
