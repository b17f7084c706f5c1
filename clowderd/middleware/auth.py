"""API-key authentication with users and groups, and access restricted to the aimage's groups.

The lb's keys file (`[lb] keys_file`, TOML, readable by clowderd alone) names users, their groups, their
keys as SHA-256 digests (the keys themselves are shown once, by `clowderctl apikey create`), and
optionally a rate limit each:

    [users.alice]
    groups = ["research"]
    keys = ["sha256:5e88..."]
    requests_per_minute = 120

With a keys file every call needs a key ("Authorization: Bearer KEY"): none or an unknown one is 401.
The aimage configuration's `access_groups` then admits only members of those groups (403 otherwise);
without a keys file there is no caller to admit, so such a deployment refuses every call. The list of
models follows the same rules: 401 without a valid key, and only the deployments the caller may call.
The file is read again when it changes.
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from clowderd.errors import InvalidInput
from clowderd.middleware.base import Call, Middleware, Refused

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
RELOAD_CHECK_S = 2.0


def bearer(header: str | None) -> str | None:
    """The key of an "Authorization: Bearer KEY" header (HTTP) or metadata entry (gRPC), if any."""
    scheme, _, key = (header or "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


def key_digest(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class User:
    name: str
    groups: frozenset[str]
    requests_per_minute: int | None


def load_keys(path: Path) -> dict[str, User]:
    """Key digest -> user. Errors name the file and the entry."""
    keys: dict[str, User] = {}
    for name, entry in read_users(path).items():
        user = User(name, frozenset(entry.get("groups", [])), entry.get("requests_per_minute"))
        for digest in entry.get("keys", []):
            if digest in keys:
                raise InvalidInput(f"{path}: users.{name}.keys: {digest} is also a key of user {keys[digest].name!r}")
            keys[digest] = user
    return keys


def read_users(path: Path) -> dict[str, dict]:
    """The file's [users.NAME] tables, each checked. Errors name the file and the entry."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise InvalidInput(f"{path}: cannot read the keys file: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise InvalidInput(f"{path}: invalid TOML: {e}") from None
    unknown = sorted(set(data) - {"users"})
    if unknown:
        raise InvalidInput(f"{path}: unknown top-level keys {unknown}; users go under [users.NAME]")
    users = data.get("users") or {}
    for name, entry in users.items():
        where = f"{path}: users.{name}"
        if not isinstance(entry, dict):
            raise InvalidInput(f"{where}: expected a table")
        extra = sorted(set(entry) - {"groups", "keys", "requests_per_minute"})
        if extra:
            raise InvalidInput(f"{where}: unknown keys {extra} (known: groups, keys, requests_per_minute)")
        groups = entry.get("groups", [])
        if not isinstance(groups, list) or not all(isinstance(g, str) and g for g in groups):
            raise InvalidInput(f"{where}.groups: expected a list of group names")
        rpm = entry.get("requests_per_minute")
        if rpm is not None and (isinstance(rpm, bool) or not isinstance(rpm, int) or rpm < 1):
            raise InvalidInput(f"{where}.requests_per_minute: expected a positive integer, got {rpm!r}")
        for digest in entry.get("keys", []):
            if not isinstance(digest, str) or not DIGEST.match(digest):
                raise InvalidInput(f"{where}.keys: {digest!r} is not \"sha256:<64 hex digits>\" (store digests, "
                                   "never keys; clowderctl apikey create writes them)")
    return users


class KeyRing:
    """The keys file, read again when its modification time changes (checked every few seconds)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._mtime = os.stat(self.path).st_mtime_ns
        self.keys = load_keys(self.path)
        self._checked = time.monotonic()

    def lookup(self, key: str) -> User | None:
        self._maybe_reload()
        return self.keys.get(key_digest(key))  # a lookup by digest reveals nothing of the stored keys

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < RELOAD_CHECK_S:
            return
        self._checked = now
        try:
            mtime = os.stat(self.path).st_mtime_ns
            if mtime != self._mtime:
                self.keys, self._mtime = load_keys(self.path), mtime
        except (OSError, InvalidInput):
            pass  # keep the keys in force; a broken edit must not lock everyone out


def authenticate(ring: KeyRing | None, api_key: str | None) -> User | None:
    """The caller of a key; None when the lb has no keys file (it authenticates no one). Raises Refused
    (401) for a missing or unknown key."""
    if ring is None:
        return None
    if not api_key:
        raise Refused(401, "this lb needs an API key: send \"Authorization: Bearer KEY\"", "missing_api_key")
    user = ring.lookup(api_key)
    if user is None:
        raise Refused(401, "the API key is not valid", "invalid_api_key")
    return user


def admits(access_groups: frozenset[str], groups: frozenset[str]) -> bool:
    """Whether a deployment restricted to `access_groups` (none: open to every caller) takes a caller in
    `groups`."""
    return not access_groups or bool(groups & access_groups)


class Authenticate(Middleware):
    name = "auth"

    def __init__(self, ring: KeyRing | None, access_groups: list[str]):
        self.ring = ring
        self.access_groups = frozenset(access_groups)

    async def on_request(self, call: Call) -> None:
        user = authenticate(self.ring, call.api_key)
        if user is not None:
            call.principal, call.groups = user.name, user.groups
            call.state["requests_per_minute"] = user.requests_per_minute
        if not admits(self.access_groups, call.groups):
            allowed = ", ".join(sorted(self.access_groups))
            if call.principal is None:
                raise Refused(403, f"deployment {call.model!r} is restricted to the groups {allowed}, and this lb "
                                   "authenticates no one (it has no keys_file)", "access_denied")
            mine = ", ".join(sorted(call.groups)) or "none"
            raise Refused(403, f"deployment {call.model!r} is restricted to the groups {allowed}; user "
                               f"{call.principal!r} is in {mine}", "access_denied")


def create(config: dict, policy, shared) -> Middleware | None:
    groups = config.get("access_groups") or []
    if shared.keys is None and not groups:
        return None
    return Authenticate(shared.keys, groups)
