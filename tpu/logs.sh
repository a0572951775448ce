#!/usr/bin/env bash
# Shows a run's log from one worker (default worker 0, the process that writes metrics and reports).
#
#   tpu/logs.sh --run-name=specs_7b              # follow (tail -F) until Ctrl-C
#   tpu/logs.sh --run-name=specs_7b --lines=200 --no-follow --worker=3
#
# Required: PROJECT, ZONE, TPU_NAME, RUN_NAME (as given to launch.sh: the WORKDIR's last component).
# Optional: WORKER (default 0; "all" prints every worker's), LINES (default 100), NO_FOLLOW=1.
# --dry-run (or DRY_RUN=1) prints the gcloud command instead of running it.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

parse_flags PROJECT ZONE TPU_NAME RUN_NAME WORKER LINES NO_FOLLOW -- "$@"
require PROJECT ZONE TPU_NAME RUN_NAME
WORKER="${WORKER:-0}"
[[ "${LINES:-100}" =~ ^[0-9]+$ ]] || die "LINES must be a number, got '$LINES'"
follow="-F"
[[ "${NO_FOLLOW:-0}" == 1 ]] && follow=""
tpu_ssh "tail -n ${LINES:-100} $follow $(remote_path "$REMOTE_LOG_DIR")/$(quote "$RUN_NAME").log"
