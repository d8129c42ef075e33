#!/usr/bin/env bash
# One prepared run on a GPU machine: parity on the device, the SD 2.1-base-shaped benchmark at
# 512, one whole learning run (paper preset, 800 + 400 LoRA iterations) and one synthesised
# 512 image on random weights, with times and peak device memory.
#
#   scripts/gpu-check.sh [BINARY [PART ...]]
#
# BINARY defaults to target/release/mifo (a BINARY ending in .gz is unpacked first). PARTs, in
# the order given (default: parity sd21):
#   parity   mifo model verify on the device (tiny fixture against the diffusers references)
#   sd21     bench and full in one process (the random weights are built once): every row at
#            512, f32, 3 runs each, then one image, then the whole learning run (last: the
#            longest; it reports every 100th step, so a run stopped part-way still shows its rate)
#   bench    mifo bench --shape sd21-base at 512, f32, 3 runs per row
#   full     mifo bench --shape sd21-base --full: one image and the whole learning run
#   f16      the inference rows in f16
#   tiny     mifo bench on the tiny fixture
# Each SD-shaped part builds 1.3 B random weights on the CPU first (seconds to a minute).
#
# Build the binary with `cargo build --release --features cuda` (README, "Performance"). The GPU
# machine needs no Rust: the binary, this checkout's fixtures/, the driver's libcuda.so.1 and the
# CUDA 13 libraries (cuBLAS, cuRAND, runtime, and cuDNN 9 for a `cudnn` build; a torch cu130 venv
# has them, found below).
# Environment: MIFO_GPU_DEVICE (default cuda:0), OUT (logs; default ./gpu-check-out).
set -uo pipefail

BIN=${1:-target/release/mifo}
shift || true
PARTS=${*:-parity sd21}
DEV=${MIFO_GPU_DEVICE:-cuda:0}
OUT=${OUT:-./gpu-check-out}
mkdir -p "$OUT"

# The CUDA libraries of a pip-installed torch (nvidia/cu13/lib, and cuDNN in nvidia/cudnn/lib
# for a `--features cudnn` build), when present.
if NV=$(python3 -c 'import nvidia;print(list(nvidia.__path__)[0])' 2>/dev/null); then
  for d in "$NV/cudnn/lib" "$NV/cu13/lib"; do
    [ -d "$d" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
  done
fi

say() { printf '\n== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }

say "machine"
if [[ $BIN == *.gz ]]; then
  gzip -dc "$BIN" >/tmp/mifo-gpu-check && chmod +x /tmp/mifo-gpu-check && BIN=/tmp/mifo-gpu-check
fi
# The driver's libcuda.so.1, where the loader does not already know it.
if ldd "$BIN" | grep -q 'libcuda.so.1 => not found'; then
  for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64; do
    if [ -e "$d/libcuda.so.1" ]; then export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:$d"; break; fi
  done
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
if ldd "$BIN" | grep 'not found'; then
  echo "missing libraries (above): put the CUDA 13 libraries on LD_LIBRARY_PATH" >&2
  exit 1
fi
"$BIN" --version

for part in $PARTS; do
  case $part in
    parity)
      say "parity on $DEV (tiny fixture vs diffusers references)"
      "$BIN" model verify fixtures/tiny-sd21 fixtures/tiny-sd21/reference.safetensors \
        --device "$DEV" >"$OUT/verify.txt" 2>&1
      echo "exit $?"; tail -3 "$OUT/verify.txt"
      ;;
    sd21)
      say "SD 2.1-base shapes at 512, f32: every row, one image, the whole learning run"
      "$BIN" bench --shape sd21-base --device "$DEV" --iters 3 \
        --only text_encode,vae_encode,vae_decode,unet_forward,learn_phase_a,learn_phase_b_lora,learn_phase_b_full,synth_step,synth_step_latent_opt,kmeans_refine,synth_image,learn_run \
        2> >(tee "$OUT/sd21.log" >&2) | tee "$OUT/sd21.txt"
      ;;
    bench)
      say "SD 2.1-base shapes at 512, f32"
      "$BIN" bench --shape sd21-base --device "$DEV" --iters 3 2>"$OUT/bench-sd21.log" \
        | tee "$OUT/bench-sd21.txt"
      ;;
    full)
      say "whole runs at 512: learning (paper preset, LoRA) and one image (50 steps, 15 guided)"
      "$BIN" bench --shape sd21-base --device "$DEV" --full 2>"$OUT/full.log" \
        | tee "$OUT/full.txt"
      ;;
    f16)
      say "SD 2.1-base shapes at 512, f16 inference rows"
      "$BIN" bench --shape sd21-base --device "$DEV" --dtype f16 --iters 3 \
        --only text_encode,vae_encode,vae_decode,unet_forward,synth_step,synth_step_latent_opt \
        2>"$OUT/bench-f16.log" | tee "$OUT/bench-f16.txt"
      ;;
    tiny)
      say "tiny fixture"
      "$BIN" bench --device "$DEV" --iters 20 2>"$OUT/bench-tiny.log" | tee "$OUT/bench-tiny.txt"
      ;;
    *)
      echo "unknown part $part (parity sd21 bench full f16 tiny)" >&2
      exit 2
      ;;
  esac
done
say "done; logs in $OUT"
