"""The worker's side of membership: it joins the controller, heartbeats with the node's inventory, the
states of its replicas and the manifests its store holds, and runs the replicas the controller assigns to it.

One session at a time: Join, then heartbeats and the assignment watch side by side until either fails;
then a pause (growing up to the heartbeat interval, or up to a minute when the controller refused) and
Join again. The node id and credential from the first Join are kept in DATA_DIR/node-identity.json, so
that every later Join, across restarts of either side, is the same node.

A session that breaks leaves the replicas as they are. Every watch starts with a snapshot, which is
applied as the whole truth: replicas not in it are unloaded, replicas in it that do not run are loaded.
A replica whose spec changes is replaced; one that failed stays FAILED, its reason in the heartbeats,
until the controller changes or removes it. Operations on one replica run one after the other, in the
order the controller asked for them.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Awaitable, Callable

import grpc

from clowder.v1 import common_pb2, controller_pb2, controller_pb2_grpc
from clowderd.errors import ClowderError, NotFound
from clowderd.files import write_private
from clowderd.inventory import Inventory
from clowderd.worker.replicas import Replica, ReplicaManager

log = logging.getLogger(__name__)

IDENTITY_FILE = "node-identity.json"
JOIN_TIMEOUT_S = 30.0
REPLICA_POLL_S = 0.25  # replica states are compared this often, so that a change is reported at once
RETRY_FIRST_S = 0.5
RETRY_MAX_REFUSED_S = 60.0  # the controller refused the join: a person has to fix something
RETRY_MAX_MIN_S = 1.0
STOPPED = common_pb2.REPLICA_STATE_STOPPED
REFUSALS = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.ALREADY_EXISTS,
            grpc.StatusCode.INVALID_ARGUMENT)


class SessionEnded(Exception):
    """The controller ended the session (the watch stream closed, or it asked the node to join again)."""


class JoinTokenUnreadable(ClowderError):
    """The join token file cannot be read."""


@dataclass(frozen=True)
class NodeIdentity:
    node_id: str
    credential: str

    @classmethod
    def load(cls, path: Path) -> "NodeIdentity | None":
        """The identity kept in path; None when there is none, or none that can be read (the node then
        joins with the join token, as a new node or in place of the unreachable node of its name)."""
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as e:
            log.warning("cannot read the node identity; joining with the join token", extra={
                "file": str(path), "error": str(e)})
            return None

    def save(self, path: Path) -> None:
        """Replace the file (mode 0600) so that a crash leaves the old identity or the new one."""
        write_private(path, json.dumps(asdict(self)))


def join_token_reader(token: str | None, path: str | None) -> Callable[[], str]:
    """The configured join token, or a reader of the file that holds it (read at each join, so that a
    rotated token is picked up)."""
    def read() -> str:
        if token is not None:
            return token
        try:
            text = Path(path).read_text().strip()
        except OSError as e:
            raise JoinTokenUnreadable(f"cannot read the join token from {path}: {e.strerror}") from None
        if not text:
            raise JoinTokenUnreadable(f"the join token file {path} is empty")
        return text
    return read


class Backoff:
    """Pauses between attempts: doubling from RETRY_FIRST_S up to a cap, with jitter so that many
    workers that lost the controller together do not come back together."""

    def __init__(self) -> None:
        self._next = RETRY_FIRST_S

    def next(self, cap: float) -> float:
        delay = min(self._next, cap)
        self._next = min(self._next * 2, cap)
        return delay * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self._next = RETRY_FIRST_S


UNEXPECTED = "membership session failed"


def _why_session_ended(error: Exception) -> tuple[str, str, bool]:
    """The log message and error for a session that ended, and whether the controller refused the node
    (then a person has to act, and attempts are spaced further apart)."""
    if isinstance(error, grpc.aio.AioRpcError):
        refused = error.code() in REFUSALS
        return ("the controller refused this node" if refused else "not connected to the controller",
                f"{error.code().name}: {error.details()}", refused)
    if isinstance(error, SessionEnded):
        return "the controller ended the session", str(error), False
    if isinstance(error, JoinTokenUnreadable):
        return "cannot join the controller", str(error), True
    return UNEXPECTED, f"{type(error).__name__}: {error}", True


def _reported(statuses: list[common_pb2.ReplicaStatus]) -> list[tuple]:
    """What of the statuses, when it changes, is worth a heartbeat before the next one is due."""
    return [(s.replica_id, s.state, s.message, s.observed_generation) for s in statuses]


class WorkerAgent:
    def __init__(self, *, replicas: ReplicaManager, status: Callable[[Replica], common_pb2.ReplicaStatus],
                 controller: str, join_token: Callable[[], str], node_info: Callable[[], common_pb2.NodeInfo],
                 inventory: Inventory, stored_manifests: Callable[[], list[str]], identity_path: Path,
                 unload_grace: float, on_joined: Callable[[str], None]):
        self.replicas = replicas
        self.status = status
        self.controller = controller
        self.join_token = join_token
        self.node_info = node_info
        self.inventory = inventory
        self.stored_manifests = stored_manifests
        self.identity_path = identity_path
        self.unload_grace = unload_grace
        self.on_joined = on_joined
        self._retry_max = RETRY_MAX_REFUSED_S  # until a join tells the heartbeat interval
        self._operations: dict[str, asyncio.Task] = {}

    async def run(self) -> None:
        """Be a member of the cluster until cancelled."""
        backoff = Backoff()
        last_error = ""
        try:
            while True:
                try:
                    await self._session(backoff)
                except Exception as e:
                    message, error, refused = _why_session_ended(e)
                delay = backoff.next(RETRY_MAX_REFUSED_S if refused else self._retry_max)
                level = logging.DEBUG if error == last_error else logging.ERROR if refused else logging.WARNING
                log.log(level, message, exc_info=message == UNEXPECTED, extra={
                    "controller": self.controller, "error": error, "retry_seconds": round(delay, 1)})
                last_error = error
                await asyncio.sleep(delay)
        finally:
            for task in self._operations.values():
                task.cancel()
            await asyncio.gather(*self._operations.values(), return_exceptions=True)

    async def _session(self, backoff: Backoff) -> None:
        async with grpc.aio.insecure_channel(self.controller) as channel:
            stub = controller_pb2_grpc.MembershipStub(channel)
            identity, joined = await self._join(stub)
            backoff.reset()
            metadata = (("authorization", f"Bearer {identity.credential}"),)
            interval = joined.heartbeat_interval.ToNanoseconds() / 1e9
            grace = joined.heartbeat_grace.ToNanoseconds() / 1e9
            tasks = [asyncio.create_task(self._heartbeat(stub, identity.node_id, metadata, interval, grace)),
                     asyncio.create_task(self._follow_assignments(stub, identity.node_id, metadata))]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            for task in done:
                task.result()

    async def _join(self, stub: controller_pb2_grpc.MembershipStub
                    ) -> tuple[NodeIdentity, controller_pb2.JoinResponse]:
        identity = NodeIdentity.load(self.identity_path)
        info = self.node_info()
        info.inventory.CopyFrom(await asyncio.to_thread(self.inventory.take))
        metadata = ()
        try:
            token = self.join_token()
        except JoinTokenUnreadable:
            if identity is None:
                raise
            token = ""  # the credential is enough to join again
        if identity is not None:
            info.node_id = identity.node_id
            metadata = (("authorization", f"Bearer {identity.credential}"),)
        joined = await stub.Join(controller_pb2.JoinRequest(join_token=token, node=info), metadata=metadata,
                                 timeout=JOIN_TIMEOUT_S)
        joined_as = NodeIdentity(joined.node_id, joined.node_credential)
        if joined_as != identity:
            joined_as.save(self.identity_path)
        self._retry_max = max(RETRY_MAX_MIN_S, joined.heartbeat_interval.ToNanoseconds() / 1e9)
        self.on_joined(joined.node_id)
        log.info("joined the controller", extra={"controller": self.controller, "node_id": joined.node_id,
                                                 "controller_version": joined.controller_version})
        return joined_as, joined

    def _statuses(self) -> list[common_pb2.ReplicaStatus]:
        return [self.status(r) for r in self.replicas.list() if r.state != STOPPED]

    async def _heartbeat(self, stub: controller_pb2_grpc.MembershipStub, node_id: str, metadata: tuple,
                         interval: float, grace: float) -> None:
        """Heartbeat every interval, and at once when a replica changed state."""
        loop = asyncio.get_running_loop()
        reported: list[tuple] | None = None
        due = 0.0
        while True:
            statuses = self._statuses()
            if _reported(statuses) != reported or loop.time() >= due:
                inventory = await asyncio.to_thread(self.inventory.take)
                answer = await stub.Heartbeat(
                    controller_pb2.HeartbeatRequest(node_id=node_id, inventory=inventory, replicas=statuses,
                                                    stored_manifests=self.stored_manifests()),
                    metadata=metadata, timeout=grace)
                if answer.rejoin:
                    raise SessionEnded("the controller does not know this node any more")
                reported, due = _reported(statuses), loop.time() + interval
            await asyncio.sleep(max(0.0, min(REPLICA_POLL_S, due - loop.time())))

    async def _follow_assignments(self, stub: controller_pb2_grpc.MembershipStub, node_id: str,
                                  metadata: tuple) -> None:
        async for event in stub.WatchAssignments(controller_pb2.WatchAssignmentsRequest(node_id=node_id),
                                                 metadata=metadata):
            self._apply(event)
        raise SessionEnded("the controller ended the assignment stream")

    # -- applying assignments ---------------------------------------------------------------------

    def _apply(self, event: controller_pb2.AssignmentEvent) -> None:
        if event.type == controller_pb2.WATCH_EVENT_TYPE_SNAPSHOT:
            assigned = {spec.replica_id for spec in event.replicas}
            for replica_id in {r.id for r in self.replicas.list()} | self._operations.keys():
                if replica_id not in assigned:
                    self._then(replica_id, self._stop, replica_id, self.unload_grace)
            for spec in event.replicas:
                self._then(spec.replica_id, self._run, spec)
        elif event.type == controller_pb2.WATCH_EVENT_TYPE_PUT:
            for spec in event.replicas:
                self._then(spec.replica_id, self._run, spec)
        elif event.type == controller_pb2.WATCH_EVENT_TYPE_DELETE:
            for spec in event.replicas:
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
