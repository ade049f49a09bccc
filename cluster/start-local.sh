#!/usr/bin/env bash
# Start a real two-node Ray cluster on this machine: a head node (GCS, dashboard, Jobs API, Ray Client server) and one
# worker node joined to it with `ray start --address`, everything on loopback. Settings: cluster/local-env.sh or --help.
# Stop it with cluster/stop-local.sh and the same settings.
source "$(dirname "${BASH_SOURCE[0]}")/local-env.sh"

if [[ -z "$CRLFT_RAY_BIN" ]]; then
    echo "error: no \`ray\` found: run \`make install\` or pass --ray PATH" >&2
    exit 2
fi

# Job entrypoints run `python ...` with the raylet's PATH: make that the Python that has Ray and this project.
export PATH="$(dirname "$CRLFT_RAY_BIN"):$PATH"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"
# A node drains for up to 30 s on SIGTERM (Serve moves replicas away); this cluster is always stopped whole.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}"

mkdir -p "$CRLFT_CLUSTER_DIR"
for node in head worker; do
    pidfile="$CRLFT_CLUSTER_DIR/$node.pid"
    if [[ -f "$pidfile" && -n "$(running "$(cat "$pidfile")")" ]]; then
        echo "error: a cluster is already running from $CRLFT_CLUSTER_DIR ($node pid $(cat "$pidfile")):" \
            "stop it with cluster/stop-local.sh --gcs-port $CRLFT_RAY_GCS_PORT" >&2
        exit 1
    fi
done

# With token authentication on, the dashboard wants the token too (Ray's own order: variable, file named, default file).
auth_header=""
if [[ "$RAY_AUTH_MODE" == token ]]; then
    token="${RAY_AUTH_TOKEN:-}"
    token_file="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
    if [[ -z "$token" && -s "$token_file" ]]; then
        token="$(cat "$token_file")"
    fi
    if [[ -z "$token" ]]; then
        echo "error: RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or run" \
            "\`ray get-auth-token --generate\`" >&2
        exit 2
    fi
    auth_header="Authorization: Bearer $token"
fi

# Start one node in the background, blocking in `ray start --block` so that its pid owns every process of the node.
# Each node has a temp dir of its own, as on separate machines: a shared one would let one node's runtime-env agent
# delete a job's unpacked working directory while the other node's job driver still runs in it.
start_node() {
    local node="$1"
    shift
    # setsid: the node survives this shell and its terminal; stop-local.sh ends it by the pid recorded here.
    setsid "$CRLFT_RAY_BIN" start --block --disable-usage-stats \
        --node-ip-address="$CRLFT_RAY_HOST" \
        --temp-dir="$CRLFT_CLUSTER_DIR/$node" \
        --object-store-memory="$CRLFT_RAY_OBJECT_STORE" \
        "$@" >"$CRLFT_CLUSTER_DIR/$node.log" 2>&1 </dev/null &
    echo $! >"$CRLFT_CLUSTER_DIR/$node.pid"
}

# Wait until the dashboard reports `want` alive nodes, or fail with the node's log when its process died.
wait_for_nodes() {
    local want="$1" node="$2" deadline=$((SECONDS + ${CRLFT_RAY_START_TIMEOUT:-120}))
    local url="http://$CRLFT_RAY_HOST:$CRLFT_RAY_DASHBOARD_PORT/api/v0/nodes?detail=false&limit=100"
    while ((SECONDS < deadline)); do
        if [[ -z "$(running "$(cat "$CRLFT_CLUSTER_DIR/$node.pid")")" ]]; then
            echo "error: the $node node exited; its log ($CRLFT_CLUSTER_DIR/$node.log) ends with:" >&2
            tail -n 20 "$CRLFT_CLUSTER_DIR/$node.log" >&2
            "$(dirname "${BASH_SOURCE[0]}")/stop-local.sh" --cluster-dir "$CRLFT_CLUSTER_DIR" >/dev/null || true
            exit 1
        fi
        # The header comes on stdin, so that the token does not show in the process list.
        alive="$(printf '%s\n' "$auth_header" | curl -fsS --max-time 5 -H @- "$url" 2>/dev/null |
            grep -o '"state": *"ALIVE"' | wc -l || true)"
        if ((alive >= want)); then
            return 0
        fi
        sleep 1
    done
    echo "error: the cluster did not report $want alive nodes within ${CRLFT_RAY_START_TIMEOUT:-120} s" \
        "(logs in $CRLFT_CLUSTER_DIR)" >&2
    "$(dirname "${BASH_SOURCE[0]}")/stop-local.sh" --cluster-dir "$CRLFT_CLUSTER_DIR" >/dev/null || true
    exit 1
}

# shellcheck disable=SC2046  # node_ports prints separate flags on purpose
start_node head --head \
    --port="$CRLFT_RAY_GCS_PORT" \
    --include-dashboard=true \
    --dashboard-host="$CRLFT_RAY_HOST" \
    --dashboard-port="$CRLFT_RAY_DASHBOARD_PORT" \
    --ray-client-server-port="$CRLFT_RAY_CLIENT_PORT" \
    --num-cpus="$CRLFT_RAY_HEAD_CPUS" \
    $(node_ports 0)
wait_for_nodes 1 head

# shellcheck disable=SC2046
start_node worker \
    --address="$CRLFT_RAY_HOST:$CRLFT_RAY_GCS_PORT" \
    --num-cpus="$CRLFT_RAY_WORKER_CPUS" \
    $(node_ports 1)
wait_for_nodes 2 worker

cat <<EOF
Ray cluster up (head + 1 worker, auth: $RAY_AUTH_MODE), state in $CRLFT_CLUSTER_DIR
  Jobs API / dashboard: http://$CRLFT_RAY_HOST:$CRLFT_RAY_DASHBOARD_PORT
  GCS address:          $CRLFT_RAY_HOST:$CRLFT_RAY_GCS_PORT
  Ray Client:           ray://$CRLFT_RAY_HOST:$CRLFT_RAY_CLIENT_PORT
Submit:  crlft submit pipeline --address http://$CRLFT_RAY_HOST:$CRLFT_RAY_DASHBOARD_PORT --follow
Stop:    cluster/stop-local.sh --gcs-port $CRLFT_RAY_GCS_PORT
EOF
