#!/usr/bin/env bash
# The static checks in one command: the import contracts (the layers of docs/architecture.md), ruff's lint,
# ruff's format check and mypy, all configured in pyproject.toml. Every check runs even when an earlier one
# failed, so one run shows every problem; the exit status is non-zero when any failed.
#   tools/lint.sh            # check
#   tools/lint.sh --fix      # also let ruff fix and format what it can, then check
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
venv=${KUBETUNE_VENV:-$root/.venv}
failed=()

check() {
  local name=$1; shift
  local t0=$SECONDS
  if "$@"; then
    echo "lint: $name passed ($((SECONDS - t0)) s)"
  else
    echo "lint: $name FAILED ($((SECONDS - t0)) s)"
    failed+=("$name")
  fi
}

if [ "${1:-}" = "--fix" ]; then
  "$venv/bin/ruff" check --fix --quiet . || true
  "$venv/bin/ruff" format --quiet .
fi
check lint-imports "$venv/bin/lint-imports" --no-cache
check "ruff check" "$venv/bin/ruff" check --output-format concise .
check "ruff format" "$venv/bin/ruff" format --check --output-format concise .
check mypy "$venv/bin/mypy"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "lint: failed: ${failed[*]}"
  exit 1
fi
echo "lint: all four checks passed"
