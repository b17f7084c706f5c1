"""The controller role: desired and observed state, node membership, scheduling; serves the admin
API (clowder.v1.Controller) and clowder.v1.Membership.

state.py is the SQLite database; cluster.py runs its calls off the event loop and tells watchers what
changed; tokens.py keeps the join and admin tokens and node credentials; membership.py and admin.py
are the two services, with deployments.py (the admin API's deployment methods) and routes.py (the
lb's route watch); images.py resolves image references at a storage node; requirements.py says
what a deployment's replicas ask for, scheduler.py where they fit, and reconcile.py is the loop that
places, moves, restarts and replaces them; service.py puts it all together and sweeps silent nodes
to unreachable.

Public interface: `clowderd.controller.service.register(server, process)`, called by
`clowderd.server.Process` when the controller role is enabled. Other roles reach this one over gRPC
only, never by importing its internals.
"""
