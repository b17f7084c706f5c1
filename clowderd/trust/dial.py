"""Channels from this node to the listeners of other roles.

With an identity, a channel presents the node's certificate and trusts only the cluster CA; it asks the
handshake for the DNS name of the role it wants (certs.server_name), so a node without that role
cannot answer in its place, whatever address the channel was given. Without one (`insecure = true`),
channels are plain gRPC.
"""
from __future__ import annotations

from typing import Sequence

import grpc

from clowderd.trust import certs
from clowderd.trust.identity import NodeIdentity

Options = Sequence[tuple[str, object]]


def role_options(role: str, options: Options = ()) -> list[tuple[str, object]]:
    return [("grpc.ssl_target_name_override", certs.server_name(role)), *options]


class Dialer:
    def __init__(self, identity: NodeIdentity | None):
        self.identity = identity

    @property
    def secure(self) -> bool:
        return self.identity is not None

    @property
    def generation(self) -> int:
        """Changes when the node's certificate does: channels made before then present the old one."""
        return self.identity.generation if self.identity is not None else 0

    def aio_channel(self, address: str, role: str, options: Options = ()) -> grpc.aio.Channel:
        if self.identity is None:
            return grpc.aio.insecure_channel(address, options=list(options))
        return grpc.aio.secure_channel(address, self.identity.channel_credentials(), options=role_options(role, options))

    def channel(self, address: str, role: str, options: Options = ()) -> grpc.Channel:
        """A blocking channel (the chunk pulls run in threads)."""
        if self.identity is None:
            return grpc.insecure_channel(address, options=list(options))
        return grpc.secure_channel(address, self.identity.channel_credentials(), options=role_options(role, options))


def public_channel(address: str, ca: bytes | None, options: Options = ()) -> grpc.Channel:
    """A blocking channel to the controller's public listener: TLS checked against the cluster CA, no
    client certificate; plain gRPC when ca is None (a cluster with `insecure = true`)."""
    if ca is None:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca),
                               options=role_options("controller", options))


def public_aio_channel(address: str, ca: bytes | None, options: Options = ()) -> grpc.aio.Channel:
    if ca is None:
        return grpc.aio.insecure_channel(address, options=list(options))
    return grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca),
                                   options=role_options("controller", options))
