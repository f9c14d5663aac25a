#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: every worker VM runs the same command; JAX joins them
# (jax.distributed.initialize() auto-detects the pod) and the workdir is a shared gs:// path.
#
#   launch/tpu_pod.sh --tpu=my-v4-32 --zone=us-central2-b [--create --accelerator=v4-32] [--setup] \
#       -- --config=configs/msrvtt.py --workdir=gs://my-bucket/runs/msrvtt \
#          --config.backbone=gs://my-bucket/ckpt/clip_vit_b32 --config.data.data_dir=gs://my-bucket/tfds
#
#   --create       create the TPU VM first (--accelerator, --version)
#   --setup        clone/update the repository on every worker and install it with jax[tpu] and gcsfs (gs:// workdirs)
#   --repo/--branch  where --setup gets the code (default: this checkout's origin and branch)
#   --dry_run      print the gcloud commands instead of running them
# Everything after -- goes to `python -m cma_jax.main` on every worker.
set -euo pipefail

tpu="" zone="" project="" accelerator="v4-32" version="tpu-ubuntu2204-base"
create=0 setup=0 dry_run=0 dir="cma_jax"
repo="$(git -C "$(dirname "$0")/.." remote get-url origin 2>/dev/null || echo "")"
branch="$(git -C "$(dirname "$0")/.." rev-parse --abbrev-ref HEAD 2>/dev/null || echo main)"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-0}"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu=*) tpu="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --accelerator=*) accelerator="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --repo=*) repo="${1#*=}" ;;
    --branch=*) branch="${1#*=}" ;;
    --dir=*) dir="${1#*=}" ;;
    --create) create=1 ;;
    --setup) setup=1 ;;
    --dry_run) dry_run=1 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown option $1" >&2; usage 2 ;;
  esac
  shift
done
args=("$@")

[[ -n "$tpu" ]] || { echo "tpu_pod.sh: --tpu=NAME is required" >&2; exit 2; }
[[ -n "$zone" ]] || { echo "tpu_pod.sh: --zone=ZONE is required" >&2; exit 2; }
[[ ${#args[@]} -gt 0 ]] || { echo "tpu_pod.sh: give the cma_jax.main flags after --" >&2; exit 2; }
workdir=""
for a in "${args[@]}"; do [[ "$a" == --workdir=* ]] && workdir="${a#--workdir=}"; done
if [[ "$workdir" != gs://* ]]; then
  echo "tpu_pod.sh: --workdir must be a gs:// path every worker can reach (got '${workdir}')" >&2
  exit 2
fi

common=(--zone="$zone")
[[ -n "$project" ]] && common+=(--project="$project")

run() {  # print the command (dry run) or run it
  if [[ $dry_run -eq 1 ]]; then
    printf '%q ' "$@"; printf '\n'
  else
    "$@"
  fi
}

if [[ $create -eq 1 ]]; then
  run gcloud compute tpus tpu-vm create "$tpu" "${common[@]}" --accelerator-type="$accelerator" --version="$version"
fi

if [[ $setup -eq 1 ]]; then
  [[ -n "$repo" ]] || { echo "tpu_pod.sh: --setup needs --repo=URL (no git origin found)" >&2; exit 2; }
  install="set -e; if [ -d $dir ]; then git -C $dir fetch -q && git -C $dir checkout -q $branch && git -C $dir pull -q; \
else git clone -q -b $branch $repo $dir; fi; pip install -q -U 'jax[tpu]' gcsfs -e ./$dir"
  run gcloud compute tpus tpu-vm ssh "$tpu" "${common[@]}" --worker=all --command="$install"
fi

quoted=$(printf '%q ' "${args[@]}")
command="cd $dir && python3 -m cma_jax.main --distributed ${quoted}"
run gcloud compute tpus tpu-vm ssh "$tpu" "${common[@]}" --worker=all --command="$command"
