# Lease 1, call 3: 4-bit break-even for the presets the last run missed, and gsm8k with plan_slots=1;
# then the bounded-cache memory probe.
set -u
source .gpuwheels/setup.sh
export PYTHONPATH=$PYTHONPATH:$PWD
timeout 300 python3 -m refusion_mlx.benchmark --shape qwen3-8b --dtype bfloat16 --quantize 4 --break-even \
    --presets arc,gpqa,math,mmlu-pro,default --max-tokens 64 --ar-tokens 16 > $OUT/gpu_break_even_8b_4bit_rest.txt 2>&1
echo "4bit rest exit $?"
timeout 150 python3 -m refusion_mlx.benchmark --shape qwen3-8b --dtype bfloat16 --quantize 4 --break-even \
    --presets gsm8k --max-tokens 64 --ar-tokens 16 --plan-slots-sweep 1 > $OUT/gpu_break_even_8b_4bit_gsm8k_ps1.txt 2>&1
echo "4bit ps exit $?"
for f in $OUT/gpu_break_even_8b_4bit_rest.txt $OUT/gpu_break_even_8b_4bit_gsm8k_ps1.txt; do
  echo "== $f"; grep -A14 "^where plan-and-infill wins" $f || tail -12 $f
done
