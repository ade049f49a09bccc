# Settings shared by start-local.sh and stop-local.sh (sourced, not run).
# Every setting is an environment variable with a flag of the same meaning, so that several clusters (and other Ray
# users) can share one machine: the two nodes take all their ports from the ones given here, never Ray's fixed defaults.
#
#   flag                  variable                  default
#   --host                CRLFT_RAY_HOST            127.0.0.1   address every Ray process binds to (loopback)
#   --gcs-port            CRLFT_RAY_GCS_PORT        6379        head GCS: `ray start --address HOST:PORT`, ray.init
#   --dashboard-port      CRLFT_RAY_DASHBOARD_PORT  8265        dashboard and Jobs API: http://HOST:PORT
#   --client-port         CRLFT_RAY_CLIENT_PORT     10001       Ray Client: ray://HOST:PORT
#   --port-base           CRLFT_RAY_PORT_BASE       20000       first of the per-node ports (see node_ports below)
#   --worker-ports        CRLFT_RAY_WORKER_PORTS    40          worker processes' ports per node
#   --head-cpus           CRLFT_RAY_HEAD_CPUS       2           logical CPUs of the head node
#   --worker-cpus         CRLFT_RAY_WORKER_CPUS     2           logical CPUs of the worker node
#   --object-store-bytes  CRLFT_RAY_OBJECT_STORE    500000000   shared-memory object store per node
#   --cluster-dir         CRLFT_CLUSTER_DIR         ${TMPDIR:-/tmp}/crlft-ray-GCS_PORT  pid files, logs, the nodes' temp dirs
#   --ray                 CRLFT_RAY_BIN             .venv/bin/ray of this repository, else `ray` on PATH
#
# Token authentication: RAY_AUTH_MODE defaults to `disabled` for this loopback cluster only. Start it with
# RAY_AUTH_MODE=token and a token in RAY_AUTH_TOKEN (or a file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token) to
# keep authentication on; clients then need the same token (docs/clusters.md).

set -euo pipefail

usage() {
    sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

CRLFT_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CRLFT_RAY_HOST="${CRLFT_RAY_HOST:-127.0.0.1}"
CRLFT_RAY_GCS_PORT="${CRLFT_RAY_GCS_PORT:-6379}"
CRLFT_RAY_DASHBOARD_PORT="${CRLFT_RAY_DASHBOARD_PORT:-8265}"
CRLFT_RAY_CLIENT_PORT="${CRLFT_RAY_CLIENT_PORT:-10001}"
CRLFT_RAY_PORT_BASE="${CRLFT_RAY_PORT_BASE:-20000}"
CRLFT_RAY_WORKER_PORTS="${CRLFT_RAY_WORKER_PORTS:-40}"
CRLFT_RAY_HEAD_CPUS="${CRLFT_RAY_HEAD_CPUS:-2}"
CRLFT_RAY_WORKER_CPUS="${CRLFT_RAY_WORKER_CPUS:-2}"
CRLFT_RAY_OBJECT_STORE="${CRLFT_RAY_OBJECT_STORE:-500000000}"
CRLFT_CLUSTER_DIR="${CRLFT_CLUSTER_DIR:-}"
CRLFT_RAY_BIN="${CRLFT_RAY_BIN:-}"

while [[ $# -gt 0 ]]; do
    case "$1" in
        --host) CRLFT_RAY_HOST="$2"; shift 2 ;;
        --gcs-port) CRLFT_RAY_GCS_PORT="$2"; shift 2 ;;
        --dashboard-port) CRLFT_RAY_DASHBOARD_PORT="$2"; shift 2 ;;
        --client-port) CRLFT_RAY_CLIENT_PORT="$2"; shift 2 ;;
        --port-base) CRLFT_RAY_PORT_BASE="$2"; shift 2 ;;
        --worker-ports) CRLFT_RAY_WORKER_PORTS="$2"; shift 2 ;;
        --head-cpus) CRLFT_RAY_HEAD_CPUS="$2"; shift 2 ;;
        --worker-cpus) CRLFT_RAY_WORKER_CPUS="$2"; shift 2 ;;
        --object-store-bytes) CRLFT_RAY_OBJECT_STORE="$2"; shift 2 ;;
        --cluster-dir) CRLFT_CLUSTER_DIR="$2"; shift 2 ;;
        --ray) CRLFT_RAY_BIN="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

for name in CRLFT_RAY_GCS_PORT CRLFT_RAY_DASHBOARD_PORT CRLFT_RAY_CLIENT_PORT CRLFT_RAY_PORT_BASE \
    CRLFT_RAY_WORKER_PORTS CRLFT_RAY_HEAD_CPUS CRLFT_RAY_WORKER_CPUS CRLFT_RAY_OBJECT_STORE; do
    if ! [[ "${!name}" =~ ^[0-9]+$ ]]; then
        echo "error: $name=${!name} is not a whole number" >&2
        exit 2
    fi
done

CRLFT_CLUSTER_DIR="${CRLFT_CLUSTER_DIR:-${TMPDIR:-/tmp}/crlft-ray-${CRLFT_RAY_GCS_PORT}}"
if [[ -z "$CRLFT_RAY_BIN" ]]; then
    if [[ -x "$CRLFT_REPO/.venv/bin/ray" ]]; then
        CRLFT_RAY_BIN="$CRLFT_REPO/.venv/bin/ray"
    else
        CRLFT_RAY_BIN="$(command -v ray || true)"
    fi
fi

# Node N (0 = head, 1 = worker) owns the ports PORT_BASE + N * (10 + WORKER_PORTS) onwards: 6 fixed ones, then its
# worker processes' range. Prints the `ray start` flags for them.
node_ports() {
    local base=$((CRLFT_RAY_PORT_BASE + $1 * (10 + CRLFT_RAY_WORKER_PORTS)))
    echo "--node-manager-port=$base" \
        "--object-manager-port=$((base + 1))" \
        "--dashboard-agent-listen-port=$((base + 2))" \
        "--dashboard-agent-grpc-port=$((base + 3))" \
        "--runtime-env-agent-port=$((base + 4))" \
        "--metrics-export-port=$((base + 5))" \
        "--min-worker-port=$((base + 10))" \
        "--max-worker-port=$((base + 10 + CRLFT_RAY_WORKER_PORTS - 1))"
}

# The pids among the given ones that still run (zombies have exited: only their parent can reap them).
running() {
    [[ $# -gt 0 ]] || return 0
    ps -o pid=,stat= -p "$(echo "$@" | tr ' ' ',')" 2>/dev/null | awk '$2 !~ /^Z/ { print $1 }' || true
}

# Every process descending from the given pids (by parent pid, so job drivers in their own sessions are included).
descendants() {
    ps -e -o pid=,ppid= | awk -v roots="$*" '
        { parent[$1] = $2 }
        END {
            n = split(roots, queue, " ")
            for (i = 1; i <= n; i++) seen[queue[i]] = 1
            changed = 1
            while (changed) {
                changed = 0
                for (p in parent) if (!(p in seen) && (parent[p] in seen)) { seen[p] = 1; changed = 1 }
            }
            for (p in seen) if (p in parent) print p
        }'
}
