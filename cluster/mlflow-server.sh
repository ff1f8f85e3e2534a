#!/usr/bin/env bash
# Start the MLflow tracking server that every node of a nasrisk cluster logs to.
#
# Every trial opens exactly one MLflow run (study/tracking.py), from whichever Ray node it lands
# on, so the tracking store must be reachable from all nodes: a tracking server with a database
# backend store, and artifacts proxied through the server (`--serve-artifacts`) into storage
# the server can write (a shared folder or an object store), so workers need no storage
# credentials of their own.
#
# Usage:
#   cluster/mlflow-server.sh [--host H] [--port P] [--backend-store-uri URI]
#                            [--artifacts-destination URI] [--workers N] [-- MLFLOW_ARGS...]
#
# Every option has an environment variable; command-line options win:
#   NASRISK_MLFLOW_HOME       folder for the default store and artifacts [~/nasrisk-mlflow]
#   NASRISK_MLFLOW_HOST       interface to bind [127.0.0.1: this machine only]. For a cluster
#                             use the head's private address (or 0.0.0.0) and keep the port
#                             closed to the outside; see cluster/README.md.
#   NASRISK_MLFLOW_PORT       [5000]
#   NASRISK_MLFLOW_BACKEND    backend store URI [sqlite:///$NASRISK_MLFLOW_HOME/mlflow.db];
#                             a real cluster: postgresql://USER:PASS@DBHOST:5432/mlflow
#                             (needs psycopg2 next to mlflow)
#   NASRISK_MLFLOW_ARTIFACTS  where proxied artifacts go [$NASRISK_MLFLOW_HOME/artifacts];
#                             a path, file:///..., s3://bucket/prefix, gs://..., ...
#   NASRISK_MLFLOW_WORKERS    server worker processes [1 with SQLite (one writer at a time),
#                             else 4]
#   NASRISK_MLFLOW_ALLOWED_HOSTS  passed as --allowed-hosts (Host-header check against DNS
#                             rebinding; mlflow's default allows localhost and private IPs);
#                             set it to the name/address nodes use, e.g. "mlflow.lab:5000"
#
# Anything after `--` goes to `mlflow server` unchanged (e.g. --cors-allowed-origins).
# The script execs `mlflow server` in the foreground: run it under systemd, tmux or nohup.
# `mlflow` must be on PATH (the same environment nasrisk is installed in).
set -euo pipefail

home="${NASRISK_MLFLOW_HOME:-$HOME/nasrisk-mlflow}"
host="${NASRISK_MLFLOW_HOST:-127.0.0.1}"
port="${NASRISK_MLFLOW_PORT:-5000}"
backend="${NASRISK_MLFLOW_BACKEND:-}"
artifacts="${NASRISK_MLFLOW_ARTIFACTS:-}"
workers="${NASRISK_MLFLOW_WORKERS:-}"
allowed_hosts="${NASRISK_MLFLOW_ALLOWED_HOSTS:-}"
extra=()

usage() { sed -n '2,32p' "$0" | sed 's/^# \{0,1\}//'; }
need() { [[ $# -ge 2 && -n "$2" ]] || { echo "mlflow-server.sh: $1 needs a value" >&2; exit 2; }; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --host) need "$@"; host="$2"; shift 2 ;;
    --port) need "$@"; port="$2"; shift 2 ;;
    --backend-store-uri) need "$@"; backend="$2"; shift 2 ;;
    --artifacts-destination) need "$@"; artifacts="$2"; shift 2 ;;
    --workers) need "$@"; workers="$2"; shift 2 ;;
    --allowed-hosts) need "$@"; allowed_hosts="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "mlflow-server.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [[ -z "$backend" ]]; then
  mkdir -p "$home"
  backend="sqlite:///$(cd "$home" && pwd)/mlflow.db"
fi
if [[ -z "$artifacts" ]]; then
  mkdir -p "$home/artifacts"
  artifacts="$(cd "$home/artifacts" && pwd)"
fi
if [[ -z "$workers" ]]; then
  # SQLite allows one writer at a time; several server workers only contend for its lock
  if [[ "$backend" == sqlite:* ]]; then workers=1; else workers=4; fi
fi

export MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}"
args=(server
  --backend-store-uri "$backend"
  --serve-artifacts --artifacts-destination "$artifacts"
  --host "$host" --port "$port" --workers "$workers")
if [[ -n "$allowed_hosts" ]]; then
  args+=(--allowed-hosts "$allowed_hosts")
fi
echo "mlflow-server.sh: backend $backend, artifacts $artifacts, listening on $host:$port" >&2
exec mlflow "${args[@]}" "${extra[@]}"
