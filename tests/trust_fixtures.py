"""Certificates for tests that speak to a cluster as a node of some role would: issued with the cluster
CA of a controller's data dir (the test process can read its key), not recorded by the controller."""
from __future__ import annotations

import datetime as dt
import socket
import ssl

import grpc
from cryptography import x509

from clowderd.trust import certs
from clowderd.trust.ca import ClusterCA
from clowderd.trust.dial import Dialer
from clowderd.trust.identity import Material, NodeIdentity
from tests.clowderd_proc import ClowderdProcess


def issue_identity(controller: ClowderdProcess, roles: tuple[str, ...], node_id: str = "node-test",
                   lifetime: dt.timedelta = dt.timedelta(hours=1)) -> NodeIdentity:
    ca = ClusterCA.load_or_create(controller.data_dir / "controller")
    key = certs.new_key()
    cert = ca.issue(key.public_key(), node_id=node_id, name=node_id, roles=roles, lifetime=lifetime)
    return NodeIdentity(Material(certs.key_pem(key), certs.certificate_pem(cert), ca.bundle))


def dialer_as(controller: ClowderdProcess, *roles: str) -> Dialer:
    """Channels that present a certificate of the controller's cluster naming these roles."""
    return Dialer(issue_identity(controller, roles))


def channel_as(controller: ClowderdProcess, proc: ClowderdProcess, listener: str, *roles: str) -> grpc.Channel:
    """A channel to one of proc's listeners that presents a certificate of controller's cluster naming roles
    (plain gRPC when proc runs with insecure = true), closed with proc."""
    dialer = Dialer(None) if proc.insecure else dialer_as(controller, *roles)
    channel = dialer.channel(proc.addresses[listener], "controller" if listener == "cluster" else listener)
    proc.adopt(channel)
    return channel


def served_serial(address: str) -> int:
    """The serial number of the certificate the listener at address presents now (not checked)."""
    host, port = address.rsplit(":", 1)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=10) as raw, context.wrap_socket(raw) as tls:
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number
