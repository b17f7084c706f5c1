"""How a node that does not run the controller comes to be a member, before it serves anything.

A node with an identity in DATA_DIR/identity (from an earlier join) is a member already, whether the
controller answers or not: a restarted node serves at once. One without, or whose certificate expired
or names fewer roles than it now runs, joins with the join token (trust/enroll.py), trying again while
the controller cannot be reached and stopping clowderd (exit 2) when it refuses the node: a person has
to act then. Roles added to a node that has a valid certificate are asked for at its first renewal
instead (they need the join token too).

With `insecure = true` the identity is a node id and the controller's cluster address in
DATA_DIR/identity/node.json, and no certificate.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from clowder.v1 import node_pb2, node_pb2_grpc
from clowderd.errors import ClowderError
from clowderd.files import write_whole
from clowderd.trust import enroll
from clowderd.trust.dial import public_aio_channel
from clowderd.trust.identity import IDENTITY_DIR, NODE_FILE, NodeIdentity

if TYPE_CHECKING:
    from clowderd.server import Process

log = logging.getLogger(__name__)

RETRY_FIRST_S, RETRY_MAX_S = 0.5, 15.0


class JoinTokenUnreadable(ClowderError):
    """The join token file cannot be read."""


@dataclass
class Membership:
    node_id: str
    cluster_address: str  # the controller's cluster listener; "" in the controller's own process
    identity: NodeIdentity | None  # None with insecure = true


def read_join_token(token: str | None, path: str | None) -> str:
    """The configured join token, or the content of the file that holds it (read at each use, so that a
    rotated token is picked up)."""
    if token is not None:
        return token
    try:
        text = Path(path).read_text().strip()
    except OSError as e:
        raise JoinTokenUnreadable(f"cannot read the join token from {path}: {e.strerror}") from None
    if not text:
        raise JoinTokenUnreadable(f"the join token file {path} is empty")
    return text


def _insecure_saved(data_dir: Path) -> Membership | None:
    try:
        saved = json.loads((data_dir / IDENTITY_DIR / NODE_FILE).read_text())
        return Membership(saved["node_id"], saved["cluster_address"], None)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("cannot read the node's identity; joining again", extra={"error": str(e)})
        return None


def own_insecure_membership(data_dir: Path) -> Membership:
    """The membership of the controller's own process with insecure = true: its node id, kept."""
    saved = _insecure_saved(data_dir)
    if saved is not None:
        return saved
    membership = Membership(f"node-{secrets.token_hex(6)}", "", None)
    write_whole(data_dir / IDENTITY_DIR / NODE_FILE, json.dumps(
        {"node_id": membership.node_id, "cluster_address": ""}).encode())
    return membership


async def current_cluster_address(public: str, ca: bytes | None) -> str | None:
    """Where the controller whose public listener is at `public` has its cluster listener now, as it says
    itself (Node.GetInfo); None when it cannot be asked. A node asks when the address it keeps stops
    answering: the operator may have moved the listener."""
    async with public_aio_channel(public, ca) as channel:
        try:
            info = await node_pb2_grpc.NodeStub(channel).GetInfo(node_pb2.GetInfoRequest(), timeout=10)
        except grpc.aio.AioRpcError:
            return None
    listener = next((item for item in info.listeners if item.name == "cluster"), None)
    return enroll.dialled_address(listener.address, public) if listener is not None else None


def remember_cluster_address(data_dir: Path, membership: Membership, address: str) -> None:
    """The controller's cluster listener moved: keep the new address, for this run and the next."""
    log.warning("the controller's cluster listener moved", extra={"from": membership.cluster_address, "to": address})
    membership.cluster_address = address
    if membership.identity is not None:
        membership.identity.keep_cluster_address(address)
    else:
        write_whole(data_dir / IDENTITY_DIR / NODE_FILE, json.dumps(
            {"node_id": membership.node_id, "cluster_address": address}).encode())


def usable(identity: NodeIdentity | None) -> bool:
    """Whether identity can still be presented: it exists and has not expired."""
    return identity is not None and time.time() < identity.holder.not_after


async def become_member(process: "Process") -> Membership:
    """The membership of a node without the controller role: the one on disk, else a new join."""
    cfg = process.config
    data_dir = Path(cfg.data_dir)
    if cfg.insecure:
        saved = _insecure_saved(data_dir)
        if saved is not None:
            return saved
    else:
        identity = NodeIdentity.load(data_dir)
        if usable(identity):
            return Membership(identity.node_id, identity.cluster_address, identity)
        if identity is not None:
            log.warning("the node's certificate has expired; joining again with the join token",
                        extra={"serial": identity.holder.serial})
    token = read_join_token(cfg.join_token, cfg.join_token_file)
    address = str(cfg.cluster_controller)
    delay = RETRY_FIRST_S
    last_error = ""
    while True:
        try:
            joined = await enroll.join(address, token, process.node_info(), secure=not cfg.insecure)
            break
        except enroll.ControllerUnreachable as e:
            if str(e) != last_error:
                log.warning("waiting for the controller to join the cluster", extra={
                    "controller": address, "error": str(e)})
                last_error = str(e)
            process.joining(f"waiting for the controller at {address} to join the cluster")
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, RETRY_MAX_S)
    log.info("joined the cluster", extra={"controller": address, "node_id": joined.node_id,
                                          "cluster_address": joined.cluster_address,
                                          "controller_version": joined.response.controller_version})
    if joined.material is None:
        write_whole(data_dir / IDENTITY_DIR / NODE_FILE, json.dumps(
            {"node_id": joined.node_id, "cluster_address": joined.cluster_address}).encode())
        return Membership(joined.node_id, joined.cluster_address, None)
    identity = NodeIdentity.create(data_dir, joined.material, joined.cluster_address)
    return Membership(joined.node_id, joined.cluster_address, identity)
