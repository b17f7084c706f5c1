"""The text of the join and admin tokens: a secret, then the SHA-256 fingerprint of the cluster CA's
certificate, `clowder-join-SECRET::sha256:HEX` (kubeadm's --discovery-token-ca-cert-hash, in the token
itself). Whoever holds the token can check, before sending the secret, that the controller it reached
has the CA the token names; the controller checks only the secret."""
from __future__ import annotations

import re

from clowderd.errors import InvalidInput

SEPARATOR = "::sha256:"
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


def with_fingerprint(secret: str, fingerprint: str | None) -> str:
    """The token given out; the bare secret where there is no CA (a cluster with insecure = true)."""
    return f"{secret}{SEPARATOR}{fingerprint}" if fingerprint else secret


def split(token: str, what: str = "the token") -> tuple[str, str | None]:
    """(secret, CA fingerprint) of a token; the fingerprint is None for a bare secret."""
    token = token.strip()
    secret, sep, fingerprint = token.partition(SEPARATOR)
    if not sep:
        return token, None
    if not _FINGERPRINT.fullmatch(fingerprint):
        raise InvalidInput(f"{what}: the part after {SEPARATOR!r} must be the 64 hex digits of the cluster CA's "
                           "SHA-256 fingerprint")
    return secret, fingerprint
