"""The worker role: runs one engine process per deployment replica; serves clowder.v1.Worker to load
balancers; its agent keeps the node a member of the cluster and runs what the controller assigns.

Public interface: `clowderd.worker.service.register(server, process)`, called by
`clowderd.server.Process` when the worker role is enabled. Other roles reach this one over gRPC
only, never by importing its internals.
"""
