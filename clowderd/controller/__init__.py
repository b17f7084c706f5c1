"""The controller role: desired state, node membership, scheduling, reconcile loop; serves the admin
API (clowder.v1.Controller) and clowder.v1.Membership.

Public interface: `clowderd.controller.service.register(server, process)`, called by
`clowderd.server.Process` when the controller role is enabled. Other roles reach this one over gRPC
only, never by importing its internals.
"""
