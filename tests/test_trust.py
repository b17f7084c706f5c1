"""The trust layer on real gRPC servers on loopback: the cluster CA, certificates naming node ids and roles,
mutual TLS with role-checked methods, revocation, renewal without a restart, and the CA pinned by a
join token's fingerprint."""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
from pathlib import Path

import grpc
import pytest

from clowder.v1 import node_pb2, node_pb2_grpc
from clowderd.errors import ClowderError, InvalidInput
from clowderd.trust import certs, tokens
from clowderd.trust.authz import Authorizer, Revocations, caller
from clowderd.trust.ca import ClusterCA
from clowderd.trust.dial import Dialer
from clowderd.trust.enroll import fetch_ca
from clowderd.trust.identity import Material, NodeIdentity
from tests.clowderd_proc import free_port
from tests.trust_fixtures import served_serial

LIFETIME = dt.timedelta(days=1)


def identity_for(ca: ClusterCA, node_id: str, roles: tuple[str, ...], lifetime: dt.timedelta = LIFETIME,
                 directory: Path | None = None) -> NodeIdentity:
    key = certs.new_key()
    cert = ca.issue(key.public_key(), node_id=node_id, name=node_id, roles=roles, lifetime=lifetime)
    material = Material(certs.key_pem(key), certs.certificate_pem(cert), ca.bundle)
    if directory is not None:
        return NodeIdentity.create(directory, material, "127.0.0.1:1")
    return NodeIdentity(material)


class Echo(node_pb2_grpc.NodeServicer):
    """Node.GetInfo answering with who called (caller()) and GetInfo's serving role unused."""

    async def GetInfo(self, request, context):
        holder = caller()
        return node_pb2.GetInfoResponse(node_name=holder.name if holder else "", node_id=holder.serial if holder else "")


class Server:
    """A gRPC server in its own event loop thread-free: used from async tests."""

    def __init__(self, identity: NodeIdentity, *, client_certificates: bool, open_to: tuple[str, ...] = ("lb",)):
        self.identity = identity
        self.revocations = Revocations()
        self.authorizer = Authorizer("test", self.revocations)
        self.authorizer.allow("clowder.v1.Node", {"GetInfo": open_to})
        interceptors = [self.authorizer] if client_certificates else []
        self.server = grpc.aio.server(interceptors=interceptors)
        node_pb2_grpc.add_NodeServicer_to_server(Echo(), self.server)
        self.address = f"127.0.0.1:{free_port()}"
        self.server.add_secure_port(self.address, identity.server_credentials(client_certificates=client_certificates))

    async def __aenter__(self) -> "Server":
        await self.server.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.server.stop(0)


async def get_info(channel: grpc.aio.Channel) -> node_pb2.GetInfoResponse:
    return await node_pb2_grpc.NodeStub(channel).GetInfo(node_pb2.GetInfoRequest(), timeout=10)


@pytest.fixture
def ca(tmp_path: Path) -> ClusterCA:
    return ClusterCA.load_or_create(tmp_path / "controller")


def test_the_ca_is_created_once_and_names_the_holders_of_its_certificates(tmp_path: Path):
    ca = ClusterCA.load_or_create(tmp_path / "controller")
    assert (tmp_path / "controller" / "ca.key").stat().st_mode & 0o777 == 0o600
    again = ClusterCA.load_or_create(tmp_path / "controller")
    assert again.fingerprint == ca.fingerprint
    identity = identity_for(ca, "node-1", ("worker", "lb"))
    assert identity.holder.node_id == "node-1"
    assert identity.holder.roles == ("worker", "lb")
    assert identity.holder.not_after - identity.holder.not_before == pytest.approx(
        LIFETIME.total_seconds() + 300, abs=5)


def test_a_ca_whose_key_and_certificate_differ_is_refused(tmp_path: Path):
    ClusterCA.load_or_create(tmp_path / "a")
    ClusterCA.load_or_create(tmp_path / "b")
    (tmp_path / "a" / "ca.crt").write_bytes((tmp_path / "b" / "ca.crt").read_bytes())
    with pytest.raises(ClowderError, match="is not the certificate of the key"):
        ClusterCA.load_or_create(tmp_path / "a")


def test_a_certificate_request_whose_signature_is_not_its_keys_is_refused():
    csr = certs.certificate_request(certs.new_key())
    tampered = csr.replace(csr[100:104], bytes(reversed(csr[100:104])))
    with pytest.raises(InvalidInput, match="csr"):
        certs.requested_key(tampered)


def test_tokens_carry_the_ca_fingerprint():
    token = tokens.with_fingerprint("clowder-join-abc", "0" * 64)
    assert tokens.split(token) == ("clowder-join-abc", "0" * 64)
    assert tokens.split("clowder-join-abc") == ("clowder-join-abc", None)
    with pytest.raises(InvalidInput, match="64 hex digits"):
        tokens.split("clowder-join-abc::sha256:xyz")


def test_a_method_is_open_only_to_the_roles_it_names(ca: ClusterCA, caplog):
    async def scenario():
        worker = identity_for(ca, "node-w", ("worker",))
        async with Server(worker, client_certificates=True, open_to=("lb",)) as server:
            lb = Dialer(identity_for(ca, "node-lb", ("lb",)))
            async with lb.aio_channel(server.address, "worker") as channel:
                answer = await get_info(channel)
            assert answer.node_name == "node-lb"  # the servicer knows who called
            other = Dialer(identity_for(ca, "node-s", ("storage",)))
            with caplog.at_level(logging.WARNING, logger="clowderd.trust.authz"):
                async with other.aio_channel(server.address, "worker") as channel:
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await get_info(channel)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "open to lb" in refused.value.details()
            record = next(r for r in caplog.records if r.getMessage() == "call refused")
            assert record.peer.startswith("ipv4:127.0.0.1:") and record.method == "/clowder.v1.Node/GetInfo"
    asyncio.run(scenario())


