#!/usr/bin/env bash
# Deletes the TPU VM (and with QUEUED=1 the queued resource that made it). Everything on its disks is
# lost: copy results out first (tpu/copy.sh --src=RUN_DIR --dest=gs://...).
#
#   PROJECT=my-proj ZONE=us-east5-a TPU_NAME=specs tpu/delete.sh
#
# Required: PROJECT, ZONE, TPU_NAME. Optional: QUEUED=1 (--queued): delete the queued resource.
# Asks no questions (--quiet). --dry-run (or DRY_RUN=1) prints the gcloud command instead.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

parse_flags PROJECT ZONE TPU_NAME QUEUED -- "$@"
require PROJECT ZONE TPU_NAME

if [[ "${QUEUED:-0}" == 1 ]]; then
  run gcloud compute tpus queued-resources delete "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" --quiet
fi
