"""HTTP APIs (the storage role's OCI Distribution API, the lb's OpenAI API) served by uvicorn inside
clowderd's asyncio loop.

``serve(process, app, ...)`` binds the listen address first (a bad one stops clowderd before it serves
anything, like a gRPC listener), checks the TLS files, and runs ``uvicorn.Server.serve`` as a task. When
the process is asked to stop, the server stops accepting while the gRPC servers drain too; in-flight
requests get the shutdown grace period.

Every connection is held to the server's HttpLimits (uvicorn has none of these): its request head must
arrive within a time-out and within a size, and a request body must not stall (a client that declares
100 bytes and sends 10 would otherwise hold the connection and the request's task for ever). The
answer to a client over a limit is 408 or 431, then the connection is closed; `error_body` writes it in
the API's own error format.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import ssl
from typing import TYPE_CHECKING, Awaitable, Callable

import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from clowderd.config import Address, HttpLimits

if TYPE_CHECKING:
    from clowderd.server import Process

# (status, message) -> (content type, body) of an error the server answers before the app sees a request.
ErrorBody = Callable[[int, str], tuple[str, bytes]]


def plain_error(status: int, message: str) -> tuple[str, bytes]:
    return "text/plain; charset=utf-8", message.encode()


class _HeadTooLarge(Exception):
    """Raised in a parser callback to stop parsing a request whose head is over the limit."""


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol (httptools) held to HttpLimits.

    The head timer runs from the connection's start, and from the first byte of each later request, to
    the end of the request's head. The body timer runs while a request's body is incomplete, restarted
    by every byte of it; it does not count while the server itself is not reading (the app has not taken
    the bytes already received, or has not yet asked for the body a client waits to send after
    `Expect: 100-continue`), so a slow app never cuts a live upload."""

    def __init__(self, *args, limits: HttpLimits, error_body: ErrorBody = plain_error, **kwargs):
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.error_body = error_body
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._in_head = True        # the bytes received are (the start of) a request head
        self._head_bytes = 0        # received of the current head, counted while it is incomplete
        self._refusal: tuple[int, str] | None = None

    # -- connection ---------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        # A head still incomplete after all these bytes: every one of them was head. Refused now, not
        # at its end, because httptools keeps a header line whole until it ends.
        if self._in_head and self._head_bytes > self.limits.max_header_bytes and not self.transport.is_closing():
            self._refuse(431, self._too_large())

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request httptools cannot parse, and to a callback that stopped it."""
        status, message = self._refusal or (400, f"invalid HTTP request: {msg}")
        self._refuse(status, message)

    # -- parser callbacks ---------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_timer is None:
            self._arm_head_timer()

    def on_headers_complete(self) -> None:
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.limits.max_header_bytes:
            self._refusal = (431, self._too_large())
            raise _HeadTooLarge()
        self._in_head, self._head_bytes = False, 0
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()
        self._arm_body_timer()

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self._arm_body_timer()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    # -- limits -------------------------------------------------------------------------------------

    def _too_large(self) -> str:
        return (f"the request line and headers are over this server's limit of {self.limits.max_header_bytes} "
                "bytes")

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.limits.header_timeout_seconds, self._head_timed_out)

    def _arm_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
        self._body_timer = self.loop.call_later(self.limits.body_timeout_seconds, self._body_timed_out)

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            self._arm_head_timer()  # a pipelined head, behind a response still being sent: not its fault
            return
        self._refuse(408, f"the request's head did not arrive within {self.limits.header_timeout_seconds:g} s")

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.flow.read_paused or (self.cycle is not None and self.cycle.waiting_for_100_continue):
            self._arm_body_timer()  # the server is not reading: the client cannot be sending
            return
        self._refuse(408, f"the request body stalled: no byte of it for {self.limits.body_timeout_seconds:g} s")

    def _refuse(self, status: int, message: str) -> None:
        """Answer `status` (unless a response to the current request has begun) and close the connection;
        the app, if it has the request, sees the client gone."""
        self._cancel_timers()
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is None or cycle.response_complete or not cycle.response_started:
            content_type, body = self.error_body(status, message)
            self.transport.write(b"".join([
                STATUS_LINE[status], b"content-type: ", content_type.encode(), b"\r\n",
                b"content-length: ", str(len(body)).encode(), b"\r\nconnection: close\r\n\r\n", body]))
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()


def server_config(app, limits: HttpLimits, *, error_body: ErrorBody = plain_error, tls_cert: str | None = None,
                  tls_key: str | None = None, grace_seconds: float = 1.0, host: str = "127.0.0.1",
                  port: int = 0) -> uvicorn.Config:
    """uvicorn's settings for an HTTP API of clowderd (`host` and `port` when uvicorn binds it itself). No
    WebSocket: no API of clowderd has one, and an upgraded connection would escape the limits."""
    return uvicorn.Config(
        app, host=host, port=port, log_config=None, access_log=False, lifespan="off", server_header=False, ws="none",
        timeout_graceful_shutdown=max(int(grace_seconds), 1), ssl_certfile=tls_cert, ssl_keyfile=tls_key,
        http=functools.partial(LimitedHttpProtocol, limits=limits, error_body=error_body))


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


def serve(process: "Process", app, listen: Address, where: str, *, name: str, limits: HttpLimits,
          error_body: ErrorBody = plain_error, tls_cert: str | None = None, tls_key: str | None = None,
          tls_where: str = "", on_stop: Callable[[], Awaitable[None] | None] | None = None) -> str:
    """Serve `app` on `listen` until clowderd stops; returns the bound address. `where` and `tls_where`
    name the settings of the address and of the certificate in startup errors; `on_stop` runs after the
    server has stopped."""
    if tls_cert and tls_key:
        check_tls(tls_cert, tls_key, tls_where)
    sock = _bind(listen, where)
    config = server_config(app, limits, error_body=error_body, tls_cert=tls_cert, tls_key=tls_key,
                           grace_seconds=process.config.shutdown_grace_seconds)
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
