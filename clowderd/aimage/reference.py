"""OCI references: `[registry[:port]/]namespace/name[:tag][@sha256:<64 hex>]`, and digests."""

import re
from dataclasses import dataclass

from clowderd.errors import InvalidInput

DEFAULT_TAG = "latest"
MAX_NAME_LENGTH = 255

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Reference:
    """A parsed reference; `registry` is None when the text names none (the default registry applies)."""

    registry: str | None
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def tag_or_default(self) -> str:
        return self.tag or DEFAULT_TAG

    @property
    def name(self) -> str:
        """`[registry/]repository`, without tag or digest."""
        return f"{self.registry}/{self.repository}" if self.registry else self.repository

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def validate_digest(text: str) -> str:
    """Return text if it is `sha256:<64 lowercase hex>`, else raise InvalidInput saying what is wrong."""
    algorithm, sep, encoded = text.partition(":")
    if not sep or not algorithm:
        raise InvalidInput(f"'{text}' is not a digest: expected 'sha256:<64 hex digits>'")
    if algorithm != "sha256":
        raise InvalidInput(f"'{text}': unsupported digest algorithm '{algorithm}' (only sha256)")
    if len(encoded) != 64:
        raise InvalidInput(f"'{text}': a sha256 digest has 64 hex digits, this one has {len(encoded)}")
    if not _HEX64.fullmatch(encoded):
        raise InvalidInput(f"'{text}': a sha256 digest is lowercase hex (0-9, a-f)")
    return text


def parse_reference(text: str) -> Reference:
    """Parse an OCI reference, raising InvalidInput that quotes the text and names the bad part."""
    if not text or not text.strip():
        raise InvalidInput("reference is empty")
    rest, at, digest = text.partition("@")
    if at:
        try:
            validate_digest(digest)
        except InvalidInput as exc:
            raise InvalidInput(f"'{text}': bad digest: {exc}") from None
    name, tag = _split_tag(rest)
    if tag is not None and not _TAG.fullmatch(tag):
        raise InvalidInput(
            f"'{text}': bad tag '{tag}' (letters, digits, '_', '.', '-', at most 128, not starting with '.' or '-')")
    registry, repository = _split_registry(name)
    if registry is not None:
        _check_registry(text, registry)
    _check_repository(text, repository, len(name))
    return Reference(registry, repository, tag, digest if at else None)


def _split_tag(name_and_tag: str) -> tuple[str, str | None]:
    colon = name_and_tag.rfind(":")
    if colon > name_and_tag.rfind("/"):
        return name_and_tag[:colon], name_and_tag[colon + 1:]
    return name_and_tag, None


def _split_registry(name: str) -> tuple[str | None, str]:
    first, slash, remainder = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost") and first not in (".", ".."):
        return first, remainder
    return None, name


def _check_registry(text: str, registry: str) -> None:
    host, colon, port = registry.partition(":")
    if colon and not (port.isdigit() and port.isascii() and 0 < int(port) < 65536):
        raise InvalidInput(f"'{text}': bad registry port '{port}'")
    if not all(_HOST_LABEL.fullmatch(label) for label in host.split(".")):
        raise InvalidInput(f"'{text}': bad registry host '{host}'")


def _check_repository(text: str, repository: str, name_length: int) -> None:
    if not repository:
        raise InvalidInput(f"'{text}': repository name is empty")
    components = repository.split("/")
    if any(c in (".", "..") for c in components):
        raise InvalidInput(f"'{text}': path components are not allowed in a name")
    if any(not c for c in components):
        raise InvalidInput(f"'{text}': empty component in repository name '{repository}'")
    if repository != repository.lower():
        raise InvalidInput(f"'{text}': repository name must be lowercase")
    for component in components:
        if not _COMPONENT.fullmatch(component):
            raise InvalidInput(
                f"'{text}': bad name component '{component}' (lowercase letters and digits, "
                "separated by '.', '_', '__' or '-')")
    if name_length > MAX_NAME_LENGTH:
        raise InvalidInput(f"'{text}': name is {name_length} characters, at most {MAX_NAME_LENGTH}")
