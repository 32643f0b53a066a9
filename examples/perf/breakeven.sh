#!/usr/bin/env bash
# On the GPU machine (issue 22): the break-even benchmark at the 8B shape, bfloat16 then 4-bit.
# Scripted decisions on real-size random-weight forwards (refusion_mlx/break_even.py); each
# profile is compared with left to right run right after it.
# About 5 minutes: ~40 s to build each model; MLX-CUDA kernels are built by each run's warm-ups.
# Each run is bounded by `timeout` and prints as it goes, so a cut run still leaves its rows.
# Writes $OUT/gpu_break_even_8b_bf16.txt, $OUT/gpu_break_even_8b_4bit.txt, $OUT/gpu_env.txt.
set -u
source .gpuwheels/setup.sh
python3 -c "import mlx.core as mx, mlx_lm, sys; print(mx.default_device(), 'mlx', mx.__version__, 'mlx_lm', mlx_lm.__version__, sys.version.split()[0])" > $OUT/gpu_env.txt 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> $OUT/gpu_env.txt
# bf16: every preset (one run per cost shape: mbpp and humaneval share gsm8k's), 64 tokens or one block.
timeout 130 python3 -m refusion_mlx.benchmark --shape qwen3-8b --dtype bfloat16 --break-even \
    --max-tokens 64 --ar-tokens 16 > $OUT/gpu_break_even_8b_bf16.txt 2>&1
echo "bf16 exit $?" >> $OUT/gpu_env.txt
# 4-bit, where wide calls cost most on this GPU: the wide-block settings and two narrow ones, each
# also with plan_slots=1.
timeout 190 python3 -m refusion_mlx.benchmark --shape qwen3-8b --dtype bfloat16 --quantize 4 --break-even \
    --presets gsm8k,mmlu-pro,gpqa,default --max-tokens 64 --ar-tokens 16 --plan-slots-sweep 1 \
    > $OUT/gpu_break_even_8b_4bit.txt 2>&1
echo "4bit exit $?" >> $OUT/gpu_env.txt
cat $OUT/gpu_env.txt
for f in $OUT/gpu_break_even_8b_bf16.txt $OUT/gpu_break_even_8b_4bit.txt; do
  echo "== $f"; grep -B3 -A22 "^where plan-and-infill wins" $f || tail -30 $f
done
