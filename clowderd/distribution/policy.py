"""Which sources a worker may pull from: its [worker] pull_from setting (clowderd.config).

"local-storage": only Clowder storage nodes (clowder:// references), so a cluster's workers never
reach outside it; "any": also OCI registries.
"""
from __future__ import annotations

from clowderd.distribution.refs import RemoteRef
from clowderd.errors import InvalidInput


def check_source(pull_from: str, ref: RemoteRef, where: str = "[worker] pull_from") -> None:
    if pull_from == "any" or ref.kind == "clowder":
        return
    raise InvalidInput(f"{ref}: this worker pulls only from Clowder storage nodes ({where} = {pull_from!r}); "
                       f"use clowder://HOST:PORT/{ref.repository}, or set pull_from = \"any\"")
