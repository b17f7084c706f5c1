"""Checking a pushed manifest: which media types are accepted and what a manifest references."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from clowderd.aimage.reference import validate_digest
from clowderd.errors import InvalidInput
from clowderd.storage.oci.errors import OCIError

MAX_MANIFEST_BYTES = 4 << 20

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
IMAGE_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MEDIA_TYPES = IMAGE_TYPES + INDEX_TYPES


@dataclass(frozen=True)
class ParsedManifest:
    media_type: str
    artifact_type: str  # artifactType, else the config's media type, else ""
    blobs: list[str]  # config and layers
    children: list[str]  # manifests of an index
    subject: str | None


def _invalid(message: str, field: str | None = None) -> OCIError:
    return OCIError("MANIFEST_INVALID", message, detail={"field": field} if field else None)


def _descriptor(value: Any, field: str) -> dict:
    if not isinstance(value, dict):
        raise _invalid(f"{field}: expected a descriptor object", field)
    media_type = value.get("mediaType")
    if not isinstance(media_type, str) or not media_type:
        raise _invalid(f"{field}.mediaType: expected a non-empty string", f"{field}.mediaType")
    size = value.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise _invalid(f"{field}.size: expected a non-negative integer, got {size!r}", f"{field}.size")
    digest = value.get("digest")
    if not isinstance(digest, str):
        raise _invalid(f"{field}.digest: expected a digest string", f"{field}.digest")
    try:
        validate_digest(digest)
    except InvalidInput as exc:
        raise _invalid(f"{field}.digest: {exc}", f"{field}.digest") from None
    return value


def _descriptors(doc: dict, key: str, required: bool) -> list[dict]:
    value = doc.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list):
        raise _invalid(f"{key}: expected an array of descriptors", key)
    return [_descriptor(d, f"{key}[{i}]") for i, d in enumerate(value)]


def parse_manifest(body: bytes, content_type: str | None) -> ParsedManifest:
    """Check a manifest body against its Content-Type; MANIFEST_INVALID names the bad field."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _invalid(f"manifest is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise _invalid("manifest is not a JSON object")
    if doc.get("schemaVersion") != 2 or isinstance(doc.get("schemaVersion"), bool):
        raise _invalid(f"schemaVersion: expected 2, got {doc.get('schemaVersion')!r}", "schemaVersion")
    header_type = (content_type or "").split(";")[0].strip() or None
    body_type = doc.get("mediaType")
    if body_type is not None and not isinstance(body_type, str):
        raise _invalid("mediaType: expected a string", "mediaType")
    if body_type and header_type and body_type != header_type:
        raise _invalid(f"mediaType {body_type!r} differs from the Content-Type {header_type!r}", "mediaType")
    media_type = body_type or header_type
    if media_type not in MEDIA_TYPES:
        raise _invalid(f"manifest media type {media_type!r} is not supported; use one of {', '.join(MEDIA_TYPES)}",
                       "mediaType")
    artifact_type = doc.get("artifactType")
    if artifact_type is not None and (not isinstance(artifact_type, str) or not artifact_type):
        raise _invalid("artifactType: expected a non-empty string", "artifactType")
    subject = _descriptor(doc["subject"], "subject")["digest"] if doc.get("subject") is not None else None
    if media_type in IMAGE_TYPES:
        config = _descriptor(doc.get("config"), "config")
        layers = _descriptors(doc, "layers", required=True)
        return ParsedManifest(media_type, artifact_type or config["mediaType"],
                              [config["digest"]] + [d["digest"] for d in layers], [], subject)
    children = _descriptors(doc, "manifests", required=True)
    return ParsedManifest(media_type, artifact_type or "", [], [d["digest"] for d in children], subject)


def annotations_of(body: bytes) -> dict | None:
    """The annotations of a stored manifest, for its referrers descriptor."""
    value = json.loads(body).get("annotations")
    return value if isinstance(value, dict) and value else None


def media_type_of(body: bytes) -> str:
    """The media type of a stored manifest that was not pushed over the API (a local build)."""
    value = json.loads(body).get("mediaType")
    return value if isinstance(value, str) and value else OCI_MANIFEST
