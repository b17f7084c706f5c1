"""Calling the controller's admin API (clowder.v1.Controller) from clowderctl.

The address comes from --controller, else $CLOWDER_CONTROLLER, else 127.0.0.1:7070; the admin token
from --token, else $CLOWDER_TOKEN, else the controller's own file DATA_DIR/controller/admin-token (on
the controller's node, as the user clowderd runs as). The token ends with the cluster CA's fingerprint:
the controller's TLS certificate is checked against that CA before the token is sent (a bare secret, as
a cluster with `insecure = true` has, goes over plain gRPC). gRPC errors become one-line messages.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import click
import grpc

from clowder.v1 import controller_pb2, controller_pb2_grpc
from clowderctl.context import StoreContext
from clowderd.config import ADMIN_TOKEN_FILE, parse_address
from clowderd.errors import ClowderError, InvalidInput, NotFound
from clowderd.member.join import usable
from clowderd.trust import certs, tokens
from clowderd.trust.dial import Dialer, public_channel
from clowderd.trust.enroll import ControllerUnreachable, fetch_ca
from clowderd.trust.identity import Material, NodeIdentity

DEFAULT_CONTROLLER = "127.0.0.1:7070"
CALL_TIMEOUT_S = 30.0


def controller_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--controller and --token, which every command of the admin API takes."""
    command = click.option("--token", envvar="CLOWDER_TOKEN", metavar="TOKEN",
                           help="The admin token (also $CLOWDER_TOKEN) [default: the file "
                                "DATA_DIR/controller/admin-token].")(command)
    return click.option("--controller", envvar="CLOWDER_CONTROLLER", default=DEFAULT_CONTROLLER, show_default=True,
                        metavar="HOST:PORT", help="The controller's address (also $CLOWDER_CONTROLLER).")(command)


class ControllerClient:
    def __init__(self, address: str, token: str):
        self.address = address
        secret, fingerprint = tokens.split(token, "the admin token")
        try:
            ca = fetch_ca(address, fingerprint) if fingerprint else None
        except ControllerUnreachable as e:
            raise ClowderError(f"{e}; give its address with --controller or $CLOWDER_CONTROLLER") from None
        self._channel = public_channel(address, ca)
        self._stub = controller_pb2_grpc.ControllerStub(self._channel)
        self._metadata = (("authorization", f"Bearer {secret}"),)

    def call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self._stub, method)(request, metadata=self._metadata, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as e:
            raise self._error(e) from None

    def stream(self, method: str, request: Any) -> Iterator[Any]:
        try:
            yield from getattr(self._stub, method)(request, metadata=self._metadata)
        except grpc.RpcError as e:
            raise self._error(e) from None

    def pages(self, method: str, request: Any, field: str) -> Iterator[Any]:
        """Every item of a paged list."""
        while True:
            response = self.call(method, request)
            yield from getattr(response, field)
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token

    def _error(self, error: grpc.RpcError) -> ClowderError:
        code, details = error.code(), error.details()
        if code == grpc.StatusCode.UNAVAILABLE:
            return ClowderError(f"cannot reach the controller at {self.address} ({details}); give its address with "
                                "--controller or $CLOWDER_CONTROLLER (a controller with TLS needs the whole admin "
                                "token, which ends in ::sha256:...)")
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return ClowderError(f"the controller at {self.address} refused the admin token: {details}")
        if code == grpc.StatusCode.NOT_FOUND:
            return NotFound(details)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidInput(details)
        return ClowderError(f"the controller at {self.address} answered {code.name}: {details}")

    def close(self) -> None:
        self._channel.close()


def cluster_dialer(data_dir: Path, controller: str, token: str | None) -> Dialer:
    """How clowderctl reaches a listener between roles (a storage node's chunk API): with the certificate of
    the node whose data dir it works on (DATA_DIR/identity), else with an admin certificate the controller
    issues for the admin token, else (no token anywhere) over plain gRPC, as a cluster with insecure = true
    takes it."""
    identity = NodeIdentity.load(data_dir)
    if usable(identity):
        return Dialer(identity)
    try:
        token = token or _local_admin_token(data_dir)
    except ClowderError:
        return Dialer(None)
    if tokens.split(token, "the admin token")[1] is None:
        return Dialer(None)
    key = certs.new_key()
    client = connect(controller, token)
    issued = client.call("IssueAdminCertificate", controller_pb2.IssueAdminCertificateRequest(
        csr=certs.certificate_request(key)))
    return Dialer(NodeIdentity(Material(certs.key_pem(key), issued.certificate, issued.ca_certificates)))


def _local_admin_token(data_dir: Path) -> str:
    path = data_dir / ADMIN_TOKEN_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        raise ClowderError(f"no admin token: give --token or $CLOWDER_TOKEN ({path} does not exist; on the "
                           "controller's node it is DATA_DIR/controller/admin-token)") from None
    except PermissionError:
        raise ClowderError(f"cannot read {path}: permission denied; run as the user clowderd runs as, or give "
                           "--token") from None


def connect(controller: str, token: str | None) -> ControllerClient:
    """A client for the current command, closed when it ends."""
    ctx = click.get_current_context()
    address = str(parse_address(controller, "--controller", allow_port_zero=False))
    client = ControllerClient(address, token or _local_admin_token(ctx.find_object(StoreContext).data_dir))
    ctx.call_on_close(client.close)
    return client
