"""colab/specs_jax_demo.ipynb runs top to bottom in a headless kernel against this checkout (configs/test.py,
≈2 min on 2 cores): it installs nothing here, runs every stage, and shows the report and the plots."""

import json
import os
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
NOTEBOOK = os.path.join(ROOT, "colab", "specs_jax_demo.ipynb")


def test_notebook_is_stored_without_outputs():
  import nbformat

  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code)
  assert nb.metadata.kernelspec.name == "python3"


@pytest.mark.slow
def test_notebook_runs_the_pipeline_and_shows_report_and_plots(tmp_path):
  import nbformat
  from nbclient import NotebookClient

  workdir = tmp_path / "run"
  nb = nbformat.read(NOTEBOOK, as_version=4)
  # The kernel inherits this environment: one CPU device as `make demo` runs (conftest asks for 8 fake
  # devices), this checkout as the source, a fresh run directory.
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "SPECS_JAX_REPO", "SPECS_JAX_CONFIG")}
  env.update(SPECS_JAX_SRC=ROOT, SPECS_JAX_WORKDIR=str(workdir), JAX_PLATFORMS="cpu")
  # "python3" is ipykernel's own spec; jupyter_client starts it with this interpreter (sys.executable).
  client = NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(tmp_path)}})
  client.execute(env=env)

  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert f"python: {sys.executable} " in text  # the kernel runs in this environment (.venv)
  assert f"specs_jax is installed from {ROOT}" in text  # nothing was pip-installed
  for stage in ("base", "zero_rl", "distill", "coldstart", "final_rl", "sft_coldstart", "sft_final", "eval"):
    assert f"stage {stage}: done" in text, stage
  markdown = [o.data["text/markdown"] for o in outputs if o.output_type == "display_data" and "text/markdown" in o.data]
  assert len(markdown) == 1 and markdown[0].startswith("# SPECS run report")
  pngs = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
  assert len(pngs) == len(list((workdir / "plots").glob("*.png"))) >= 3
  summary = json.loads((workdir / "summary.json").read_text())
  assert all(s["status"] == "done" for s in summary["stages"].values())
