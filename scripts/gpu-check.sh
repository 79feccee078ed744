#!/usr/bin/env bash
# One command on a CUDA machine with the project set up: fine-tune SmolLM2-135M with LoRA and full (bf16;
# ZeRO-2 and ZeRO-3; one GPU and all GPUs) for a fixed number of steps, print tokens/s and MFU for each, then
# serve the ZeRO-3 full fine-tune with vLLM's GPU server and ask it one OpenAI chat question. Exits non-zero
# on any failure; the whole check is bounded to under 8 minutes. See scripts/gpu_check.py for what is measured.
#   scripts/gpu-check.sh               # run (needs nvidia-smi, a CUDA torch in .venv, a GPU vLLM)
#   scripts/gpu-check.sh --dry-run     # print the plan, no GPU needed
#   scripts/gpu-check.sh --steps 20 --gpus 2
# Environment: KUBETUNE_VENV (default .venv), KUBETUNE_VLLM_PYTHON or KUBETUNE_VLLM_VENV (a Python that
# imports vllm; default: the project's), KUBETUNE_GPU_PEAK_TFLOPS (peak bf16 TFLOP/s per GPU for the MFU when
# the GPU is not in the built-in table).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${KUBETUNE_VENV:-$root/.venv}
python="$venv/bin/python"
[ -x "$python" ] || { echo "gpu-check: no Python at $python (run scripts/setup.sh, or set KUBETUNE_VENV)" >&2; exit 2; }

dry=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && dry=1; done
if [ "$dry" = 0 ]; then
  command -v nvidia-smi >/dev/null || { echo "gpu-check: nvidia-smi not found: not a CUDA machine" >&2; exit 2; }
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
fi
# 470 s for everything (model conversion, servers, eight trainings at most, vLLM): under 8 minutes.
exec timeout --kill-after=10 470 "$python" "$root/scripts/gpu_check.py" --timeout 450 "$@"
