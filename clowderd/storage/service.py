"""gRPC services of the storage role: the Registry service (clowderd.storage.transfer) over the
node's content store; its methods not yet implemented answer UNIMPLEMENTED, naming the method. The
store is scrubbed in the background (clowderd.store.scrub)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from clowder.v1 import registry_pb2_grpc
from clowderd.storage import http
from clowderd.storage.transfer import RegistryServicer
from clowderd.store import scrub
from clowderd.store.content import ContentStore

if TYPE_CHECKING:
    from clowderd.server import Process


def register(server: grpc.aio.Server, process: "Process") -> None:
    """Add the storage role's services to its server."""
    store = ContentStore(Path(process.config.data_dir) / "store")
    registry_pb2_grpc.add_RegistryServicer_to_server(RegistryServicer(store), server)
    scrub.run_in(process, store, "storage")

    async def close_store() -> None:
        store.close()

    process.on_shutdown(close_store, "close the Registry service's store")
    http.start(process, store)  # the OCI Distribution HTTP API; stops (newest first) before the store closes
