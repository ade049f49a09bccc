#!/usr/bin/env bash
# Stop the cluster that cluster/start-local.sh started with the same settings: the worker node, then the head node,
# and every process they started (job drivers included), by pid. Never `ray stop`: that would end every Ray cluster of
# every user on this machine.
source "$(dirname "${BASH_SOURCE[0]}")/local-env.sh"

grace_s="${CRLFT_RAY_STOP_GRACE:-20}"

# Ends one node the way `ray stop` ends each process, but only this node's: SIGTERM to every process of its tree at
# once; once the node's own process has exited (or after the grace period), SIGKILL to what is left: job drivers start
# with SIGTERM blocked and would otherwise outlive their cluster. The tree is taken before signalling, since the
# children are re-parented once their node exits.
stop_node() {
    local node="$1" pidfile="$CRLFT_CLUSTER_DIR/$1.pid"
    [[ -f "$pidfile" ]] || return 0
    local pid
    pid="$(cat "$pidfile")"
    if [[ -z "$(running "$pid")" ]]; then
        rm -f "$pidfile"
        return 0
    fi
    local pids alive
    pids="$(descendants "$pid")"
    # shellcheck disable=SC2086  # one pid per word
    kill -TERM $pids 2>/dev/null || true
    local deadline=$((SECONDS + grace_s))
    while [[ -n "$(running "$pid")" ]] && ((SECONDS < deadline)); do
        sleep 0.5
    done
    # shellcheck disable=SC2086
    alive="$(running $pids)"
    if [[ -n "$alive" ]]; then
        # shellcheck disable=SC2086
        echo "$node node: killing what is left:" $(ps -o comm= -p "$(echo $alive | tr ' ' ',')") >&2
        # shellcheck disable=SC2086
        kill -KILL $alive 2>/dev/null || true
        # shellcheck disable=SC2086
        while [[ -n "$(running $alive)" ]]; do sleep 0.2; done
    fi
    rm -f "$pidfile"
    echo "$node node stopped (pid $pid)"
}

stop_node worker
stop_node head
