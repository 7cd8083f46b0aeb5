#!/usr/bin/env bash
# MLflow tracking server for the cluster, without Docker (e.g. on an EC2 instance next to an RDS
# PostgreSQL): runs and the model registry in PostgreSQL, artifacts in S3, proxied through the
# server (--serve-artifacts), so Ray nodes and users need only MLFLOW_TRACKING_URI. The same
# server as docker-compose.yaml; for local development use infra/local/dev_services.sh instead.
#
# Usage: infra/mlflow/run_server.sh [extra `mlflow server` options...]
#   MLFLOW_BACKEND_STORE_URI      postgresql://USER:PASSWORD@HOST:5432/DB   (required)
#   MLFLOW_ARTIFACTS_DESTINATION  s3://bucket/prefix                        (required)
#   MLFLOW_ALLOWED_HOSTS          extra Host headers clients send, e.g. 'mlflow.adps.internal:*'
#                                 (localhost and private IPs are always allowed)
#   PORT (5000), WORKERS (4), HOST (127.0.0.1: this machine only; set the machine's private
#                                 address for the Ray cluster, never a public one)
#   S3 credentials: the instance role, or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY;
#   MLFLOW_S3_ENDPOINT_URL for an S3-compatible store.
# Needs mlflow (the version pinned in pyproject.toml), psycopg2-binary and boto3 on PATH's Python.
# After upgrading mlflow, migrate the database first: mlflow db upgrade "$MLFLOW_BACKEND_STORE_URI"
# Put TLS and authentication in front of the port before exposing it beyond a private network.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo pipefail$/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
}

die() {
    echo "run_server: $*" >&2
    exit 1
}

case "${1:-}" in
    -h | --help) usage; exit 0 ;;
esac

backend="${MLFLOW_BACKEND_STORE_URI:-}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-}"
[[ -n "$backend" ]] || { usage >&2; die "set MLFLOW_BACKEND_STORE_URI (postgresql://USER:PASSWORD@HOST:5432/DB)"; }
[[ -n "$artifacts" ]] || { usage >&2; die "set MLFLOW_ARTIFACTS_DESTINATION (s3://bucket/prefix)"; }
[[ "$backend" == postgresql://* || "$backend" == postgresql+*://* ]] \
    || die "MLFLOW_BACKEND_STORE_URI must be a postgresql:// URI (for a local SQLite server: infra/local/dev_services.sh)"
[[ "$artifacts" == s3://* ]] || die "MLFLOW_ARTIFACTS_DESTINATION must be an s3:// URI, not '$artifacts'"
command -v mlflow >/dev/null || die "mlflow not found on PATH (pip install 'mlflow>=3.17,<3.18' psycopg2-binary boto3)"

extra=()
if [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
    # --allowed-hosts replaces MLflow's default list: keep localhost and the private ranges.
    allowed="localhost,localhost:*,127.0.0.1,127.0.0.1:*,10.*,192.168.*"
    for i in $(seq 16 31); do allowed="$allowed,172.$i.*"; done
    extra=(--allowed-hosts "$allowed,$MLFLOW_ALLOWED_HOSTS")
fi

# The server's background job runner (MLflow GenAI features) is not used here; off, the server
# starts faster and uses far less memory.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
exec mlflow server \
    --backend-store-uri "$backend" \
    --artifacts-destination "$artifacts" \
    --serve-artifacts \
    --host "${HOST:-127.0.0.1}" \
    --port "${PORT:-5000}" \
    --workers "${WORKERS:-4}" \
    ${extra[@]+"${extra[@]}"} \
    "$@"
