"""Keys, certificate requests and what a cluster certificate says, with `cryptography`.

A cluster certificate names its node in URI subject alternative names, `urn:clowder:node:<node id>`
and one `urn:clowder:role:<role>` per role, and carries one DNS name per role, `clowder-<role>`: a
channel to a role asks the TLS handshake for that name, so that only a node of that role can answer
it (hostnames play no part: the nodes of a cluster trust its CA, not DNS). The subject's common name
is the node's name, for people reading logs. Keys are ECDSA P-256: small, and fast to sign with.
"""
from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from clowderd.errors import InvalidInput

NODE_ROLES = ("controller", "storage", "worker", "lb")
ADMIN = "admin"  # clowderctl with the admin token: not a node, no server
ROLES = (*NODE_ROLES, ADMIN)
# Certificates start this long before they are issued, as clocks of nodes differ; it is no part of
# the lifetime a node plans its renewal by.
CLOCK_SKEW_S = 300
NODE_URI = "urn:clowder:node:"
ROLE_URI = "urn:clowder:role:"


def server_name(role: str) -> str:
    """The DNS name a certificate carries for each of its roles, which a channel to that role asks for."""
    return f"clowder-{role}"


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_key(pem: bytes, what: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise InvalidInput(f"{what}: not a PEM private key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InvalidInput(f"{what}: expected an ECDSA key")
    return key


def certificate_request(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A PEM certificate request for key. The subject says nothing: the CA decides what the
    certificate names."""
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "clowder node")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def requested_key(csr_pem: bytes, what: str = "csr") -> ec.EllipticCurvePublicKey:
    """The public key of a certificate request whose signature proves its sender holds the key."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as e:
        raise InvalidInput(f"{what}: not a PEM certificate request ({e})") from None
    try:
        valid = csr.is_signature_valid
        key = csr.public_key()
    except (InvalidSignature, UnsupportedAlgorithm, ValueError):
        valid = False
    if not valid:
        raise InvalidInput(f"{what}: the request's signature does not match its key")
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise InvalidInput(f"{what}: the key must be ECDSA P-256")
    return key


def load_certificate(pem: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise InvalidInput(f"{what}: not a PEM certificate ({e})") from None


def load_certificates(pem: bytes, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise InvalidInput(f"{what}: not PEM certificates ({e})") from None
    return certs


def certificate_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER, hex: what a join token pins."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def serial_hex(serial: int) -> str:
    return format(serial, "x")


@dataclass(frozen=True)
class Holder:
    """Who a cluster certificate was issued to."""

    node_id: str
    name: str
    roles: tuple[str, ...]
    serial: str  # hex
    not_before: float  # Unix seconds
    not_after: float

    def has_role(self, *roles: str) -> bool:
        return any(role in self.roles for role in roles)

    def __str__(self) -> str:
        return f"{self.name} ({self.node_id}, {'+'.join(self.roles) or 'no role'})"


def holder(cert: x509.Certificate) -> Holder:
    """What a cluster certificate names. InvalidInput when it is not one (no node id)."""
    try:
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    node_ids = [u[len(NODE_URI):] for u in uris if u.startswith(NODE_URI)]
    if len(node_ids) != 1:
        raise InvalidInput("the certificate names no node of a Clowder cluster")
    roles = tuple(r for r in ROLES if ROLE_URI + r in uris)
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return Holder(node_ids[0], str(names[0].value) if names else node_ids[0], roles, serial_hex(cert.serial_number),
                  cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp())


def utc(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc)
