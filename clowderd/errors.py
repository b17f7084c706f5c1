"""Errors a user can act on. Each message names what is wrong: the file, the field, the limit."""


class ClowderError(Exception):
    """Base of every error that clowderctl and clowderd report to the user as a message."""


class InvalidInput(ClowderError):
    """A file, field, name or argument given by the user is not acceptable."""


class NotFound(ClowderError):
    """A named thing (image, blob, tag, node) does not exist."""


class Quarantined(NotFound):
    """A blob whose stored bytes were found corrupt: it stays in the store, but is not served until the
    same content comes in again (a push, a pull or a build of it), which repairs it."""

    def __init__(self, digest: str, message: str):
        super().__init__(message)
        self.digest = digest


class DigestMismatch(ClowderError):
    """Content does not hash to the digest it was expected to have."""


class StoreError(ClowderError):
    """The content store cannot complete an operation (full disk, corrupt blob, lost lock)."""


class AlreadyExists(ClowderError):
    """A name is taken by something else (a node name, a deployment name)."""


class Conflict(ClowderError):
    """A change was asked for on a version of something that has changed since (a stale etag)."""
