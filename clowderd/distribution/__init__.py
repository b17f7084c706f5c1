"""Distribution: push and pull aimages between this node's content store and a Clowder storage
node (chunk-aware, over gRPC: chunk_client) or any OCI Distribution v1.1 registry (oci_client).

References (refs.py): `clowder://HOST:PORT/repo[:tag|@digest]` names a Clowder storage node's gRPC
address; `HOST[:PORT]/repo[:tag|@digest]` names an OCI registry (plain HTTP for loopback hosts or
with --insecure, else HTTPS).
"""
