#!/usr/bin/env bash
# Stop the cluster that cluster/start-local.sh started with the same settings: the worker node, then the head node,
# and every process they started (job drivers included), by pid. Never `ray stop`: that would end every Ray cluster of
# every user on this machine.
source "$(dirname "${BASH_SOURCE[0]}")/local-env.sh"

grace_s="${CRLFT_RAY_STOP_GRACE:-20}"

# The given pids that are not in the session of the first one.
other_sessions() {
    local sid
    sid="$(ps -o sid= -p "$1" | tr -d ' ')"
    shift
    [[ $# -gt 0 ]] || return 0
    ps -o pid=,sid= -p "$(echo "$@" | tr ' ' ',')" 2>/dev/null | awk -v sid="$sid" '$2 != sid { print $1 }' || true
}

# Ends one node. Job drivers first: they run in sessions of their own, SIGKILLed as Ray's job supervisor would when its
# cluster goes away (left running, they hold the node's shutdown up for long). Then SIGTERM to the `ray start --block`
# process, which shuts the node's Ray processes down; once it has exited (or after the grace period) and a few seconds
# more, SIGKILL to whatever of its process tree is left. The tree is taken before signalling: children are re-parented
# once their node exits.
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
    kill -KILL $(other_sessions "$pid" $pids) 2>/dev/null || true
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + grace_s))
    while [[ -n "$(running "$pid")" ]] && ((SECONDS < deadline)); do
        sleep 0.5
    done
    # A few seconds more for the processes still finishing their own shutdown.
    deadline=$((SECONDS + 3))
    # shellcheck disable=SC2086  # one pid per word
    while alive="$(running $pids)" && [[ -n "$alive" ]] && ((SECONDS < deadline)); do
        sleep 0.5
    done
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
