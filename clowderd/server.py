"""The clowderd process: one asyncio loop, one grpc.aio server per role, clean shutdown.

Lifecycle (``Process.run``):

1. ``lock_data_dir``: create the data dir (0750) and take an exclusive flock on
   ``<data_dir>/clowderd.lock``; a second clowderd on the same dir fails here.
2. ``start``: check that every listen address can be bound; become a member of the cluster (the
   controller role issues its own process a certificate from the cluster CA; another node uses the
   identity it has, or joins with the join token: clowderd.member.join); then create one server per
   listener, register that role's services (``clowderd.<role>.service.register``) and
   ``clowder.v1.Node`` on it, bind all of them, and only then start them, so a bad address starts
   nothing. Listeners between roles (storage, worker, the controller's cluster listener) are mutual
   TLS and authorize every call (clowderd.trust.authz); the public ones (the controller's, the lb's)
   are TLS with no client certificate (the controller's) and take tokens. Logs one "serving" line per
   listener and tells systemd READY=1 (``Type=notify``). Then the background tasks of
   ``run_in_background`` start, the membership session (clowderd.member.agent) among them.
3. Wait for ``request_stop`` (SIGTERM / SIGINT in ``main``).
4. ``shutdown``: Node.Watch streams get STOPPING and end; background tasks are cancelled; every
   server stops taking new calls and in-flight calls get ``shutdown_grace_seconds`` to finish,
   then are cancelled; callbacks registered with ``on_shutdown`` run, newest first; log "stopped".

Later components attach here: a role's ``register(server, process)`` adds its servicers, may
call ``process.run_in_background(loop)`` for work of its own (heartbeats, sweeps) and
``process.on_shutdown(close)`` to release what it opened (stores, engine processes). Streams that
would otherwise stay open end when ``wait_stop_requested`` returns.
"""
from __future__ import annotations

import asyncio
import errno
import fcntl
import importlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from clowder.v1 import common_pb2, node_pb2, node_pb2_grpc
from clowderd.config import Address, Config, ConfigError
from clowderd.errors import ClowderError
from clowderd.trust import certs
from clowderd.trust.authz import Authorizer, Revocations
from clowderd.trust.dial import Dialer
from clowderd.version import __version__

log = logging.getLogger("clowderd")

ROLE_ENUM = {
    "controller": common_pb2.ROLE_CONTROLLER,
    "storage": common_pb2.ROLE_STORAGE,
    "worker": common_pb2.ROLE_WORKER,
    "lb": common_pb2.ROLE_LB,
}

# Applied to every server. so_reuseport=0: a second process binding the same port must fail,
# not silently share the port (gRPC enables SO_REUSEPORT by default on Linux).
SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]

ShutdownCallback = Callable[[], Awaitable[Any]]
BackgroundLoop = Callable[[], Awaitable[Any]]
Registrar = Callable[[grpc.aio.Server, "Process"], None]

EXIT_REFUSED = 2  # the cluster refused or revoked this node: as for a bad config, a person has to act
JOIN_STATUS_EXTEND_S = 60  # while waiting to join, systemd is asked for this much more start-up time


@dataclass(frozen=True)
class Listener:
    """One gRPC listener of the process: its name (in logs and `allow`), the role it serves, where,
    whether it is mutual TLS (between roles) or public, and what registers its services."""

    name: str
    role: str
    address: Address
    where: str
    mutual: bool
    register: Registrar


class StartupError(ClowderError):
    """clowderd cannot start (data dir locked, port in use). Exit status 2."""


# ---------------------------------------------------------------------------------------------
# Helpers for role services


class StatusCodes:
    """Errors as gRPC status codes, the first class that matches winning; the message is the error's
    own. `handled` is the tuple of the classes, for an `except`."""

    def __init__(self, *pairs: tuple[type[Exception], grpc.StatusCode]):
        self.pairs = pairs
        self.handled = tuple(cls for cls, _ in pairs)

    def code(self, error: Exception) -> grpc.StatusCode:
        return next(code for cls, code in self.pairs if isinstance(error, cls))


def unimplemented_servicer(servicer_cls: type, file_descriptor: Any, service_name: str) -> Any:
    """An instance of the generated servicer_cls whose every method fails with UNIMPLEMENTED.

    The message names the full method and the clowderd version, so that a client talking to an
    older or partial clowderd learns exactly what is missing. Subclass the result's class and
    override methods one by one as they are implemented.
    """
    return refusing_servicer(servicer_cls, file_descriptor, service_name, grpc.StatusCode.UNIMPLEMENTED,
                             f"{{method}} is not implemented in clowderd {__version__}")


