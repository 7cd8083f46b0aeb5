#!/usr/bin/env bash
# Local S3 for development and tests: a moto S3 server on 127.0.0.1 (in memory: data is gone
# when it stops). Runs in the foreground; Ctrl-C stops it.
#
# Usage: infra/local/s3_server.sh [BUCKET]      (PORT=5555 by default)
#   Creates BUCKET once the server answers, then prints the variables to export, e.g.
#   export AWS_ENDPOINT_URL=http://127.0.0.1:5555 AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_DEFAULT_REGION=us-east-1
# boto3 and pyarrow (Ray storage_path=s3://BUCKET/...) both honour AWS_ENDPOINT_URL; for an
# MLflow server with s3:// artifacts see infra/mlflow/run_server.sh.
set -euo pipefail

port="${PORT:-5555}"
bucket="${1:-}"

moto="$(command -v moto_server)" || { echo "moto_server not found (pip install 'moto[server]')" >&2; exit 1; }
# The Python next to moto_server has boto3 (moto depends on it).
python="$(dirname "$moto")/python"
[[ -x "$python" ]] || python="python3"

export AWS_ENDPOINT_URL="http://127.0.0.1:$port"
export AWS_ACCESS_KEY_ID=test
export AWS_SECRET_ACCESS_KEY=test
export AWS_DEFAULT_REGION=us-east-1

"$moto" -H 127.0.0.1 -p "$port" &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT INT TERM

# Wait (up to 20 s) until the server answers, then create the bucket.
ADPS_S3_BUCKET="$bucket" "$python" -c '
import os, sys, time
import boto3
from botocore.exceptions import ClientError, EndpointConnectionError
s3 = boto3.client("s3")
deadline = time.monotonic() + 20
while True:
    try:
        s3.list_buckets()
        break
    except EndpointConnectionError:
        if time.monotonic() > deadline:
            sys.exit("moto server did not answer on " + os.environ["AWS_ENDPOINT_URL"])
        time.sleep(0.2)
bucket = os.environ["ADPS_S3_BUCKET"]
if bucket:
    try:
        s3.create_bucket(Bucket=bucket)
    except ClientError as e:
        if e.response["Error"]["Code"] != "BucketAlreadyOwnedByYou":
            raise
    print("bucket: s3://" + bucket, file=sys.stderr)
'

cat <<VARS
# S3 server ready on $AWS_ENDPOINT_URL; in another shell:
export AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL
export AWS_ACCESS_KEY_ID=test
export AWS_SECRET_ACCESS_KEY=test
export AWS_DEFAULT_REGION=us-east-1
VARS

wait "$server"
