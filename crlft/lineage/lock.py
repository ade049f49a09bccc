"""The promotion lock: one promotion of a registered model decides at a time, across threads, processes and
machines, on any MLflow store."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

from crlft.errors import CrlftError
from crlft.lineage.tags import TAG
from crlft.tracking import error_code, mlflow_error

if TYPE_CHECKING:
    from mlflow import MlflowClient

LOCK_SUFFIX = ".promotion-lock"
LOCK_TTL_S = 120.0  # a lock older than this is left over from a crashed promoter
LOCK_TIMEOUT_S = 300.0


@contextlib.contextmanager
def promotion_lock(client: MlflowClient, name: str, timeout_s: float = LOCK_TIMEOUT_S,
                   ttl_s: float = LOCK_TTL_S) -> Iterator[None]:
    """Serialise promotions of `name` across threads, processes and machines.

    MLflow aliases have no compare-and-set, so "read champion, compare, set alias" races: two promoters can both read
    the old champion and the slower one may move the alias to the worse model. The only atomic primitive every store
    offers is "create a registered model with a unique name" (a primary key in the SQL stores behind both the SQLite
    file and a tracking server): creating `<name>.promotion-lock` is taking the lock, deleting it is releasing it.
    One mechanism for both stores, unlike a file lock (which a remote server's clients do not share); it needs no
    server-side support. A lock left by a crashed promoter expires after `ttl_s` (its expiry is a tag); breaking it is
    the one non-atomic step, acceptable because it only happens after a crash.
    """
    from mlflow.exceptions import MlflowException

    lock_name = name + LOCK_SUFFIX
    owner = f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        try:
            client.create_registered_model(
                lock_name,
                tags={TAG + "lock.owner": owner, TAG + "lock.expires": repr(time.time() + ttl_s)},
                description=f"held while a promotion of {name} decides; delete it if no promotion is running",
            )
            break
        except MlflowException as exc:
            # MLflow's SQL store answers a clash on the name by reading the existing model, which is "not found"
            # when its holder released it in between: contention too, try again.
            if error_code(exc) not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise mlflow_error(exc, f"take the promotion lock of {name}") from None
        _break_if_stale(client, lock_name)
        if time.monotonic() > deadline:
            raise CrlftError(
                f"another promotion of {name} holds the lock (registered model {lock_name!r}) for over {timeout_s:.0f}"
                " s: wait for it, or delete that registered model if no promotion is running"
            )
        time.sleep(delay * (0.5 + uuid.uuid4().int % 100 / 100))  # jitter: threads do not retry in lock-step
        delay = min(delay * 2, 1.0)
    try:
        yield
    finally:
        with contextlib.suppress(MlflowException):
            client.delete_registered_model(lock_name)


def _break_if_stale(client: MlflowClient, lock_name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(lock_name).tags or {}
        expires = float(tags.get(TAG + "lock.expires", "inf"))
        if time.time() > expires:
            client.delete_registered_model(lock_name)
    except (MlflowException, ValueError):
        pass  # released meanwhile, or a lock someone made by hand: wait for it
