"""The controller's secrets: the join token and the admin token.

Each secret is 32 random bytes in URL-safe base64 behind a prefix that says what it is; the database
keeps only its SHA-256 digest. The tokens people are given also carry the cluster CA's fingerprint
(trust/tokens.py), so that whoever uses one checks the controller before sending the secret. Both are
kept in full in files under the data dir (mode 0600) for the operator to read: at start, a missing file
gets a new token, a file whose secret differs from the database's digest (an operator wrote it) makes
that secret the one, and a file without the current CA's fingerprint gets it appended.
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
from clowderd.trust import tokens

log = logging.getLogger(__name__)

JOIN_PREFIX = "clowder-join-"
ADMIN_PREFIX = "clowder-admin-"


def new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def matches(token: str, expected_digest: str | None) -> bool:
    """Whether token's secret (the token with or without its CA fingerprint) has expected_digest."""
    secret = token.partition(tokens.SEPARATOR)[0].strip()
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


@dataclass
class ClusterTokens:
    """The join token (in full) and the admin token's digest of a running controller."""

    join_path: Path
    join: str
    join_created_at: float
    admin_digest: str
    fingerprint: str | None  # the cluster CA's, which the tokens given out carry; None: insecure = true

    def admits(self, join_token: str) -> bool:
        return matches(join_token, digest(self.join.partition(tokens.SEPARATOR)[0]))

    def is_admin(self, token: str) -> bool:
        return matches(token, self.admin_digest)

    @classmethod
    def load(cls, state: ClusterState, join_path: Path, admin_path: Path, fingerprint: str | None,
             now: float) -> "ClusterTokens":
        join, join_created_at = _load(state, "join", JOIN_PREFIX, join_path, fingerprint, now)
        admin, _ = _load(state, "admin", ADMIN_PREFIX, admin_path, fingerprint, now)
        return cls(join_path, tokens.with_fingerprint(join, fingerprint), join_created_at, digest(admin), fingerprint)

    async def rotate_join(self, cluster: Cluster, now: float) -> None:
        secret = new_secret(JOIN_PREFIX)
        write_private(self.join_path, tokens.with_fingerprint(secret, self.fingerprint) + "\n")
        await cluster.call(cluster.state.set_secret, "join", digest(secret), now)
        await cluster.call(cluster.state.add_event, NORMAL, "JoinTokenRotated", "Cluster", "join-token",
                           "the join token was replaced; nodes that have joined keep their certificates", now)
        self.join, self.join_created_at = tokens.with_fingerprint(secret, self.fingerprint), now


def _load(state: ClusterState, name: str, prefix: str, path: Path, fingerprint: str | None, now: float) -> tuple[str, float]:
    """The secret of the file (created when missing) and when it became the secret; the file is left
    holding the secret with the CA's fingerprint."""
    token = read_token_file(path)
    stored = state.secret(name)
    if token is None:
        secret = new_secret(prefix)
        write_private(path, tokens.with_fingerprint(secret, fingerprint) + "\n")
        state.set_secret(name, digest(secret), now)
        log.info(f"created the {name} token", extra={"file": str(path)})
        return secret, now
    secret, named = token.partition(tokens.SEPARATOR)[0].strip(), token.partition(tokens.SEPARATOR)[2]
    if named != (fingerprint or ""):
        write_private(path, tokens.with_fingerprint(secret, fingerprint) + "\n")
    if stored is None or stored[0] != digest(secret):
        if stored is not None:
            log.warning(f"the {name} token was replaced by the one in its file", extra={"file": str(path)})
        state.set_secret(name, digest(secret), now)
        return secret, now
    return secret, stored[1]
