#!/usr/bin/env bash
# Builds mifo with CUDA (`--features cuda`) on a machine that has no CUDA toolkit and no GPU,
# from NVIDIA's pip wheels: nvcc 13.0 and the CUDA 13 headers and libraries go into a venv, and a
# link stub stands in for the driver's libcuda.so (every entry point returns
# CUDA_ERROR_STUB_LIBRARY; the real one comes from the driver where the binary runs).
#
#   scripts/build-cuda.sh [CARGO ARGS ...]      e.g. --target-dir /tmp/cuda-target
#   scripts/build-cuda.sh --features cudnn      cuDNN convolutions as well (README)
#
# Environment: MIFO_CUDA_TOOLKIT (where the venv and the toolkit tree go; default
# target/cuda-toolkit), CUDA_COMPUTE_CAP (default 90: H100/H200), PYTHON (default python3).
# With a CUDA 13.0 toolkit installed, none of this is needed:
#   CUDA_COMPUTE_CAP=90 cargo build --release --features cuda
#
# nvcc must be 13.0: a newer one writes PTX that driver 580 cannot load. The binary needs, where
# it runs, libcuda.so.1 (the driver) and libcublas/libcublasLt 13, libcudart 13, libcurand 10
# (a torch cu130 venv has them: site-packages/nvidia/cu13/lib; scripts/gpu-check.sh finds them).
set -euo pipefail

W=${MIFO_CUDA_TOOLKIT:-target/cuda-toolkit}
mkdir -p "$W"
W=$(cd "$W" && pwd)
PY=${PYTHON:-python3}

if [ ! -x "$W/venv/bin/python" ]; then
  "$PY" -m venv "$W/venv"
fi
echo "installing the CUDA 13.0 wheels into $W/venv (about 650 MB the first time)" >&2
"$W/venv/bin/python" -m pip install -q \
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
  nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 \
  nvidia-cublas==13.1.0.3 nvidia-curand==10.4.0.35

# With `--features cudnn`: cuDNN 9 (the version a torch cu130 install ships, so that the binary
# finds the same library where it runs).
CUDNN=0
for a in "$@"; do [[ $a == *cudnn* ]] && CUDNN=1; done
if [ $CUDNN = 1 ]; then
  echo "installing the cuDNN 9.19 wheel (about 370 MB the first time)" >&2
  "$W/venv/bin/python" -m pip install -q --no-deps nvidia-cudnn-cu13==9.19.1.2
fi

# The CUDA 13 wheels install into site-packages/nvidia/cu13/{bin,include,lib,nvvm}; cudarc and
# candle-kernels want a CUDA_HOME with bin/, include/, nvvm/ and unversioned lib64/*.so.
C=$("$W/venv/bin/python" -c 'import nvidia,os;print(os.path.join(list(nvidia.__path__)[0],"cu13"))')
H=$W/cuda
mkdir -p "$H/lib64/stubs"
for d in bin include nvvm; do ln -sfn "$C/$d" "$H/$d"; done
for l in cudart.so.13 cublas.so.13 cublasLt.so.13 curand.so.10 nvrtc.so.13; do
  ln -sfn "$C/lib/lib$l" "$H/lib64/lib${l%.so.*}.so"
done

if [ $CUDNN = 1 ]; then
  D=$("$W/venv/bin/python" -c 'import nvidia,os;print(os.path.join(list(nvidia.__path__)[0],"cudnn","lib"))')
  ln -sfn "$D/libcudnn.so.9" "$H/lib64/libcudnn.so"
fi

# The link stub must exist before cudarc's build script first runs (it adds -L only for
# folders that exist then, and caches that).
if [ ! -e "$H/lib64/stubs/libcuda.so" ]; then
  gcc -E -P -I"$H/include" -x c - <<<'#include <cuda.h>' \
    | grep -oE '\bCUresult +cu[A-Za-z0-9_]+ *\(' | sed -E 's/CUresult +//; s/ *\(//' | sort -u \
    | awk '{print "int " $1 "(void){return 34;}"}' >"$W/cuda_stub.c"
  gcc -shared -fPIC -O2 -Wl,-soname,libcuda.so.1 -o "$H/lib64/stubs/libcuda.so" "$W/cuda_stub.c"
fi

export CUDA_HOME=$H
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CUDARC_CUDA_VERSION=13000
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-$(nproc)}
echo "cargo build --release --features cuda $* (CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP; about 12 min cold on 2 cores)" >&2
cargo build --release --features cuda "$@"
