"""ClusterState for the controller's coroutines.

Every query and write runs on one thread of its own, one at a time: SQLite never blocks the event
loop and never sees two writers. Whoever watches a node's assignments or the events waits on
`changes`, which moves when a call changed them. DEPLOYMENTS moves when anything the reconcile loop
or the routes depend on changed: deployments, replicas and what nodes report of them, nodes joining,
going and coming back, cordons and drains. TRUST moves when certificates were revoked.
"""
from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable, Hashable, TypeVar

from clowder.v1 import common_pb2
from clowderd.controller.state import ClusterState

T = TypeVar("T")

EVENTS = "events"
DEPLOYMENTS = "deployments"
TRUST = "trust"


def assignments_key(node_id: str) -> tuple[str, str]:
    return ("assignments", node_id)


class Changes:
    """A version per key, and waiting for a version to move until the controller stops."""

    def __init__(self, stopping: Callable[[], Awaitable[None]]) -> None:
        self._stopping = stopping
        self._stopped: asyncio.Future | None = None
        self._versions: dict[Hashable, int] = {}
        self._wakeups: dict[Hashable, asyncio.Event] = {}

    def version(self, key: Hashable) -> int:
        return self._versions.get(key, 0)

    def publish(self, key: Hashable) -> None:
        self._versions[key] = self.version(key) + 1
        wakeup = self._wakeups.pop(key, None)
        if wakeup is not None:
            wakeup.set()

    async def wait(self, key: Hashable, seen: int) -> bool:
        """Wait until the key's version is no longer `seen` (True) or the controller is stopping (False)."""
        if self._stopped is None:
            self._stopped = asyncio.ensure_future(self._stopping())
        while self.version(key) == seen:
            if self._stopped.done():
                return False
            wakeup = asyncio.ensure_future(self._wakeups.setdefault(key, asyncio.Event()).wait())
            try:
                await asyncio.wait((wakeup, self._stopped), return_when=asyncio.FIRST_COMPLETED)
            finally:
                wakeup.cancel()
        return True

    def close(self) -> None:
        if self._stopped is not None:
            self._stopped.cancel()


class Cluster:
    def __init__(self, state: ClusterState, stopping: Callable[[], Awaitable[None]]):
        self.state = state
        self.changes = Changes(stopping)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="controller-state")

    async def call(self, method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a method of `self.state` on the state's thread; announce the events it added."""
        before = self.state.last_event_revision
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._thread, functools.partial(method, *args, **kwargs))
        finally:
            if self.state.last_event_revision != before:
                self.changes.publish(EVENTS)

    async def assign(self, spec: common_pb2.ReplicaSpec, node_id: str, now: float) -> None:
        """Place a replica on a node (see ClusterState.assign); the nodes concerned are told."""
        previous = await self.call(self.state.assign, spec, node_id, now)
        self.changes.publish(assignments_key(node_id))
        if previous is not None and previous != node_id:
            self.changes.publish(assignments_key(previous))

    async def unassign(self, replica_id: str, now: float) -> None:
        """Remove a replica (see ClusterState.unassign); the node it was on is told."""
        node_id = await self.call(self.state.unassign, replica_id, now)
        if node_id is not None:
            self.changes.publish(assignments_key(node_id))

    async def close(self) -> None:
        self.changes.close()
        await self.call(self.state.close)
        self._thread.shutdown(wait=True)
