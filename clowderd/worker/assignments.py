"""The worker's part of the node's membership session (clowderd.member.agent): it reports the states of
its replicas and the manifests its store holds in every heartbeat, and runs the replicas the controller
assigns to it.

An assigned replica that stopped without its assignment asking (unloaded by a Worker.UnloadReplica call)
is reported STOPPED, so that the controller restarts or moves it; a replica the controller says no
deployment assigned (HeartbeatResponse.stop_replicas: loaded by a Worker.LoadReplica call) is stopped.

Every assignment watch starts with a snapshot, which is applied as the whole truth: replicas not in it
are unloaded, replicas in it that do not run are loaded. A replica whose spec changes is replaced; one
that failed stays FAILED, its reason in the heartbeats, until the controller changes or removes it.
Operations on one replica run one after the other, in the order the controller asked for them. A
session that breaks leaves the replicas as they are.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from clowder.v1 import common_pb2, controller_pb2, controller_pb2_grpc
from clowderd.errors import ClowderError, NotFound
from clowderd.member.agent import SessionEnded
from clowderd.worker.replicas import Replica, ReplicaManager

log = logging.getLogger(__name__)

STOPPED = common_pb2.REPLICA_STATE_STOPPED


class Assignments:
    def __init__(self, replicas: ReplicaManager, status: Callable[[Replica], common_pb2.ReplicaStatus],
                 stored_manifests: Callable[[], list[str]], unload_grace: float):
        self.replicas = replicas
        self.status = status
        self.stored_manifests = stored_manifests
        self.unload_grace = unload_grace
        self._operations: dict[str, asyncio.Task] = {}
        self._assigned: dict[str, common_pb2.ReplicaSpec] = {}  # as the last snapshot and changes said

    # -- what heartbeats carry ----------------------------------------------------------------------

    def _statuses(self) -> list[common_pb2.ReplicaStatus]:
        """Every replica that is not stopped, and the assigned ones that stopped though still assigned as
        they are (no operation of this worker is under way for them)."""
        return [self.status(r) for r in self.replicas.list()
                if r.state != STOPPED or (self._assigned.get(r.id) == r.spec and r.id not in self._operations)]

    def changed(self) -> object:
        return [(s.replica_id, s.state, s.message, s.observed_generation) for s in self._statuses()]

    def report(self, heartbeat: controller_pb2.HeartbeatRequest) -> None:
        heartbeat.replicas.extend(self._statuses())
        heartbeat.stored_manifests.extend(self.stored_manifests())

    def answered(self, answer: controller_pb2.HeartbeatResponse) -> None:
        for replica_id in answer.stop_replicas:
            if replica_id not in self._assigned:  # the controller's word, but never against an assignment
                log.warning("stopping a replica no deployment assigned", extra={"replica": replica_id})
                self._then(replica_id, self._stop, replica_id, self.unload_grace)

    # -- following assignments ----------------------------------------------------------------------

    async def follow(self, stub: controller_pb2_grpc.MembershipStub, node_id: str) -> None:
        async for event in stub.WatchAssignments(controller_pb2.WatchAssignmentsRequest(node_id=node_id)):
            self._apply(event)
        raise SessionEnded("the controller ended the assignment stream")

    async def close(self) -> None:
        for task in self._operations.values():
            task.cancel()
        await asyncio.gather(*self._operations.values(), return_exceptions=True)

    def _apply(self, event: controller_pb2.AssignmentEvent) -> None:
        if event.type == controller_pb2.WATCH_EVENT_TYPE_SNAPSHOT:
            self._assigned = {spec.replica_id: spec for spec in event.replicas}
            for replica_id in {r.id for r in self.replicas.list()} | self._operations.keys():
                if replica_id not in self._assigned:
                    self._then(replica_id, self._stop, replica_id, self.unload_grace)
            for spec in event.replicas:
                self._then(spec.replica_id, self._run, spec)
        elif event.type == controller_pb2.WATCH_EVENT_TYPE_PUT:
            for spec in event.replicas:
                self._assigned[spec.replica_id] = spec
                self._then(spec.replica_id, self._run, spec)
        elif event.type == controller_pb2.WATCH_EVENT_TYPE_DELETE:
            for spec in event.replicas:
                self._assigned.pop(spec.replica_id, None)
                grace = spec.termination_grace.ToTimedelta().total_seconds() \
                    if spec.HasField("termination_grace") else self.unload_grace
                self._then(spec.replica_id, self._stop, spec.replica_id, grace)

    def _then(self, replica_id: str, operation: Callable[..., Awaitable[None]], *args: object) -> None:
        """Run operation(*args) once the replica's operations asked for before it are done."""
        previous = self._operations.get(replica_id)

        async def run() -> None:
            if previous is not None:
                await asyncio.wait([previous])
            try:
                await operation(*args)
            except ClowderError as e:
                log.warning("cannot apply an assignment", extra={"replica": replica_id, "error": str(e)})
            except Exception:
                log.exception("cannot apply an assignment", extra={"replica": replica_id})

        task = asyncio.create_task(run(), name=f"assignment of {replica_id}")
        self._operations[replica_id] = task
        task.add_done_callback(lambda t: self._operations.pop(replica_id) if self._operations.get(replica_id) is t
                               else None)

    def _find(self, replica_id: str) -> Replica | None:
        try:
            replica = self.replicas.get(replica_id)
        except NotFound:
            return None
        return None if replica.state == STOPPED else replica

    async def _run(self, spec: common_pb2.ReplicaSpec) -> None:
        current = self._find(spec.replica_id)
        if current is not None:
            if current.spec == spec:
                return
            log.info("the replica's assignment changed: replacing it", extra={"replica": spec.replica_id})
            await self.replicas.unload(spec.replica_id, self.unload_grace)
        log.info("loading an assigned replica", extra={"replica": spec.replica_id, "deployment": spec.deployment})
        self.replicas.load(spec)

    async def _stop(self, replica_id: str, grace: float) -> None:
        if self._find(replica_id) is not None:
            log.info("unloading a replica no longer assigned", extra={"replica": replica_id, "grace_seconds": grace})
            await self.replicas.unload(replica_id, grace)
