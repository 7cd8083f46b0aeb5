#!/usr/bin/env bash
# Local development services, in the background: an MLflow tracking server (SQLite store, proxied
# artifacts in a local folder) and an S3 server (moto, in memory).
#
# Usage: infra/local/dev_services.sh start|stop|status|env
#   start    start both servers, wait until each answers, print the variables to export
#            (so `eval "$(infra/local/dev_services.sh start)"` sets them in this shell).
#            Refuses to start when either is already running.
#   stop     stop both (the whole process group of each) and remove the pid files
#   status   say what runs where; exit 0 when both run, 3 otherwise
#   env      print the export lines of the running services
#
# Settings (environment):
#   ADPS_DEV_SERVICES_DIR      state folder: pid files, logs, mlflow.db, artifacts
#                              (default: .adps/dev_services under the repository root)
#   ADPS_MLFLOW_PORT           MLflow port on 127.0.0.1 (default 28500)
#   ADPS_S3_PORT               S3 (moto) port on 127.0.0.1 (default 28501)
#   ADPS_DEV_SERVICES_TIMEOUT  seconds to wait for each server to answer (default 90)
# Runs, models and artifacts persist in the state folder across restarts (delete it to reset);
# S3 contents live in moto's memory and are gone after `stop`.
# Uses .venv/bin/mlflow and .venv/bin/moto_server when present, else the ones on PATH.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo pipefail$/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
}

die() {
    echo "dev_services: $*" >&2
    exit 1
}

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
state="${ADPS_DEV_SERVICES_DIR:-$root/.adps/dev_services}"
mlflow_port="${ADPS_MLFLOW_PORT:-28500}"
s3_port="${ADPS_S3_PORT:-28501}"
timeout="${ADPS_DEV_SERVICES_TIMEOUT:-90}"
host=127.0.0.1
services="mlflow s3"

for value in "$mlflow_port" "$s3_port" "$timeout"; do
    [[ "$value" =~ ^[0-9]+$ ]] || die "not a number: '$value' (ADPS_MLFLOW_PORT, ADPS_S3_PORT, ADPS_DEV_SERVICES_TIMEOUT)"
done
[[ "$mlflow_port" != "$s3_port" ]] || die "ADPS_MLFLOW_PORT and ADPS_S3_PORT are both $s3_port"

# --- helpers -----------------------------------------------------------------------------------

tool() {  # tool NAME: the virtualenv's executable, else the one on PATH
    if [[ -x "$root/.venv/bin/$1" ]]; then
        echo "$root/.venv/bin/$1"
    elif command -v "$1" >/dev/null 2>&1; then
        command -v "$1"
    else
        die "$1 not found: create .venv (python3 bootstrap.py test) or put $1 on PATH"
    fi
}

pattern() {  # the word every server process's command line holds
    case "$1" in
        mlflow) echo "mlflow" ;;
        s3) echo "moto_server" ;;
    esac
}

# A process counts as alive when it exists and is not a zombie (an orphan's exit status may wait
# a while for init to collect it).
alive() {
    local stat
    stat="$(ps -o stat= -p "$1" 2>/dev/null)" || return 1
    [[ -n "$stat" && "$stat" != Z* ]]
}

group_alive() {  # group_alive PGID: some live process is in that process group
    ps -eo pgid=,stat= 2>/dev/null | awk -v g="$1" '$1 == g && $2 !~ /^Z/ { found = 1 } END { exit !found }'
}

pid_of() {  # pid_of SERVICE: its pid when it runs (stale pid files are removed), else fails
    local file="$state/$1.pid" pid args
    [[ -f "$file" ]] || return 1
    pid="$(cat "$file")"
    # The pid must still be our server, not a process that reused the number.
    if [[ "$pid" =~ ^[0-9]+$ ]] && alive "$pid" \
        && args="$(ps -o args= -p "$pid" 2>/dev/null)" && [[ "$args" == *"$(pattern "$1")"* ]]; then
        echo "$pid"
        return 0
    fi
    rm -f "$file" "$state/$1.url"
    return 1
}

url_of() {
    cat "$state/$1.url" 2>/dev/null || echo "?"
}

port_in_use() {
    (exec 3<>"/dev/tcp/$host/$1") 2>/dev/null
}

# http_code URL: the HTTP status of a GET, or 000 when nothing answers.
http_code() {
    if command -v curl >/dev/null 2>&1; then
        curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1" 2>/dev/null || true
    else
        "$python" - "$1" <<'PY' 2>/dev/null || echo 000
import sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
        print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
except OSError:
    print("000")
PY
    fi
}

answers() {  # answers SERVICE URL: MLflow's /health says 200; moto answers anything
    local code
    if [[ "$1" == mlflow ]]; then
        code="$(http_code "$2/health")"
        [[ "$code" == 200 ]]
    else
        code="$(http_code "$2")"
        [[ -n "$code" && "$code" != 000 ]]
    fi
}

