"""Errors a user can act on. Each message names what is wrong: the file, the field, the limit."""


class ClowderError(Exception):
    """Base of every error that clowderctl and clowderd report to the user as a message."""


class InvalidInput(ClowderError):
    """A file, field, name or argument given by the user is not acceptable."""


class NotFound(ClowderError):
    """A named thing (image, blob, tag, node) does not exist."""


class DigestMismatch(ClowderError):
    """Content does not hash to the digest it was expected to have."""


class StoreError(ClowderError):
    """The content store cannot complete an operation (full disk, corrupt blob, lost lock)."""


class AlreadyExists(ClowderError):
    """A name is taken by something else (a node name, a deployment name)."""


class Conflict(ClowderError):
    """A change was asked for on a version of something that has changed since (a stale etag)."""
