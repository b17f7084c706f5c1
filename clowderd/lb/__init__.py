"""The load balancer role: the OpenAI-compatible endpoint (clowder.v1.Inference over gRPC, HTTP
later), the middleware chain, and routing to ready replicas.

Public interface: `clowderd.lb.service.register(server, process)`, called by
`clowderd.server.Process` when the lb role is enabled. Other roles reach this one over gRPC
only, never by importing its internals.
"""
