"""A node's identity: its private key, the certificate the cluster CA issued for it, and the CA
certificates the cluster trusts. Kept in DATA_DIR/identity (key.pem mode 0600, cert.pem, ca.pem, and
node.json with where the controller's cluster listener is), so a restarted node is the same node.

Each file is replaced whole, and in an order that a crash, or a reader in another process, can never
catch half-way: a renewal's new key goes to key.pem.next, then its certificate to cert.pem, then the key
is renamed over key.pem (load() takes key.pem.next where only it matches cert.pem); node.json is
written last, so that an identity without it is one whose first save did not end (none).

The TLS credentials of the node's listeners are dynamic: a certificate renewed while the process runs
is presented from the next handshake on, with no restart. Channels are made with the credentials of
the moment; `generation` changes at each renewal, so that holders of long-lived channels know to make
new ones.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from clowderd.errors import ClowderError, InvalidInput
from clowderd.files import write_whole
from clowderd.trust import certs

log = logging.getLogger(__name__)

IDENTITY_DIR = "identity"
KEY_FILE, CERT_FILE, CA_FILE, NODE_FILE = "key.pem", "cert.pem", "ca.pem", "node.json"
NEXT_KEY_FILE = "key.pem.next"
RENEW_AT = 2 / 3  # of a certificate's lifetime, as kubelet does around 70-90 %


@dataclass(frozen=True)
class Material:
    key: bytes  # PEM
    cert: bytes  # PEM, the node's certificate alone
    ca: bytes  # PEM bundle


class NodeIdentity:
    """The identity of this process (or of clowderctl, for an admin certificate: directory None, kept
    in memory only)."""

    def __init__(self, material: Material, cluster_address: str = "", directory: Path | None = None):
        self.directory = directory
        self.cluster_address = cluster_address
        self.generation = 0
        self._lock = threading.Lock()
        self._set(material)

    def _set(self, material: Material) -> None:
        cert = certs.load_certificate(material.cert, "the node certificate")
        certs.load_certificates(material.ca, "the CA bundle")
        self.holder = certs.holder(cert)
        self.material = material  # one attribute, so that readers on other threads see a whole set

    @property
    def node_id(self) -> str:
        return self.holder.node_id

    @property
    def renew_at(self) -> float:
        """When RENEW_AT of the certificate's life (from its issue, not its backdated start) has passed."""
        h = self.holder
        issued = min(h.not_before + certs.CLOCK_SKEW_S, h.not_after)
        return issued + RENEW_AT * (h.not_after - issued)

    # -- on disk ------------------------------------------------------------------------------

    @classmethod
    def load(cls, data_dir: Path) -> "NodeIdentity | None":
        """The identity kept under data_dir; None when there is none. ClowderError when it is there but
        cannot be used (unreadable, damaged), naming the file. Never writes."""
        directory = Path(data_dir) / IDENTITY_DIR
        if not ((directory / NODE_FILE).exists() and (directory / CERT_FILE).exists()):
            return None  # none, a first save that did not end, or a node of an insecure cluster
        try:
            cert, ca = ((directory / name).read_bytes() for name in (CERT_FILE, CA_FILE))
            key = _key_of(directory, cert)
            node = json.loads((directory / NODE_FILE).read_text())
            identity = cls(Material(key, cert, ca), str(node.get("cluster_address", "")), directory)
        except OSError as e:
            raise ClowderError(f"cannot read the node identity in {directory}: {e.strerror} ({e.filename})") from None
        except (ValueError, InvalidInput) as e:
            raise ClowderError(f"the node identity in {directory} is damaged: {e}; remove the directory and the "
                               "node joins again with the join token") from None
        return identity

    @classmethod
    def create(cls, data_dir: Path, material: Material, cluster_address: str) -> "NodeIdentity":
        identity = cls(material, cluster_address, Path(data_dir) / IDENTITY_DIR)
        identity._save()
        return identity

    def _save(self) -> None:
        if self.directory is None:
            return
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        m = self.material
        write_whole(self.directory / NEXT_KEY_FILE, m.key)
        write_whole(self.directory / CERT_FILE, m.cert, 0o644)
        os.replace(self.directory / NEXT_KEY_FILE, self.directory / KEY_FILE)
        write_whole(self.directory / CA_FILE, m.ca, 0o644)
        write_whole(self.directory / NODE_FILE, json.dumps(
            {"node_id": self.holder.node_id, "cluster_address": self.cluster_address}).encode())

    def renewed(self, material: Material) -> None:
        """Take a renewed certificate (and maybe key and CA bundle); saved, then used."""
        with self._lock:
            self._set(material)
            self._save()
            self.generation += 1
        log.info("certificate renewed", extra={"node_id": self.holder.node_id, "serial": self.holder.serial,
                                               "not_after": certs.utc(self.holder.not_after).isoformat()})

    def keep_cluster_address(self, address: str) -> None:
        with self._lock:
            self.cluster_address = address
            self._save()

    def trusted_cas(self, ca: bytes) -> None:
        """The cluster's CA bundle changed (told by the controller)."""
        if ca and ca != self.material.ca:
            self.renewed(Material(self.material.key, self.material.cert, ca))

    # -- TLS credentials ----------------------------------------------------------------------

    def _server_config(self) -> grpc.ServerCertificateConfiguration:
        m = self.material
        # The chain ends with the CA, so that a node that has only the join token's fingerprint can
        # read the CA off the handshake (enroll.py) and check it.
        return grpc.ssl_server_certificate_configuration([(m.key, m.cert + m.ca)], root_certificates=m.ca)

    def server_credentials(self, *, client_certificates: bool) -> grpc.ServerCredentials:
        """TLS credentials for a listener, which present the current certificate at every handshake;
        with client_certificates, a client must present a certificate of the cluster CA."""
        served = [self.material]
        initial = self._server_config()

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            if self.material is served[0]:
                return None  # unchanged: gRPC keeps the configuration it has
            served[0] = self.material
            return self._server_config()

        return grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=client_certificates)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        m = self.material
        return grpc.ssl_channel_credentials(root_certificates=m.ca, private_key=m.key, certificate_chain=m.cert)


def _key_of(directory: Path, cert_pem: bytes) -> bytes:
    """The key of cert.pem: key.pem, or key.pem.next where a save stopped between the certificate and the
    rename of its key."""
    public = certs.load_certificate(cert_pem, str(directory / CERT_FILE)).public_key()
    candidates = [directory / KEY_FILE, directory / NEXT_KEY_FILE]
    for path in candidates:
        try:
            pem = path.read_bytes()
        except FileNotFoundError:
            continue
        if certs.load_key(pem, str(path)).public_key() == public:
            return pem
    raise InvalidInput(f"{directory / KEY_FILE}: not the key of {directory / CERT_FILE}")
