#!/usr/bin/env bash
# One device call for the end-to-end numbers in docs/BENCHMARKS.md (qwen3.5-9b, bf16, random weights):
#   phase A, single GPU:  our prefill at cp=1 on GPU 0 (plus decode steps)  |  on GPU 1 (GPU 0 if only one):
#                         the GPU-vs-fp32 check, then transformers + FLA prefill
#   phase B, two GPUs:    our prefill at cp=2 (plus decode steps and a profile of the K/V transfers)
# With two GPUs the two columns of phase A run at the same time, one process per GPU.
# Every stage has its own time limit and log under $OUT, so partial results survive.
# Carry `.whl` (../shared/device-wheels.sh plus flax 0.12.12) with the call.
# Environment: T_A, T_B (phase limits, s), TOKENS_CP1, TOKENS_HF, TOKENS_CP2, REPS, DECODE, BATCH,
# STRATEGY (GDN strategy at cp=2), LAYERS (time only the first N layers of the preset), SKIP (stage names).
set -u
source "$(dirname "$0")/gpu_common.sh"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
other=$(( ngpu >= 2 ? 1 : 0 ))
common="--preset qwen3.5-9b ${LAYERS:+--layers $LAYERS} --reps ${REPS:-2} --batch ${BATCH:-1}"

T_A=${T_A:-330}; T_B=${T_B:-200}
start=$(date +%s)
( stage ours_cp1 "$T_A" env CUDA_VISIBLE_DEVICES=0 python3 scripts/bench_prefill.py $common --cp 1 \
    --tokens ${TOKENS_CP1:-8192,32768,131072} --decode ${DECODE:-8} ) &
if [ "$other" = 0 ]; then wait; fi
( stage check 100 env CUDA_VISIBLE_DEVICES=$other python3 scripts/bench_prefill.py --check-only
  stage hf_fla $(( T_A - 100 )) env CUDA_VISIBLE_DEVICES=$other python3 scripts/bench_prefill.py $common --impl hf \
    --tokens ${TOKENS_HF:-8192,32768,131072} ) &
wait
echo "phase A took $(( $(date +%s) - start )) s"
for s in ours_cp1 check hf_fla; do [ -f "$OUT/$s.log" ] && show $s; done
if [ "$ngpu" -ge 2 ]; then
  stage ours_cp2 "$T_B" python3 scripts/bench_prefill.py $common --cp 2 --gdn-strategy ${STRATEGY:-auto} \
    --tokens ${TOKENS_CP2:-32768,131072} --decode ${DECODE:-8} --profile /tmp/profile
  show ours_cp2 24
fi
echo "total $(( $(date +%s) - start )) s"
