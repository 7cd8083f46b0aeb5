#!/usr/bin/env bash
# Local MLflow tracking server for development (SQLite runs + registry, proxied artifacts).
#
# Usage: infra/mlflow/run_server.sh [extra `mlflow server` options...]
#   ADPS_MLFLOW_DIR   folder for mlflow.db and local artifacts   (default .adps/mlflow)
#   ADPS_ARTIFACTS    artifact destination: a folder or s3://bucket/prefix
#                     (default $ADPS_MLFLOW_DIR/artifacts)
#   PORT              port on 127.0.0.1                           (default 5000)
#   MLFLOW_S3_ENDPOINT_URL  S3-compatible endpoint when ADPS_ARTIFACTS is s3:// (falls back to
#                     AWS_ENDPOINT_URL, e.g. the moto server of infra/local/s3_server.sh)
# Then: export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
# Clients need no S3 credentials: artifacts go through this server (--artifacts-destination).
# With job execution off and one worker it starts in ~12 s using ~0.5 GB.
set -euo pipefail

command -v mlflow >/dev/null || { echo "mlflow not found on PATH (activate .venv)" >&2; exit 1; }

mlflow_dir="${ADPS_MLFLOW_DIR:-.adps/mlflow}"
mkdir -p "$mlflow_dir"
mlflow_dir="$(cd "$mlflow_dir" && pwd)"  # absolute: sqlite:////abs/path/mlflow.db
artifacts="${ADPS_ARTIFACTS:-$mlflow_dir/artifacts}"

if [[ "$artifacts" == s3://* ]]; then
    if [[ -z "${MLFLOW_S3_ENDPOINT_URL:-}" && -n "${AWS_ENDPOINT_URL:-}" ]]; then
        export MLFLOW_S3_ENDPOINT_URL="$AWS_ENDPOINT_URL"
    fi
    echo "artifacts: $artifacts (endpoint: ${MLFLOW_S3_ENDPOINT_URL:-AWS})" >&2
else
    mkdir -p "$artifacts"
    artifacts="$(cd "$artifacts" && pwd)"
    echo "artifacts: $artifacts" >&2
fi

export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
exec mlflow server \
    --backend-store-uri "sqlite:///$mlflow_dir/mlflow.db" \
    --artifacts-destination "$artifacts" \
    --host 127.0.0.1 \
    --port "${PORT:-5000}" \
    --workers 1 \
    "$@"
