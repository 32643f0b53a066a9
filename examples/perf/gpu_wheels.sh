#!/usr/bin/env bash
# Here (with the package registry): the pure-Python wheels the GPU machine (Python 3.12, no network)
# needs beside MLX-CUDA to run this project's GPU scripts: mlx-lm (the comparisons), our server's
# HTTP stack (vs_mlx_lm_server_gpu.sh) and pytest. Writes them to .gpuwheels/ (git-ignored) with a
# setup.sh to source there; MLX-CUDA itself comes from ../shared/cuda/mlx-cuda-wheels.sh (.mlxcuda/).
#
#   bash examples/perf/gpu_wheels.sh                      # here
#   source .gpuwheels/setup.sh                            # there (carry .gpuwheels and .mlxcuda/b)
set -eu
mkdir -p .gpuwheels
python -m pip download -q -d .gpuwheels --python-version 3.12 --platform manylinux2014_x86_64 \
    --only-binary=:all: --no-deps mlx-lm==0.32.2 uvicorn h11 click starlette anyio sniffio idna pydantic \
    pydantic_core annotated_types typing_inspection typing_extensions pytest pluggy iniconfig
cat > .gpuwheels/setup.sh <<'SETUP'
# sourced on the GPU machine: MLX-CUDA (staged part.aa + .mlxcuda/b) and these wheels on PYTHONPATH
mkdir -p /root/mlx /root/pkgs
if [ ! -d /root/mlx/mlx ]; then cat /root/stage/part.aa .mlxcuda/b/part.ab | tar -xJ -C /root/mlx; fi
if [ ! -d /root/pkgs/uvicorn ]; then python3 -m pip install -q --no-index --no-deps --target /root/pkgs .gpuwheels/*.whl; fi
export PYTHONPATH=/root/mlx:/root/pkgs:$PWD
SETUP
ls .gpuwheels
