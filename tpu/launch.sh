#!/usr/bin/env bash
# Starts `python -m specs_jax.main --config=CONFIG --workdir=WORKDIR` on every worker, in the
# background (it survives the ssh session), with its output in ~/specs_jax_logs/RUN_NAME.log on each.
#
#   tpu/launch.sh --config=configs/qwen2_5_vl_7b.py:v5p-8,data_root=/home/me/data \
#       --workdir=/mnt/specs_jax/runs/specs_7b -- --config.model.hf_dir=/home/me/ckpt/Qwen2.5-VL-7B-Instruct
#
# Required: PROJECT, ZONE, TPU_NAME, CONFIG (path inside the checkout, with its :arg), WORKDIR (on a
#   pod slice, a path every host shares: see mount.sh). Arguments after `--` go to specs_jax.main
#   (--config.x.y=... overrides, --stages=...).
# Optional: RUN_NAME (the log's name; default the WORKDIR's last component); WORKER (default all:
#   every host of a slice must run the same command, JAX connects them).
# Follow the log with tpu/logs.sh, stop the run with tpu/stop.sh.
# --dry-run (or DRY_RUN=1) prints the gcloud command instead of running it.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

parse_flags PROJECT ZONE TPU_NAME CONFIG WORKDIR RUN_NAME WORKER -- "$@"
require PROJECT ZONE TPU_NAME CONFIG WORKDIR
RUN_NAME="${RUN_NAME:-$(basename "$WORKDIR")}"
logs="$(remote_path "$REMOTE_LOG_DIR")"
log="$logs/$(quote "$RUN_NAME").log"
main="$(remote_path "$REMOTE_VENV/bin/python") $(quote -m specs_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" \
  ${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"})"

# Start main from the checkout (so CONFIG's relative path resolves) and record its pid for stop.sh.
tpu_ssh "set -euo pipefail; mkdir -p $logs; cd $(remote_path "$REMOTE_DIR"); \
HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false nohup $main > $log 2>&1 < /dev/null & \
echo \$! > $logs/$(quote "$RUN_NAME").pid; echo \"\$(hostname): started pid \$!, log $log\""