def refusing_servicer(servicer_cls: type, file_descriptor: Any, service_name: str, code: grpc.StatusCode,
                      message: str) -> Any:
    """An instance of the generated servicer_cls whose every method fails with code and message (in which
    "{method}" names the full method)."""
    service = file_descriptor.services_by_name[service_name]

    def make(full_name: str) -> Callable[..., Any]:
        async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(code, message.format(method=full_name))
        handler.__name__ = full_name.rsplit("/", 1)[1]
        return handler

    methods = {m.name: make(f"/{service.full_name}/{m.name}") for m in service.methods}
    cls = type(f"Refusing{service_name}Servicer", (servicer_cls,), methods)
    return cls()


# ---------------------------------------------------------------------------------------------
# systemd readiness


def sd_notify(state: str) -> bool:
    """Send state ("READY=1", "STOPPING=1", "STATUS=...") to systemd, if it is listening.

    Implements the sd_notify(3) datagram protocol without libsystemd: one datagram to the unix
    socket named by $NOTIFY_SOCKET ("@name" is an abstract socket). Returns whether it was sent.
    """
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
        return True
    except OSError as e:
        log.warning("sd_notify failed", extra={"notify_socket": addr, "error": str(e)})
        return False


# ---------------------------------------------------------------------------------------------
# Data dir


