#!/usr/bin/env bash
# One prepared run on a GPU machine: parity on the device, the SD 2.1-base-shaped benchmark,
# one full learning run (paper preset, 800 + 400 iterations) and one synthesised image at 512,
# both on random weights, with times and peak device memory.
#
#   scripts/gpu-check.sh [MIFO_BINARY]      (default: target/release/mifo)
#
# Build the binary with `cargo build --release --features cuda` (see README, "GPU"). The GPU
# machine needs no Rust: only the binary, this checkout's fixtures/ and the CUDA 13 libraries
# (cuBLAS, cuRAND, CUDA runtime; e.g. from a torch 2.11+ cu130 venv) plus the driver.
# Environment: MIFO_GPU_DEVICE (default cuda:0), MIFO_GPU_SKIP="learn synth" to skip parts,
# OUT (a folder for the logs; default ./gpu-check-out).
set -uo pipefail

BIN=${1:-target/release/mifo}
DEV=${MIFO_GPU_DEVICE:-cuda:0}
OUT=${OUT:-./gpu-check-out}
SKIP=${MIFO_GPU_SKIP:-}
mkdir -p "$OUT"

# The CUDA libraries of a pip-installed torch (nvidia/cu13/lib), when present.
if NV=$(python3 -c 'import nvidia,os;print(os.path.join(list(nvidia.__path__)[0],"cu13","lib"))' 2>/dev/null) && [ -d "$NV" ]; then
  export LD_LIBRARY_PATH="$NV:${LD_LIBRARY_PATH:-}"
fi

say() { printf '\n== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }

# Peak device memory of a command: nvidia-smi sampled every 100 ms.
peak_mem() {
  local log=$1; shift
  local peak=0 pid
  "$@" >"$log" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    m=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "${DEV#cuda:}" 2>/dev/null | head -1)
    [ -n "$m" ] && [ "$m" -gt "$peak" ] 2>/dev/null && peak=$m
    sleep 0.1
  done
  wait "$pid"; local rc=$?
  echo "exit $rc, peak device memory ${peak} MiB"
  return $rc
}

say "machine"
nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
ldd "$BIN" | grep -E 'not found|cuda|cublas|curand' || true
"$BIN" --version

say "parity on the device (tiny fixture vs diffusers references)"
"$BIN" model verify fixtures/tiny-sd21 fixtures/tiny-sd21/reference.safetensors --device "$DEV" | tail -3

say "benchmark, tiny model"
"$BIN" bench --device "$DEV" --iters 20 | tee "$OUT/bench-tiny.txt"

say "benchmark, SD 2.1-base shapes at 512, f32"
"$BIN" bench --shape sd21-base --device "$DEV" --iters 5 --json >"$OUT/bench-sd21-f32.json" 2>"$OUT/bench-sd21-f32.log"
"$BIN" bench --shape sd21-base --device "$DEV" --iters 5 2>/dev/null | tee "$OUT/bench-sd21-f32.txt" || tail -5 "$OUT/bench-sd21-f32.log"

say "benchmark, SD 2.1-base shapes at 512, f16 (components and synthesis)"
"$BIN" bench --shape sd21-base --device "$DEV" --dtype f16 --iters 5 \
  --only text_encode,vae_encode,vae_decode,unet_forward,synth_step,synth_step_latent_opt 2>&1 | tail -9 | tee "$OUT/bench-sd21-f16.txt"

case " $SKIP " in *" learn "*) ;; *)
say "one full learning run: paper preset (800 + 400 LoRA), SD 2.1-base shapes, random weights, 512"
peak_mem "$OUT/learn.log" "$BIN" bench --shape sd21-base --device "$DEV" --only learn_run
tail -2 "$OUT/learn.log"
;; esac

case " $SKIP " in *" synth "*) ;; *)
say "one synthesised image: 50 steps, 15 with latent optimisation, SD 2.1-base shapes, 512"
peak_mem "$OUT/synth.log" "$BIN" bench --shape sd21-base --device "$DEV" --only synth_image
tail -3 "$OUT/synth.log"
;; esac

say "done; logs in $OUT"
