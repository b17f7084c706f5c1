"""A member's session with the controller, for every node (the controller's own process included):
Register, then side by side until one of them ends: heartbeats with the node's inventory, the trust
watch (the certificates the cluster revoked, the CA bundle), the renewal of the node's certificate when
it is due, and what the node's roles add (a worker reports its replicas and follows its assignments).
Then a pause (growing up to the heartbeat interval, or up to a minute when the controller refused) and
a new session.

A session that breaks leaves the node as it is. A renewed certificate ends the session on purpose: the
next one is made with the new certificate. A node whose certificate the cluster revoked is out of the
cluster: the agent asks clowderd to stop with exit status 2, saying so.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Awaitable, Callable, Protocol

import grpc

from clowder.v1 import common_pb2, controller_pb2, controller_pb2_grpc
from clowderd.inventory import Inventory
from clowderd.member.join import Membership
from clowderd.trust import certs
from clowderd.trust.authz import Revocations
from clowderd.trust.dial import Dialer
from clowderd.trust.identity import Material

log = logging.getLogger(__name__)

REGISTER_TIMEOUT_S = 30.0
RETRY_FIRST_S = 0.5
RETRY_MAX_REFUSED_S = 60.0  # the controller refused the node: a person has to fix something
RETRY_MAX_MIN_S = 1.0
POLL_S = 0.25  # what a role reports is compared this often, so that a change is reported at once
REFUSALS = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.ALREADY_EXISTS,
            grpc.StatusCode.INVALID_ARGUMENT)
UNEXPECTED = "membership session failed"


class SessionEnded(Exception):
    """The session ended on purpose (a renewal) or because the controller ended it."""


class RoleReport(Protocol):
    """What a role adds to the membership session (the worker's: clowderd.worker.assignments)."""

    def report(self, heartbeat: controller_pb2.HeartbeatRequest) -> None:
        """Fill the role's part of a heartbeat."""

    def changed(self) -> object:
        """A value that differs when the role has news worth a heartbeat before the next one is due."""

    def answered(self, answer: controller_pb2.HeartbeatResponse) -> None:
        """What the controller answered a heartbeat."""

    async def follow(self, stub: controller_pb2_grpc.MembershipStub, node_id: str) -> None:
        """Follow the controller for the session's length (return when the stream ends)."""

    async def close(self) -> None:
        ...


class Backoff:
    """Pauses between attempts: doubling from RETRY_FIRST_S up to a cap, with jitter so that many nodes
    that lost the controller together do not come back together."""

    def __init__(self) -> None:
        self._next = RETRY_FIRST_S

    def next(self, cap: float) -> float:
        delay = min(self._next, cap)
        self._next = min(self._next * 2, cap)
        return delay * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self._next = RETRY_FIRST_S


def _why_session_ended(error: Exception) -> tuple[str, str, bool]:
    """The log message and error for a session that ended, and whether the controller refused the node."""
    if isinstance(error, grpc.aio.AioRpcError):
        refused = error.code() in REFUSALS
        return ("the controller refused this node" if refused else "not connected to the controller",
                f"{error.code().name}: {error.details()}", refused)
    if isinstance(error, SessionEnded):
        return "session ended", str(error), False
    return UNEXPECTED, f"{type(error).__name__}: {error}", True


def revoked(error: Exception) -> bool:
    return (isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.UNAUTHENTICATED
            and "certificate revoked" in (error.details() or ""))


class MemberAgent:
    def __init__(self, *, membership: Membership, cluster_address: Callable[[], str], dialer: Dialer,
                 node_info: Callable[[], common_pb2.NodeInfo], inventory: Inventory, revocations: Revocations,
                 roles: tuple[str, ...], role_reports: list[RoleReport], join_token: Callable[[], str],
                 on_revoked: Callable[[str], None],
                 rediscover: Callable[[], Awaitable[None]] | None = None):
        self.membership = membership
        self.cluster_address = cluster_address
        self.dialer = dialer
        self.node_info = node_info
        self.inventory = inventory
        self.revocations = revocations
        self.roles = roles
        self.role_reports = role_reports
        self.join_token = join_token  # read when roles are added: they need it
        self.on_revoked = on_revoked
        self.rediscover = rediscover  # asks the controller where its cluster listener is now (None: in its process)
        self._retry_max = RETRY_MAX_REFUSED_S  # until a registration tells the heartbeat interval
        self.registered = asyncio.Event()  # set once the first registration is done

    async def run(self) -> None:
        """Be a member of the cluster until cancelled."""
        backoff = Backoff()
        last_error = ""
        try:
            while True:
                try:
                    await self._session(backoff)
                except Exception as e:
                    if revoked(e):
                        self.on_revoked(f"the cluster revoked this node's certificate ({e.details()}); to come "
                                        "back it must join again: remove DATA_DIR/identity and restart it with the "
                                        "join token")
                        return
                    message, error, refused = _why_session_ended(e)
                    if self.rediscover is not None and isinstance(e, grpc.aio.AioRpcError) \
                            and e.code() == grpc.StatusCode.UNAVAILABLE:
                        await self.rediscover()
                delay = backoff.next(RETRY_MAX_REFUSED_S if refused else self._retry_max)
                level = logging.DEBUG if error == last_error or message == "session ended" else \
                    logging.ERROR if refused else logging.WARNING
                log.log(level, message, exc_info=message == UNEXPECTED, extra={
                    "controller": self.cluster_address(), "error": error, "retry_seconds": round(delay, 1)})
                last_error = error
                await asyncio.sleep(0 if message == "session ended" else delay)
        finally:
            for report in self.role_reports:
                await report.close()

    async def _session(self, backoff: Backoff) -> None:
        async with self.dialer.aio_channel(self.cluster_address(), "controller") as channel:
            stub = controller_pb2_grpc.MembershipStub(channel)
            info = self.node_info()
            info.inventory.CopyFrom(await asyncio.to_thread(self.inventory.take))
            registered = await stub.Register(controller_pb2.RegisterRequest(node=info), timeout=REGISTER_TIMEOUT_S)
            backoff.reset()
            interval = registered.heartbeat_interval.ToNanoseconds() / 1e9
            grace = registered.heartbeat_grace.ToNanoseconds() / 1e9
            self._retry_max = max(RETRY_MAX_MIN_S, interval)
            if not self.registered.is_set():
                log.info("registered with the controller", extra={"controller": self.cluster_address(),
                                                                   "node_id": registered.node_id})
            self.registered.set()
            jobs: list[Awaitable[None]] = [self._heartbeat(stub, interval, grace), self._watch_trust(stub)]
            if self.membership.identity is not None:
                jobs.append(self._renew_when_due(stub))
            jobs += [report.follow(stub, self.membership.node_id) for report in self.role_reports]
            tasks = [asyncio.create_task(job) for job in jobs]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            for task in done:
                task.result()
            raise SessionEnded("the controller ended a stream")

    async def _heartbeat(self, stub: controller_pb2_grpc.MembershipStub, interval: float, grace: float) -> None:
        """Heartbeat every interval, and at once when a role has news."""
        loop = asyncio.get_running_loop()
        reported: list[object] | None = None
        due = 0.0
        while True:
            news = [report.changed() for report in self.role_reports]
            if news != reported or loop.time() >= due:
                request = controller_pb2.HeartbeatRequest(node_id=self.membership.node_id,
                                                          inventory=await asyncio.to_thread(self.inventory.take))
                for report in self.role_reports:
                    report.report(request)
                answer = await stub.Heartbeat(request, timeout=grace)
                if answer.rejoin:
                    raise SessionEnded("the controller does not know this node any more; registering again")
                for report in self.role_reports:
                    report.answered(answer)
                reported, due = news, loop.time() + interval
            await asyncio.sleep(max(0.0, min(POLL_S, due - loop.time())))

    async def _watch_trust(self, stub: controller_pb2_grpc.MembershipStub) -> None:
        async for event in stub.WatchTrust(controller_pb2.WatchTrustRequest()):
            self.revocations.replace(event.revoked_serials)
            if self.membership.identity is not None:
                self.membership.identity.trusted_cas(event.ca_certificates)

    async def _renew_when_due(self, stub: controller_pb2_grpc.MembershipStub) -> None:
        """Renew the certificate at RENEW_AT of its life (at once when it names fewer roles than this
        node runs), then end the session so that the next one presents the new certificate."""
        identity = self.membership.identity
        missing = set(self.roles) - set(identity.holder.roles)
        if not missing:
            await asyncio.sleep(max(0.0, identity.renew_at - time.time()))
        key = certs.new_key()
        request = controller_pb2.RenewCertificateRequest(csr=certs.certificate_request(key))
        if missing:
            request.roles.extend(common_pb2.Role.Value("ROLE_" + r.upper()) for r in self.roles)
            request.join_token = self.join_token()
        issued = await stub.RenewCertificate(request, timeout=REGISTER_TIMEOUT_S)
        identity.renewed(Material(certs.key_pem(key), issued.certificate, issued.ca_certificates))
        raise SessionEnded("renewed the node's certificate; the next session presents it")
