"""The state every clowderctl command shares: the node's data directory and its store."""
from __future__ import annotations

from pathlib import Path

import click

from clowderd.store.content import ContentStore
from clowderd.store.images import ImageIndex


class StoreContext:
    """Opens the node's store on first use, so `--help` works without a data directory."""

    def __init__(self, data_dir: str):
        self.data_dir = Path(data_dir)
        self._store: ContentStore | None = None

    @property
    def store(self) -> ContentStore:
        if self._store is None:
            self._store = ContentStore(self.data_dir / "store")
        return self._store

    @property
    def index(self) -> ImageIndex:
        return ImageIndex(self.store)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


pass_store = click.make_pass_decorator(StoreContext)
