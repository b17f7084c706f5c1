"""Engine hosts shared by the replicas on this worker: one host per base, so that aimages sharing a base
keep one copy of it in memory, each replica's EP layers loaded onto that copy as adapters.

Two replicas share a host when their aimages have the same model layers (the manifest's model digest)
and ask for the same engine, engine parameters and GPUs. The first replica of a base starts the host on
a model view of the pool's own (the view outlives any one replica); the last replica to leave unloads
it and removes the view. An EP layer is loaded once per host, keyed by its content, under a name of the
pool's making (two aimages may both call an EP layer "french"), and dropped when no replica uses it.
A host that exits takes every replica on it down; the next replica of that base starts a new one.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from clowderd.engines.client import EngineClient
from clowderd.engines.errors import EngineError
from clowderd.errors import NotFound
from clowderd.store.views import ViewManager

log = logging.getLogger(__name__)

VIEW_PREFIX = "base-"  # the pool's model views; any left by an earlier clowderd are removed at start


@dataclass(frozen=True)
class BaseKey:
    """What makes two replicas able to share one engine host."""
    model_digest: str
    engine: str
    params: str             # the engine parameters as canonical JSON
    gpus: tuple[str, ...]   # GPU UUIDs, in the order the replica asked for them

    @classmethod
    def of(cls, model_digest: str, engine: str, params: dict, gpus) -> "BaseKey":
        return cls(model_digest, engine, json.dumps(params, sort_keys=True), tuple(gpus))

    def short(self) -> str:
        return hashlib.sha256(repr(self).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class EpLayer:
    """An EP layer as one replica's aimage names it: its name there, its directory in the replica's
    view, and its content (the digests of its files), which decides whether two replicas share it."""
    name: str
    path: Path
    content: tuple[str, ...]

    def engine_name(self) -> str:
        # Unique per content; '.' is not allowed in a PEFT adapter name.
        tag = hashlib.sha256("\n".join(self.content).encode()).hexdigest()[:8]
        return f"{self.name.replace('.', '_')}-{tag}"


@dataclass
class _Adapter:
    engine_name: str
    users: set[str] = field(default_factory=set)


class SharedEngine:
    def __init__(self, key: BaseKey, view: str, client: EngineClient, timeout: float):
        self.key = key
        self.view = view
        self.client = client
        self.users: set[str] = set()
        self.adapters: dict[tuple[str, ...], _Adapter] = {}
        self.started = asyncio.create_task(client.start(timeout=timeout), name=f"engine {view}")
        self._adapters_lock = asyncio.Lock()

    @property
    def gone(self) -> bool:
        """The host exited or failed to start: no new replica may join it."""
        failed = self.started.done() and (self.started.cancelled() or self.started.exception() is not None)
        return failed or self.client.returncode is not None

    async def attach(self, user: str, layers: list[EpLayer]) -> dict[str, str]:
        """Load the user's EP layers that the host lacks; their engine names by the user's EP names."""
        names = {}
        async with self._adapters_lock:
            try:
                for layer in layers:
                    adapter = self.adapters.get(layer.content)
                    if adapter is None:
                        adapter = _Adapter(layer.engine_name())
                        await self.client.add_adapter(adapter.engine_name, layer.path)
                        self.adapters[layer.content] = adapter
                    adapter.users.add(user)
                    names[layer.name] = adapter.engine_name
            except BaseException:
                await self._drop_user_adapters(user)
                raise
        return names

    async def detach(self, user: str) -> None:
        async with self._adapters_lock:
            await self._drop_user_adapters(user)

    async def _drop_user_adapters(self, user: str) -> None:
        for content, adapter in list(self.adapters.items()):
            adapter.users.discard(user)
            if adapter.users:
                continue
            del self.adapters[content]
            if self.client.returncode is None:
                try:
                    await self.client.remove_adapter(adapter.engine_name)
                except EngineError as e:  # left loaded: it costs memory until the host goes, nothing else
                    log.warning("could not remove an adapter", extra={"adapter": adapter.engine_name,
                                                                       "error": str(e)})


class EnginePool:
    def __init__(self, views: ViewManager):
        self.views = views
        self.engines: dict[BaseKey, SharedEngine] = {}
        self._lock = asyncio.Lock()
        self._generation = itertools.count(1)
        for name, _ in views.list():
            if name.startswith(VIEW_PREFIX):
                views.remove(name)

    async def acquire(self, user: str, key: BaseKey, manifest_digest: str, timeout: float) -> SharedEngine:
        """The host of this base, started from the aimage `manifest_digest` when there is none; returns
        once it has loaded. Raises what the host's start raises (the user is released then)."""
        async with self._lock:
            shared = self.engines.get(key)
            if shared is None or shared.gone:
                shared = self.engines[key] = await self._launch(key, manifest_digest, timeout)
            shared.users.add(user)
        try:
            await asyncio.shield(shared.started)
        except BaseException:
            await self.release(user, shared, timeout=0.0)
            raise
        return shared

    async def _launch(self, key: BaseKey, manifest_digest: str, timeout: float) -> SharedEngine:
        view = f"{VIEW_PREFIX}{key.short()}-{next(self._generation)}"
        path = await asyncio.to_thread(self.views.create, view, manifest_digest)
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(key.gpus)} if key.gpus else None
        client = EngineClient(key.engine, path, params=json.loads(key.params), env=env)
        log.info("starting an engine host", extra={"engine": key.engine, "view": view,
                                                   "model_digest": key.model_digest})
        return SharedEngine(key, view, client, timeout)

    async def release(self, user: str, shared: SharedEngine, timeout: float) -> None:
        """The user is done with the host (its adapters already detached); the last user stops it:
        an unload of up to `timeout` seconds, then a kill; a host still loading is killed at once."""
        async with self._lock:
            shared.users.discard(user)
            if shared.users:
                return
            if self.engines.get(shared.key) is shared:
                del self.engines[shared.key]
        client = shared.client
        if not shared.started.done():
            shared.started.cancel()
            if client.proc is not None and client.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    client.proc.kill()
        await asyncio.wait([shared.started])  # its outcome is the users' business, not the release's
        if client.proc is not None:
            if client.ready_info is not None and client.returncode is None:
                await client.unload(timeout=timeout)
            else:
                await client.kill()
            log.info("engine host stopped", extra={"view": shared.view, "pid": client.pid,
                                                   "exit_status": client.returncode})
        with contextlib.suppress(NotFound):
            await asyncio.to_thread(self.views.remove, shared.view)
