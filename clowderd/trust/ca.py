"""The cluster's certificate authority, as k3s and kubeadm keep one: created by the controller at its
first start in DATA_DIR/controller (ca.key mode 0600, ca.crt readable), and used to issue every
node's certificate. The join and admin tokens carry its fingerprint, so that a node checks it reached
this controller before it sends a secret.
"""
from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from clowderd.errors import ClowderError
from clowderd.files import write_whole
from clowderd.trust import certs

log = logging.getLogger(__name__)

CA_KEY_FILE = "ca.key"
CA_CERT_FILE = "ca.crt"
CA_LIFETIME = dt.timedelta(days=3650)
CLOCK_SKEW = dt.timedelta(seconds=certs.CLOCK_SKEW_S)


class ClusterCA:
    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate):
        self.key = key
        self.cert = cert
        self.fingerprint = certs.fingerprint(cert)
        self.bundle = certs.certificate_pem(cert)

    @classmethod
    def load_or_create(cls, directory: Path, cluster_name: str = "clowder") -> "ClusterCA":
        key_path, cert_path = directory / CA_KEY_FILE, directory / CA_CERT_FILE
        if key_path.exists() or cert_path.exists():
            try:
                key = certs.load_key(key_path.read_bytes(), str(key_path))
                cert = certs.load_certificate(cert_path.read_bytes(), str(cert_path))
            except OSError as e:
                raise ClowderError(f"cannot read the cluster CA in {directory}: {e.strerror} ({e.filename})") from None
            if cert.public_key().public_numbers() != key.public_key().public_numbers():
                raise ClowderError(f"{cert_path} is not the certificate of the key {key_path}")
            return cls(key, cert)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = certs.new_key()
        now = dt.datetime.now(dt.timezone.utc)
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Clowder"),
                          x509.NameAttribute(NameOID.COMMON_NAME, f"{cluster_name} cluster CA")])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + CA_LIFETIME)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False, key_agreement=False,
                                             key_cert_sign=True, crl_sign=True, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        # The key first: a crash between the two leaves a key without a certificate, which the next
        # start refuses with a clear message rather than a certificate whose key is lost.
        write_whole(key_path, certs.key_pem(key))
        write_whole(cert_path, certs.certificate_pem(cert), 0o644)
        log.info("created the cluster CA", extra={"file": str(cert_path), "fingerprint": certs.fingerprint(cert)})
        return cls(key, cert)

    def issue(self, public_key: ec.EllipticCurvePublicKey, *, node_id: str, name: str, roles: Iterable[str],
              lifetime: dt.timedelta) -> x509.Certificate:
        """A certificate for public_key naming node_id, name and roles (see certs.py), for client and
        server authentication, valid for lifetime (never past the CA's own end)."""
        roles = [r for r in certs.ROLES if r in set(roles)]
        now = dt.datetime.now(dt.timezone.utc)
        not_after = min(now + lifetime, self.cert.not_valid_after_utc)
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(certs.NODE_URI + node_id)]
        sans += [x509.UniformResourceIdentifier(certs.ROLE_URI + role) for role in roles]
        sans += [x509.DNSName(certs.server_name(role)) for role in roles if role != certs.ADMIN]
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if any(role != certs.ADMIN for role in roles):
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Clowder"),
                             x509.NameAttribute(NameOID.COMMON_NAME, name[:64] or node_id)])
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(self.cert.subject)
                .public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(now - CLOCK_SKEW).not_valid_after(not_after)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False, key_agreement=False,
                                             key_cert_sign=False, crl_sign=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                               critical=False)
                .sign(self.key, hashes.SHA256()))
