#!/usr/bin/env bash
# Runs an editing-jax command on every worker of a Cloud TPU VM (single host or pod slice).
#
#   launch/tpu.sh --tpu NAME --zone ZONE [--project P] [--dry_run] -- editing-jax train --config ... --workdir DIR
#
# Steps: copy this checkout to every worker, install it with jax[tpu], then run the command on all workers at once
# with --distributed appended to `editing-jax train` (jax.distributed.initialize() discovers the pod on TPU VMs).
# DIR must be a path every worker sees (e.g. a gcsfuse mount); checkpoints use Orbax on that path.
# --dry_run prints the gcloud commands instead of running them.
set -euo pipefail

tpu="" zone="" project="" dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) tpu="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --dry_run) dry_run=1; shift ;;
    --) shift; break ;;
    *) echo "launch/tpu.sh: unknown argument $1 (put the command after --)" >&2; exit 2 ;;
  esac
done
if [[ -z "${tpu}" || -z "${zone}" || $# -eq 0 ]]; then
  echo "usage: launch/tpu.sh --tpu NAME --zone ZONE [--project P] [--dry_run] -- editing-jax COMMAND ..." >&2
  exit 2
fi
if [[ "$1" != "editing-jax" ]]; then
  echo "launch/tpu.sh: the command must start with editing-jax, got: $1" >&2
  exit 2
fi
command=("$@")
if [[ "${command[1]:-}" == "train" ]]; then
  command+=("--distributed")
fi

repo="$(cd "$(dirname "$0")/.." && pwd)"
gcloud_args=(--zone "${zone}" --worker=all)
[[ -n "${project}" ]] && gcloud_args+=(--project "${project}")

run() {
  if [[ "${dry_run}" == 1 ]]; then
    printf '%q ' "$@"; echo
  else
    "$@"
  fi
}

quoted_command="$(printf '%q ' "${command[@]}")"
run gcloud compute tpus tpu-vm scp --recurse "${repo}" "${tpu}:~/editing_jax" "${gcloud_args[@]}"
run gcloud compute tpus tpu-vm ssh "${tpu}" "${gcloud_args[@]}" \
  --command "cd ~/editing_jax && python3 -m pip install -q -e . 'jax[tpu]'"
run gcloud compute tpus tpu-vm ssh "${tpu}" "${gcloud_args[@]}" \
  --command "cd ~/editing_jax && ${quoted_command}"
