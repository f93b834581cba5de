#!/bin/bash
# Cloud TPU pod slice: run the same cdd_jax command on every worker VM of the slice at once.
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b WORKDIR=gs://BUCKET/sr launch/tpu_pod.sh
#   MODE=setup TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh   # copy code, install deps
#   DRY_RUN=1 launch/tpu_pod.sh --config.train.num_steps=100            # print, run nothing
#
# Arguments after the script name are passed to `python -m cdd_jax.main` unchanged.
# Environment knobs: TPU_NAME, ZONE, PROJECT (optional), CONFIG, WORKDIR (a gs:// path: every
# worker writes its checkpoint shards there through Orbax), REMOTE_DIR (code location on the
# workers), PYTHON, MODE ("train" or "setup"), DRY_RUN.
#
# `gcloud compute tpus tpu-vm ssh --worker=all` starts the command on all workers in parallel; each
# runs one JAX process driving its local TPU chips. `--distributed=yes` calls
# jax.distributed.initialize(), which on a TPU VM reads the worker list and this worker's id from
# the VM metadata server, so no addresses are passed here. Logs and images come from worker 0 only.

set -euo pipefail

TPU_NAME=${TPU_NAME:-cdd-jax-pod}
ZONE=${ZONE:-us-central2-b}
PROJECT=${PROJECT:-}
CONFIG=${CONFIG:-configs/sr.py:large}
WORKDIR=${WORKDIR:-gs://YOUR_BUCKET/cdd_jax/sr}
REMOTE_DIR=${REMOTE_DIR:-cdd_jax}
PYTHON=${PYTHON:-python3}
MODE=${MODE:-train}
REPO_DIR=$(cd "$(dirname "$0")/.." && pwd)

gcloud_tpu=(gcloud compute tpus tpu-vm)
target=("${TPU_NAME}" --zone="${ZONE}" --worker=all)
if [[ -n "${PROJECT}" ]]; then
  target+=(--project="${PROJECT}")
fi

case "${MODE}" in
  train)
    # The remote shell re-splits this string: quote every word.
    remote=$(printf '%q ' cd "${REMOTE_DIR}")
    remote+="&& "
    remote+=$(printf '%q ' "${PYTHON}" -m cdd_jax.main --config="${CONFIG}" \
      --workdir="${WORKDIR}" --distributed=yes "$@")
    cmds=("$(printf '%q ' "${gcloud_tpu[@]}" ssh "${target[@]}" --command="${remote}")")
    ;;
  setup)
    install="$(printf '%q ' cd "${REMOTE_DIR}")&& ${PYTHON} -m pip install -U pip && "
    install+="${PYTHON} -m pip install -e . 'jax[tpu]'"
    cmds=(
      "$(printf '%q ' "${gcloud_tpu[@]}" scp --recurse "${REPO_DIR}" "${TPU_NAME}:${REMOTE_DIR}" \
        "${target[@]:1}")"
      "$(printf '%q ' "${gcloud_tpu[@]}" ssh "${target[@]}" --command="${install}")"
    )
    ;;
  *)
    echo "MODE must be 'train' or 'setup', got '${MODE}'" >&2
    exit 2
    ;;
esac

for c in "${cmds[@]}"; do
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    echo "${c}"
  else
    eval "${c}"
  fi
done