def lock_data_dir(path: str, where: str = "data_dir") -> int:
    """Create path (0750) if needed and hold an exclusive lock on path/clowderd.lock.

    Returns the lock file descriptor; the lock lasts as long as it stays open (the process).
    where names the setting in messages (the flag or "FILE: data_dir").
    """
    if os.path.lexists(path) and not os.path.isdir(path):
        raise StartupError(f"{where} {path}: exists and is not a directory")
    try:
        os.makedirs(path, mode=0o750, exist_ok=True)
    except OSError as e:
        raise StartupError(f"{where} {path}: cannot create: {e.strerror}") from None
    lock_path = os.path.join(path, "clowderd.lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as e:
        raise StartupError(f"{where} {path}: cannot open {lock_path}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        try:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        except OSError:
            holder = ""
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise StartupError(f"{where} {path} is in use by another clowderd{who}; "
                               f"lock file {lock_path}") from None
        raise StartupError(f"{where} {path}: cannot lock {lock_path}: {e.strerror}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


# ---------------------------------------------------------------------------------------------
# Binding


def check_bindable(addr: Address, where: str) -> None:
    """Fail with a clear message when addr cannot be bound (in use, not local, privileged).

    gRPC reports bind failures only as "failed to bind"; this check names the cause. A race with
    another process binding in between is still caught by gRPC's own bind afterwards.
    """
    try:
        infos = socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise StartupError(f"{where}: cannot resolve {addr.host!r}: {e.strerror}") from None
    for family, stype, proto, _, sockaddr in infos:
        with socket.socket(family, stype, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind(sockaddr)
            except OSError as e:
                why = {
                    errno.EADDRINUSE: "address already in use",
                    errno.EADDRNOTAVAIL: "not an address of this host",
                    errno.EACCES: "permission denied (ports below 1024 need privileges)",
                }.get(e.errno, e.strerror)
                raise StartupError(f"{where}: cannot listen on {addr}: {why}") from None


# ---------------------------------------------------------------------------------------------
# Node service


class NodeServicer(node_pb2_grpc.NodeServicer):
    """clowder.v1.Node, served on every listener."""

    def __init__(self, process: "Process", role: str):
        self._p = process
        self._role = role

    async def GetInfo(self, request: node_pb2.GetInfoRequest,
                      context: grpc.aio.ServicerContext) -> node_pb2.GetInfoResponse:
        p = self._p
        started = timestamp_pb2.Timestamp()
        started.FromNanoseconds(p.started_at_ns)
        uptime = duration_pb2.Duration()
        uptime.FromNanoseconds(time.monotonic_ns() - p.started_monotonic_ns)
        return node_pb2.GetInfoResponse(
            node_name=p.config.node_name,
            version=__version__,
            roles=[ROLE_ENUM[r] for r in p.config.roles],
            serving_role=ROLE_ENUM[self._role],
            started_at=started,
            uptime=uptime,
            listeners=p.listener_messages(),
            api_versions=["v1"],
            node_id=p.node_id,
            pid=os.getpid(),
        )

    async def Watch(self, request: node_pb2.WatchRequest, context: grpc.aio.ServicerContext):
        p = self._p
        last = None
        try:
            while True:
                async with p._state_changed:
                    if p.state == last:
                        await p._state_changed.wait()
                    state, since = p.state, p.state_since_ns
                if state == last:
                    continue
                last = state
                ts = timestamp_pb2.Timestamp()
                ts.FromNanoseconds(since)
                yield node_pb2.WatchResponse(state=state, since=ts)
                if state == node_pb2.SERVING_STATE_STOPPING:
                    return
        except asyncio.CancelledError:
            return  # the watcher went away, or the server is stopping: nothing to report


# ---------------------------------------------------------------------------------------------
# The process


class Process:
    """Everything one clowderd process runs. Create, then ``await run()`` (or start/shutdown)."""

    def __init__(self, config: Config):
        self.config = config
        self.started_at_ns = time.time_ns()
        self.started_monotonic_ns = time.monotonic_ns()
        self.membership = None  # clowderd.member.join.Membership, once the node is a member
        self.revocations = Revocations()  # what the cluster no longer trusts, kept by the membership session
        self.dialer = Dialer(None)  # channels to other roles; given the node's identity once it has one
        self.role_reports: list = []  # what roles add to the membership session (clowderd.member.agent)
        self.local_replicas = None  # the worker role's ReplicaManager, when it runs in this process
        self.listeners: dict[str, str] = {}  # listener name -> "host:port" as bound
        self.servers: dict[str, grpc.aio.Server] = {}
        self.exit_status = 0
        self.state = node_pb2.SERVING_STATE_STARTING
        self.state_since_ns = time.time_ns()
        self._state_changed = asyncio.Condition()
        self._stop = asyncio.Event()
        self._stop_signals = 0
        self._shutdown_callbacks: list[tuple[str, ShutdownCallback]] = []
        self._background: list[tuple[str, BackgroundLoop]] = []
        self._background_tasks: list[asyncio.Task] = []
        self._lock_fd: int | None = None
        self._authorizers: dict[str, Authorizer] = {}
        self._listener_specs: dict[str, Listener] = {}

    @property
    def node_id(self) -> str:
        return self.membership.node_id if self.membership is not None else ""

    # -- hooks for components

    def on_shutdown(self, callback: ShutdownCallback, name: str | None = None) -> ShutdownCallback:
        """Register an async callable run at shutdown, after the servers stopped taking calls.

        Callbacks run newest first (like a stack of context managers), each within the grace
        period; an exception is logged and does not stop the others. Usable as a decorator.
        """
        self._shutdown_callbacks.append((name or getattr(callback, "__qualname__", repr(callback)),
                                         callback))
        return callback

    def run_in_background(self, loop: BackgroundLoop, name: str) -> None:
        """Run loop() as a task once every server is serving, until shutdown begins (it is cancelled
        then, before the servers stop). An exception ends the task and is logged."""
        self._background.append((name, loop))

    def allow(self, listener: str, service: str, methods: dict[str, tuple[str, ...]]) -> None:
        """Open methods of a service on a listener between roles to the roles named for each (see
        clowderd.trust.authz); nothing to do on a public listener or with insecure = true."""
        authorizer = self._authorizers.get(listener)
        if authorizer is not None:
            authorizer.allow(service, methods)

    def authorizer(self, listener: str) -> Authorizer | None:
        """The checks of a listener between roles; None on a public listener or with insecure = true."""
        return self._authorizers.get(listener)

    def joining(self, status: str) -> None:
        """While the node waits to join: tell systemd what it waits for, and that it needs more time."""
        sd_notify(f"STATUS={status}\nEXTEND_TIMEOUT_USEC={JOIN_STATUS_EXTEND_S * 1_000_000}")

    def fail(self, message: str) -> None:
        """Stop with exit status EXIT_REFUSED, saying why (the cluster revoked or refused this node)."""
        log.error(message)
        self.exit_status = EXIT_REFUSED
        self.request_stop("refused by the cluster")

    def listener_messages(self) -> list[common_pb2.Listener]:
        out = []
        for name, address in self.listeners.items():
            spec = self._listener_specs[name]
            secure = not self.config.insecure
            tls = (self.config.lb_http.tls_cert is not None) if spec.role == "lb" else secure
            protocol = "grpc+mtls" if spec.mutual and secure else "grpc+tls" if tls else "grpc"
            out.append(common_pb2.Listener(role=ROLE_ENUM[spec.role], address=address, protocol=protocol, name=name))
        return out

    def node_info(self) -> common_pb2.NodeInfo:
        """This process as it describes itself to the controller (without its inventory)."""
        return common_pb2.NodeInfo(
            name=self.config.node_name, node_id=self.node_id, roles=[ROLE_ENUM[r] for r in self.config.roles],
            labels=self.config.labels, version=__version__, listeners=self.listener_messages())

    async def _run_background(self, name: str, loop: BackgroundLoop) -> None:
        try:
            await loop()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("background task failed", extra={"task": name})

    # -- lifecycle

    async def _set_state(self, state: int) -> None:
        async with self._state_changed:
            self.state = state
            self.state_since_ns = time.time_ns()
            self._state_changed.notify_all()

    def _listeners(self, controller_role: Any) -> list[Listener]:
        cfg = self.config
        out = []
        for role in cfg.roles:
            where = cfg.where(f"{role}.listen")
            if role == "controller":
                out.append(Listener("controller", role, cfg.role[role].listen, where, False,
                                    controller_role.register_public))
                out.append(Listener("cluster", role, cfg.controller_cluster_listen,
                                    cfg.where("controller.cluster_listen"), True, controller_role.register_cluster))
            else:
                module = importlib.import_module(f"clowderd.{role}.service")
                out.append(Listener(role, role, cfg.role[role].listen, where, role != "lb", module.register))
        return out

    def _credentials(self, listener: Listener) -> grpc.ServerCredentials | None:
        """The listener's TLS credentials; None for plain gRPC."""
        identity = self.membership.identity
        if listener.role == "lb":  # users': the certificate they trust, as for the lb's HTTP API
            http = self.config.lb_http
            if http.tls_cert is None:
                return None
            with open(http.tls_key, "rb") as key, open(http.tls_cert, "rb") as cert:
                return grpc.ssl_server_credentials([(key.read(), cert.read())])
        if identity is None:
            return None
        return identity.server_credentials(client_certificates=listener.mutual)

    async def _become_member(self) -> Any:
        """The controller role (made first: its CA gives this process its identity), if this process runs it,
        and the process's membership."""
        if "controller" in self.config.roles:
            from clowderd.controller import service as controller_service

            controller_role, self.membership = await controller_service.prepare(self)
        elif self.config.standalone:
            from clowderd.member.join import Membership

            controller_role, self.membership = None, Membership("", "", None)
        else:
            from clowderd.member.join import become_member

            controller_role, self.membership = None, await become_member(self)
        self.dialer.identity = self.membership.identity
        if self.config.insecure:
            log.warning("insecure = true: the listeners between roles take plain gRPC from anyone who reaches them; "
                        "no certificates, no authorization between roles (a worker generates for any caller, a "
                        "storage node sends its chunks to any caller)")
        return controller_role

    async def start(self) -> None:
        cfg = self.config
        if self._lock_fd is None:
            self._lock_fd = lock_data_dir(cfg.data_dir, cfg.where("data_dir"))
        for role in cfg.roles:
            check_bindable(cfg.role[role].listen, cfg.where(f"{role}.listen"))
        if "controller" in cfg.roles:
            check_bindable(cfg.controller_cluster_listen, cfg.where("controller.cluster_listen"))
        controller_role = await self._become_member()
        for listener in self._listeners(controller_role):
            interceptors = []
            if listener.mutual and self.membership.identity is not None:
                self._authorizers[listener.name] = Authorizer(listener.name, self.revocations)
                interceptors.append(self._authorizers[listener.name])
            server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)
            node_pb2_grpc.add_NodeServicer_to_server(NodeServicer(self, listener.role), server)
            self.allow(listener.name, "clowder.v1.Node", {"GetInfo": certs.ROLES, "Watch": certs.ROLES})
            self._listener_specs[listener.name] = listener
            listener.register(server, self)
            credentials = self._credentials(listener)
            try:
                port = (server.add_secure_port(str(listener.address), credentials) if credentials is not None
                        else server.add_insecure_port(str(listener.address)))
            except RuntimeError as e:
                raise StartupError(f"{listener.where}: cannot listen on {listener.address}: {e}") from None
            if port == 0:
                raise StartupError(f"{listener.where}: cannot listen on {listener.address}")
            self.servers[listener.name] = server
            self.listeners[listener.name] = str(Address(listener.address.host, port))
        for server in self.servers.values():
            await server.start()
        await self._set_state(node_pb2.SERVING_STATE_SERVING)
        for name in self.servers:
            log.info("serving", extra={"role": self._listener_specs[name].role, "listener": name,
                                       "addr": self.listeners[name]})
        if not self.config.standalone:
            self._start_membership()
        self._background_tasks = [asyncio.create_task(self._run_background(name, loop), name=name)
                                  for name, loop in self._background]
        sd_notify("READY=1\nSTATUS=serving " + ", ".join(
            f"{r} on {a}" for r, a in self.listeners.items()))

    def _start_membership(self) -> None:
        from clowderd.inventory import Inventory
        from clowderd.member.agent import MemberAgent
        from clowderd.member.join import current_cluster_address, read_join_token, remember_cluster_address

        inventory = Inventory(self.config.data_dir)

        async def rediscover() -> None:
            identity = self.membership.identity
            address = await current_cluster_address(self.controller_address(),
                                                    identity.material.ca if identity is not None else None)
            if address is not None and address != self.membership.cluster_address:
                remember_cluster_address(Path(self.config.data_dir), self.membership, address)

        agent = MemberAgent(
            membership=self.membership, cluster_address=self.cluster_address, dialer=self.dialer,
            node_info=self.node_info, inventory=inventory, revocations=self.revocations, roles=self.config.roles,
            role_reports=self.role_reports,
            join_token=lambda: read_join_token(self.config.join_token, self.config.join_token_file),
            on_revoked=self.fail, rediscover=None if "controller" in self.config.roles else rediscover)
        self.run_in_background(agent.run, "membership")

        async def close_inventory() -> None:
            inventory.close()

        self.on_shutdown(close_inventory, "close NVML")

    def controller_address(self) -> str:
        """The controller's public listener: configured, else the controller role of this process."""
        if self.config.cluster_controller is not None:
            return str(self.config.cluster_controller)
        return self._local("controller")

    def cluster_address(self) -> str:
        """Where this node reaches Membership: the controller's cluster listener, as the controller said
        when the node joined, or the one of this process."""
        if "cluster" in self.listeners:
            return self._local("cluster")
        return self.membership.cluster_address

    def _local(self, listener: str) -> str:
        """The bound address of a listener of this process, a wildcard host as loopback."""
        bound = self.listeners.get(listener)
        if bound is None:
            raise RuntimeError(f"the address of the {listener} listener asked before it was bound")
        host, port = bound.rsplit(":", 1)
        host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host)
        return f"{host}:{port}"

    def request_stop(self, reason: str = "") -> None:
        """Begin a clean shutdown (safe to call from a signal handler). A second call makes
        shutdown immediate: in-flight calls are cancelled without waiting out the grace period."""
        self._stop_signals += 1
        if self._stop_signals == 1:
            log.info("stopping", extra={"reason": reason,
                                        "grace_seconds": self.config.shutdown_grace_seconds})
            self._stop.set()
        elif self._stop_signals == 2:
            log.warning("stopping now, cancelling in-flight calls", extra={"reason": reason})
            for server in self.servers.values():
                asyncio.ensure_future(server.stop(0))

    async def wait_stop_requested(self) -> None:
        await self._stop.wait()

    async def shutdown(self) -> None:
        grace = self.config.shutdown_grace_seconds
        sd_notify("STOPPING=1")
        self._stop.set()
        await self._set_state(node_pb2.SERVING_STATE_STOPPING)
        for task in self._background_tasks:
            task.cancel()
        await asyncio.gather(*self._background_tasks, return_exceptions=True)
        t0 = time.monotonic()
        await asyncio.gather(*(s.stop(grace) for s in self.servers.values()))
        log.debug("servers stopped", extra={"seconds": round(time.monotonic() - t0, 3)})
        for name, cb in reversed(self._shutdown_callbacks):
            try:
                await asyncio.wait_for(cb(), timeout=max(grace, 1.0))
            except asyncio.TimeoutError:
                log.error("shutdown callback timed out", extra={"callback": name,
                                                                 "timeout_seconds": grace})
            except Exception:
                log.exception("shutdown callback failed", extra={"callback": name})
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        log.info("stopped")

    async def run(self) -> None:
        """start(), wait for request_stop(), shutdown()."""
        try:
            await self.start()
        except BaseException:
            for server in self.servers.values():
                await server.stop(None)
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
            raise
        await self.wait_stop_requested()
        await self.shutdown()


__all__ = ["Process", "StartupError", "ConfigError", "unimplemented_servicer", "sd_notify",
           "lock_data_dir", "ROLE_ENUM", "SERVER_OPTIONS"]
