#!/usr/bin/env bash
# On the GPU machine (issue 22): our server against mlx_lm.server on the same weights (the demo
# model in float32), streamed chat requests from 1 and 8 clients (examples/perf/vs_mlx_lm_server.py).
# About 2 minutes. Writes $OUT/gpu_vs_mlx_lm_server.txt (the table, then each step's exit code).
# Assumes MLX-CUDA and mlx_lm are importable (`source .gpuwheels/setup.sh`, sourced here if present).
set -u
OUT=${OUT:-/tmp}
LOG=$OUT/gpu_vs_mlx_lm_server.txt
PORT=${PORT:-8765}
REQUESTS=${REQUESTS:-48}
[ -f .gpuwheels/setup.sh ] && source .gpuwheels/setup.sh
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
WEIGHTS=$(mktemp -d)/demo32
SERVER=
cleanup() {
  if [ -n "$SERVER" ] && kill -0 "$SERVER" 2>/dev/null; then
    kill "$SERVER"; sleep 2; kill -9 "$SERVER" 2>/dev/null
  fi
  wait 2>/dev/null
  rm -rf "$(dirname "$WEIGHTS")"
}
trap cleanup EXIT

{
  python3 -c "import mlx.core as mx, mlx_lm, sys; print('#', mx.default_device(), 'mlx', mx.__version__, 'mlx_lm', mlx_lm.__version__, sys.version.split()[0])"
  nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | sed 's/^/# /'
} > "$LOG" 2>&1

# Our server needs its HTTP stack; a GPU machine without network has to be given the wheels
# (`bash examples/perf/gpu_wheels.sh` here writes them, with mlx-lm's, to .gpuwheels/).
if ! python3 -c "import uvicorn, starlette, pydantic" 2>> "$LOG"; then
  echo "# our server's dependencies are missing (uvicorn, starlette, pydantic): install their wheels first" >> "$LOG"
  cat "$LOG"; exit 1
fi

timeout 60 python3 -m refusion_mlx.convert --hf-path refusion_mlx/demo/model --mlx-path "$WEIGHTS" \
    --dtype float32 >> "$LOG" 2>&1
echo "# convert exit $?" >> "$LOG"

python3 -m mlx_lm.server --model "$WEIGHTS" --port "$PORT" --decode-concurrency 16 \
    > "$OUT/gpu_mlx_lm_server.log" 2>&1 &
SERVER=$!
up=0
for _ in $(seq 90); do  # its port open within 90 s, or give up
  if python3 -c "import socket, sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1)" "$PORT" 2>/dev/null; then
    up=1; break
  fi
  kill -0 "$SERVER" 2>/dev/null || break
  sleep 1
done
echo "# mlx_lm.server up: $up" >> "$LOG"

if [ "$up" = 1 ]; then
  timeout 240 python3 examples/perf/vs_mlx_lm_server.py --port "$PORT" --requests "$REQUESTS" >> "$LOG" 2>&1
  echo "# vs_mlx_lm_server.py exit $?" >> "$LOG"
else
  tail -5 "$OUT/gpu_mlx_lm_server.log" >> "$LOG"
fi
cat "$LOG"
