#!/usr/bin/env bash
# The GPU runs behind docs/BENCHMARKS.md, one suite per argument, each stage under a time limit with its log in
# $OUT/<stage>.log (partial results survive a limit). Run from the repository root on the GPU machine, with the
# wheels of ../shared/device-wheels.sh (plus flax) carried as .whl/:
#   bash benchmarks/run.sh kernels            GDN vs FLA, attention vs cuDNN, MoE stages, MoE layer vs transformers
#   bash benchmarks/run.sh prefill            qwen3.5-9b prefill: ours (cp 1, and cp 2 on two GPUs), the GPU-vs-fp32
#                                             check, transformers + flash-linear-attention
#   bash benchmarks/run.sh decode             qwen3.5-9b decode against its memory floor
#   bash benchmarks/run.sh tp                 the tp check, then MoE presets over MESHES (cp x tp) of the GPUs (the
#                                             397B: its first LAYERS397 layers)
#   bash benchmarks/run.sh warmstart          cold start (ready, refined, a session of random lengths), then a restart
#   bash benchmarks/run.sh prefix             the prefix cache: a 100k-token document and questions, a chat (9B)
#   bash benchmarks/run.sh warmstart35        the 35B-A3B ready for 128k prompts with 64 new tokens, then one
#   bash benchmarks/run.sh fp8                FP8 paths checked, matmuls, logits error, the 122B-A10B in FP8 on one
#                                             GPU; then the 35B-A3B and 27B in FP8 against bf16 (one GPU)
# Environment: SKIP (stage names to leave out), T_<STAGE> (a stage's limit in seconds), TOKENS, MESHES, CP.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export JAX_LOG_COMPILES=1  # compile times of every jitted program go to the logs
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
ngpu=$(nvidia-smi -L | wc -l)

stage() {  # name, default limit (s), command...: runs it into $OUT/name.log, then prints the log's end
  local name=$1 limit; limit=$(eval echo "\${T_${1^^}:-$2}"); shift 2
  case " ${SKIP:-} " in *" $name "*) echo "== $name skipped"; return;; esac
  echo "== $name (limit ${limit}s) start $(date +%T)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "== $name exit $? at $(date +%T)" >> "$OUT/$name.log"
  grep -v "^W0000\|^I0000\|Autotuning cache miss\|Finished tracing\|Finished jaxpr\|Compiling \|WARNING:jax._src" \
    "$OUT/$name.log" | grep -v "Finished XLA compilation of jit(\(convert\|broadcast\|_normal\|multiply\|_uniform\|log\)" \
    | tail -40
}

bench9b="pcp-jax bench --preset qwen3.5-9b --reps ${REPS:-2}"
for suite in "$@"; do
  case $suite in
    kernels)
      stage gdn 420 python3 benchmarks/gdn.py
      stage attention 300 python3 benchmarks/attention.py
      stage moe 300 python3 benchmarks/moe.py
      stage moe_layer 400 python3 benchmarks/moe_layer.py ;;
    prefill)  # one process per GPU: ours on GPU 0 beside the check and transformers on GPU 1 (after, on one GPU)
      other=$(( ngpu >= 2 ? 1 : 0 ))
      ( stage ours_cp1 330 env CUDA_VISIBLE_DEVICES=0 $bench9b --cp 1 --tokens "${TOKENS:-8192,32768,131072}" --decode 8 ) &
      [ "$other" = 0 ] && wait
      ( stage check 100 env CUDA_VISIBLE_DEVICES=$other $bench9b --check-only
        stage transformers 230 env CUDA_VISIBLE_DEVICES=$other $bench9b --impl hf --tokens "${TOKENS:-8192,32768,131072}" ) &
      wait
      [ "$ngpu" -ge 2 ] && stage ours_cp2 300 $bench9b --cp 2 --tokens "${TOKENS:-32768,131072}" --decode 8 \
        --profile "$OUT/profile" ;;
    decode)
      stage decode 400 python3 benchmarks/decode.py ;;
    tp)  # on four GPUs: MESHES="4x1 2x2 1x4" LAYERS397=32 (the 122B needs tp >= 2; 32 of the 397B's layers fit tp 4)
      stage tp_check 240 python3 benchmarks/tp_check.py
      for mesh in ${MESHES:-1x1 2x1 1x2}; do
        stage "a3b_$mesh" 150 pcp-jax bench --preset qwen3.5-35b-a3b --reps 2 --decode 16 --tokens 32768,131072 \
          --cp "${mesh%x*}" --tp "${mesh#*x}"
      done
      for mesh in ${MESHES:-1x2}; do
        [ "${mesh#*x}" = 1 ] && continue  # 244 GB of weights: more than one GPU holds
        stage "a10b_$mesh" 200 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 pcp-jax bench --preset qwen3.5-122b-a10b \
          --reps 2 --decode 16 --tokens 32768 --cp "${mesh%x*}" --tp "${mesh#*x}"
        stage "a17b_$mesh" 200 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 pcp-jax bench --preset qwen3.5-397b-a17b \
          --layers "${LAYERS397:-16}" --reps 2 --decode 16 --tokens 32768 --cp "${mesh%x*}" --tp "${mesh#*x}"
      done ;;
    warmstart)  # a cold start on an empty store, then a restart on it (qwen3.5-9b, cp = CP)
      rm -rf /tmp/pcp_store
      stage cold 420 python3 benchmarks/warmstart.py --store /tmp/pcp_store --cp "${CP:-1}" --max-tokens 131072 \
        --session 20 --fit
      stage restart 170 python3 benchmarks/warmstart.py --store /tmp/pcp_store --cp "${CP:-1}" --max-tokens 131072 \
        --session 20 ;;
    prefix)  # qwen3.5-9b: a 100k-token document and five questions, the first prefill with the cache on/off, a chat
      stage prefix 300 python3 benchmarks/prefix_cache.py ;;
    warmstart35)  # qwen3.5-35b-a3b: warmup(131072, max_new_tokens=64) until ready, then a 128k prompt + 64 tokens
      rm -rf /tmp/pcp_store35
      stage warm35 250 python3 benchmarks/warmstart.py --store /tmp/pcp_store35 --preset qwen3.5-35b-a3b \
        --max-tokens 131072 --max-new-tokens 64 --new-tokens 64 --session 1 --min-tokens 131072 --ready-only ;;
    fp8)
      stage fp8_kernels 540 env CUDA_VISIBLE_DEVICES=0 python3 benchmarks/fp8.py --parts check,matmul,error,big
      stage fp8_models 570 env CUDA_VISIBLE_DEVICES=0 python3 benchmarks/fp8.py --parts models ;;
    *) echo "unknown suite $suite; expected kernels, prefill, decode, tp, warmstart, prefix, warmstart35 or fp8" >&2; exit 2 ;;
  esac
done
