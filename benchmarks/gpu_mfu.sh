#!/usr/bin/env bash
# The base and SR 256 U-Nets' train steps on one accelerator, bf16, with the attention the
# target runs (cuDNN's fused kernel on GPU where it applies): step time, model FLOPs
# (nn.flops: 3 x forward), XLA's FLOPs and the model-FLOPs MFU, each preset at the largest
# batch that fits (tried from the largest down; an out-of-memory run moves on to the next).
# One short run, for scarce GPU time:
#
#   bash benchmarks/gpu_mfu.sh                       # on the GPU machine, from the repo root
#   PRESETS="base64:tiny" BATCHES="8 4" STEPS=2 PEAK_TFLOPS=1 bash benchmarks/gpu_mfu.sh  # CPU
#
# Prints each run's benchmarks/unet_step.py report, then one line per preset:
#   gpu_mfu: preset=base64:paper batch=.. attn=.. step_s=.. model_tflop=.. xla_tflop=.. mfu=..
set -uo pipefail
PY=${PY:-python3}
PRESETS=${PRESETS:-"base64:bench base64:paper sr256:paper"}
BATCHES=${BATCHES:-"256 128 64 32 16 8"}
STEPS=${STEPS:-5}
PEAK=()
[ -n "${PEAK_TFLOPS:-}" ] && PEAK=(--peak_tflops="$PEAK_TFLOPS")  # else by device kind
summary=()
for preset in $PRESETS; do
  found=""
  for batch in $BATCHES; do
    out=$("$PY" benchmarks/unet_step.py --preset="$preset" --batch="$batch" --dtype=bfloat16 \
      --steps="$STEPS" --fwd_steps=2 "${PEAK[@]}" 2>&1)
    if [ $? -eq 0 ]; then
      echo "$out"
      step=$(sed -n 's/^train step *\([0-9.]*\) s.*/\1/p' <<<"$out")
      gflop=$(sed -n 's/^train-step FLOPs *\([0-9.]*\) GFLOP.*/\1/p' <<<"$out")
      model=$(sed -n 's/^model FLOPs *\([0-9.]*\) GFLOP.*/\1/p' <<<"$out")
      attn=$(sed -n 's/^attention *\([^ ]*\).*/\1/p' <<<"$out")
      mfu=$(sed -n 's/^MFU *\([^ ]*\).*/\1/p' <<<"$out")
      tflop=$(awk -v g="$gflop" 'BEGIN { printf "%.6f", g / 1000 }')
      mtflop=$(awk -v g="$model" 'BEGIN { printf "%.6f", g / 1000 }')
      summary+=("gpu_mfu: preset=$preset batch=$batch attn=$attn step_s=$step model_tflop=$mtflop xla_tflop=$tflop mfu=$mfu")
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
