"""The lb role's parts, put together once per process: the route table (kept from the controller's route
watch), the connections to workers, the middleware chains, the dispatcher that runs calls through them,
and the OpenAI-compatible HTTP API."""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from clowderd import httpserver
from clowderd.lb.dispatch import Dispatcher
from clowderd.lb.openai_http import OpenAIApp, protocol_error
from clowderd.lb.route_watch import RouteWatch
from clowderd.lb.routes import RouteTable
from clowderd.lb.upstream import Workers
from clowderd.middleware.registry import ChainBuilder, LbPolicy, Shared
from clowderd.trust.dial import Dialer

if TYPE_CHECKING:
    from clowderd.server import Process

log = logging.getLogger("clowderd.lb")


class LbCore:
    """What answers calls, whatever fills its route table: the middleware's shared state, the routes,
    the connections to workers (`local`: this process's worker, see Workers), the chains and the
    dispatcher."""

    def __init__(self, policy: LbPolicy, dialer: Dialer, local: tuple[str, object] | None = None):
        self.policy = policy
        self.shared = Shared.open(policy, lambda call, messages: self.dispatcher.summarise(call, messages))
        self.routes = RouteTable()
        self.workers = Workers(dialer, local=local)
        self.chains = ChainBuilder(policy, self.shared)
        self.dispatcher = Dispatcher(self.routes, self.workers, self.chains)


class LbNode(LbCore):
    def __init__(self, process: "Process"):
        self.process = process
        cfg = process.config
        http = cfg.lb_http
        data_dir = Path(cfg.data_dir) / "lb"
        audit_log = data_dir / "audit.log" if http.audit_log == "" else Path(http.audit_log) if http.audit_log else None
        local = process.local_replicas
        super().__init__(LbPolicy(data_dir=data_dir, middleware=list(http.middleware),
                                  keys_file=Path(http.keys_file) if http.keys_file else None,
                                  requests_per_minute=http.requests_per_minute, audit_log=audit_log,
                                  secrets_file=Path(http.secrets_file) if http.secrets_file else None),
                         dialer=process.dialer, local=(cfg.node_name, local) if local is not None else None)

    def start(self) -> None:
        cfg = self.process.config
        http = cfg.lb_http
        watch = RouteWatch(self.routes, self.process.cluster_address, self.process.dialer, on_change=self.chains.forget)
        watching = asyncio.get_running_loop().create_task(watch.run(), name="lb-route-watch")

        async def stop_watching() -> None:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)

        self.process.on_shutdown(stop_watching, "stop watching routes")
        self.process.on_shutdown(self.workers.close, "close the lb's worker connections")

        async def close_shared() -> None:
            await self.shared.close(drain_seconds=cfg.shutdown_grace_seconds / 2)

        self.process.on_shutdown(close_shared, "close the lb's middleware resources")
        if http.listen is None:
            return
        app = OpenAIApp(self.dispatcher, http.max_body_bytes).app()
        bound = httpserver.serve(self.process, app, http.listen, cfg.where("lb.http_listen"), name="openai-http",
                                 limits=http.limits, error_body=protocol_error, tls_cert=http.tls_cert,
                                 tls_key=http.tls_key, tls_where=cfg.where("lb.tls_cert"))
        log.info("serving http", extra={"role": "lb", "addr": bound, "tls": bool(http.tls_cert),
                                        "auth": self.shared.keys is not None})
