# shellcheck shell=bash
# Shared by the tpu/*.sh scripts (sourced, not run): flags, required parameters, dry runs, and the
# gcloud calls that reach every worker of a TPU VM slice.
#
# Every parameter is an environment variable (PROJECT, ZONE, TPU_NAME, ...) that can also be given
# as a flag: --tpu-name=x sets TPU_NAME=x. --dry-run (or DRY_RUN=1) prints each command instead of
# running it; --help prints the script's header.

# The script that sourced this file, for --help.
SCRIPT_PATH="${BASH_SOURCE[1]:-$0}"
DRY_RUN="${DRY_RUN:-0}"

# Used by the scripts that source this file:
# shellcheck disable=SC2034
{
# The checkout these scripts belong to (the parent of tpu/).
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Where things live on every TPU worker (relative paths are under the remote user's home).
REMOTE_DIR="${REMOTE_DIR:-specs_jax}"     # the checkout
REMOTE_VENV="${REMOTE_VENV:-specs_jax_venv}"  # its virtual environment
REMOTE_LOG_DIR="${REMOTE_LOG_DIR:-specs_jax_logs}"
}

die() {
  echo "error: $*" >&2
  exit 2
}

usage() {
  # The comment block at the top of the script (after the shebang), without the leading '# '.
  sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$SCRIPT_PATH"
}

# parse_flags ALLOWED_NAMES... -- "$@": --some-name=value sets SOME_NAME for names in ALLOWED_NAMES;
# --dry-run, --help; bare --flag sets FLAG=1 (switches such as --spot). A further "--" ends the
# flags: what follows it is left in the array PASSTHROUGH. Anything else is an error.
PASSTHROUGH=()
parse_flags() {
  local allowed=()
  while [[ $# -gt 0 && "$1" != "--" ]]; do
    allowed+=("$1")
    shift
  done
  [[ $# -gt 0 ]] && shift
  local arg name value var known
  while [[ $# -gt 0 ]]; do
    arg="$1"
    shift
    case "$arg" in
      --)
        # shellcheck disable=SC2034  # read by the scripts
        PASSTHROUGH=("$@")
        return 0
        ;;
      --dry-run) DRY_RUN=1 ;;
      -h | --help) usage; exit 0 ;;
      --*)
        name="${arg#--}"
        if [[ "$name" == *=* ]]; then
          value="${name#*=}"
          name="${name%%=*}"
        else
          value=1
        fi
        var="$(echo "$name" | tr '[:lower:]-' '[:upper:]_')"
        if [[ " ${allowed[*]} " != *" $var "* ]]; then
          known="$(echo "${allowed[*]}" | tr '[:upper:]_' '[:lower:]-' | sed 's/[^ ]*/--&/g')"
          die "unknown flag --$name (known: $known --dry-run --help)"
        fi
        printf -v "$var" '%s' "$value"
        export "${var?}"
        ;;
      *) die "unexpected argument '$arg' (parameters are --name=value flags or environment variables; see --help)" ;;
    esac
  done
}

# require NAME...: every named variable must be set and non-empty.
require() {
  local missing=() name
  for name in "$@"; do
    [[ -n "${!name:-}" ]] || missing+=("$name")
  done
  if [[ ${#missing[@]} -gt 0 ]]; then
    local hints=() m
    for m in "${missing[@]}"; do
      hints+=("$m (--$(echo "$m" | tr '[:upper:]_' '[:lower:]-')=...)")
    done
    die "missing required parameter(s): ${hints[*]}; set them as environment variables or flags"
  fi
}

# shell_quote WORD: WORD as one shell word, bare when it is plain, else in single quotes.
shell_quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# quote ARGS...: one string that a shell splits back into exactly these arguments.
quote() {
  local out="" a
  for a in "$@"; do
    out+="${out:+ }$(shell_quote "$a")"
  done
  printf '%s' "$out"
}

# remote_path PATH: PATH for a remote shell command; a relative one is under the remote $HOME.
remote_path() {
  if [[ "$1" == /* ]]; then
    quote "$1"
  else
    printf '%s' "\$HOME/$(quote "$1")"
  fi
}

# run CMD ARGS...: runs the command, or in a dry run prints it (one line, "+ " then the quoted words).
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "+ $(quote "$@")"
  else
    "$@"
  fi
}

# default_runtime_version ACCELERATOR_TYPE: the TPU software version for JAX on that generation.
default_runtime_version() {
  case "$1" in
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v2-* | v3-* | v4-*) echo "tpu-ubuntu2204-base" ;;
    *) die "no default RUNTIME_VERSION for ACCELERATOR_TYPE '$1'; set --runtime-version" ;;
  esac
}

# tpu_ssh COMMAND: runs COMMAND (a shell string) on WORKER (default: all workers).
tpu_ssh() {
  require PROJECT ZONE TPU_NAME
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" \
    --worker="${WORKER:-all}" --command="$1"
}

# tpu_scp LOCAL_SRC REMOTE_DEST: copies a local file or directory to WORKER (default: all workers).
tpu_scp() {
  require PROJECT ZONE TPU_NAME
  run gcloud compute tpus tpu-vm scp --recurse "$1" "$TPU_NAME:$2" --project="$PROJECT" --zone="$ZONE" \
    --worker="${WORKER:-all}"
}
