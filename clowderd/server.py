"""The clowderd process: one asyncio loop, one grpc.aio server per role, clean shutdown.

Lifecycle (``Process.run``):

1. ``lock_data_dir``: create the data dir (0750) and take an exclusive flock on
   ``<data_dir>/clowderd.lock``; a second clowderd on the same dir fails here.
2. ``start``: check that every listen address can be bound, then create one server per role,
   register that role's services (``clowderd.<role>.service.register``) and ``clowder.v1.Node``
   on it, bind all of them, and only then start them, so a bad address starts nothing.
   Logs one "serving" line per role and tells systemd READY=1 (``Type=notify``).
   Then the background tasks of ``run_in_background`` start.
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
from typing import Any, Awaitable, Callable

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from clowder.v1 import common_pb2, node_pb2, node_pb2_grpc
from clowderd.config import Address, Config, ConfigError
from clowderd.errors import ClowderError
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
    service = file_descriptor.services_by_name[service_name]

    def make(full_name: str) -> Callable[..., Any]:
        async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                                f"{full_name} is not implemented in clowderd {__version__}")
        handler.__name__ = full_name.rsplit("/", 1)[1]
        return handler

    methods = {m.name: make(f"/{service.full_name}/{m.name}") for m in service.methods}
    cls = type(f"Unimplemented{service_name}Servicer", (servicer_cls,), methods)
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
    """clowder.v1.Node, served on every role's listener."""

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
            listeners=[common_pb2.Listener(role=ROLE_ENUM[r], address=a, protocol="grpc")
                       for r, a in p.listeners.items()],
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
        self.node_id = ""  # set when the node joins a controller
        self.local_replicas = None  # the worker role's ReplicaManager, when it runs in this process
        self.listeners: dict[str, str] = {}  # role -> "host:port" as bound
        self.servers: dict[str, grpc.aio.Server] = {}
        self.state = node_pb2.SERVING_STATE_STARTING
        self.state_since_ns = time.time_ns()
        self._state_changed = asyncio.Condition()
        self._stop = asyncio.Event()
        self._stop_signals = 0
        self._shutdown_callbacks: list[tuple[str, ShutdownCallback]] = []
        self._background: list[tuple[str, BackgroundLoop]] = []
        self._background_tasks: list[asyncio.Task] = []
        self._lock_fd: int | None = None

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

    def node_info(self) -> common_pb2.NodeInfo:
        """This process as it describes itself to the controller (without its inventory)."""
        return common_pb2.NodeInfo(
            name=self.config.node_name, node_id=self.node_id, roles=[ROLE_ENUM[r] for r in self.config.roles],
            labels=self.config.labels, version=__version__,
            listeners=[common_pb2.Listener(role=ROLE_ENUM[r], address=a, protocol="grpc")
                       for r, a in self.listeners.items()])

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

    async def start(self) -> None:
        cfg = self.config
        if self._lock_fd is None:
            self._lock_fd = lock_data_dir(cfg.data_dir, cfg.where("data_dir"))
        for role in cfg.roles:
            check_bindable(cfg.role[role].listen, cfg.where(f"{role}.listen"))
        for role in cfg.roles:
            server = grpc.aio.server(options=SERVER_OPTIONS)
            node_pb2_grpc.add_NodeServicer_to_server(NodeServicer(self, role), server)
            module = importlib.import_module(f"clowderd.{role}.service")
            module.register(server, self)
            addr = cfg.role[role].listen
            try:
                port = server.add_insecure_port(str(addr))
            except RuntimeError as e:
                raise StartupError(f"{cfg.where(role + '.listen')}: cannot listen on {addr}: "
                                   f"{e}") from None
            if port == 0:
                raise StartupError(f"{cfg.where(role + '.listen')}: cannot listen on {addr}")
            self.servers[role] = server
            self.listeners[role] = str(Address(addr.host, port))
        for role, server in self.servers.items():
            await server.start()
        for role in ("worker", "lb"):
            if role in self.servers:
                log.debug("controller address", extra={"role": role,
                                                       "controller": self.controller_address(role)})
        await self._set_state(node_pb2.SERVING_STATE_SERVING)
        for role in self.servers:
            log.info("serving", extra={"role": role, "addr": self.listeners[role]})
        self._background_tasks = [asyncio.create_task(self._run_background(name, loop), name=name)
                                  for name, loop in self._background]
        sd_notify("READY=1\nSTATUS=serving " + ", ".join(
            f"{r} on {a}" for r, a in self.listeners.items()))

    def controller_address(self, role: str) -> str:
        """Where the worker or lb role reaches the controller: the configured address, else the
        controller role of this process (its bound port; a wildcard host becomes loopback)."""
        configured = self.config.role[role].controller
        if configured is not None:
            return str(configured)
        bound = self.listeners.get("controller")
        if bound is None:
            raise RuntimeError("controller address asked before the controller was bound")
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
