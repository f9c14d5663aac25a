#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: every worker VM runs the same command; JAX joins them
# (jax.distributed.initialize() auto-detects the pod) and the workdir is a shared gs:// path.
#
#   launch/tpu_pod.sh --tpu=my-v4-32 --zone=us-central2-b [--create [--accelerator=v4-32]] [--setup] \
#       -- --config=configs/msrvtt.py --workdir=gs://my-bucket/runs/msrvtt \
#          --config.backbone=gs://my-bucket/ckpt/clip_vit_b32 --config.data.data_dir=gs://my-bucket/tfds
#
#   --create       create the TPU VM first (--accelerator, --version)
#   --setup        clone/update the repository on every worker and install it with jax[tpu] and gcsfs (gs:// workdirs)
#   --repo/--branch  where --setup gets the code (default: this checkout's origin and branch)
#   --dry_run      print the gcloud commands instead of running them
#   --skip_compile do not compile for the slice first (see below)
# Everything after -- goes to `python -m cma_jax.main` on every worker.
# Before anything is created or started, the run's train step is compiled here for the slice's topology
# (--accelerator, or the existing TPU's type; `python -m cma_jax.compile`, which needs libtpu here:
# pip install -e '.[tpu]'): a config that does not fit the slice stops here, in one line, not on the pod.
set -euo pipefail

tpu="" zone="" project="" accelerator="" version="tpu-ubuntu2204-base"
create=0 setup=0 dry_run=0 skip_compile=0 dir="cma_jax"
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
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
    --skip_compile) skip_compile=1 ;;
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

if [[ -z "$accelerator" ]]; then
  if [[ $create -eq 1 ]]; then
    accelerator="v4-32"
  else  # the existing slice's type (read-only: asked in a dry run too)
    accelerator="$(gcloud compute tpus tpu-vm describe "$tpu" "${common[@]}" --format='value(acceleratorType)')"
  fi
fi

if [[ $skip_compile -eq 0 ]]; then
  if (cd "$root" && "$python" -c "import libtpu" 2>/dev/null); then
    compile_args=()
    for a in "${args[@]}"; do [[ "$a" == --config=* || "$a" == --config.* ]] && compile_args+=("$a"); done
    echo "tpu_pod.sh: compiling the train step for $accelerator first (cma_jax.compile)" >&2
    if ! (cd "$root" && "$python" -m cma_jax.compile --topology="$accelerator" --noeval "${compile_args[@]}") >&2; then
      echo "tpu_pod.sh: nothing was started: the run does not compile for $accelerator (above)" >&2
      exit 1
    fi
  else
    echo "tpu_pod.sh: not compiling for $accelerator first: libtpu is not installed here (pip install -e '.[tpu]'," \
      "or --skip_compile)" >&2
  fi
fi

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
