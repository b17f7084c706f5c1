"""Repository names, tags and digests as they appear in OCI Distribution URLs."""
from __future__ import annotations

import re

from clowderd.aimage.reference import validate_digest
from clowderd.errors import InvalidInput
from clowderd.storage.oci.errors import OCIError

MAX_NAME_LENGTH = 255
_NAME = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


def is_repository(name: str) -> bool:
    return len(name) <= MAX_NAME_LENGTH and _NAME.fullmatch(name) is not None


def check_repository(name: str) -> str:
    if len(name) > MAX_NAME_LENGTH:
        raise OCIError("NAME_INVALID", f"repository name is {len(name)} characters, at most {MAX_NAME_LENGTH}",
                       detail={"name": name[:MAX_NAME_LENGTH]})
    if not _NAME.fullmatch(name):
        raise OCIError("NAME_INVALID", f"repository name {name!r} is invalid: lowercase letters and digits in "
                       "components separated by '/', joined by '.', '_', '__' or '-'", detail={"name": name})
    return name


def check_digest(digest: str, code: str = "DIGEST_INVALID") -> str:
    try:
        return validate_digest(digest)
    except InvalidInput as exc:
        raise OCIError(code, str(exc), detail={"digest": digest}) from None


def is_digest_reference(reference: str) -> bool:
    """A manifest reference with a ':' is a digest; tags cannot contain one."""
    return ":" in reference


def check_tag(tag: str, code: str = "MANIFEST_INVALID") -> str:
    if not _TAG.fullmatch(tag):
        raise OCIError(code, f"tag {tag!r} is invalid: letters, digits, '_', '.', '-', at most 128 characters, "
                       "not starting with '.' or '-'", detail={"tag": tag})
    return tag
