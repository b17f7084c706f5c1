"""Replicas on this worker: each one an aimage's model view served by its own engine host process.

States (clowder.v1.ReplicaState):

    PENDING -> PULLING (only when the image is not in the local store) -> LOADING -> READY
    LOADING -> PULLING (a corrupt blob is fetched again) -> LOADING
    READY -> DRAINING (UnloadReplica: no new requests, in-flight ones get the grace period) -> STOPPED
    any state -> FAILED (the reason in `message`; the engine is gone and the view removed)
    FAILED -> STOPPED (UnloadReplica)

Each replica has one task that owns its place on an engine host and its model view from first to
last: it pulls, builds the view (named after the replica), joins the engine host of its base (started
for it when no other replica has that base loaded, see engines.py) with its EP layers, serves until the
engine exits or a stop is asked for, and then leaves the host and removes the view, whatever happened.

Before an engine loads a view, every file of it is checked against its blob's chunk index (on all
cores). A blob that is corrupt (found then, or quarantined earlier by another reader or the scrub) is
fetched again from the replica's sources, which repairs it in the store, and the view is made anew; a
blob that cannot be fetched again fails the replica, naming it.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from pathlib import Path
from typing import AsyncIterator

from clowder.v1 import common_pb2
from clowderd.aimage.manifest import parse_manifest
from clowderd.engines.base import Event, GenerateRequest
from clowderd.engines.client import EngineClient, describe_status
from clowderd.engines.errors import EngineCrashed, EngineError, InvalidRequest
from clowderd.errors import ClowderError, InvalidInput, NotFound, Quarantined, StoreError
from clowderd.store.content import ContentStore
from clowderd.store.images import ImageIndex
from clowderd.store.views import ViewManager
from clowderd.trust.dial import Dialer
from clowderd.worker import images
from clowderd.worker.engines import BaseKey, EnginePool, EpLayer, SharedEngine

log = logging.getLogger(__name__)

S = common_pb2.ReplicaState
TERMINAL = (S.REPLICA_STATE_STOPPED, S.REPLICA_STATE_FAILED)
DEFAULT_ENGINE = "transformers"
# A replica id names its model view too, so it takes the view name's characters.
REPLICA_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
ENGINE_START_TIMEOUT_S = 600.0  # loading the weights of a large model from a cold disk
ENGINE_UNLOAD_TIMEOUT_S = 10.0  # then the engine host is killed
CRASH_DRAIN_S = 5.0  # the engine client fails open streams about a second after the host died


class ReplicaUnavailable(ClowderError):
    """The replica exists but cannot take the request (not READY, failed or unloaded meanwhile)."""


def state_name(state: int) -> str:
    return S.Name(state).removeprefix("REPLICA_STATE_")


class Replica:
    def __init__(self, spec: common_pb2.ReplicaSpec):
        self.spec = spec
        self.state = S.REPLICA_STATE_PENDING
        self.message = ""
        self.since_ns = time.time_ns()
        self.in_flight = 0
        self.engine: SharedEngine | None = None  # the engine host it has joined
        self.view: str | None = None  # the view's name while it exists
        self.adapters: dict[str, str] = {}  # EP layer digest (each of its files) -> EP name
        self.model_digest = ""  # selects the base model alone
        self.engine_adapters: dict[str, str] = {}  # EP name -> the adapter's name in the engine host
        self.task: asyncio.Task | None = None
        self.stopping = False
        self.stop_requested = asyncio.Event()
        self.stopped: asyncio.Task | None = None  # the stop, shared by every UnloadReplica call
        self.unload_timeout = ENGINE_UNLOAD_TIMEOUT_S
        self.idle = asyncio.Condition()

    @property
    def id(self) -> str:
        return self.spec.replica_id

    @property
    def client(self) -> EngineClient | None:
        return None if self.engine is None else self.engine.client

    def set_state(self, state: int, message: str = "") -> None:
        changed = state != self.state
        self.state, self.message, self.since_ns = state, message, time.time_ns()
        if changed:
            log.info("replica state", extra={"replica": self.id, "state": state_name(state), "reason": message})

    def adapter_name(self, digest: str) -> str | None:
        """The engine's name for the EP layer that `digest` (any of its layers' digests) selects; None
        (the base model) for the model digest. An empty digest asks for the aimage as it is: its EP
        layer when it has exactly one, else the base model."""
        if not digest:
            return next(iter(self.engine_adapters.values())) if len(self.engine_adapters) == 1 else None
        if digest == self.model_digest:
            return None
        name = self.adapters.get(digest)
        if name is None:
            have = ", ".join(f"{n} ({d})" for d, n in sorted(self.adapters.items(), key=lambda x: x[1]))
            raise NotFound(f"adapter {digest} is neither an EP layer of replica {self.id!r} "
                           f"({describe_image(self)}) nor its base model ({self.model_digest}); its EP layers: "
                           f"{have or 'none'}")
        return self.engine_adapters[name]

    async def set_in_flight(self, delta: int) -> None:
        async with self.idle:
            self.in_flight += delta
            self.idle.notify_all()

    async def drained(self, timeout: float) -> bool:
        """Wait until no request is in flight, for at most timeout seconds."""
        async with self.idle:
            if self.in_flight == 0:
                return True
            try:
                await asyncio.wait_for(self.idle.wait_for(lambda: self.in_flight == 0), timeout)
            except asyncio.TimeoutError:
                return False
            return True


def describe_image(replica: Replica) -> str:
    return images.describe_image(replica.spec)


def engine_exit_reason(client: EngineClient) -> str:
    """'engine host NAME (pid N) exited with status S', and when it exited on its own with an error
    status, the last line it wrote to stderr (a Python error's own line). A signal is its own reason."""
    reason = f"engine host {client.engine} (pid {client.pid}) exited with {describe_status(client.returncode)}"
    last = next((line for line in reversed(client.stderr_tail) if line.strip()), "")
    return f"{reason}: {last}" if last and client.returncode > 0 else reason


def failure_reason(replica: Replica, error: BaseException) -> str:
    client = replica.client
    if isinstance(error, EngineCrashed) and client is not None and client.returncode is not None:
        return engine_exit_reason(client)
    if isinstance(error, ClowderError):
        return str(error)
    return f"internal error: {type(error).__name__}: {error}"


class ReplicaManager:
    def __init__(self, store: ContentStore, pull_from: str, dialer: Dialer):
        self.store = store
        self.pull_from = pull_from
        self.dialer = dialer  # how pulls reach storage nodes
        self.views = ViewManager(store, ImageIndex(store))
        self.engines = EnginePool(self.views)
        self.replicas: dict[str, Replica] = {}

    # -- lifecycle ------------------------------------------------------------------------------

    def load(self, spec: common_pb2.ReplicaSpec) -> Replica:
        """Start loading a replica and return it at once. Idempotent by replica_id: a replica that
        is not STOPPED or FAILED is returned as it is; a STOPPED or FAILED one is loaded anew."""
        if not REPLICA_ID.match(spec.replica_id):
            raise InvalidInput(f"replica_id {spec.replica_id!r}: use 1 to 128 lowercase letters, digits, "
                               "'.', '_' and '-' (it names the replica's model view)")
        if not (spec.manifest_digest or spec.image):
            raise InvalidInput(f"replica {spec.replica_id!r}: the spec gives neither manifest_digest nor image")
        current = self.replicas.get(spec.replica_id)
        if current is not None and (current.state not in TERMINAL or current.task is not None
                                    and not current.task.done()):
            return current
        replica = self.replicas[spec.replica_id] = Replica(spec)
        replica.task = asyncio.create_task(self._run(replica), name=f"replica {spec.replica_id}")
        return replica

    async def unload(self, replica_id: str, grace: float) -> Replica:
        """Drain (up to grace seconds), unload the engine, remove the view: STOPPED when it returns."""
        replica = self.get(replica_id)
        if replica.stopped is None:
            replica.stopped = asyncio.create_task(self._stop(replica, grace, ENGINE_UNLOAD_TIMEOUT_S))
        await asyncio.shield(replica.stopped)
        return replica

    async def close(self, timeout: float) -> None:
        """Stop every replica at once (clowderd is shutting down) within about timeout seconds: no
        drain, since the servers already let in-flight calls finish; engines not gone by then are
        killed."""
        stops = []
        for replica in self.replicas.values():
            if replica.stopped is None:
                replica.stopped = asyncio.create_task(self._stop(replica, 0.0, timeout))
            stops.append(replica.stopped)
        await asyncio.gather(*stops, return_exceptions=True)

    async def _stop(self, replica: Replica, grace: float, unload_timeout: float) -> None:
        replica.stopping = True
        replica.unload_timeout = unload_timeout
        if replica.state in (S.REPLICA_STATE_READY, S.REPLICA_STATE_DRAINING):
            replica.set_state(S.REPLICA_STATE_DRAINING)
            if not await replica.drained(grace):
                log.warning("unloading with requests in flight", extra={
                    "replica": replica.id, "in_flight": replica.in_flight, "grace_seconds": grace})
        elif replica.state in (S.REPLICA_STATE_PENDING, S.REPLICA_STATE_PULLING, S.REPLICA_STATE_LOADING):
            # Not serving yet: stop at once. A pull runs on in its thread and leaves only blobs
            # behind; an engine host still loading for this replica alone is killed.
            replica.task.cancel()
        replica.stop_requested.set()
        with contextlib.suppress(asyncio.CancelledError):
            await replica.task
        replica.set_state(S.REPLICA_STATE_STOPPED, "unloaded")

    async def _run(self, replica: Replica) -> None:
        try:
            await self._start(replica)
            if not replica.stopping:
                await self._serve(replica)
        except asyncio.CancelledError:
            pass  # stopped before it served: _stop cancelled the pull or the engine's start
        except Exception as e:
            if not replica.stopping:
                if not isinstance(e, ClowderError):
                    log.exception("replica failed", extra={"replica": replica.id})
                replica.set_state(S.REPLICA_STATE_FAILED, failure_reason(replica, e))
        finally:
            await self._release(replica)

    async def _serve(self, replica: Replica) -> None:
        """Wait until the engine exits or a stop is asked for; an exit on its own fails the replica."""
        exited = asyncio.ensure_future(replica.client.proc.wait())
        stop = asyncio.ensure_future(replica.stop_requested.wait())
        await asyncio.wait((exited, stop), return_when=asyncio.FIRST_COMPLETED)
        for waiter in (exited, stop):
            waiter.cancel()
        if not replica.stopping:
            replica.set_state(S.REPLICA_STATE_FAILED, engine_exit_reason(replica.client))
            await replica.drained(CRASH_DRAIN_S)  # the client ends open streams after the exit

    async def _start(self, replica: Replica) -> None:
        spec = replica.spec
        digest = await asyncio.to_thread(images.local_manifest, self.store, spec)
        if digest is None:
            replica.set_state(S.REPLICA_STATE_PULLING, f"pulling {describe_image(replica)}")
            digest = await asyncio.to_thread(images.pull_image, self.store, spec, self.pull_from, self.dialer)
        replica.set_state(S.REPLICA_STATE_LOADING, f"loading {describe_image(replica)}")
        view = await self._checked_view(replica, digest)
        replica.view = replica.id
        if replica.stopping:
            return
        key, ep_layers = self._read_view(replica, view)
        shared = await self.engines.acquire(replica.id, key, digest, timeout=ENGINE_START_TIMEOUT_S)
        replica.engine = shared
        replica.engine_adapters = await shared.attach(replica.id, ep_layers)
        if not replica.stopping:
            others = sorted(shared.users - {replica.id})
            sharing = f", its base shared with {', '.join(map(repr, others))}" if others else ""
            replica.set_state(S.REPLICA_STATE_READY, f"engine {key.engine} serving {describe_image(replica)} "
                                                     f"(pid {replica.client.pid}){sharing}")

    async def _checked_view(self, replica: Replica, digest: str) -> Path:
        """The replica's view, every blob in it checked. Corrupt blobs are fetched again; each at most once
        (a corrupt manifest hides the rest of the image until it is fetched again: a round may find more)."""
        fetched: set[str] = set()
        while True:
            view, corrupt = await asyncio.to_thread(self._view_if_whole, replica.id, digest)
            if not corrupt:
                if fetched:
                    log.info("corrupt blobs fetched again", extra={"replica": replica.id, "blobs": sorted(fetched)})
                return view
            digests = [e.digest for e in corrupt]
            named = await asyncio.to_thread(self._name_blobs, digest, digests)
            blobs, are = (f"blob {named} of {describe_image(replica)}", "is") if len(corrupt) == 1 else \
                (f"blobs {named} of {describe_image(replica)}", "are")
            if fetched & set(digests):
                raise StoreError(f"{blobs} {are} still corrupt on this node after fetching again: "
                                 + "; ".join(map(str, corrupt)))
            log.warning("fetching corrupt blobs again", extra={"replica": replica.id, "blobs": digests})
            replica.set_state(S.REPLICA_STATE_PULLING, f"fetching again the corrupt {blobs}")
            try:
                await asyncio.to_thread(images.pull_image, self.store, replica.spec, self.pull_from, self.dialer)
            except ClowderError as e:
                raise StoreError(f"{blobs} {are} corrupt on this node and could not be fetched again: {e}") from None
            fetched.update(digests)
            replica.set_state(S.REPLICA_STATE_LOADING, f"loading {describe_image(replica)}")

    def _view_if_whole(self, name: str, digest: str) -> tuple[Path | None, list[Quarantined]]:
        """(the view, []) when every blob of the image checks out; else (None, an error naming each
        corrupt blob) and no view."""
        blobs = set(self.views.index.image_blobs(digest))
        quarantined = [record.error() for record in self.store.quarantined() if record.digest in blobs]
        if quarantined:
            return None, quarantined
        try:
            view = self._create_view(name, digest)
        except Quarantined as exc:  # the manifest or the configuration, read whole to make the view
            return None, [exc]
        corrupt = self.views.verify(name)
        if corrupt:
            self.views.remove(name)
            return None, corrupt
        return view, []

    def _name_blobs(self, digest: str, blobs: list[str]) -> str:
        """'DIGEST (its file in the view), ...' for blobs of the image."""
        try:
            files = {blob: rel for rel, blob in self.views.files(digest).items()}
        except ClowderError:  # the manifest itself is corrupt
            files = {digest: "clowder/manifest.json"}
        return ", ".join(f"{blob} ({files[blob]})" if blob in files else blob for blob in blobs)

    def _create_view(self, name: str, digest: str) -> Path:
        # A view of this name can only be left over from a clowderd that did not shut down
        # cleanly: replica ids are unique, and this worker removes the views of its replicas.
        with contextlib.suppress(NotFound):
            self.views.remove(name)
        return self.views.create(name, digest)

    @staticmethod
    def _read_view(replica: Replica, view: Path) -> tuple[BaseKey, list[EpLayer]]:
        """What the replica's engine host must be (the base, and the engine and its parameters from the
        aimage configuration), its EP layers, and the digests that select each EP layer."""
        where = f"{describe_image(replica)}: configuration"
        config = json.loads((view / "clowder" / "config.json").read_bytes())
        section = config.get("engine") or {}
        if not isinstance(section, dict):
            raise InvalidInput(f"{where}: engine must be an object")
        engine = section.get("name", DEFAULT_ENGINE)
        params = section.get(engine) or {}
        if not isinstance(params, dict):
            raise InvalidInput(f"{where}: engine.{engine} must be an object")
        manifest = parse_manifest((view / "clowder" / "manifest.json").read_bytes(), describe_image(replica))
        ep_layers = []
        for name, layers in manifest.ep_layers.items():
            ep_layers.append(EpLayer(name, view / "adapters" / name, tuple(sorted(d.digest for d in layers))))
            replica.adapters.update((d.digest, name) for d in layers)
        replica.model_digest = manifest.model_digest
        key = BaseKey.of(manifest.model_digest, engine, params, replica.spec.gpu_uuids)
        return key, ep_layers

    async def _release(self, replica: Replica) -> None:
        """Leave the engine host (the last replica on it unloads it, or kills it when it does not go in
        time) and remove the view."""
        shared, replica.engine = replica.engine, None
        if shared is not None:
            await shared.detach(replica.id)
            await self.engines.release(replica.id, shared, timeout=replica.unload_timeout)
        if replica.view is not None:
            await asyncio.to_thread(self.views.remove, replica.view)
            replica.view = None

    # -- queries --------------------------------------------------------------------------------

    def get(self, replica_id: str) -> Replica:
        replica = self.replicas.get(replica_id)
        if replica is None:
            raise NotFound(f"replica {replica_id!r} is not on this worker")
        return replica

    def list(self, deployment: str = "") -> list[Replica]:
        return [r for r in self.replicas.values() if not deployment or r.spec.deployment == deployment]

    async def generate(self, replica_id: str, request: GenerateRequest,
                       adapter_digest: str = "") -> AsyncIterator[Event]:
        """Stream the request's events from the replica's engine. NotFound (replica, adapter),
        ReplicaUnavailable (not READY, or failed or unloaded before the end), and the engine's
        InvalidRequest and other EngineErrors."""
        replica = self.get(replica_id)
        if replica.state != S.REPLICA_STATE_READY:
            raise ReplicaUnavailable(f"replica {replica_id!r} is {state_name(replica.state)}"
                                     + (f": {replica.message}" if replica.message else ""))
        request.adapter = replica.adapter_name(adapter_digest)
        client = replica.client
        await replica.set_in_flight(+1)
        try:
            async for event in client.generate(request):
                yield event
        except EngineCrashed:
            reason = replica.message if replica.state == S.REPLICA_STATE_FAILED else engine_exit_reason(client)
            raise ReplicaUnavailable(f"replica {replica_id!r} failed: {reason}") from None
        except EngineError as e:
            if isinstance(e, InvalidRequest) or not replica.stopping:
                raise
            raise ReplicaUnavailable(f"replica {replica_id!r} was unloaded before the request finished") from None
        finally:
            await replica.set_in_flight(-1)
