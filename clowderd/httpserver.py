"""HTTP APIs (the storage role's OCI Distribution API, the lb's OpenAI API) served by uvicorn inside
clowderd's asyncio loop.

``serve(process, app, ...)`` binds the listen address first (a bad one stops clowderd before it serves
anything, like a gRPC listener), checks the TLS files, and runs ``uvicorn.Server.serve`` as a task. When
the process is asked to stop, the server stops accepting while the gRPC servers drain too; in-flight
requests get the shutdown grace period.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from typing import TYPE_CHECKING, Awaitable, Callable

import uvicorn

from clowderd.config import Address

if TYPE_CHECKING:
    from clowderd.server import Process


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: SIGTERM/SIGINT belong to clowderd's Process."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def _bind(addr: Address, where: str) -> socket.socket:
    from clowderd.server import StartupError, check_bindable

    check_bindable(addr, where)
    family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio sets TCP_NODELAY only on sockets that say so, and without it a
    # response written in two parts waits for the client's delayed ACK (40 ms on Linux).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((addr.host, addr.port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise StartupError(f"{where}: cannot listen on {addr}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def check_tls(cert: str, key: str, where: str) -> None:
    from clowderd.server import StartupError

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"{where}: cannot load the TLS certificate {cert} with key {key}: "
                           f"{getattr(exc, 'strerror', None) or exc}") from None


def serve(process: "Process", app, listen: Address, where: str, *, name: str, tls_cert: str | None = None,
          tls_key: str | None = None, tls_where: str = "",
          on_stop: Callable[[], Awaitable[None] | None] | None = None) -> str:
    """Serve `app` on `listen` until clowderd stops; returns the bound address. `where` and `tls_where`
    name the settings of the address and of the certificate in startup errors; `on_stop` runs after the
    server has stopped."""
    if tls_cert and tls_key:
        check_tls(tls_cert, tls_key, tls_where)
    sock = _bind(listen, where)
    config = uvicorn.Config(
        app, log_config=None, access_log=False, lifespan="off", server_header=False,
        timeout_graceful_shutdown=max(int(process.config.shutdown_grace_seconds), 1),
        ssl_certfile=tls_cert, ssl_keyfile=tls_key,
    )
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    server = _Server(config)
    loop = asyncio.get_running_loop()
    serving = loop.create_task(server.serve(sockets=[sock]), name=name)

    async def drain_on_stop() -> None:
        await process.wait_stop_requested()
        server.should_exit = True

    draining = loop.create_task(drain_on_stop(), name=f"{name}-stop")

    async def stop() -> None:
        server.should_exit = True
        draining.cancel()
        try:
            await serving
        finally:
            sock.close()
            if on_stop is not None:
                result = on_stop()
                if result is not None:
                    await result

    process.on_shutdown(stop, f"stop {name}")
    host, port = sock.getsockname()[:2]
    return str(Address(host, port))
