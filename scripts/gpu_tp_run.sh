#!/usr/bin/env bash
# Device calls for the cp x tp rows of docs/BENCHMARKS.md (random weights made on the GPUs, bf16, B=1), on one
# machine of two GPUs. On four (nvidia-h200-x4), the issue's rows: MESHES="4x1 2x2 1x4" MESHES122="2x2 1x4"
# MESHES397="1x4" LAYERS397=32 (the 122B does not fit at tp=1; 32 of the 397B's 60 layers fit at tp=4).
# PART=1: the tp check (scripts/check_tp.py: fp32 exact against cp=tp=1, bf16 GPU kernels against fp32), then
# qwen3.5-35b-a3b at 32k and 128k for each (cp, tp) of MESHES.
# PART=2: qwen3.5-122b-a10b at each (cp, tp) of MESHES122 (244 GB of weights: tp=2 puts half on each GPU) and
# the first LAYERS397 layers of qwen3.5-397b-a17b at each of MESHES397. Carry `.whl`. First-call times include
# compilation.
set -u
source "$(dirname "$0")/gpu_common.sh"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
start=$(date +%s)
part() { case " ${PART:-1} " in *" $1 "*) return 0;; esac; return 1; }
bench="python3 scripts/bench_prefill.py --reps ${REPS:-2} --decode 16"
if part 1; then
  stage check ${T_CHECK:-240} python3 scripts/check_tp.py; show check 12
  for mesh in ${MESHES:-1x1 2x1 1x2}; do
    cp=${mesh%x*}; tp=${mesh#*x}
    stage a3b_${mesh} ${T_A3B:-150} $bench --preset qwen3.5-35b-a3b --tokens ${TOKENS:-32768,131072} --cp $cp --tp $tp
    show a3b_${mesh} 8
  done
fi
if part 2; then
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM_FRACTION:-0.95}  # 122 GB of weights per GPU: leave XLA the rest
  for mesh in ${MESHES122:-1x2}; do
    cp=${mesh%x*}; tp=${mesh#*x}
    stage a10b_${mesh} ${T_A10B:-200} $bench --preset qwen3.5-122b-a10b --tokens ${TOKENS122:-32768,131072} --cp $cp --tp $tp
    show a10b_${mesh} 8
  done
  for mesh in ${MESHES397:-1x2}; do
    cp=${mesh%x*}; tp=${mesh#*x}
    stage a17b_${mesh} ${T_A17B:-200} $bench --preset qwen3.5-397b-a17b --layers ${LAYERS397:-16} \
      --tokens ${TOKENS397:-32768,131072} --cp $cp --tp $tp
    show a17b_${mesh} 8
  done
fi
echo "total $(( $(date +%s) - start )) s"
