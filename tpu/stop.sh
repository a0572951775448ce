#!/usr/bin/env bash
# Stops a run started by launch.sh on every worker: SIGTERM to the recorded pid, so each stage saves a
# checkpoint and the run resumes from it when launched again with the same WORKDIR.
#
#   tpu/stop.sh --run-name=specs_7b
#
# Required: PROJECT, ZONE, TPU_NAME, RUN_NAME. Optional: WORKER (default all).
# --dry-run (or DRY_RUN=1) prints the gcloud command instead of running it.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

parse_flags PROJECT ZONE TPU_NAME RUN_NAME WORKER -- "$@"
require PROJECT ZONE TPU_NAME RUN_NAME
pid="$(remote_path "$REMOTE_LOG_DIR")/$(quote "$RUN_NAME").pid"
tpu_ssh "if [ -f $pid ] && kill -0 \"\$(cat $pid)\" 2>/dev/null; then kill -TERM \"\$(cat $pid)\"; \
echo \"\$(hostname): sent SIGTERM to \$(cat $pid)\"; else echo \"\$(hostname): no running process for $pid\"; fi"
