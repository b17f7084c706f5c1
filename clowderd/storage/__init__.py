"""The storage role: a registry of aimages. Serves chunk-aware transfer to Clowder nodes
(clowder.v1.Registry, gRPC) and, later, the OCI Distribution v1.1 HTTP API.

Public interface: `clowderd.storage.service.register(server, process)`, called by
`clowderd.server.Process` when the storage role is enabled. Other roles reach this one over gRPC
only, never by importing its internals.
"""
