#!/usr/bin/env bash
# Creates a TPU VM: one host (v5p-8, v4-8, v6e-8) or a pod slice of several hosts (v5p-64, v4-32).
#
#   PROJECT=my-proj ZONE=us-east5-a TPU_NAME=specs ACCELERATOR_TYPE=v5p-8 tpu/create.sh
#   tpu/create.sh --project=my-proj --zone=us-central2-b --tpu-name=specs --accelerator-type=v4-32 --spot
#
# Required: PROJECT, ZONE, TPU_NAME, ACCELERATOR_TYPE.
# Optional: RUNTIME_VERSION (default: the JAX image of the generation: v2-alpha-tpuv5 for v5p,
#   v2-alpha-tpuv6e for v6e, tpu-ubuntu2204-base for v4); SPOT=1 (--spot): a Spot VM, cheaper, can
#   be preempted; QUEUED=1 (--queued): ask through a queued resource named TPU_NAME, which waits for
#   capacity (v5p and v6e are often only granted this way); check it with
#   `gcloud compute tpus queued-resources describe TPU_NAME`.
# --dry-run (or DRY_RUN=1) prints the gcloud command instead of running it.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

parse_flags PROJECT ZONE TPU_NAME ACCELERATOR_TYPE RUNTIME_VERSION SPOT QUEUED -- "$@"
require PROJECT ZONE TPU_NAME ACCELERATOR_TYPE
RUNTIME_VERSION="${RUNTIME_VERSION:-$(default_runtime_version "$ACCELERATOR_TYPE")}"

extra=()
[[ "${SPOT:-0}" == 1 ]] && extra+=(--spot)

if [[ "${QUEUED:-0}" == 1 ]]; then
  run gcloud compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" \
    --project="$PROJECT" --zone="$ZONE" --accelerator-type="$ACCELERATOR_TYPE" \
    --runtime-version="$RUNTIME_VERSION" "${extra[@]}"
else
  run gcloud compute tpus tpu-vm create "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${extra[@]}"
fi
