"""Errors of a push or a pull that the user can act on."""
from clowderd.errors import ClowderError


class TransferError(ClowderError):
    """A remote registry or node refused or broke off a transfer; the message says which and why."""


class AuthError(TransferError):
    """A registry wants credentials that were not given or were refused."""
