#!/usr/bin/env bash
# A local stack without Kubernetes, on one host: Triton (nvidia-pytriton, CPU) serving a TorchScript
# port, the gateway shadowing it against the MXNet legacy model, Prometheus scraping the gateway with
# the alert rules of deploy/prometheus loaded. Run from anywhere after `make install system-deps`.
#
#   deploy/local/stack.sh up           build the models (first time), start the three, wait until ready
#   deploy/local/stack.sh traffic [N]  send N requests (default 200) through the gateway
#   deploy/local/stack.sh status       ctl status, the match rate and firing alerts from Prometheus
#   deploy/local/stack.sh down         stop all three
#
# Ports and places come from the environment: GRPC_PORT (8001), METRICS_PORT (8002), ADMIN_PORT (8003),
# TRITON_PORT (8101), PROMETHEUS_PORT (9090), STACK_DIR ($TMPDIR/shadowserve-stack), PYTHON (.venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
STACK_DIR=${STACK_DIR:-${TMPDIR:-/tmp}/shadowserve-stack}
export GRPC_PORT=${GRPC_PORT:-8001} METRICS_PORT=${METRICS_PORT:-8002} ADMIN_PORT=${ADMIN_PORT:-8003}
export TRITON_PORT=${TRITON_PORT:-8101} PROMETHEUS_PORT=${PROMETHEUS_PORT:-9090}
export RULES=$REPO/deploy/prometheus/shadowserve.rules.yml
export SHADOWSERVE_ADMIN=127.0.0.1:$ADMIN_PORT
PROMETHEUS_URL=http://127.0.0.1:$PROMETHEUS_PORT

fill() {  # a template with ${VAR} filled in from the environment
  "$PYTHON" -c 'import os, sys; print(os.path.expandvars(open(sys.argv[1]).read()), end="")' "$1"
}

start() {  # NAME COMMAND...: in its own process group, logging to STACK_DIR/NAME.log
  local name=$1; shift
  setsid "$@" >"$STACK_DIR/$name.log" 2>&1 < /dev/null &
  echo $! >"$STACK_DIR/$name.pid"
}

wait_until() {  # WHAT COMMAND...: poll COMMAND for up to 5 minutes
  local what=$1; shift
  for _ in $(seq 600); do
    if "$@" >/dev/null 2>&1; then echo "$what: ready"; return 0; fi
    sleep 0.5
  done
  echo "$what did not become ready; its log is in $STACK_DIR" >&2
  return 1
}

triton_ready() {
  "$PYTHON" -c 'import sys, tritonclient.grpc as g; sys.exit(not g.InferenceServerClient(sys.argv[1]).is_model_ready("classifier_torch"))' \
    "127.0.0.1:$TRITON_PORT"
}

prometheus_ready() {
  "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/-/ready", timeout=2)' "$PROMETHEUS_URL"
}

promql() {  # one instant query, printed as "labels value" lines
  "$PYTHON" - "$PROMETHEUS_URL" "$1" <<'PY'
import json, sys, urllib.parse, urllib.request
url = f"{sys.argv[1]}/api/v1/query?" + urllib.parse.urlencode({"query": sys.argv[2]})
for item in json.load(urllib.request.urlopen(url, timeout=5))["data"]["result"]:
    labels = ",".join(f"{k}={v}" for k, v in sorted(item["metric"].items()) if k != "__name__")
    print(f"  {{{labels}}} {item['value'][1]}")
PY
}

up() {
  mkdir -p "$STACK_DIR"
  [ -f "$STACK_DIR/model_repository/classifier_torch/config.pbtxt" ] || "$PYTHON" deploy/local/models.py "$STACK_DIR"
  fill deploy/local/shadow.yaml >"$STACK_DIR/shadow.yaml"
  fill deploy/local/prometheus.yml >"$STACK_DIR/prometheus.yml"
  "$PYTHON" -m server.cli check-config "$STACK_DIR/shadow.yaml"

  start triton "$PYTHON" deploy/local/triton.py "$STACK_DIR/model_repository" --grpc-port "$TRITON_PORT"
  wait_until "Triton on 127.0.0.1:$TRITON_PORT" triton_ready
  start gateway "$PYTHON" -m server.cli --log-format json serve --config "$STACK_DIR/shadow.yaml"
  wait_until "gateway on 127.0.0.1:$GRPC_PORT" "$PYTHON" deploy/healthcheck.py "127.0.0.1:$GRPC_PORT"
  start prometheus prometheus --config.file="$STACK_DIR/prometheus.yml" --storage.tsdb.path="$STACK_DIR/tsdb" \
    --web.listen-address="127.0.0.1:$PROMETHEUS_PORT"
  wait_until "Prometheus on $PROMETHEUS_URL" prometheus_ready
  echo "export SHADOWSERVE_ADMIN=$SHADOWSERVE_ADMIN   # for shadowserve ctl"
}

traffic() {
  "$PYTHON" -c 'import asyncio, sys; from server.demo import drive
print(asyncio.run(drive(sys.argv[1], "classifier", int(sys.argv[2]))), "requests answered")' \
    "127.0.0.1:$GRPC_PORT" "${1:-200}"
}

status() {
  "$PYTHON" -m server.cli ctl status
  echo "match rate over the last 5 minutes:"
  promql 'sum by (model) (rate(shadowserve_comparisons_total{verdict="match"}[5m])) / sum by (model) (rate(shadowserve_comparisons_total[5m]))'
  echo "alerts firing:"
  promql 'ALERTS{alertstate="firing"}'
}

down() {
  for name in prometheus gateway triton; do
    local pidfile=$STACK_DIR/$name.pid
    [ -f "$pidfile" ] || continue
    local pid; pid=$(cat "$pidfile")
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$pidfile"
    echo "$name: stopped"
  done
}

case "${1:-}" in
  up|status|down) "$1" ;;
  traffic) traffic "${2:-200}" ;;
  *) sed -n '2,13p' "$0" >&2; exit 2 ;;
esac
