#!/usr/bin/env bash
# One device call on two GPUs for docs/BENCHMARKS.md (qwen3.5-9b, bf16, random weights, B=1):
#   phase A (two single-GPU processes at once): cp=1 at $LONG tokens with decode steps on GPU 0,
#                                               cp=1 at $SHORT tokens on GPU 1;
#   phase B (both GPUs): cp=2 at $TOKENS_CP2 with decode steps, and a profile of the longest prefill
#                        (NCCL vs compute kernel overlap, pcp_jax/overlap.py).
# Carry `.whl`. Compile times of every jitted program go to the logs under $OUT (JAX_LOG_COMPILES).
set -u
source "$(dirname "$0")/gpu_common.sh"
common="--preset qwen3.5-9b --reps ${REPS:-2}"
start=$(date +%s)
stage cp1_long ${T_A:-170} env CUDA_VISIBLE_DEVICES=0 python3 scripts/bench_prefill.py $common --cp 1 --tokens ${LONG:-131072} --decode 8 &
stage cp1_short ${T_A:-170} env CUDA_VISIBLE_DEVICES=1 python3 scripts/bench_prefill.py $common --cp 1 --tokens ${SHORT:-8192} &
wait
echo "phase A took $(( $(date +%s) - start )) s"; show cp1_long 14; show cp1_short 14
stage cp2 ${T_B:-290} python3 scripts/bench_prefill.py $common --cp 2 --tokens ${TOKENS_CP2:-131072,32768} --decode 8 --profile /tmp/profile
show cp2 26
echo "total $(( $(date +%s) - start )) s"
