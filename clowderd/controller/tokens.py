"""The controller's secrets: the join token, the admin token and node credentials.

Each is 32 random bytes in URL-safe base64 behind a prefix that says what it is. The database keeps
only their SHA-256 digests. The join and admin tokens are also kept in plain text in files under the
data dir (mode 0600) for the operator to read: at start, a missing file gets a new token, and a file
whose token differs from the database's digest (an operator wrote it) makes that token the one.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from clowderd.controller.cluster import Cluster
from clowderd.controller.state import NORMAL, ClusterState
from clowderd.files import write_private

log = logging.getLogger(__name__)

JOIN_PREFIX = "clowder-join-"
ADMIN_PREFIX = "clowder-admin-"
NODE_PREFIX = "clowder-node-"


def new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def matches(secret: str, expected_digest: str | None) -> bool:
    return bool(secret) and expected_digest is not None and hmac.compare_digest(digest(secret), expected_digest)


def bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The secret of an `authorization: Bearer SECRET` entry of gRPC metadata; "" when there is none."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer "):].strip()
    return ""


def read_token_file(path: Path) -> str | None:
    """The token in path, None when the file does not exist."""
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def write_token_file(path: Path, token: str) -> None:
    """Replace path with the token, mode 0600, so that no reader ever sees a partial file."""
    write_private(path, token + "\n")


@dataclass
class ClusterTokens:
    """The join token and the admin token's digest of a running controller."""

    join_path: Path
    join: str
    join_created_at: float
    admin_digest: str

    def admits(self, join_token: str) -> bool:
        return matches(join_token, digest(self.join))

    def is_admin(self, token: str) -> bool:
        return matches(token, self.admin_digest)

    @classmethod
    def load(cls, state: ClusterState, join_path: Path, admin_path: Path, now: float) -> "ClusterTokens":
        join, join_created_at = _load(state, "join", JOIN_PREFIX, join_path, now)
        admin, _ = _load(state, "admin", ADMIN_PREFIX, admin_path, now)
        return cls(join_path, join, join_created_at, digest(admin))

    async def rotate_join(self, cluster: Cluster, now: float) -> None:
        token = new_secret(JOIN_PREFIX)
        write_token_file(self.join_path, token)
        await cluster.call(cluster.state.set_secret, "join", digest(token), now)
        await cluster.call(cluster.state.add_event, NORMAL, "JoinTokenRotated", "Cluster", "join-token",
                           "the join token was replaced; nodes that have joined keep their credentials", now)
        self.join, self.join_created_at = token, now


def _load(state: ClusterState, name: str, prefix: str, path: Path, now: float) -> tuple[str, float]:
    """The token of the file (created when missing) and when it became the token."""
    token = read_token_file(path)
    stored = state.secret(name)
    if token is None:
        token = new_secret(prefix)
        write_token_file(path, token)
        state.set_secret(name, digest(token), now)
        if name == "join":
            log.info("created the join token", extra={"join_token": token, "file": str(path)})
        return token, now
    if stored is None or stored[0] != digest(token):
        if stored is not None:
            log.warning(f"the {name} token was replaced by the one in its file", extra={"file": str(path)})
        state.set_secret(name, digest(token), now)
        return token, now
    return token, stored[1]
