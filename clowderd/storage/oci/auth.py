"""Who may read and write which repositories of the storage role's OCI registry.

Tokens come from the file named by ``[storage] tokens_file`` (TOML)::

    [[token]]
    name = "ci"                          # shown in logs; unique
    secret_sha256 = "9f86d08...15b0f00a08"  # hex sha256 of the secret: printf %s "$SECRET" | sha256sum
    repositories = ["smollm2/*", "team/**", "demo"]
    access = "write"                     # "read" or "write" (write includes read)

A repository pattern matches whole names: ``*`` matches within one path component, ``**`` across
components. Only hashes of secrets are stored. A client presents the secret as
``Authorization: Bearer <secret>`` or as the password of HTTP Basic credentials (any user name;
skopeo, oras and docker send Basic). Basic credentials with an empty password are anonymous.

Without a tokens file the registry is open to every client that can reach it, like a CNCF
distribution registry without an auth section; the default listen address is loopback only.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import re
import sys
from dataclasses import dataclass

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from clowderd.config import ConfigError
from clowderd.storage.oci.errors import OCIError

REALM = "clowder"
ACCESS_LEVELS = ("read", "write")
_PATTERN = re.compile(r"[a-z0-9._*/-]+")
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Token:
    name: str
    repositories: tuple[re.Pattern, ...]
    access: str

    def allows(self, repository: str, action: str) -> bool:
        if action == "write" and self.access != "write":
            return False
        return any(p.fullmatch(repository) for p in self.repositories)


def _compile(pattern: str) -> re.Pattern:
    parts = re.split(r"(\*\*|\*)", pattern)
    return re.compile("".join({"**": ".*", "*": "[^/]*"}.get(p, re.escape(p)) for p in parts))


def load_tokens(path: str, where: str) -> dict[str, Token]:
    """Read a tokens file; returns secret hash -> Token. ConfigError names the entry and field."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: {path}: invalid TOML: {exc}") from None
    unknown = set(data) - {"token"}
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; expected [[token]] tables")
    entries = data.get("token", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: 'token' must be an array of tables ([[token]])")
    tokens: dict[str, Token] = {}
    names: set[str] = set()
    for i, entry in enumerate(entries):
        at = f"{path}: token[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{at}: expected a table")
        extra = set(entry) - {"name", "secret_sha256", "repositories", "access"}
        if extra:
            raise ConfigError(f"{at}: unknown key(s) {', '.join(sorted(extra))}")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{at}: name: expected a non-empty string")
        if name in names:
            raise ConfigError(f"{at}: name {name!r} is used by an earlier token")
        names.add(name)
        secret = entry.get("secret_sha256")
        if not isinstance(secret, str) or not _HEX64.fullmatch(secret):
            raise ConfigError(f"{at} ({name}): secret_sha256: expected 64 lowercase hex digits "
                              "(the sha256 of the secret, not the secret)")
        if secret in tokens:
            raise ConfigError(f"{at} ({name}): secret_sha256 is the same as token {tokens[secret].name!r}'s")
        repos = entry.get("repositories")
        if not isinstance(repos, list) or not repos or not all(isinstance(r, str) and _PATTERN.fullmatch(r) for r in repos):
            raise ConfigError(f"{at} ({name}): repositories: expected a non-empty array of repository patterns "
                              "(lowercase names, '/', '*' within a component, '**' across components)")
        access = entry.get("access")
        if access not in ACCESS_LEVELS:
            raise ConfigError(f"{at} ({name}): access: expected \"read\" or \"write\", got {access!r}")
        tokens[secret] = Token(name, tuple(_compile(r) for r in repos), access)
    return tokens


class Authorizer:
    """Decides each request from its Authorization header. ``enabled`` is False without tokens."""

    def __init__(self, tokens: dict[str, Token] | None, anonymous_read: bool):
        self.enabled = tokens is not None
        self.tokens = tokens or {}
        self.anonymous_read = anonymous_read

    def _challenge(self, message: str, detail: dict | None = None) -> OCIError:
        return OCIError("UNAUTHORIZED", message, detail=detail,
                        headers={"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'})

    def identify(self, authorization: str | None) -> Token | None:
        """The token the header presents; None when anonymous. 401 for credentials that are wrong."""
        if not authorization:
            return None
        scheme, _, value = authorization.strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer":
            secret = value
        elif scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(value, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                raise self._challenge("Authorization: Basic credentials are not base64 of 'user:password'") from None
            _, _, secret = decoded.partition(":")
            if not secret:
                return None
        else:
            raise self._challenge(f"Authorization scheme {scheme!r} is not supported; use Basic or Bearer")
        token = self.tokens.get(hashlib.sha256(secret.encode()).hexdigest())
        if token is None:
            raise self._challenge("the token is not valid")
        return token

    def check_ping(self, authorization: str | None) -> None:
        """GET /v2/: with auth enabled, a client without credentials is told how to authenticate."""
        if self.enabled and self.identify(authorization) is None:
            raise self._challenge("authentication required; send a token as the Basic password or as Bearer")

    def check(self, authorization: str | None, repository: str, action: str) -> None:
        """Allow action ('read' or 'write') on repository, or raise 401 (no/bad credentials) or 403."""
        if not self.enabled:
            return
        token = self.identify(authorization)
        if token is None:
            if action == "read" and self.anonymous_read:
                return
            raise self._challenge(f"authentication required to {action} {repository}",
                                  detail={"repository": repository, "access": action})
        if not token.allows(repository, action):
            raise OCIError("DENIED", f"token {token.name!r} has no {action} access to repository {repository!r}",
                           detail={"repository": repository, "access": action})

    def can_read(self, authorization: str | None, repository: str) -> bool:
        try:
            self.check(authorization, repository, "read")
        except OCIError:
            return False
        return True