def test_a_client_without_a_certificate_of_the_cluster_cannot_even_connect(ca: ClusterCA, tmp_path: Path):
    async def scenario():
        async with Server(identity_for(ca, "node-w", ("worker",)), client_certificates=True) as server:
            bare = grpc.ssl_channel_credentials(root_certificates=ca.bundle)
            async with grpc.aio.secure_channel(server.address, bare, options=[
                    ("grpc.ssl_target_name_override", "clowder-worker")]) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await get_info(channel)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            stranger = Dialer(identity_for(ClusterCA.load_or_create(tmp_path / "other"), "node-x", ("lb",)))
            async with stranger.aio_channel(server.address, "worker") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await get_info(channel)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    asyncio.run(scenario())


def test_a_channel_to_a_role_is_answered_only_by_a_node_of_that_role(ca: ClusterCA):
    async def scenario():
        async with Server(identity_for(ca, "node-s", ("storage",)), client_certificates=True) as server:
            lb = Dialer(identity_for(ca, "node-lb", ("lb",)))
            async with lb.aio_channel(server.address, "worker") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await get_info(channel)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # the server's certificate is no worker's
    asyncio.run(scenario())


def test_a_revoked_certificate_is_refused_from_the_next_call(ca: ClusterCA):
    async def scenario():
        async with Server(identity_for(ca, "node-w", ("worker",)), client_certificates=True) as server:
            lb_identity = identity_for(ca, "node-lb", ("lb",))
            async with Dialer(lb_identity).aio_channel(server.address, "worker") as channel:
                await get_info(channel)
                server.revocations.replace([lb_identity.holder.serial])
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await get_info(channel)  # the same connection
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "revoked" in refused.value.details()
    asyncio.run(scenario())


def test_a_renewed_certificate_is_served_from_the_next_handshake_without_a_restart(ca: ClusterCA, tmp_path):
    async def scenario():
        worker = identity_for(ca, "node-w", ("worker",), directory=tmp_path / "w")
        async with Server(worker, client_certificates=False, open_to=()) as server:
            first = await asyncio.to_thread(fetch_ca, server.address, ca.fingerprint)
            key = certs.new_key()
            cert = ca.issue(key.public_key(), node_id="node-w", name="node-w", roles=("worker",), lifetime=LIFETIME)
            worker.renewed(Material(certs.key_pem(key), certs.certificate_pem(cert), ca.bundle))
            assert NodeIdentity.load(tmp_path / "w").holder.serial == certs.serial_hex(cert.serial_number)
            served = await asyncio.to_thread(served_serial, server.address)
            assert served == cert.serial_number
            assert first == ca.bundle
    asyncio.run(scenario())


def test_an_identity_save_stopped_at_any_step_loads_as_a_whole_or_not_at_all(ca: ClusterCA, tmp_path):
    saved = identity_for(ca, "node-w", ("worker",), directory=tmp_path / "w")
    directory = tmp_path / "w" / "identity"
    old_key, old_cert = (directory / "key.pem").read_bytes(), (directory / "cert.pem").read_bytes()
    key = certs.new_key()
    cert = ca.issue(key.public_key(), node_id="node-w", name="node-w", roles=("worker",), lifetime=LIFETIME)
    new_key, new_cert = certs.key_pem(key), certs.certificate_pem(cert)

    # A renewal stopped after its new key, before its certificate: the old pair.
    (directory / "key.pem.next").write_bytes(new_key)
    loaded = NodeIdentity.load(tmp_path / "w")
    assert (loaded.material.key, loaded.material.cert) == (old_key, old_cert)
    # ... after its certificate, before the key's rename: the new pair.
    (directory / "cert.pem").write_bytes(new_cert)
    loaded = NodeIdentity.load(tmp_path / "w")
    assert (loaded.material.key, loaded.material.cert) == (new_key, new_cert)
    assert (directory / "key.pem").read_bytes() == old_key  # loading writes nothing
    # A renewal that ended leaves no key aside.
    saved.renewed(Material(new_key, new_cert, ca.bundle))
    assert not (directory / "key.pem.next").exists()
    assert NodeIdentity.load(tmp_path / "w").material.key == new_key

    # A key that is not the certificate's, and no other: damaged, named.
    (directory / "key.pem").write_bytes(old_key)
    with pytest.raises(ClowderError, match="key.pem: not the key of .*cert.pem"):
        NodeIdentity.load(tmp_path / "w")
    # A first save stopped before node.json: no identity (the node joins again).
    (directory / "node.json").unlink()
    assert NodeIdentity.load(tmp_path / "w") is None


def test_the_ca_is_taken_only_when_its_fingerprint_is_the_tokens(ca: ClusterCA, tmp_path: Path):
    async def scenario():
        async with Server(identity_for(ca, "node-c", ("controller",)), client_certificates=False, open_to=()) as server:
            assert await asyncio.to_thread(fetch_ca, server.address, ca.fingerprint) == ca.bundle
            other = ClusterCA.load_or_create(tmp_path / "other")
            with pytest.raises(ClowderError, match="does not have the cluster CA the join token names"):
                await asyncio.to_thread(fetch_ca, server.address, other.fingerprint)
    asyncio.run(scenario())
