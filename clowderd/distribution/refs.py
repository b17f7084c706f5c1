"""Remote references for push and pull.

- `clowder://HOST:PORT/repo[:tag][@sha256:...]`: a Clowder storage node, at its gRPC (storage
  listen) address; transfers are chunk-aware.
- `HOST[:PORT]/repo[:tag][@sha256:...]`: an OCI Distribution registry (CNCF distribution, Harbor,
  zot, a Clowder node's OCI HTTP API). The registry host is required: there is no default registry.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from clowderd.aimage.reference import parse_reference
from clowderd.errors import InvalidInput

CLOWDER_SCHEME = "clowder://"


@dataclass(frozen=True)
class RemoteRef:
    kind: str  # 'clowder' or 'oci'
    registry: str  # host:port
    repository: str
    tag: str | None
    digest: str | None

    @property
    def reference(self) -> str:
        """What to ask the registry for: the digest when given, else the tag (default 'latest')."""
        return self.digest or self.tag or "latest"

    @property
    def local_name(self) -> str:
        """The name a pulled image gets on this node: registry/repository:tag."""
        return f"{self.registry}/{self.repository}:{self.tag or 'latest'}"

    def __str__(self) -> str:
        text = (CLOWDER_SCHEME if self.kind == "clowder" else "") + f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_remote(text: str) -> RemoteRef:
    """Parse a remote reference, raising InvalidInput that quotes it and says what is wrong."""
    kind = "oci"
    rest = text
    if "://" in text:
        if not text.startswith(CLOWDER_SCHEME):
            raise InvalidInput(f"'{text}': unknown scheme; use clowder://HOST:PORT/repo:tag for a Clowder node "
                               "or HOST[:PORT]/repo:tag for an OCI registry")
        kind, rest = "clowder", text[len(CLOWDER_SCHEME):]
    ref = parse_reference(rest)
    if ref.registry is None:
        if kind == "clowder":
            raise InvalidInput(f"'{text}': expected clowder://HOST:PORT/repo[:tag]")
        raise InvalidInput(f"'{text}' names no registry: write HOST[:PORT]/repo[:tag], e.g. 127.0.0.1:5000/{rest}, "
                           f"or clowder://HOST:PORT/{rest} for a Clowder storage node")
    if kind == "clowder" and ":" not in ref.registry:
        raise InvalidInput(f"'{text}': a Clowder node is addressed by HOST:PORT (its storage gRPC address)")
    return RemoteRef(kind, ref.registry, ref.repository, ref.tag, ref.digest)


def is_loopback(registry: str) -> bool:
    host = registry.rsplit(":", 1)[0] if not registry.endswith("]") else registry
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
