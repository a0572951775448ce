#!/usr/bin/env bash
# Copies data and checkpoints to every worker, or a run's outputs back to Cloud Storage.
#
#   tpu/copy.sh --src=gs://my-bucket/data --dest=/home/me/data                 # bucket -> every worker
#   tpu/copy.sh --src=gs://my-bucket/Qwen2.5-VL-7B-Instruct --dest=ckpt/Qwen2.5-VL-7B-Instruct
#   tpu/copy.sh --src=./local/dir --dest=data/dir                              # this machine -> every worker
#   tpu/copy.sh --src=runs/specs_7b --dest=gs://my-bucket/runs/specs_7b        # worker 0 -> bucket
#
# Which way is decided by the two paths: SRC gs://... is pulled by every worker (gcloud storage rsync,
# so a repeated copy only sends what changed); a DEST gs://... is pushed from WORKER (default 0;
# SRC is a path on the worker); otherwise SRC is a local file or directory sent with scp.
# Relative remote paths are under the remote home directory.
# Required: PROJECT, ZONE, TPU_NAME, SRC, DEST. Optional: WORKER (default all; 0 for pushes).
# --dry-run (or DRY_RUN=1) prints the gcloud commands instead of running them.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

parse_flags PROJECT ZONE TPU_NAME SRC DEST WORKER -- "$@"
require PROJECT ZONE TPU_NAME SRC DEST

if [[ "$SRC" == gs://* && "$DEST" == gs://* ]]; then
  die "SRC and DEST are both gs:// paths: copy between buckets with gcloud storage rsync directly"
elif [[ "$SRC" == gs://* ]]; then
  tpu_ssh "set -euo pipefail; mkdir -p $(quote "$DEST") && \
gcloud storage rsync --recursive $(quote "$SRC") $(quote "$DEST")"
elif [[ "$DEST" == gs://* ]]; then
  WORKER="${WORKER:-0}"
  tpu_ssh "set -euo pipefail; gcloud storage rsync --recursive $(quote "$SRC") $(quote "$DEST")"
else
  [[ -e "$SRC" || "$DRY_RUN" == 1 ]] || die "SRC '$SRC' does not exist on this machine"
  tpu_ssh "mkdir -p $(quote "$(dirname "$DEST")")"
  tpu_scp "$SRC" "$DEST"
fi
