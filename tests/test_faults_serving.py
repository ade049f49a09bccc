"""Faults under load: one of 2 replicas, or only its vLLM engine core, SIGKILLed while 32 clients send requests.

Real Ray Serve on loopback behind the HAProxy ingress (as `crlft serve` runs it), 2 replicas of the tiny model on vLLM's
CPU build: one stack for both cases, driven by benchmarks/replica_faults.py (which also reports the figures). Every
request is bounded, and one not over in time is a hang: there must be none. Only requests in flight on the victim at the
kill may fail, and 2 replicas must serve again within a bound.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from benchmarks.replica_faults import TEARDOWN_S, FaultResult, replica_pids, run_case, two_replicas

RECOVERY_S = 180.0  # a new replica on a loaded 2-core machine: its Ray worker, imports and vLLM start
OPENAI_ERROR_FIELDS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from crlft.inference.engine import vllm_installed

    if not vllm_installed() and not os.environ.get("CI"):  # `make install` brings it; CI must not skip
        pytest.skip("vLLM is not installed (crlft[vllm])")
    with two_replicas(tmp_path_factory.mktemp("faults")) as url:
        yield url


def _no_hang_and_recovered(result: FaultResult) -> None:
    assert result.on_victim, "the kill caught no request in flight on the victim"
    assert [o.result for o in result.hung] == []
    assert result.recovered_s is not None, f"2 replicas did not serve again within {RECOVERY_S:.0f} s"


@pytest.mark.slow
def test_an_engine_core_killed_under_load_ends_only_its_own_requests_with_openai_errors_and_is_restarted(
    endpoint: str,
) -> None:
    result = run_case(endpoint, "engine", recovery_s=RECOVERY_S)
    _no_hang_and_recovered(result)
    assert [(o.result, o.replica, o.error) for o in result.failed_beyond_victim] == []
    assert set(result.readiness) == {"200"}, "/readyz said no while a replica could serve"
    assert result.failed, "the victim's streams under way should have ended as errors"
    for outcome in result.failed:  # the replica lives: it answers every request it held, in OpenAI's shape
        assert outcome.replica == result.victim
        assert outcome.error is not None and set(outcome.error) == OPENAI_ERROR_FIELDS
        assert outcome.error["code"] == "engine_unavailable"
        if outcome.stream:
            assert (outcome.result, outcome.done) == ("error event", True)
        else:
            assert outcome.result == "status 503"
    assert result.engine_cores == 2  # the victim's engine runs again


@pytest.mark.slow
def test_a_replica_process_killed_under_load_drops_only_its_own_requests_and_is_replaced(endpoint: str) -> None:
    result = run_case(endpoint, "replica", recovery_s=RECOVERY_S)
    _no_hang_and_recovered(result)
    # No process is left to write an error: the victim's requests end with their connections, at once.
    assert {o.result for o in result.on_victim if not o.ok} <= {"RemoteProtocolError", "ReadError"}
    assert all(o.ended - result.killed_at < 10 for o in result.failed)
    replicas = replica_pids()
    assert len(replicas) == 2 and result.victim not in replicas
    beyond = [(round(o.started - result.killed_at, 2), o.result, o.replica) for o in result.failed_beyond_victim]
    # None, not even one sent while the victim's process was being torn down (its sockets still took requests, then
    # were reset with no answer): HAProxy holds each request whole and resends it (cluster/session.py's
    # HAPROXY_RETRY_ON).
    assert beyond == [], f"requests failed that were not on the victim (started s after the kill, result, replica): " \
        f"{beyond}"
    assert all(sent < TEARDOWN_S for sent in result.readiness_failed_at), \
        f"/readyz said no while a replica could serve: {dict(result.readiness)} at {result.readiness_failed_at} s"