# stop_service SERVICE [started]: TERM its process group, KILL what is left after 15 s. With
# "started" (this very script started it), the pid file is trusted even before the server's
# command line shows (between fork and exec).
stop_service() {
    local pid i
    if [[ "${2:-}" == started && -f "$state/$1.pid" ]]; then
        pid="$(cat "$state/$1.pid")"
    elif ! pid="$(pid_of "$1")"; then
        return 1
    fi
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
        group_alive "$pid" || break
        sleep 0.1
    done
    if group_alive "$pid"; then
        echo "dev_services: $1 (pid $pid) ignored SIGTERM; sending SIGKILL" >&2
        kill -KILL -- "-$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            group_alive "$pid" || break
            sleep 0.1
        done
    fi
    rm -f "$state/$1.pid" "$state/$1.url"
    echo "stopped $1 (pid $pid)" >&2
}

env_lines() {
    local s3_url
    s3_url="$(url_of s3)"
    cat <<EOF
export MLFLOW_TRACKING_URI=$(url_of mlflow)
export AWS_ENDPOINT_URL=$s3_url
export MLFLOW_S3_ENDPOINT_URL=$s3_url
export AWS_ACCESS_KEY_ID=test
export AWS_SECRET_ACCESS_KEY=test
export AWS_DEFAULT_REGION=us-east-1
EOF
}

# --- commands ----------------------------------------------------------------------------------

cmd_start() {
    local running="" svc pid
    mkdir -p "$state"
    state="$(cd "$state" && pwd)"  # absolute: sqlite:////abs/path/mlflow.db
    for svc in $services; do
        if pid="$(pid_of "$svc")"; then
            running="$running $svc (pid $pid, $(url_of "$svc"))"
        fi
    done
    [[ -z "$running" ]] || die "already running:$running; use 'status', or 'stop' first"
    port_in_use "$mlflow_port" && die "port $mlflow_port is in use by another program: set ADPS_MLFLOW_PORT"
    port_in_use "$s3_port" && die "port $s3_port is in use by another program: set ADPS_S3_PORT"

    local mlflow moto
    mlflow="$(tool mlflow)"
    moto="$(tool moto_server)"
    mkdir -p "$state/mlflow/artifacts"

    # Job control gives each background server a process group of its own (pgid = pid), which
    # `stop` ends as a whole: the MLflow CLI runs its web server as a child process.
    set -m
    # Credentials for anything in the servers that talks to S3; moto accepts any.
    (
        export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_DEFAULT_REGION=us-east-1
        exec "$moto" -H "$host" -p "$s3_port"
    ) </dev/null >"$state/s3.log" 2>&1 &
    echo $! >"$state/s3.pid"
    echo "http://$host:$s3_port" >"$state/s3.url"

    # STACK.md: without job execution and with one worker the server starts in ~12 s using ~0.5 GB.
    (
        export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
        exec "$mlflow" server \
            --backend-store-uri "sqlite:///$state/mlflow/mlflow.db" \
            --artifacts-destination "$state/mlflow/artifacts" \
            --serve-artifacts \
            --host "$host" \
            --port "$mlflow_port" \
            --workers 1
    ) </dev/null >"$state/mlflow.log" 2>&1 &
    echo $! >"$state/mlflow.pid"
    echo "http://$host:$mlflow_port" >"$state/mlflow.url"
    set +m
    # Interrupted while waiting: take both down again rather than leave half a start behind.
    trap 'fail_start "interrupted"' INT TERM

    local deadline=$((SECONDS + timeout)) url
    for svc in s3 mlflow; do
        url="$(url_of "$svc")"
        until answers "$svc" "$url"; do
            if ! alive "$(cat "$state/$svc.pid")"; then
                fail_start "$svc exited before answering on $url"
            fi
            if ((SECONDS >= deadline)); then
                fail_start "$svc did not answer on $url within $timeout s (ADPS_DEV_SERVICES_TIMEOUT)"
            fi
            sleep 0.3
        done
        echo "$svc ready on $url (pid $(cat "$state/$svc.pid"), log $state/$svc.log)" >&2
    done
    trap - INT TERM
    env_lines
}

fail_start() {
    local svc
    trap - INT TERM
    echo "dev_services: $*" >&2
    for svc in $services; do
        if [[ -s "$state/$svc.log" ]]; then
            echo "--- last lines of $state/$svc.log:" >&2
            tail -n 20 "$state/$svc.log" >&2
        fi
    done
    for svc in $services; do
        stop_service "$svc" started || true
    done
    rm -f "$state/mlflow.pid" "$state/s3.pid" "$state/mlflow.url" "$state/s3.url"
    exit 1
}

cmd_stop() {
    local svc stopped=0
    for svc in $services; do
        if stop_service "$svc"; then
            stopped=1
        fi
    done
    ((stopped)) || echo "nothing was running (state: $state)" >&2
}

cmd_status() {
    local svc pid running=0 health
    for svc in $services; do
        if pid="$(pid_of "$svc")"; then
            running=$((running + 1))
            if answers "$svc" "$(url_of "$svc")"; then health="answering"; else health="NOT answering"; fi
            echo "$svc: running (pid $pid) on $(url_of "$svc"), $health; log $state/$svc.log"
        else
            echo "$svc: stopped"
        fi
    done
    [[ "$running" == 2 ]] || return 3
}

cmd_env() {
    local svc
    for svc in $services; do
        pid_of "$svc" >/dev/null || die "$svc is not running (infra/local/dev_services.sh start)"
    done
    env_lines
}

python="$root/.venv/bin/python"
[[ -x "$python" ]] || python="python3"

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    -h | --help | help)
        usage
        ;;
    *)
        usage >&2
        exit 2
        ;;
esac
