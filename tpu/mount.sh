#!/usr/bin/env bash
# Mounts a Cloud Storage bucket at the same path on every worker (gcsfuse), for a run directory that
# all hosts of a pod slice share: a multi-host run writes one checkpoint from every host, so its
# --workdir must be a path that every host sees (this mount, or an NFS share such as Filestore).
#
#   PROJECT=my-proj ZONE=us-east5-a TPU_NAME=specs BUCKET=my-bucket tpu/mount.sh   # at /mnt/specs_jax
#
# Required: PROJECT, ZONE, TPU_NAME, BUCKET (name only, without gs://).
# Optional: MOUNT_POINT (default /mnt/specs_jax); WORKER (default all). Installs gcsfuse from
# Google's apt repository when it is missing. The VM's service account needs access to the bucket.
# --dry-run (or DRY_RUN=1) prints the gcloud command instead of running it.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

parse_flags PROJECT ZONE TPU_NAME BUCKET MOUNT_POINT WORKER -- "$@"
require PROJECT ZONE TPU_NAME BUCKET
[[ "$BUCKET" != gs://* ]] || die "BUCKET is the bucket name, without gs:// (got '$BUCKET')"
mp="$(quote "${MOUNT_POINT:-/mnt/specs_jax}")"
repo='https://packages.cloud.google.com/apt'
key=/usr/share/keyrings/cloud.google.asc

tpu_ssh "set -euo pipefail; \
if ! command -v gcsfuse >/dev/null; then \
curl -fsSL $repo/doc/apt-key.gpg | sudo tee $key >/dev/null; \
echo \"deb [signed-by=$key] $repo gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null; \
sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse; fi; \
sudo mkdir -p $mp && sudo chown \"\$(id -u):\$(id -g)\" $mp; \
mountpoint -q $mp || gcsfuse --implicit-dirs $(quote "$BUCKET") $mp; \
echo \"\$(hostname): gs://$BUCKET at $mp\""
