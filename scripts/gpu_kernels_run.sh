#!/usr/bin/env bash
# Issue 17's GPU runs on one H200 (carry .whl). PART=1: MoE layer and grouped-matmul candidates
# (scripts/bench_moe.py) and the GDN variants against FLA (bench_kernels.py gdnvar). PART=2: the 9B decode
# step against its memory floor (scripts/bench_decode_step.py) and the 35B-A3B prefill before (.old/, the
# tree before this work, carried) and after. PART=3: the last round (see below). PART=4: MoE tail tiles and
# generate's queued decode loop; PART=5: GDN variants (fused forms timed); PART=6: the GDN default
# against fp32 and FLA; PART=7: the 9B prefill before (.old) and after;
# PART=8: decode attention from the stacked cache in place (run K11); PART=9: trace profiles (kernel
# tables, scripts/trace_table.py) of the GDN forward vs FLA at 128k / 64 heads and of the MoE stages at 8k
# tokens; PART=10: Nsight Compute counters of one call of each (scripts/ncu_kernels.py). PART=4's
# `--sweep tail` went with the tail tiles' revert (91d4ffb). PART=11: MoE row tiles of 192/256 rows, and the
# 35B MoE layer at 32k against transformers; PART=12: the 397B MoE layer at 8k; PART=13: the row-tile lookup
# before/after; PART=14: more MoE tile shapes at 8k. Stage logs under $OUT.
source scripts/gpu_common.sh
export JAX_LOG_COMPILES=0
for part in ${PART:-1 2}; do
  if [ "$part" = 1 ]; then
    stage moe "${T_MOE:-300}" python scripts/bench_moe.py --quick --budget-s 120 --out "$OUT"
    show moe 60
    stage gdnvar "${T_GDN:-270}" python scripts/bench_kernels.py --sections gdnvar --gdn-T "${GDN_T:-32768,131072}" --out "$OUT"
    show gdnvar 40
  elif [ "$part" = 3 ]; then  # the last round: MoE epilogue/chain variants, fused GDN forms, generate loop
    stage moe_final "${T_MOE:-150}" python scripts/check_moe_kernel.py \
      --cases qwen3.5-397b-a17b:8192,qwen3.5-35b-a3b:8192,qwen3.5-35b-a3b:32768
    show moe_final 70
    stage gdnvar_final "${T_GDN:-150}" python scripts/bench_kernels.py --sections gdnvar --gdn-T "${GDN_T:-32768,131072}" --out "$OUT"
    show gdnvar_final 30
    stage decode_final "${T_DEC:-190}" python scripts/bench_decode_step.py --fill random ${DECODE_ARGS:-}
    show decode_final 30
  elif [ "$part" = 4 ]; then
    stage moe_tail "${T_MOE:-220}" python scripts/check_moe_kernel.py --sweep tail --cases \
      qwen3.5-397b-a17b:8192,qwen3.5-397b-a17b:32768,qwen3.5-122b-a10b:8192,qwen3.5-35b-a3b:8192,qwen3.5-35b-a3b:32768
    show moe_tail 50
    stage decode_loop "${T_DEC:-240}" python scripts/bench_decode_step.py --fill random --variants dense ${DECODE_ARGS:-}
    show decode_loop 16
  elif [ "$part" = 5 ]; then
    stage gdnvar5 "${T_GDN:-420}" python scripts/bench_kernels.py --sections gdnvar --gdn-T "${GDN_T:-32768,131072}" --out "$OUT"
    show gdnvar5 40
  elif [ "$part" = 6 ]; then  # the fused GDN default: checked against fp32, then against FLA
    stage gdn6 "${T_GDN:-330}" python scripts/bench_kernels.py --sections checkgdn,gdn --gdn-T 8192,32768,131072 --out "$OUT"
    show gdn6 30
  elif [ "$part" = 7 ]; then
    stage prefill9_old "${T_PF:-150}" bash -c "cd .old && python run_old.py scripts/bench_prefill.py --preset qwen3.5-9b --tokens 32768 --reps 3"
    show prefill9_old 8
    stage prefill9_new "${T_PF:-150}" python scripts/bench_prefill.py --preset qwen3.5-9b --tokens 32768 --reps 3
    show prefill9_new 8
  elif [ "$part" = 8 ]; then  # decode attention reading the stacked cache in place, with a profile at 128k
    stage checkdecode 120 python scripts/bench_kernels.py --sections checkdecode --out "$OUT"
    show checkdecode 8
    stage decode_pallas "${T_DEC:-300}" python scripts/bench_decode_step.py --fill random --variants dense,pallas \
      --profile "$OUT/decode_prof" --profile-context 131072 ${DECODE_ARGS:-}
    show decode_pallas 60
  elif [ "$part" = 9 ]; then  # profiles for the two missed goals: GDN forward vs FLA, MoE grouped matmul at 8k
    stage prof_gdn "${T_GDN:-200}" python scripts/bench_kernels.py --sections gdn --gdn-T 32768,131072 \
      --profile "$OUT/prof_gdn" --out "$OUT"
    show prof_gdn 60
    stage prof_moe "${T_MOE:-200}" python scripts/check_moe_kernel.py \
      --cases qwen3.5-397b-a17b:8192,qwen3.5-35b-a3b:8192 --profile "$OUT/prof_moe"
    show prof_moe 60
  elif [ "$part" = 10 ]; then  # Nsight Compute counters of one call of each kernel behind the missed goals
    ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    for c in ${NCU_CASES:-moe:qwen3.5-397b-a17b:8192 moe:qwen3.5-35b-a3b:8192 gdn:32768:64 fla:32768:64}; do
      n=ncu_${c//[:.]/_}${NCU_TAG:-}
      stage "$n" "${T_NCU:-150}" "$ncu" --profile-from-start off --clock-control none ${NCU_ARGS:-} --csv --page details \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy \
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum --log-file "$OUT/$n.csv" \
        python scripts/ncu_kernels.py --cases "$c"
      show "$n" 6
      python scripts/ncu_kernels.py --summarize "$OUT/$n.csv" 2>&1 | tee "$OUT/$n.md" | head -40
    done
  elif [ "$part" = 11 ]; then  # MoE row tiles of 192 and 256 rows (checked, then timed; trace profile per case),
    # then the 35B's MoE layer at 32k tokens against transformers (the row run K2 did not reach)
    stage moe_rows "${T_MOE:-300}" python scripts/check_moe_kernel.py --profile /tmp/prof_moe --cases \
      qwen3.5-397b-a17b:8192,qwen3.5-122b-a10b:8192,qwen3.5-35b-a3b:8192,qwen3.5-397b-a17b:32768
    show moe_rows 150
    stage moe35_32k "${T_LAYER:-200}" python scripts/bench_moe.py --presets qwen3.5-35b-a3b --tokens 32768 --quick \
      --budget-s 30 --out /tmp/moe35
    show moe35_32k 40
  elif [ "$part" = 12 ]; then  # the 397B's MoE layer at 8k tokens with 192-row tiles (default_config), vs transformers
    stage moe397_8k "${T_LAYER:-200}" python scripts/bench_moe.py --presets qwen3.5-397b-a17b --tokens 8192 --quick \
      --budget-s 30 --out /tmp/moe397
    show moe397_8k 40
  elif [ "$part" = 13 ]; then  # the row-tile lookup as one comparison: MoE stages profiled, the 397B layer at 8k,
    # and the 35B prefill at 32k before (.prev: `git archive 2086943` plus .old/run_old.py, carried) and after
    stage moe_prof 130 python scripts/check_moe_kernel.py --profile /tmp/prof_moe --cases qwen3.5-397b-a17b:8192
    show moe_prof 60
    stage moe397_8k 120 python scripts/bench_moe.py --presets qwen3.5-397b-a17b --tokens 8192 --quick --budget-s 20 \
      --out /tmp/moe397
    show moe397_8k 12
    stage prefill35_prev "${T_PF:-150}" bash -c "cd .prev && python run_old.py scripts/bench_prefill.py \
      --preset qwen3.5-35b-a3b --tokens 32768 --reps 3"
    show prefill35_prev 6
    stage prefill35_new "${T_PF:-150}" python scripts/bench_prefill.py --preset qwen3.5-35b-a3b --tokens 32768 --reps 3
    show prefill35_new 6
  elif [ "$part" = 14 ]; then  # MoE tiles at 8k tokens: chained / swizzled 192-row tiles, block_k 128
    stage moe_tiles "${T_MOE:-300}" python scripts/check_moe_kernel.py --cases \
      qwen3.5-397b-a17b:8192,qwen3.5-122b-a10b:8192,qwen3.5-35b-a3b:8192
    show moe_tiles 90
  else
    stage decode "${T_DEC:-300}" python scripts/bench_decode_step.py --fill random --profile "$OUT/decode_prof" ${DECODE_ARGS:-}
    show decode 50
    stage prefill35_old "${T_PF:-130}" bash -c "cd .old && python run_old.py scripts/bench_prefill.py --preset qwen3.5-35b-a3b --tokens 32768 --reps 2"
    show prefill35_old 8
    stage prefill35_new "${T_PF:-130}" python scripts/bench_prefill.py --preset qwen3.5-35b-a3b --tokens 32768 --reps 2
    show prefill35_new 8
  fi
done
