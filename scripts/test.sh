#!/usr/bin/env bash
# The test command: sets everything up on a fresh machine, then runs the whole suite against real servers
# (kube-apiserver + etcd + kube-controller-manager, SeaweedFS, a local Ray cluster, DeepSpeed, vLLM on CPU, an
# MLflow tracking server),
# each started by the test fixtures on free 127.0.0.1 ports and stopped by them. Before pytest, the static checks
# (tools/lint.sh: lint-imports, ruff check, ruff format --check, mypy); a failed check fails the run, after the
# tests have run too so one run reports everything.
#   scripts/test.sh                 # everything
#   scripts/test.sh -m unit         # extra arguments go to pytest
#   KUBETUNE_LINT=0 scripts/test.sh -m unit   # skip the static checks while iterating (never in CI)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  DO_NOT_TRACK=1 VLLM_NO_USAGE_STATS=1 PYTHONUNBUFFERED=1

# The vLLM server has its own environment (its own image in production); build it beside the main one.
serving_log=$(mktemp)
bash tools/serving-venv.sh >"$serving_log" 2>&1 &
serving_pid=$!
# So has the MLflow tracking server the tracking tests log to (tests/support/mlflow_server.py).
mlflow_log=$(mktemp)
bash tools/mlflow-venv.sh >"$mlflow_log" 2>&1 &
mlflow_pid=$!
bash scripts/setup.sh
if ! wait "$serving_pid"; then
  echo "test: the vLLM serving environment failed to build:"; tail -30 "$serving_log"; exit 1
fi
export KUBETUNE_VLLM_VENV=$(tail -1 "$serving_log")
if ! wait "$mlflow_pid"; then
  echo "test: the MLflow server environment failed to build:"; tail -30 "$mlflow_log"; exit 1
fi
export KUBETUNE_MLFLOW_VENV=$(tail -1 "$mlflow_log")

venv=${KUBETUNE_VENV:-$root/.venv}
set +e
lint_rc=0
if [ "${KUBETUNE_LINT:-1}" != 0 ] || [ -n "${CI:-}" ]; then
  bash tools/lint.sh
  lint_rc=$?
fi
# Two workers by default (tests/conftest.py says why); KUBETUNE_TEST_WORKERS=0 runs in this one process.
"$venv/bin/python" -m pytest -n "${KUBETUNE_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
rc=$?
set -e
[ "$rc" = 5 ] && { echo "test: pytest collected no tests"; exit 1; }
[ "$rc" = 0 ] && [ "$lint_rc" != 0 ] && { echo "test: the tests passed but the static checks failed (tools/lint.sh)"; exit 1; }
exit "$rc"
