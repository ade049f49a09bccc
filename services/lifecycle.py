"""The model a replica serves over time: its first load, the swap to a new version, and the restart of a dead engine.

Following the registry: the model is the deployment's `user_config` {"model": URI, "watch_s": S}. A replica serving
`models:/NAME@ALIAS` looks the alias up every S seconds and, when it moved, loads the new version next to the old
one, sends new requests to it and lets the old engine finish what it holds (nothing in flight is dropped). Changing
`user_config` (a Serve config update, KubeRay serveConfigV2) swaps the same way without restarting replicas.

Adapters: user_config's "adapters" {name: URI} are served on the model, each under its name (a model URI that is itself
an adapter is served so too, under the model's name); without a model, the engine holds their base, listed under
registry.base_model_name. An adapter whose alias moved is swapped alone: new requests name its new version (a new id,
which vLLM loads on first use), those in flight finish on the old one; the engine and the other adapters stay.
With "every_champion" (serve.adapters' `*`) the replica also serves the champion of every registered name whose
champion is an adapter on its base, found again at each check of the registry: a name promoted onto the base joins, one
whose champion leaves it (or is deleted) leaves; requests to the others go on. Its engine takes adapters from the start
(names may join later). More adapters than inference.max_loras are all served: vLLM schedules at most max_loras of
them in a batch (requests to the others wait for the next) and keeps that many loaded, loading an evicted one again from
its folder when asked; a line in the log says when the replica serves more than that.

Faults: when the engine dies, whichever caller finds it dead first (a request, a probe, Serve's health check) starts
the same model again in place; requests wait for it (at most RESTART_WAIT_S). An engine that cannot be started again,
or dies again within MIN_ENGINE_LIFETIME_S of its restart, makes the replica report itself unhealthy, so that Serve
replaces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from pathlib import Path
from typing import Any

from crlft.config import Config
from crlft.errors import CrlftError
from crlft.export import adapter_base, adapter_rank, content_fingerprint, is_adapter
from crlft.inference.engine import EngineSettings
from crlft.lineage.bases import champion_adapters
from crlft.lineage.versions import ModelRef
from crlft.storage import folder_revision
from services.api import unavailable
from services.metrics import metrics
from services.protocol import ApiError
from services.served_model import (
    EVERY_CHAMPION,
    LoadedModel,
    Served,
    ServedAdapter,
    champion_source,
    load_adapter,
    load_model,
    resolve_model_uri,
)

logger = logging.getLogger("ray.serve")

# A restarted engine that dies again within this long is a fault of the replica (its process, node or memory), not a
# one-off: no second restart in place, Serve replaces the replica.
MIN_ENGINE_LIFETIME_S = 60.0
# A request waits this long at most for an engine being restarted (a vLLM start), then gets a 503 with Retry-After.
RESTART_WAIT_S = 120.0

Resolved = dict[str, tuple[str, Path]]  # served name -> (source, folder) of each adapter


class ModelLifecycle:
    """The model a replica serves now (`current`), the models it replaced that still finish their requests, the
    registry watch and the engine's restart in place."""

    def __init__(self, cfg: Config, model_name: str, tracking_uri: str | None, engine_settings: EngineSettings) -> None:
        self.cfg = cfg
        self.model_name = model_name
        self.tracking_uri = tracking_uri
        self.engine_settings = engine_settings
        self.base_name = model_name  # the name the engine's own model answers to
        self.current: LoadedModel | None = None
        self.adapters: dict[str, ServedAdapter] = {}
        # user_config's model, adapters and every_champion
        self._sources: tuple[str | None, dict[str, str], bool] = (None, {}, False)
        self._every_found: list[str] | None = None  # the names every_champion found last
        self._lora_ids = itertools.count(1)
        self._retired: list[LoadedModel] = []  # replaced models still finishing their requests in flight
        self._watch_s = 0.0
        self._watch_task: asyncio.Task[None] | None = None
        self._swap_lock = asyncio.Lock()
        self._restart: asyncio.Task[None] | None = None  # a dead engine being started again (failed: kept, unhealthy)
        self._restarted_at: float | None = None

    # -- loading and swapping -------------------------------------------------------------------------------------
    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Called by Serve at start and whenever user_config changes: load the model if it changed."""
        model = user_config.get("model")
        self._sources = (None if model is None else str(model), dict(user_config.get("adapters") or {}),
                         bool(user_config.get("every_champion")))
        self._watch_s = float(user_config.get("watch_s") or 0.0)
        await self._load()
        if self._watch_s > 0 and (self._watch_task is None or self._watch_task.done()):
            self._watch_task = asyncio.get_running_loop().create_task(self._watch())

    async def _load(self) -> None:
        """Resolve the model and adapters configured; load and swap in whichever is not what is loaded."""
        async with self._swap_lock:
            source, path, adapters = await asyncio.to_thread(self._resolve, *self._sources)
            if adapters or self._sources[2]:  # slots of the configured rank, raised to the highest adapter's (never
                # lowered); every_champion's names may all come later: slots of the rank crlft trains adapters with
                ranks = [adapter_rank(adapter_path) for _, adapter_path in adapters.values()] or [self.cfg.train.lora.r]
                self.engine_settings = self.engine_settings.with_adapters(self.cfg.inference.max_loras, ranks)
            if self._needs_engine(source, path):
                self._install(await asyncio.to_thread(load_model, source, path, self.engine_settings))
            served: dict[str, ServedAdapter] = {}
            for name, (adapter_source, adapter_path) in adapters.items():
                old = self.adapters.get(name)
                if old is None or old.source != adapter_source or old.revision != folder_revision(adapter_path):
                    old = await asyncio.to_thread(load_adapter, name, adapter_source, adapter_path,
                                                  next(self._lora_ids))
                    logger.info("serving the adapter %s from %s (revision %s)", name, adapter_path, old.revision)
                served[name] = old
            self._note_left_and_slots(served)
            self.adapters = served

    def _needs_engine(self, source: str, path: Path) -> bool:
        """Whether the engine must be opened (again): another model, or one opened without adapter slots, or with
        slots too small for the adapters' rank."""
        current, settings = self.current, self.engine_settings
        if current is None or current.source != source or current.revision != folder_revision(path):
            return True
        return bool(settings.max_loras) and (not current.max_loras
                                             or (settings.max_lora_rank or 0) > current.max_lora_rank)

    def _note_left_and_slots(self, served: dict[str, ServedAdapter]) -> None:
        """A line for each adapter no longer served, and one when the adapters served outnumber inference.max_loras."""
        for name in sorted(self.adapters.keys() - served.keys()):
            logger.info("no longer serving the adapter %s", name)
        slots = self.cfg.inference.max_loras
        if len(served) > slots and len(served) != len(self.adapters):
            logger.warning("serving %d adapters, more than inference.max_loras (%d): a batch holds %d of them "
                           "(requests to the others wait for the next) and vLLM keeps %d loaded, loading another from "
                           "its folder when it is asked for", len(served), slots, slots, slots)

    def _resolve(self, source: str | None, adapters: dict[str, str],
                 every_champion: bool = False) -> tuple[str, Path, Resolved]:
        """The engine's model (source, folder) and the adapters' (name -> source, folder): those listed, and with
        `every_champion` the champions on the engine's base (`_with_every_champion`)."""
        source, base, listed = self._resolve_listed(source, adapters)
        return source, base, self._with_every_champion(base, listed) if every_champion else listed

    def _resolve_listed(self, source: str | None, adapters: dict[str, str]) -> tuple[str, Path, Resolved]:
        """A model that is an adapter joins the adapters under the model's name; without a model the engine's is the
        adapters' one base."""
        resolved = {name: (uri, resolve_model_uri(uri, self.cfg, self.tracking_uri)) for name, uri in adapters.items()}
        if source is not None:
            path = resolve_model_uri(source, self.cfg, self.tracking_uri)
            if not is_adapter(path):
                return source, path, resolved
            resolved = {self.model_name: (source, path), **resolved}  # served under the model's name
            self.base_name = self.cfg.registry.base_model_name
        bases = {name: adapter_base(path).folder(self.cfg.state_dir) for name, (_, path) in resolved.items()}
        if len(set(bases.values())) != 1:
            raise CrlftError("one replica serves adapters of one base: "
                             + ", ".join(f"{name} is on {base}" for name, base in bases.items()))
        base = next(iter(bases.values()))
        return str(base), base, resolved

    def _with_every_champion(self, base: Path, listed: Resolved) -> Resolved:
        """`listed`, and the champion of every other registered name that is an adapter on `base`, under its name (one
        listed, by name or as its champion, stays as listed). A champion that cannot be fetched now is left out until it
        can, with a line in the log: it must not stop the others."""
        fingerprint = adapter_base(next(iter(listed.values()))[1]).fingerprint if listed else _fingerprint(base)
        sources = {source for source, _ in listed.values()}
        every = dict(listed)
        for champion in champion_adapters(self.cfg, self.tracking_uri, fingerprint):
            source = champion_source(champion.name, self.cfg)
            if champion.name in every or source in sources:
                continue
            try:  # the version found, not the alias: it may have moved since, off this base
                version = ModelRef(champion.name, version=champion.version).uri
                every[champion.name] = (source, resolve_model_uri(version, self.cfg, self.tracking_uri))
            except CrlftError as exc:
                logger.warning("not serving %s (serve.adapters %r) for now: %s", champion.name, EVERY_CHAMPION, exc)
        self._note_found(sorted(every.keys() - listed.keys()), fingerprint, alone=not listed)
        return every

    def _note_found(self, found: list[str], fingerprint: str, alone: bool) -> None:
        """A line in the log when the names `*` found change (and at start): which, or that there are none."""
        if found == self._every_found:
            return
        self._every_found = found
        if found:
            logger.info("serve.adapters %r: the champions of %s on this base", EVERY_CHAMPION, ", ".join(found))
        else:
            logger.info("serve.adapters %r: no registered name's champion is an adapter on this base (%s): serving %s",
                        EVERY_CHAMPION, fingerprint, "the base alone" if alone else "the base and the adapters listed")

    def _install(self, new: LoadedModel) -> None:
        """Send new requests to `new`; the model it replaces finishes its requests in flight, then frees its engine."""
        current, self.current = self.current, new
        m = metrics()
        if current is not None:
            current.engine.drain()
            self._retired.append(current)
            m.model.remove(self.model_name, current.revision, current.engine.kind)
        m.model.labels(self.model_name, new.revision, new.engine.kind).set(1)
        logger.info("serving %s from %s (revision %s, %s engine)", self.model_name, new.path, new.revision,
                    new.engine.kind)

    async def _watch(self) -> None:
        while self._watch_s > 0:
            await asyncio.sleep(self._watch_s)
            model = self.current
            if model is None:
                continue
            try:
                await self._load()
            except Exception as exc:  # the registry may be briefly unreachable: keep serving what is loaded
                logger.warning("could not check %s for a new version: %s", model.source, exc)

    def retiring(self) -> int:
        """Sequences still being generated by models this replica has replaced (those done are forgotten)."""
        self._retired = [m for m in self._retired if m.engine.alive()]
        return sum(sum(m.engine.counts()) for m in self._retired)

    # -- a dead engine --------------------------------------------------------------------------------------------
    def _restarting(self) -> asyncio.Task[None] | None:
        """Where the engine has died: its restart in place, begun by whichever caller finds it dead first (a request,
        a probe, Serve's health check). None while the engine is alive."""
        model = self.current
        if model is None or model.engine.alive():
            return None
        if self._restart is None:
            self._restart = asyncio.get_running_loop().create_task(self._restart_engine(model))
        return self._restart

    async def _restart_engine(self, dead: LoadedModel) -> None:
        if self._restarted_at is not None and time.monotonic() - self._restarted_at < MIN_ENGINE_LIFETIME_S:
            raise RuntimeError(f"the {dead.engine.kind} engine died again within {MIN_ENGINE_LIFETIME_S:.0f} s of its "
                               "restart")
        logger.error("the %s engine stopped: starting %s again", dead.engine.kind, dead.path)
        async with self._swap_lock:
            if self.current is dead:  # else a new model was swapped in meanwhile
                self._install(await asyncio.to_thread(load_model, dead.source, dead.path, self.engine_settings))
        self._restarted_at = time.monotonic()
        self._restart = None

    async def check_health(self) -> None:
        """Serve replaces a replica whose engine died and could not be started again (a dead engine is restarted in
        place first: faster than a new replica, and no request fails meanwhile)."""
        restart = self._restarting()
        if restart is not None and restart.done():
            raise RuntimeError(f"the generation engine stopped and could not be restarted: {restart.exception()}")

    def ready(self) -> LoadedModel:
        """The model, unless this replica cannot answer: still loading, or its engine could not be restarted. A dead
        engine being restarted counts as ready: requests wait for it (`serving`)."""
        restart = self._restarting()
        model = self.current
        if model is None:
            raise unavailable("the model is loading; retry shortly", "model_loading")
        if restart is not None and restart.done():
            raise unavailable("the model's engine stopped and could not be restarted; retry shortly",
                              "engine_unavailable")
        return model

    def names(self) -> list[str]:
        """The names requests may give in `model`: the engine's model, then its adapters."""
        return [self.base_name, *self.adapters]

    def named(self, name: str, model: LoadedModel) -> Served:
        """What a request naming `name` is generated by, on `model`; a 404 for a name this replica does not serve."""
        if name == self.base_name:
            return Served(name, model)
        if name in self.adapters:
            return Served(name, model, self.adapters[name])
        served = ", ".join(map(repr, self.names()))
        raise ApiError(404, f"the model {name!r} does not exist: this server serves {served}", param="model",
                       code="model_not_found")

    async def serving(self) -> LoadedModel:
        """The model to generate with: where its engine died, after its restart (at most RESTART_WAIT_S)."""
        restart = self._restarting()
        if restart is not None:
            with contextlib.suppress(Exception):  # too slow or failed: answered below
                await asyncio.wait_for(asyncio.shield(restart), RESTART_WAIT_S)
        model = self.ready()
        if not model.engine.alive():
            raise unavailable("the model's engine is being restarted; retry shortly", "engine_unavailable")
        return model


@functools.lru_cache(maxsize=4)
def _content_fingerprint(path: Path, revision: str) -> str:
    return content_fingerprint(path)


def _fingerprint(base: Path) -> str:
    """A base folder's content fingerprint, hashed once per revision of the folder (a listed adapter's base names it:
    `_with_every_champion` reads it there when it can)."""
    return _content_fingerprint(base, folder_revision(base))
