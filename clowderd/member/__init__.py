"""The node's side of membership, for every role: join the cluster once (join.py), then stay a member
(agent.py): register after every start, heartbeat with the node's inventory, follow what the cluster
no longer trusts, renew the certificate before it expires. A worker adds what it reports and follows
(clowderd.worker.assignments).

Used by `clowderd.server.Process`; talks to the controller over gRPC only.
"""
