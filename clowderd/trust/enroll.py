"""Joining a cluster: from a join token to a node identity.

1. The token names the cluster CA by its SHA-256 fingerprint. The controller's public listener sends
   its certificate chain, CA included, in every TLS handshake; the node reads the chain without
   trusting it yet (there is nothing to check it against) and keeps the CA certificate whose
   fingerprint is the token's. A listener without it is the wrong controller, or an impostor: the node
   stops there, before the secret leaves it.
2. With that CA as the only root, a TLS channel to the same listener, and Enrollment.Join with the
   token and a certificate request for a key made here; the key never leaves the node.

With `insecure = true` there is no CA: Join goes over plain gRPC and returns a node id only.
"""
from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
from dataclasses import dataclass

import grpc
from cryptography import x509

from clowder.v1 import common_pb2, controller_pb2, controller_pb2_grpc
from clowderd.config import Address, parse_address
from clowderd.errors import ClowderError
from clowderd.trust import certs, tokens
from clowderd.trust.dial import public_aio_channel
from clowderd.trust.identity import Material

JOIN_TIMEOUT_S = 30.0
HANDSHAKE_TIMEOUT_S = 10.0
WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]")


class JoinRefused(ClowderError):
    """The controller refused the node (wrong token, a name taken): a person has to act."""


class ControllerUnreachable(ClowderError):
    """The controller could not be asked: try again later."""


def _unverified_chain(sock: ssl.SSLSocket) -> list[bytes]:
    """The DER certificates the peer sent, not verified. Public in Python 3.13; in 3.10-3.12 the same
    method exists on the socket's SSL object."""
    get = getattr(sock, "get_unverified_chain", None) or sock._sslobj.get_unverified_chain  # noqa: SLF001
    return [c if isinstance(c, bytes) else c.public_bytes(ssl._ssl.ENCODING_DER) for c in get() or ()]  # noqa: SLF001


def fetch_ca(address: str, fingerprint: str, timeout: float = HANDSHAKE_TIMEOUT_S) -> bytes:
    """The PEM certificate of the CA with this fingerprint, as the controller's public listener at
    address presents it. ControllerUnreachable when it cannot be reached, ClowderError when it
    presents another CA or no TLS at all."""
    addr = parse_address(address, "the controller's address", allow_port_zero=False)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # nothing to verify against yet: the fingerprint decides below
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((addr.host, addr.port), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=certs.server_name("controller")) as tls:
            chain = _unverified_chain(tls)
    except ssl.SSLError as e:
        raise ClowderError(f"the controller at {address} does not answer TLS ({e.reason or e}); if the cluster "
                           "runs with insecure = true, so must this node") from None
    except OSError as e:
        raise ControllerUnreachable(f"cannot reach the controller at {address}: {e.strerror or e}") from None
    for der in chain:
        if hashlib.sha256(der).hexdigest() == fingerprint:
            cert = x509.load_der_x509_certificate(der)
            try:
                is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
            except x509.ExtensionNotFound:
                is_ca = False
            if is_ca:
                return certs.certificate_pem(cert)
    presented = ", ".join(f"sha256:{hashlib.sha256(der).hexdigest()[:16]}..." for der in chain) or "nothing"
    raise ClowderError(f"the controller at {address} does not have the cluster CA the join token names "
                       f"(sha256:{fingerprint[:16]}...; it presented {presented}): a wrong address, a token of "
                       "another cluster, or someone in between")


def speaks_tls(address: str, timeout: float = HANDSHAKE_TIMEOUT_S) -> bool:
    """Whether the listener at address completes a TLS handshake (certificate not checked)."""
    try:
        fetch_ca(address, "0" * 64, timeout)
    except ControllerUnreachable:
        return False
    except ClowderError as e:
        return "does not answer TLS" not in str(e)
    return True


def dialled_address(reported: str, dialled: str) -> str:
    """reported ("HOST:PORT" from the controller), with a wildcard host replaced by the host dialled."""
    addr = parse_address(reported, "the controller's cluster address", allow_port_zero=False)
    if addr.host in WILDCARD_HOSTS:
        return str(Address(parse_address(dialled, "the controller's address", allow_port_zero=False).host,
                           addr.port))
    return str(addr)


@dataclass
class Joined:
    node_id: str
    cluster_address: str
    material: Material | None  # None with insecure = true
    response: controller_pb2.JoinResponse


async def join(address: str, token: str, node: common_pb2.NodeInfo, *, secure: bool) -> Joined:
    """Join the cluster whose controller's public listener is at address. JoinRefused,
    ControllerUnreachable or ClowderError naming what is wrong."""
    secret, fingerprint = tokens.split(token, "the join token")
    key = csr = ca = None
    if secure:
        if fingerprint is None:
            raise JoinRefused("the join token names no CA fingerprint (it ends in ::sha256:...); use the token "
                              "`clowderctl token` prints, or DATA_DIR/controller/join-token of the controller")
        ca = await asyncio.to_thread(fetch_ca, address, fingerprint)
        key = certs.new_key()
        csr = certs.certificate_request(key)
    async with public_aio_channel(address, ca) as channel:
        try:
            response = await controller_pb2_grpc.EnrollmentStub(channel).Join(
                controller_pb2.JoinRequest(join_token=secret, node=node, csr=csr or b""), timeout=JOIN_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            if e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                            grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.INVALID_ARGUMENT):
                raise JoinRefused(f"the controller at {address} refused this node: {e.details()}") from None
            if not secure and e.code() == grpc.StatusCode.UNAVAILABLE and await asyncio.to_thread(speaks_tls, address):
                raise JoinRefused(f"the controller at {address} answers TLS, and this node has insecure = true: "
                                  "remove it (and use the whole join token, with its ::sha256: part)") from None
            raise ControllerUnreachable(f"cannot join the controller at {address}: {e.code().name}: "
                                        f"{e.details()}") from None
    material = None
    if secure:
        issued = response.certificate
        cert = certs.load_certificate(issued.certificate, "the certificate the controller issued")
        if cert.public_key().public_numbers() != key.public_key().public_numbers():
            raise ClowderError(f"the controller at {address} issued a certificate for another key")
        if ca not in issued.ca_certificates:
            raise ClowderError(f"the controller at {address} answered with a CA bundle without the pinned CA")
        material = Material(certs.key_pem(key), issued.certificate, issued.ca_certificates)
    return Joined(response.node_id, dialled_address(response.cluster_address, address), material, response)
