#!/usr/bin/env bash
# One device call for the end-to-end numbers in docs/BENCHMARKS.md: GPU path checked against the jnp
# path, then qwen3.5-9b prefill with our model at cp=1 (and cp=2 when two GPUs are visible) and with
# transformers + FLA. Every stage has its own time limit and log under $OUT, so partial results survive.
# Carry `.whl` (../shared/device-wheels.sh plus flax 0.12.12) with the call.
# Stage limits (seconds) and sizes can be set from the environment: T_CHECK, T_OURS, T_HF, T_CP2, TOKENS,
# TOKENS_CP2, LAYERS (time only the first N layers of the preset). The defaults fit one 10-minute call;
# run D (docs/BENCHMARKS.md) ran out of time with 200/110/150 s for the three 9B stages.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
ngpu=$(nvidia-smi -L | wc -l)
stage() { local name=$1 limit=$2; shift 2; echo "== $name"; timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v "^W0000\|^I0000\|Autotuning cache miss" | tail -12; }
stage check ${T_CHECK:-90} env CUDA_VISIBLE_DEVICES=0 python3 scripts/bench_prefill.py --check-only
stage ours_cp1 ${T_OURS:-240} env CUDA_VISIBLE_DEVICES=0 python3 scripts/bench_prefill.py --preset qwen3.5-9b ${LAYERS:+--layers $LAYERS} --tokens ${TOKENS:-8192,32768,131072} --reps 3
stage hf_fla ${T_HF:-200} env CUDA_VISIBLE_DEVICES=0 python3 scripts/bench_prefill.py --impl hf --preset qwen3.5-9b --tokens 8192,32768 --reps 3
if [ "$ngpu" -ge 2 ]; then
  stage ours_cp2 ${T_CP2:-120} python3 scripts/bench_prefill.py --preset qwen3.5-9b ${LAYERS:+--layers $LAYERS} --cp 2 --tokens ${TOKENS_CP2:-32768,131072} --reps 3
fi
