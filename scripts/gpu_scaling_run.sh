#!/usr/bin/env bash
# One device call on two GPUs for docs/BENCHMARKS.md (qwen3.5-9b, bf16, random weights, B=1):
#   phase A (two single-GPU processes at once): cp=1 at $LONG tokens with decode steps on GPU 0,
#                                               cp=1 at $SHORT tokens on GPU 1;
#   phase B (both GPUs): cp=2 at $TOKENS_CP2 with decode steps, and a profile of the longest prefill
#                        (NCCL vs compute kernel overlap, pcp_jax/overlap.py).
# Carry `.whl`. Compile times of every jitted program go to the logs under $OUT (JAX_LOG_COMPILES).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export JAX_LOG_COMPILES=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
common="--preset qwen3.5-9b --reps ${REPS:-2}"
stage() { local name=$1 limit=$2; shift 2; echo "== $name (limit ${limit}s) start $(date +%T)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "== $name exit $? at $(date +%T)" >> "$OUT/$name.log"; }
show() { echo "---- $1"; grep -v "^W0000\|^I0000\|Autotuning cache miss\|Finished tracing\|Finished jaxpr\|Compiling \|WARNING:jax._src\|Finished XLA compilation of jit(\(convert\|broadcast\|_normal\|multiply\|_uniform\|log\|stage\|_threefry\|_where\)" "$OUT/$1.log" | tail -${2:-14}; grep -h "Finished XLA compilation of jit(per_shard)" "$OUT/$1.log" | sed 's/.*Finished/  Finished/'; }
start=$(date +%s)
stage cp1_long ${T_A:-170} env CUDA_VISIBLE_DEVICES=0 python3 scripts/bench_prefill.py $common --cp 1 --tokens ${LONG:-131072} --decode 8 &
stage cp1_short ${T_A:-170} env CUDA_VISIBLE_DEVICES=1 python3 scripts/bench_prefill.py $common --cp 1 --tokens ${SHORT:-8192} &
wait
echo "phase A took $(( $(date +%s) - start )) s"; show cp1_long; show cp1_short
stage cp2 ${T_B:-290} python3 scripts/bench_prefill.py $common --cp 2 --tokens ${TOKENS_CP2:-131072,32768} --decode 8 --profile /tmp/profile
show cp2 26
echo "total $(( $(date +%s) - start )) s"
