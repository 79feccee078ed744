#!/usr/bin/env bash
# The main job: sets everything up on a fresh machine, then fine-tunes the real SmolLM2-135M-Instruct on the
# bundled sample dataset with the same trainer code the cluster runs (local Ray, DeepSpeed on the CPU),
# compares held-out loss before and after, serves the result with vLLM's OpenAI-compatible server on
# 127.0.0.1 and answers a sample prompt.
#   scripts/quickstart.sh                       # examples/quickstart.yaml
#   scripts/quickstart.sh path/to/manifest.yaml # any FineTuneJob manifest
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  DO_NOT_TRACK=1 VLLM_NO_USAGE_STATS=1
serving_log=$(mktemp)
bash tools/serving-venv.sh >"$serving_log" 2>&1 &
serving_pid=$!
bash scripts/setup.sh
echo "quickstart: waiting for the vLLM serving environment (first time: several minutes)"
wait "$serving_pid" || { tail -30 "$serving_log"; exit 1; }
venv=${KUBETUNE_VENV:-$root/.venv}
exec "$venv/bin/kubetune" run "${1:-examples/quickstart.yaml}"
