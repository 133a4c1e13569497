#!/usr/bin/env bash
# GPU smoke test: optimize -> sample -> eval on CUDA for builtin:unet-digits and tiny models built
# here into a temporary folder (a pixel diffusers UNet2DModel; a latent UNet2DConditionModel + VAE
# with fixed prompt embeddings; a StableDiffusionPipeline with CLIP when transformers is installed);
# CPU/GPU agreement of one sample batch; a samples/s table, CPU vs GPU.
#
#   scripts/gpu_smoke.sh              # on a CUDA machine: a few minutes (< 10); without CUDA: skipped, exit 0
#   scripts/gpu_smoke.sh --cpu-only   # every step on the CPU with small sizes: checks the script itself
#
# Agreement: samples (latents for latent models) from the same schedule and seeds on the CPU and on
# the GPU, float32 with TF32 off (NVIDIA_TF32_OVERRIDE=0), must satisfy
#   max |x_gpu - x_cpu| / max |x_cpu| <= TOL   (TOL = 1e-4, override with STEPOPT_SMOKE_TOL)
# float32 roundoff is 6e-8 per operation; a few-step sampler through a small UNet stays near 1e-6,
# so 1e-4 leaves room for different kernels while catching a wrong dtype, device or seed handling.
# Timings are `stepopt sample --json` seconds (sampling only, model loading excluded; the GPU
# figure includes CUDA warm-up). Exit status: 0 when every step passed, 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
TOL=${STEPOPT_SMOKE_TOL:-1e-4}
export NVIDIA_TF32_OVERRIDE=0 PYTHONPATH="tests${PYTHONPATH:+:$PYTHONPATH}"

if [[ "${1:-}" == "--cpu-only" ]]; then
  GPU=cpu N_AGREE=4 N_TIME=16 N_EVAL=4
  echo "gpu_smoke: --cpu-only: every step on the CPU, small sizes (checks the script, not a GPU)"
elif "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  GPU=cuda N_AGREE=32 N_TIME=1024 N_EVAL=64
  "$PY" -c "import torch; print('gpu_smoke:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
else
  echo "gpu_smoke: no CUDA device, skipped"
  exit 0
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
stepopt() { "$PY" -m stepopt "$@"; }
HAS_EVAL=0
stepopt eval --help >/dev/null 2>&1 && HAS_EVAL=1

# Tiny untrained diffusers models (fixed seeds), written by the tests' own builders.
"$PY" - "$WORK" <<'PYEOF'
import importlib.util, sys
from pathlib import Path
from _tiny_diffusers import make_tiny_diffusers

work = Path(sys.argv[1])
make_tiny_diffusers(work / "tiny-pixel", prediction_type="v_prediction", channels=3, sample_size=16)
if importlib.util.find_spec("transformers") is not None:
    from _tiny_latent import make_tiny_sd

    make_tiny_sd(work / "tiny-sd")
PYEOF
# The latent path (guidance, VAE decoding) also runs without CLIP: a tiny UNet2DConditionModel + VAE
# with fixed prompt embeddings from a python: factory.
MODELS=(builtin:unet-digits "diffusers:$WORK/tiny-pixel" python:_tiny_latent:make_embedded_latent_one_prompt)
if [[ -d "$WORK/tiny-sd" ]]; then
  MODELS+=("diffusers:$WORK/tiny-sd")
else
  echo "gpu_smoke: transformers is not installed: the CLIP text-to-image pipeline is skipped"
fi

# seconds of a `stepopt sample --json` run, read from its JSON line.
seconds() { "$PY" -c "import json, sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])['seconds'])"; }

ROWS="$WORK/rows.tsv"
: >"$ROWS"
status=0
for i in "${!MODELS[@]}"; do
  m=${MODELS[$i]}
  d="$WORK/m$i"
  mkdir -p "$d"
  extra=()
  [[ "$m" == *tiny-sd ]] && extra=(--prompt "a photo of a cat" --prompt "the red dog" --guidance 3.0)
  echo "== $m"
  stepopt optimize --model "$m" --trust-code --solver dpmpp-2m --nfe 6 -O trust-region --device "$GPU" "${extra[@]}" \
    --out "$d/s.yaml"
  # The agreement batch, on both devices (different batch sizes too: results must not depend on them).
  stepopt sample --trust-code --schedule "$d/s.yaml" --n "$N_AGREE" --batch-size 8 --device cpu "${extra[@]}" --out "$d/a-cpu.npz"
  stepopt sample --trust-code --schedule "$d/s.yaml" --n "$N_AGREE" --device "$GPU" "${extra[@]}" --out "$d/a-gpu.npz"
  diff=$("$PY" - "$d/a-cpu.npz" "$d/a-gpu.npz" <<'PYEOF'
import sys
import numpy as np

a, b = (np.load(p, allow_pickle=False) for p in sys.argv[1:3])
key = "latents" if "latents" in a.files else "samples"
x, y = a[key].astype(np.float64), b[key].astype(np.float64)
print(f"{np.abs(y - x).max() / max(np.abs(x).max(), 1e-30):.3e}")
PYEOF
)
  if "$PY" -c "import sys; sys.exit(0 if float('$diff') <= float('$TOL') else 1)"; then
    echo "   CPU/GPU agreement: max|diff|/max|x| = $diff <= $TOL"
  else
    echo "   CPU/GPU agreement FAILED: max|diff|/max|x| = $diff > $TOL"
    status=1
  fi
  t_cpu=$(stepopt sample --trust-code --schedule "$d/s.yaml" --n "$N_TIME" --batch-size 256 --device cpu "${extra[@]}" \
    --out "$d/t-cpu.npz" --json | seconds)
  t_gpu=$(stepopt sample --trust-code --schedule "$d/s.yaml" --n "$N_TIME" --batch-size 256 --device "$GPU" "${extra[@]}" \
    --out "$d/t-gpu.npz" --grid "$d/grid.png" --json | seconds)
  printf '%s\t%s\t%s\t%s\t%s\n' "$m" "$N_TIME" "$t_cpu" "$t_gpu" "$diff" >>"$ROWS"
  if [[ $HAS_EVAL == 1 ]]; then
    stepopt eval --trust-code -S "$d/s.yaml" --metrics ode-error --n "$N_EVAL" --device "$GPU" --no-cache --out "$d/eval.md"
  else
    echo "   stepopt eval is not available: eval step skipped"
  fi
done

echo
echo "== samples/s (dpmpp-2m, NFE 6, batch 256, float32; device '$GPU' vs cpu)"
"$PY" - "$ROWS" <<'PYEOF'
import sys

print(f"| {'model':<40} | {'n':>5} | {'CPU samples/s':>13} | {'GPU samples/s':>13} | {'speed-up':>8} | {'CPU/GPU diff':>12} |")
print(f"|{'-' * 42}|{'-' * 7}|{'-' * 15}|{'-' * 15}|{'-' * 10}|{'-' * 14}|")
for line in open(sys.argv[1]):
    m, n, tc, tg, diff = line.rstrip("\n").split("\t")
    n, tc, tg = int(n), float(tc), float(tg)
    name = m if len(m) <= 40 else "..." + m[-37:]
    print(f"| {name:<40} | {n:>5} | {n / tc:>13.1f} | {n / tg:>13.1f} | {tc / tg:>7.1f}x | {diff:>12} |")
PYEOF
if [[ $status == 0 ]]; then echo "gpu_smoke: all steps passed"; else echo "gpu_smoke: FAILED (see above)"; fi
exit $status
