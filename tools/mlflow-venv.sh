#!/usr/bin/env bash
# Create (once) the virtual environment that runs an MLflow tracking server for the tests.
#
#   tools/mlflow-venv.sh            # -> prints the venv directory on the last line of stdout
#
# Location: ${KUBETUNE_MLFLOW_VENV:-${KUBETUNE_CACHE:-$HOME/.cache/kubetune}/mlflow-venv}
# The trainer only needs the client (mlflow-skinny, in the trainer extra). The full `mlflow` package (the
# server: Flask, SQLAlchemy, alembic) pins pyarrow<26, which the trainer's Ray Data cannot take, so the server
# lives in an environment of its own, as it is its own deployment in production.
#
# Idempotent: a stamp file inside the venv records the pin; a second run with the same pin returns at once.
# Concurrent runs are serialised with flock.
set -euo pipefail

MLFLOW_SPEC="${KUBETUNE_MLFLOW_SPEC:-mlflow==3.17.2}"
PYTHON="${PYTHON:-python3.11}"
CACHE="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}"
VENV="${KUBETUNE_MLFLOW_VENV:-$CACHE/mlflow-venv}"
STAMP="$VENV/.kubetune-mlflow-stamp"
WANT="$MLFLOW_SPEC python=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])') v1"

log() { echo "[mlflow-venv] $*" >&2; }

up_to_date() { [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$VENV/bin/mlflow" ]]; }

if up_to_date; then
  log "up to date: $VENV ($WANT)"
  echo "$VENV"
  exit 0
fi

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9
if up_to_date; then  # someone else finished while we waited for the lock
  log "up to date: $VENV ($WANT)"
  echo "$VENV"
  exit 0
fi

start=$(date +%s)
rm -rf "$VENV"
log "creating venv $VENV with $PYTHON"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
log "installing $MLFLOW_SPEC"
"$VENV/bin/python" -m pip install --quiet --progress-bar off "$MLFLOW_SPEC"
"$VENV/bin/mlflow" --version >&2

echo "$WANT" > "$STAMP"
log "done in $(( $(date +%s) - start )) s; size $(du -sh "$VENV" | cut -f1)"
echo "$VENV"
