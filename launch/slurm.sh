#!/usr/bin/env bash
# Train on a SLURM GPU cluster: submits one job whose tasks all run cma_jax.main; JAX reads the
# coordinator (first node of the allocation), process count and ids from the SLURM environment
# (`--distributed` -> jax.distributed.initialize() auto-detection).
#
#   launch/slurm.sh --nodes=2 --gpus_per_node=8 [--per=gpu|node] [--partition=P] [--time=24:00:00] \
#       [--account=A] [--venv=.venv] -- --config=configs/msrvtt.py --workdir=/shared/runs/msrvtt
#
#   --per=gpu   one process per GPU (default): every task sees the node's GPUs and JAX's SLURM
#               auto-detection makes task i of a node drive GPU i (so no --gpus-per-task=1)
#   --per=node  one process per node driving all its GPUs (JAX_LOCAL_DEVICE_IDS lists them, as
#               the auto-detection would otherwise give the process GPU 0 only)
#   --venv=DIR  the virtual environment every task activates (default .venv; a relative path is
#               relative to the repository root). It must be on a filesystem every node reads, with
#               cma_jax and the CUDA build of jax installed (JAX's installation guide).
#   --partition, --time, --account  passed to #SBATCH;  --name=cma_jax  the job name (log: NAME-JOBID.out)
#   --dry_run   print the batch script instead of submitting it
# Everything after -- goes to `python -m cma_jax.main`. The workdir must be on a shared filesystem.
set -euo pipefail

nodes=1 gpus=8 per="gpu" partition="" time_limit="24:00:00" account="" venv=".venv" name="cma_jax" dry_run=0
root="$(cd "$(dirname "$0")/.." && pwd)"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-0}"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes=*) nodes="${1#*=}" ;;
    --gpus_per_node=*) gpus="${1#*=}" ;;
    --per=*) per="${1#*=}" ;;
    --partition=*) partition="${1#*=}" ;;
    --time=*) time_limit="${1#*=}" ;;
    --account=*) account="${1#*=}" ;;
    --venv=*) venv="${1#*=}" ;;
    --name=*) name="${1#*=}" ;;
    --dry_run) dry_run=1 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "slurm.sh: unknown option $1" >&2; usage 2 ;;
  esac
  shift
done
[[ $# -gt 0 ]] || { echo "slurm.sh: give the cma_jax.main flags after --" >&2; exit 2; }
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || { echo "slurm.sh: --nodes must be a positive integer" >&2; exit 2; }
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || { echo "slurm.sh: --gpus_per_node must be a positive integer" >&2; exit 2; }

devices=""
case "$per" in
  gpu) tasks="#SBATCH --ntasks-per-node=${gpus}
#SBATCH --gpus-per-node=${gpus}" ;;
  node) tasks="#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=${gpus}"
    devices="export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus - 1)))"$'\n' ;;
  *) echo "slurm.sh: --per must be gpu or node (got '${per}')" >&2; exit 2 ;;
esac
extra=""
[[ -n "$partition" ]] && extra+="#SBATCH --partition=${partition}"$'\n'
[[ -n "$account" ]] && extra+="#SBATCH --account=${account}"$'\n'

script="#!/bin/bash
#SBATCH --job-name=${name}
#SBATCH --nodes=${nodes}
${tasks}
#SBATCH --time=${time_limit}
#SBATCH --output=${name}-%j.out
${extra}set -euo pipefail
cd $(printf '%q' "$root")
source $(printf '%q' "$venv")/bin/activate
${devices}srun python -m cma_jax.main --distributed $(printf '%q ' "$@")"

if [[ $dry_run -eq 1 ]]; then
  echo "$script"
else
  # Checked here, not after the job has waited in the queue.
  (cd "$root" && [[ -f "${venv}/bin/activate" ]]) || {
    echo "slurm.sh: --venv=${venv} has no bin/activate (a relative path starts at ${root}); create the" \
      "environment there or pass --venv=DIR" >&2
    exit 2
  }
  sbatch <<<"$script"
fi
