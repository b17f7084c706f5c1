"""Who may call what, on the listeners between roles.

Those listeners ask every client for a certificate of the cluster CA in the TLS handshake (gRPC
refuses the handshake of a client that has none, or one from another CA). Then, for every call:

- the caller is the holder of that certificate (`caller()` tells a servicer who it is serving);
- a certificate the cluster revoked, or one past its end, is refused with UNAUTHENTICATED;
- the method must be open to one of the certificate's roles (each role's service says which, next to
  its servicer: `Authorizer.allow`), else PERMISSION_DENIED; a method nobody opened is open to nobody.

Each refusal is logged with the peer, the method and the reason; at most REFUSALS_LOGGED lines per
REFUSALS_WINDOW_S on one listener, and a count of those not logged, so a caller cannot flood the log.
"""
from __future__ import annotations

import contextvars
import logging
import threading
import time
from typing import Any, Awaitable, Callable, Iterable, Mapping

import grpc

from clowderd.errors import InvalidInput
from clowderd.trust import certs

log = logging.getLogger(__name__)

REFUSALS_LOGGED = 20
REFUSALS_WINDOW_S = 10.0
_HOLDERS_CACHED = 4096

_caller: contextvars.ContextVar[certs.Holder | None] = contextvars.ContextVar("clowder_caller", default=None)


def caller() -> certs.Holder | None:
    """The certificate holder of the call being served; None on a listener that asks for none."""
    return _caller.get()


def lapsed(holder: certs.Holder, revocations: "Revocations") -> str | None:
    """Why holder's certificate is no longer good (revoked, or past its end), or None. A servicer that
    takes many requests on one call asks it again for each, since a call may outlive a certificate."""
    if holder.serial in revocations:
        return f"certificate revoked: serial {holder.serial} of node {holder}"
    if time.time() > holder.not_after:
        return f"certificate expired: serial {holder.serial} of node {holder}"
    return None


class Revocations:
    """Serial numbers (hex) of the certificates the cluster revoked and that have not expired; replaced
    whole when the controller says it changed."""

    def __init__(self, serials: Iterable[str] = ()):
        self.serials: frozenset[str] = frozenset(serials)

    def replace(self, serials: Iterable[str]) -> None:
        self.serials = frozenset(serials)

    def __contains__(self, serial: str) -> bool:
        return serial in self.serials


class RefusalLog:
    """Logs refusals, a bounded number per window (the count of the others at the window's end)."""

    def __init__(self, listener: str):
        self.listener = listener
        self._window_start = 0.0
        self._logged = 0
        self._dropped = 0
        self._lock = threading.Lock()

    def log(self, code: grpc.StatusCode, peer: str, method: str, why: str, holder: certs.Holder | None) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._window_start >= REFUSALS_WINDOW_S:
                if self._dropped:
                    log.warning("calls refused and not logged", extra={
                        "listener": self.listener, "count": self._dropped, "window_seconds": REFUSALS_WINDOW_S})
                self._window_start, self._logged, self._dropped = now, 0, 0
            if self._logged >= REFUSALS_LOGGED:
                self._dropped += 1
                return
            self._logged += 1
        log.warning("call refused", extra={
            "listener": self.listener, "code": code.name, "peer": peer, "method": method, "reason": why,
            "caller": str(holder) if holder else ""})


class Authorizer(grpc.aio.ServerInterceptor):
    """The checks above, for one listener. `allow(service, {method: roles})` opens methods to roles."""

    def __init__(self, listener: str, revocations: Revocations):
        self.listener = listener
        self.revocations = revocations
        self._open: dict[str, frozenset[str]] = {}
        self._holders: dict[bytes, certs.Holder | None] = {}
        self._refusals = RefusalLog(listener)

    def allow(self, service: str, methods: Mapping[str, Iterable[str]]) -> None:
        """Open each method of service ("clowder.v1.Worker") to the roles named for it."""
        for method, roles in methods.items():
            unknown = set(roles) - set(certs.ROLES)
            if unknown:
                raise ValueError(f"unknown roles {sorted(unknown)} for {service}/{method}")
            self._open[f"/{service}/{method}"] = frozenset(roles)

    def _holder(self, pem: bytes) -> certs.Holder | None:
        held = self._holders.get(pem, False)
        if held is False:
            try:
                held = certs.holder(certs.load_certificate(pem, "the peer certificate"))
            except InvalidInput:
                held = None
            if len(self._holders) >= _HOLDERS_CACHED:
                self._holders.clear()
            self._holders[pem] = held
        return held

    async def refuse(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, method: str, why: str,
                     holder: certs.Holder | None) -> None:
        """Log the refusal (bounded, as every refusal on this listener) and end the call with code."""
        self._refusals.log(code, context.peer(), method, why, holder)
        await context.abort(code, why)

    async def check(self, context: grpc.aio.ServicerContext, method: str) -> certs.Holder:
        """The caller of method, or the call aborted with UNAUTHENTICATED or PERMISSION_DENIED."""
        pems = context.auth_context().get("x509_pem_cert")
        holder = self._holder(pems[0]) if pems else None
        if holder is None:
            why = ("no client certificate was presented" if not pems else
                   "the client certificate names no node of this cluster")
            await self.refuse(context, grpc.StatusCode.UNAUTHENTICATED, method, why, None)
        why = lapsed(holder, self.revocations)
        if why:
            await self.refuse(context, grpc.StatusCode.UNAUTHENTICATED, method, why, holder)
        roles = self._open.get(method)
        if not roles or not holder.has_role(*roles):
            opened = f"open to {', '.join(sorted(roles))}" if roles else "not open to other nodes"
            await self.refuse(context, grpc.StatusCode.PERMISSION_DENIED, method,
                               f"{method} is {opened}; the caller is {holder}", holder)
        _caller.set(holder)
        return holder

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[grpc.RpcMethodHandler]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:
            return None
        return _checked(handler, lambda context: self.check(context, details.method))


def _checked(handler: grpc.RpcMethodHandler,
             check: Callable[[grpc.aio.ServicerContext], Awaitable[certs.Holder]]) -> grpc.RpcMethodHandler:
    """handler, with check run before its behaviour."""
    des, ser = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary:
        inner = handler.unary_unary

        async def unary_unary(request, context):
            await check(context)
            return await inner(request, context)
        return grpc.unary_unary_rpc_method_handler(unary_unary, des, ser)
    if handler.stream_unary:
        inner = handler.stream_unary

        async def stream_unary(requests, context):
            await check(context)
            return await inner(requests, context)
        return grpc.stream_unary_rpc_method_handler(stream_unary, des, ser)
    streaming = handler.unary_stream or handler.stream_stream

    async def streamed(request_or_requests, context):
        await check(context)
        result = streaming(request_or_requests, context)
        if hasattr(result, "__aiter__"):
            async for response in result:
                yield response
        else:  # a handler that writes with context.write
            await result
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streamed, des, ser)
    return grpc.stream_stream_rpc_method_handler(streamed, des, ser)
