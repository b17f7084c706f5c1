"""How transfers report progress: per blob, bytes done out of a total. The CLI draws bars."""
from __future__ import annotations


class Progress:
    """Does nothing; the CLI's subclass draws bars. Calls come from several threads."""

    def start(self, key: str, description: str, total: int) -> None:
        pass

    def advance(self, key: str, nbytes: int) -> None:
        pass

    def done(self, key: str) -> None:
        pass
