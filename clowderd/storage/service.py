"""gRPC services of the storage role: the Registry service (clowderd.storage.transfer) over the
node's content store; its methods not yet implemented answer UNIMPLEMENTED, naming the method. The
store is scrubbed in the background (clowderd.store.scrub).

Its listener is between roles: the chunk API reads for the nodes of the cluster and for clowderctl with
an admin certificate (the OCI HTTP API is where registry tokens are taken). With insecure = true it reads
for anyone, unless the tokens file forbids anonymous reads: then it reads for nobody."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from clowder.v1 import registry_pb2, registry_pb2_grpc
from clowderd.server import refusing_servicer
from clowderd.storage import http
from clowderd.storage.transfer import RegistryServicer
from clowderd.store import scrub
from clowderd.store.content import ContentStore
from clowderd.trust import certs

if TYPE_CHECKING:
    from clowderd.server import Process

READ_METHODS = ("ListRepositories", "ListTags", "GetManifest", "StatBlob", "GetChunkIndex", "HasChunks",
                "FetchChunks")


def register(server: grpc.aio.Server, process: "Process") -> None:
    """Add the storage role's services to its server."""
    config = process.config
    store = ContentStore(Path(config.data_dir) / "store")
    if config.insecure and config.registry_http.tokens_file and not config.registry_http.anonymous_read:
        # Plain gRPC cannot tell a node from anyone else, and reads need a token here: the chunk API is
        # closed rather than open to all (the OCI API takes the tokens).
        registry_pb2_grpc.add_RegistryServicer_to_server(refusing_servicer(
            registry_pb2_grpc.RegistryServicer, registry_pb2.DESCRIPTOR, "Registry", grpc.StatusCode.PERMISSION_DENIED,
            "{method}: this storage node lets only token holders read (anonymous_read = false), and with insecure = "
            "true its gRPC API cannot tell who calls; pull over its OCI API with a token, or run the cluster with "
            "TLS (insecure = false)"), server)
    else:
        registry_pb2_grpc.add_RegistryServicer_to_server(RegistryServicer(store), server)
    readers = (*certs.NODE_ROLES, certs.ADMIN)
    process.allow("storage", "clowder.v1.Registry", {method: readers for method in READ_METHODS})
    scrub.run_in(process, store, "storage")

    async def close_store() -> None:
        store.close()

    process.on_shutdown(close_store, "close the Registry service's store")
    http.start(process, store)  # the OCI Distribution HTTP API; stops (newest first) before the store closes
