"""The storage role's OCI Distribution HTTP API, served by uvicorn inside clowderd's asyncio loop
(clowderd.httpserver). On shutdown the server stops accepting, in-flight requests get the shutdown grace
period, then upload sessions are dropped with their files.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from clowderd import httpserver
from clowderd.store.content import ContentStore
from clowderd.store.images import ImageIndex
from clowderd.storage.oci.app import Registry, create_app
from clowderd.storage.oci.auth import Authorizer, load_tokens
from clowderd.storage.oci.uploads import UploadSessions

if TYPE_CHECKING:
    from clowderd.server import Process

log = logging.getLogger("clowderd.storage.http")

SWEEP_SECONDS = 60.0


def start(process: "Process", store: ContentStore) -> None:
    """Start serving the OCI API of the store, if [storage] http_listen is set."""
    cfg = process.config
    http = cfg.registry_http
    if http.listen is None:
        return
    tokens = load_tokens(http.tokens_file, cfg.where("storage.tokens_file")) if http.tokens_file else None
    sessions = UploadSessions(store)
    app = create_app(Registry(store, ImageIndex(store), sessions, Authorizer(tokens, http.anonymous_read)))
    sweeper = asyncio.get_running_loop().create_task(_sweep(sessions), name="oci-upload-expiry")

    def stopped() -> None:
        sweeper.cancel()
        sessions.close()

    try:
        bound = httpserver.serve(process, app, http.listen, cfg.where("storage.http_listen"), name="oci-http",
                                 limits=http.limits, tls_cert=http.tls_cert, tls_key=http.tls_key,
                                 tls_where=cfg.where("storage.tls_cert"), on_stop=stopped)
    except BaseException:
        stopped()
        raise
    log.info("serving http", extra={"role": "storage", "addr": bound, "tls": bool(http.tls_cert),
                                    "auth": tokens is not None, "anonymous_read": http.anonymous_read})


async def _sweep(sessions: UploadSessions) -> None:
    while True:
        await asyncio.sleep(SWEEP_SECONDS)
        expired = sessions.expire()
        if expired:
            log.info("upload sessions expired", extra={"count": expired})
