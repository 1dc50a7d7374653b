#!/usr/bin/env bash
# The base U-Net's train step on one accelerator, bf16: step time, XLA FLOPs and MFU at the
# bench preset and at paper width, each at the largest batch that fits (tried from the largest
# down; an out-of-memory run moves on to the next). One short run, for scarce GPU time:
#
#   bash benchmarks/gpu_mfu.sh                       # on the GPU machine, from the repo root
#   PRESETS="base64:tiny" BATCHES="8 4" STEPS=2 bash benchmarks/gpu_mfu.sh   # a CPU dry run
#
# Prints each run's benchmarks/unet_step.py report, then one line per preset:
#   gpu_mfu: preset=base64:paper batch=.. step_s=.. tflop=.. mfu=..
set -uo pipefail
PY=${PY:-python3}
PRESETS=${PRESETS:-"base64:bench base64:paper"}
BATCHES=${BATCHES:-"256 128 64 32 16 8"}
STEPS=${STEPS:-5}
summary=()
for preset in $PRESETS; do
  found=""
  for batch in $BATCHES; do
    out=$("$PY" benchmarks/unet_step.py --preset="$preset" --batch="$batch" --dtype=bfloat16 \
      --steps="$STEPS" --fwd_steps=2 2>&1)
    if [ $? -eq 0 ]; then
      echo "$out"
      step=$(sed -n 's/^train step *\([0-9.]*\) s.*/\1/p' <<<"$out")
      gflop=$(sed -n 's/^train-step FLOPs *\([0-9.]*\) GFLOP.*/\1/p' <<<"$out")
      mfu=$(sed -n 's/^MFU *\([^ ]*\).*/\1/p' <<<"$out")
      tflop=$(awk -v g="$gflop" 'BEGIN { printf "%.2f", g / 1000 }')
      summary+=("gpu_mfu: preset=$preset batch=$batch step_s=$step tflop=$tflop mfu=$mfu")
      found=1
      break
    fi
    if grep -qiE "RESOURCE_EXHAUSTED|out of memory|OOM" <<<"$out"; then
      echo "gpu_mfu: $preset batch $batch does not fit; trying a smaller batch"
    else
      echo "$out" | tail -20
      echo "gpu_mfu: $preset batch $batch failed (not out of memory); stopping this preset" >&2
      break
    fi
  done
  [ -n "$found" ] || summary+=("gpu_mfu: preset=$preset no batch in '$BATCHES' ran")
done
printf '%s\n' "${summary[@]}"
