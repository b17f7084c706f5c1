"""The storage role's OCI Distribution HTTP API, served by uvicorn inside clowderd's asyncio loop.

``start(process, store)`` binds the listen address (a bad one stops clowderd before it serves
anything, like a gRPC listener), checks TLS files and the tokens file, and runs
``uvicorn.Server.serve`` as a task. On shutdown the server stops accepting, in-flight requests get
the shutdown grace period, then upload sessions are dropped with their files.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from typing import TYPE_CHECKING

import uvicorn

from clowderd.config import Address
from clowderd.store.content import ContentStore
from clowderd.store.images import ImageIndex
from clowderd.storage.oci.app import Registry, create_app
from clowderd.storage.oci.auth import Authorizer, load_tokens
from clowderd.storage.oci.uploads import UploadSessions

if TYPE_CHECKING:
    from clowderd.server import Process

log = logging.getLogger("clowderd.storage.http")

SWEEP_SECONDS = 60.0


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: SIGTERM/SIGINT belong to clowderd's Process."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def _bind(addr: Address, where: str) -> socket.socket:
    from clowderd.server import StartupError, check_bindable

    check_bindable(addr, where)
    family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((addr.host, addr.port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise StartupError(f"{where}: cannot listen on {addr}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def _check_tls(cert: str, key: str, where: str) -> None:
    from clowderd.server import StartupError

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"{where}: cannot load the TLS certificate {cert} with key {key}: "
                           f"{getattr(exc, 'strerror', None) or exc}") from None


def start(process: "Process", store: ContentStore) -> None:
    """Start serving the OCI API of the store, if [storage] http_listen is set."""
    cfg = process.config
    http = cfg.registry_http
    if http.listen is None:
        return
    tokens = load_tokens(http.tokens_file, cfg.where("storage.tokens_file")) if http.tokens_file else None
    if http.tls_cert and http.tls_key:
        _check_tls(http.tls_cert, http.tls_key, cfg.where("storage.tls_cert"))
    sock = _bind(http.listen, cfg.where("storage.http_listen"))
    sessions = UploadSessions(store)
    app = create_app(Registry(store, ImageIndex(store), sessions, Authorizer(tokens, http.anonymous_read)))
    config = uvicorn.Config(
        app, log_config=None, access_log=False, lifespan="off", server_header=False,
        timeout_graceful_shutdown=max(int(cfg.shutdown_grace_seconds), 1),
        ssl_certfile=http.tls_cert, ssl_keyfile=http.tls_key,
    )
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    server = _Server(config)
    serving = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]), name="oci-http")
    sweeper = asyncio.get_running_loop().create_task(_sweep(sessions), name="oci-upload-expiry")
    host, port = sock.getsockname()[:2]
    bound = str(Address(host, port))
    log.info("serving http", extra={"role": "storage", "addr": bound, "tls": bool(http.tls_cert),
                                    "auth": tokens is not None, "anonymous_read": http.anonymous_read})

    async def drain_on_stop() -> None:
        # Stop accepting when the process is asked to stop, while the gRPC servers drain too.
        await process.wait_stop_requested()
        server.should_exit = True

    draining = asyncio.get_running_loop().create_task(drain_on_stop(), name="oci-http-stop")

    async def stop() -> None:
        server.should_exit = True
        sweeper.cancel()
        draining.cancel()
        try:
            await serving
        finally:
            sock.close()
            sessions.close()

    process.on_shutdown(stop, "stop the OCI HTTP API")


async def _sweep(sessions: UploadSessions) -> None:
    while True:
        await asyncio.sleep(SWEEP_SECONDS)
        expired = sessions.expire()
        if expired:
            log.info("upload sessions expired", extra={"count": expired})


