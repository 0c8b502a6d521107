#!/usr/bin/env bash
# The GPU check (issue 8), for one NVIDIA GPU with network access to the package index:
#   1. installs the CUDA JAX wheels (same jax version as here), a CUDA torch and the test extra;
#   2. runs the parity tests on the GPU (JAX on CUDA vs diffusers on the CPU, fp32 at full matmul
#      precision: XLA's default fp32 matmuls on Ampere+ are TF32, which is not what parity means);
#   3. runs scripts/benchmark.py for the SD 1.5 architecture, 512x512, 50 steps, 4 concepts, bf16 ours vs
#      fp16 diffusers on the same card, with model FLOP utilisation against the card's bf16 peak, and the
#      same case in fp32 on both sides (20 steps), so the half-precision rows' GPU memory has its fp32 base
#      (issue 16: bf16 peak <= 0.6x fp32's);
#   4. runs it for SDXL (the real architecture, random weights), 1024x1024, 50 steps, 2 concepts, bf16 ours vs
#      fp16 diffusers (its SEGA code around its SDXL UNet, sega_jax.testing.reference.sega_xl_reference);
#   5. prints one table (also written to $OUT/gpu_check.md). Budget: under 15 minutes on an H100/H200.
#
# Usage: bash scripts/gpu_check.sh        (SKIP_INSTALL=1 when the environment is ready;
#        PEAK_TFLOPS=... to override the dense bf16 peak taken from the card's name; OUT=folder for logs)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export SEGA_JAX_CACHE_DIR=off PYTHONUNBUFFERED=1

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  JAX_VERSION=${JAX_VERSION:-0.10.2}
  python3 -m pip install -q "jax[cuda12]==${JAX_VERSION}" torch || exit 1
  python3 -m pip install -q -e ".[test]" && python3 -m pip install -q --no-deps open_clip_torch || exit 1
fi

GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case "$GPU" in  # dense bf16 tensor-core peak, TFLOP/s (vendor figures)
  *H200* | *H100*SXM* | *H100\ 80GB\ HBM3*) PEAK=${PEAK_TFLOPS:-989} ;;
  *H100*) PEAK=${PEAK_TFLOPS:-756} ;;
  *A100*) PEAK=${PEAK_TFLOPS:-312} ;;
  *L40S*) PEAK=${PEAK_TFLOPS:-362} ;;
  *) PEAK=${PEAK_TFLOPS:-0} ;;
esac
python3 -c "import jax; d = jax.devices(); assert d[0].platform == 'gpu', d; print('jax', jax.__version__, d)" \
  || { echo "JAX sees no GPU"; exit 1; }

start=$(date +%s)
JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest timeout 300 python3 -m pytest -q -x -m "not heavy" \
  -p no:cacheprovider tests/test_attention.py tests/test_unet.py tests/test_vae.py tests/test_clip.py \
  tests/test_guidance.py tests/test_schedulers.py tests/test_scheduler_configs.py tests/test_pipeline.py 2>&1 | tee "$OUT/parity.log"
parity_rc=${PIPESTATUS[0]}
parity_s=$(( $(date +%s) - start ))

JAX_PLATFORMS=cuda timeout 300 python3 scripts/benchmark.py --model sd15 --size 512 --steps 50 --concepts 4 \
  --dtype bfloat16 --torch-device cuda --torch-dtype float16 --repeats 2 --peak-tflops "$PEAK" \
  2>&1 | tee "$OUT/benchmark.log"
bench_rc=${PIPESTATUS[0]}

JAX_PLATFORMS=cuda timeout 300 python3 scripts/benchmark.py --model sd15 --size 512 --steps 20 --concepts 4 \
  --torch-device cuda --torch-dtype float32 --repeats 1 2>&1 | tee "$OUT/benchmark_fp32.log"
fp32_rc=${PIPESTATUS[0]}

JAX_PLATFORMS=cuda timeout 600 python3 scripts/benchmark.py --model sdxl --size 1024 --steps 50 --concepts 2 \
  --dtype bfloat16 --torch-device cuda --torch-dtype float16 --repeats 1 \
  2>&1 | tee "$OUT/benchmark_sdxl.log"
sdxl_rc=${PIPESTATUS[0]}

field() { grep -m1 "$1" "${LOG:-$OUT/benchmark.log}" | sed -E "s/$2/\1/"; }
{
  echo "GPU check on: $GPU ($(date -u '+%Y-%m-%d %H:%M UTC'))"
  echo
  echo "| check | result |"
  echo "|---|---|"
  echo "| parity tests (fp32, highest matmul precision) | $(tail -1 "$OUT/parity.log") (exit $parity_rc, ${parity_s} s) |"
  echo "| sega-jax bf16, ms/step (SD 1.5, 512x512, 4 concepts) | $(field '^sega-jax :' '^sega-jax : *([0-9.]+) ms.*') |"
  echo "| diffusers fp16, ms/step | $(field '^diffusers:' '^diffusers: *([0-9.]+) ms.*') |"
  echo "| speed-up (diffusers / sega-jax) | $(field '^ratio' '.*: ([0-9.]+x).*') |"
  echo "| model FLOP utilisation (UNet, peak ${PEAK} TFLOP/s) | $(field 'model FLOP' '.*= ([0-9.]+%).*') |"
  echo "| GPU peak memory, sega-jax / diffusers | $(field '^sega-jax :' '.*gpu peak ([0-9]+ MB).*') / $(field '^diffusers:' '.*gpu peak ([0-9]+ MB).*') |"
  echo "| compile time, sega-jax | $(field '^sega-jax :' '.*compile ([0-9.]+ s).*') |"
  echo "| benchmark exit status | $bench_rc |"
  LOG="$OUT/benchmark_fp32.log"
  echo "| fp32 both sides, ms/step sega-jax / diffusers (20 steps) | $(field '^sega-jax :' '^sega-jax : *([0-9.]+) ms.*') / $(field '^diffusers:' '^diffusers: *([0-9.]+) ms.*') |"
  echo "| fp32 GPU peak memory, sega-jax / diffusers | $(field '^sega-jax :' '.*gpu peak ([0-9]+ MB).*') / $(field '^diffusers:' '.*gpu peak ([0-9]+ MB).*') |"
  echo "| fp32 benchmark exit status | $fp32_rc |"
  LOG="$OUT/benchmark_sdxl.log"
  echo "| SDXL sega-jax bf16, ms/step (1024x1024, 50 steps, 2 concepts) | $(field '^sega-jax :' '^sega-jax : *([0-9.]+) ms.*') |"
  echo "| SDXL diffusers fp16 (SEGA code around its UNet), ms/step | $(field '^diffusers:' '^diffusers: *([0-9.]+) ms.*') |"
  echo "| SDXL speed-up (diffusers / sega-jax) | $(field '^ratio' '.*: ([0-9.]+x).*') |"
  echo "| SDXL GPU peak memory, sega-jax / diffusers | $(field '^sega-jax :' '.*gpu peak ([0-9]+ MB).*') / $(field '^diffusers:' '.*gpu peak ([0-9]+ MB).*') |"
  echo "| SDXL benchmark exit status | $sdxl_rc |"
} | tee "$OUT/gpu_check.md"
[ "$parity_rc" = 0 ] && [ "$bench_rc" = 0 ] && [ "$fp32_rc" = 0 ] && [ "$sdxl_rc" = 0 ]
