#!/usr/bin/env bash
# Device calls for the warm-start numbers in docs/BENCHMARKS.md (qwen3.5-9b, bf16, random weights, B=1),
# before (the tree in .old/: `git archive 59c6b12`, with kernels/ and convert/ copied under pcp_jax/) and
# after (this tree), on one machine of two GPUs. PART=1: the GPU-vs-fp32 check; cp=1 before and after side
# by side (one GPU each), then cp=2 after and before. PART=2: decode scanned vs unrolled (with and
# without XLA's dynamic-slice fusion), a session of random lengths after warmup (cp=2). PART=3: peak memory at 128k / 512k / 1M tokens with chunk_size="auto" (cp=2), one process each.
# Carry `.whl` and `.old` (with .old/run_old.py, which hides the editable install of this tree). First-call times include compilation; every compile is logged (JAX_LOG_COMPILES).
set -u
source "$(dirname "$0")/gpu_common.sh"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
common="--preset qwen3.5-9b --reps ${REPS:-2}"
old() { python3 .old/run_old.py "$@"; }  # the old tree, with the editable install of this one hidden
start=$(date +%s)
part() { case " ${PART:-1} " in *" $1 "*) return 0;; esac; return 1; }  # PART="2 3" runs both
if part 1; then
  ( stage check 80 env CUDA_VISIBLE_DEVICES=0 python3 scripts/bench_prefill.py --check-only
    stage new_cp1 230 env CUDA_VISIBLE_DEVICES=0 PCP_JAX_COMPILE_CACHE=/tmp/xla_a python3 scripts/bench_prefill.py \
      $common --cp 1 --tokens ${TOKENS:-8192,32768,131072} --decode 8 ) &
  stage old_cp1 300 env CUDA_VISIBLE_DEVICES=1 bash -c "$(declare -f old); old .old/scripts/bench_prefill.py \
    $common --cp 1 --tokens ${TOKENS:-8192,32768,131072} --decode 8" &
  wait
  echo "phase A took $(( $(date +%s) - start )) s"; show check 4; show new_cp1; show old_cp1
  stage new_cp2 100 env PCP_JAX_COMPILE_CACHE=/tmp/xla_b python3 scripts/bench_prefill.py $common --cp 2 \
    --tokens ${TOKENS:-8192,32768,131072} --decode 8
  show new_cp2
  stage old_cp2 ${T_OLD2:-110} bash -c "$(declare -f old); old .old/scripts/bench_prefill.py $common --cp 2 \
    --tokens ${OLD2_TOKENS:-131072} --decode 8"
  show old_cp2
fi
if part 2; then
  [ -n "${SKIP_LAYOUT:-}" ] || {
  stage layout 200 env CUDA_VISIBLE_DEVICES=0 python3 scripts/bench_decode_layout.py &
  stage layout_dsf 200 env CUDA_VISIBLE_DEVICES=1 XLA_FLAGS=--xla_gpu_enable_dynamic_slice_fusion=true \
    python3 scripts/bench_decode_layout.py &
  wait
  show layout 6; show layout_dsf 6; }
  stage session ${T_SESSION:-330} env PCP_JAX_COMPILE_CACHE=/tmp/xla_s python3 scripts/bench_warmstart.py --cp 2 \
    --max-tokens ${MAX_TOKENS:-131072} --session 20
  show session 40
fi
if part 3; then
  for n in ${MEM_TOKENS:-131072 524288 1048576}; do
    stage mem_$n ${T_MEM:-200} env PCP_JAX_COMPILE_CACHE=/tmp/xla_m python3 scripts/bench_prefill.py --preset qwen3.5-9b \
      --reps 1 --cp 2 --tokens $n
    show mem_$n 4
  done
fi
echo "total $(( $(date +%s) - start )) s"
