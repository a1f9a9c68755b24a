# Sourced by the GPU run scripts: environment, wheel and package install, and the stage/show helpers.
# Carry `.whl` (../shared/device-wheels.sh plus flax 0.12.12) with the call.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export JAX_LOG_COMPILES=1  # compile times of every jitted program go to the logs
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
ngpu=$(nvidia-smi -L | wc -l)

stage() {  # name, time limit (s), command...: runs it into $OUT/name.log unless SKIP names it
  local name=$1 limit=$2; shift 2
  case " ${SKIP:-} " in *" $name "*) echo "== $name skipped"; return;; esac
  echo "== $name (limit ${limit}s) start $(date +%T)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "== $name exit $? at $(date +%T)" >> "$OUT/$name.log"
}

show() {  # name [lines]: the end of a stage's log without the compile chatter, then its model compile times
  echo "---- $1"
  grep -v "^W0000\|^I0000\|Autotuning cache miss\|Finished tracing\|Finished jaxpr\|Compiling \|WARNING:jax._src\|Finished XLA compilation of jit(\(convert\|broadcast\|_normal\|multiply\|_uniform\|log\|stage\|_threefry\|_where\)" \
    "$OUT/$1.log" | tail -"${2:-16}"
  grep -h "Finished XLA compilation of jit(per_shard)" "$OUT/$1.log" | sed 's/.*Finished/  Finished/'
}
