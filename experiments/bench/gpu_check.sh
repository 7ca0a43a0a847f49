#!/usr/bin/env bash
# The GPU measurements of experiments/bench/README.md in one script (a machine with one NVIDIA
# GPU, jax[cuda] and the package's dependencies installed; run from the repository root):
#
#   experiments/bench/gpu_check.sh OUT_DIR
#
# Each step has its own time limit, so one slow step cannot take the others' results with it:
# the bench parts (bf16 train step at the SmolLM2 and ~1B shapes, decode at batch 1/16/64,
# one consolidation step of a sleep at the SmolLM2 shape against its bound, vmapped vs
# sequential dream trials), then the README's main job through launch/gpu_local.sh
# with the installed environment (SKIP_INSTALL=1), timed.
set -uo pipefail
OUT=${1:?usage: experiments/bench/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c 'import jax; print(jax.__version__, jax.devices())' | tee -a "$OUT/gpu.txt"

bench() {  # bench PART LIMIT_S
  echo "=== bench $1 (limit $2 s)" >>"$OUT/bench.log"
  timeout "$2" $PY -m sleep_jax.bench --only "$1" --out "$OUT/bench_$1.json" >>"$OUT/bench.log" 2>&1
  echo "bench $1: exit $?"
}
PARTS=${PARTS:-train_step sampler sleep_step dream_trials}  # a subset reruns only those
[[ " $PARTS " == *" train_step "* ]] && bench train_step "${TRAIN_LIMIT:-210}"
[[ " $PARTS " == *" sampler "* ]] && bench sampler "${SAMPLER_LIMIT:-90}"
[[ " $PARTS " == *" sleep_step "* ]] && bench sleep_step "${SLEEP_STEP_LIMIT:-120}"
[[ " $PARTS " == *" dream_trials "* ]] && bench dream_trials "${TRIALS_LIMIT:-60}"

VENV=${VENV:-$(dirname "$(dirname "$(command -v $PY)")")}
t0=$(date +%s)
SKIP_INSTALL=1 VENV=$VENV timeout "${MAIN_LIMIT:-150}" launch/gpu_local.sh \
    --config=sleep_jax/configs/knowledge.py --workdir=/tmp/sleep_jax_gpu_main >"$OUT/main_job.log" 2>&1
echo "main job: exit $? after $(( $(date +%s) - t0 )) s"
cp /tmp/sleep_jax_gpu_main/results.md "$OUT/main_job_results.md" 2>/dev/null || true
