#!/usr/bin/env bash
# Installs specs_jax on every worker of a TPU VM: the code, then a virtual environment with
# `pip install -e '.[tpu]'` (jax[tpu]); checks that JAX imports.
#
#   PROJECT=my-proj ZONE=us-east5-a TPU_NAME=specs tpu/setup.sh            # this checkout, copied over
#   tpu/setup.sh --repo-url=https://github.com/me/specs_jax.git --repo-ref=main  # or cloned on each worker
#
# Required: PROJECT, ZONE, TPU_NAME.
# Optional: REPO_URL (clone it on every worker instead of copying this checkout, and update it on
#   later runs; REPO_REF: the branch, tag or commit to check out, default the remote's HEAD);
#   PYTHON (default python3.11, installed with apt when missing: the project needs Python >= 3.11,
#   the Ubuntu 22.04 TPU images have 3.10); WORKER (default all).
# On the workers: the code in ~/specs_jax, the environment in ~/specs_jax_venv (REMOTE_DIR,
# REMOTE_VENV). Copying sends the working tree without .git, .venv and runs/.
# --dry-run (or DRY_RUN=1) prints every command instead of running it.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

parse_flags PROJECT ZONE TPU_NAME REPO_URL REPO_REF PYTHON WORKER -- "$@"
require PROJECT ZONE TPU_NAME
PYTHON="${PYTHON:-python3.11}"
dir="$(remote_path "$REMOTE_DIR")"
venv="$(remote_path "$REMOTE_VENV")"

if [[ -n "${REPO_URL:-}" ]]; then
  url="$(quote "$REPO_URL")"
  ref="$(quote "${REPO_REF:-HEAD}")"
  fetch="[ -d $dir/.git ] || git clone --quiet $url $dir; \
git -C $dir fetch --quiet origin $ref && git -C $dir checkout --quiet --detach FETCH_HEAD"
else
  tarball="${TMPDIR:-/tmp}/specs_jax_src_${TPU_NAME}.tgz"
  run tar -czf "$tarball" -C "$REPO_ROOT" --exclude=./.git --exclude=./.venv --exclude=./runs \
    --exclude=__pycache__ --exclude=.pytest_cache .
  tpu_scp "$tarball" specs_jax_src.tgz
  fetch="mkdir -p $dir && tar -xzf \$HOME/specs_jax_src.tgz -C $dir && rm \$HOME/specs_jax_src.tgz"
fi

py="$(quote "$PYTHON")"
tpu_ssh "set -euo pipefail; \
if ! command -v $py >/dev/null; then sudo apt-get update -qq && sudo apt-get install -y -qq $py $py-venv; fi; \
$fetch; \
[ -x $venv/bin/python ] || $py -m venv $venv; \
$venv/bin/pip install -q --upgrade pip; \
$venv/bin/pip install -q -e $dir'[tpu]'; \
$venv/bin/python -c 'import jax, specs_jax; print(\"jax\", jax.__version__, \"imports\")'; echo \"on \$(hostname)\""
