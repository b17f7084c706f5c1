"""The aimage manifest: an OCI image manifest v1.1 whose layers are model files and EP layers."""

import hashlib
import json
from dataclasses import dataclass, field

from clowderd.aimage import mediatypes as mt
from clowderd.aimage.adapter import validate_adapter_name
from clowderd.aimage.config import canonical_json
from clowderd.aimage.reference import validate_digest
from clowderd.errors import InvalidInput


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    artifact_type: str | None = None

    @property
    def filepath(self) -> str | None:
        return self.annotations.get(mt.ANNOTATION_FILEPATH)

    def to_json(self) -> dict:
        obj = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            obj["annotations"] = dict(self.annotations)
        if self.artifact_type:
            obj["artifactType"] = self.artifact_type
        return obj

    @classmethod
    def from_json(cls, obj: object, where: str) -> "Descriptor":
        """Parse an OCI descriptor; `where` prefixes errors (e.g. 'manifest.json: layers[2]').
        Unknown properties (urls, data, platform) are ignored, as the OCI spec requires."""
        if not isinstance(obj, dict):
            raise InvalidInput(f"{where}: a descriptor must be a JSON object")
        media_type, digest, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
        if not isinstance(media_type, str) or not media_type:
            raise InvalidInput(f"{where}.mediaType: must be a non-empty string")
        if not isinstance(digest, str):
            raise InvalidInput(f"{where}.digest: must be a string")
        try:
            validate_digest(digest)
        except InvalidInput as exc:
            raise InvalidInput(f"{where}.digest: {exc}") from None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidInput(f"{where}.size: must be a non-negative integer, not {size!r}")
        annotations = obj.get("annotations", {})
        if not isinstance(annotations, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()):
            raise InvalidInput(f"{where}.annotations: must map strings to strings")
        artifact_type = obj.get("artifactType")
        if artifact_type is not None and not isinstance(artifact_type, str):
            raise InvalidInput(f"{where}.artifactType: must be a string")
        return cls(media_type, digest, size, dict(annotations), artifact_type)


@dataclass(frozen=True)
class Manifest:
    config: Descriptor
    layers: list[Descriptor]
    annotations: dict[str, str]

    @property
    def model_layers(self) -> list[Descriptor]:
        return [d for d in self.layers if d.media_type in mt.MODEL_LAYER_TYPES]

    @property
    def ep_layers(self) -> dict[str, list[Descriptor]]:
        """EP layers grouped by adapter name, names sorted."""
        groups: dict[str, list[Descriptor]] = {}
        for d in self.layers:
            if d.media_type in mt.EP_LAYER_TYPES:
                groups.setdefault(d.annotations[mt.ANNOTATION_EP_NAME], []).append(d)
        return dict(sorted(groups.items()))

    @property
    def model_digest(self) -> str:
        return model_digest(self.model_layers)


def model_digest(model_layers: list[Descriptor]) -> str:
    """Identity of a base model: sha256 of the canonical JSON list of [filepath, digest] of its weight
    and weight-config layers, sorted by filepath. Documents (README, LICENSE) and the Configuration do
    not count, so editing them does not orphan the adapters trained on the model."""
    pairs = sorted([d.filepath, d.digest] for d in model_layers if d.media_type != mt.MODEL_DOC)
    return "sha256:" + hashlib.sha256(canonical_json(pairs)).hexdigest()


def build_manifest(config: Descriptor, layers: list[Descriptor], annotations: dict[str, str]) -> bytes:
    """The canonical bytes of an aimage manifest. Layers are ordered model files by path, then EP layers
    by adapter name and path, so the same content always gives the same digest. No timestamps."""
    def order(d: Descriptor) -> tuple:
        return (d.media_type in mt.EP_LAYER_TYPES, d.annotations.get(mt.ANNOTATION_EP_NAME, ""),
                d.filepath or "", d.media_type, d.digest)

    obj = {
        "schemaVersion": mt.OCI_SCHEMA_VERSION,
        "mediaType": mt.OCI_MANIFEST,
        "artifactType": mt.AIMAGE_ARTIFACT,
        "config": config.to_json(),
        "layers": [d.to_json() for d in sorted(layers, key=order)],
    }
    if annotations:
        obj["annotations"] = dict(annotations)
    data = canonical_json(obj)
    parse_manifest(data, "new manifest")
    return data


def parse_manifest(data: bytes, source: str) -> Manifest:
    """Parse and check an aimage manifest; InvalidInput names the source and the field."""
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"{source}: not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidInput(f"{source}: a manifest must be a JSON object")
    if obj.get("schemaVersion") != mt.OCI_SCHEMA_VERSION or isinstance(obj.get("schemaVersion"), bool):
        raise InvalidInput(f"{source}: schemaVersion: must be 2, not {obj.get('schemaVersion')!r}")
    if obj.get("mediaType") != mt.OCI_MANIFEST:
        raise InvalidInput(f"{source}: mediaType: {obj.get('mediaType')!r} is not an OCI image manifest "
                           f"({mt.OCI_MANIFEST})")
    if obj.get("artifactType") != mt.AIMAGE_ARTIFACT:
        raise InvalidInput(f"{source}: artifactType: this is not an aimage ({obj.get('artifactType')!r}, "
                           f"expected {mt.AIMAGE_ARTIFACT})")
    config = Descriptor.from_json(obj.get("config"), f"{source}: config")
    if config.media_type != mt.AIMAGE_CONFIG:
        raise InvalidInput(f"{source}: config.mediaType: {config.media_type!r}, expected {mt.AIMAGE_CONFIG}")
    raw_layers = obj.get("layers")
    if not isinstance(raw_layers, list):
        raise InvalidInput(f"{source}: layers: must be an array")
    layers = [Descriptor.from_json(d, f"{source}: layers[{i}]") for i, d in enumerate(raw_layers)]
    annotations = obj.get("annotations", {})
    if not isinstance(annotations, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()):
        raise InvalidInput(f"{source}: annotations: must map strings to strings")
    manifest = Manifest(config, layers, dict(annotations))
    _check_layers(manifest, source)
    return manifest


def check_filepath(path: object, where: str) -> str:
    """A layer's file path must stay inside the directory it is unpacked to."""
    if not isinstance(path, str) or not path:
        raise InvalidInput(f"{where}: {mt.ANNOTATION_FILEPATH} annotation is missing")
    if path.startswith("/") or "\\" in path or "\0" in path or any(
            segment in ("", ".", "..") for segment in path.split("/")):
        raise InvalidInput(f"{where}: {mt.ANNOTATION_FILEPATH} {path!r} must be a relative path inside "
                           "the model directory")
    return path


def _check_layers(manifest: Manifest, source: str) -> None:
    model_paths: set[str] = set()
    adapter_paths: dict[str, set[str]] = {}
    adapter_types: dict[str, set[str]] = {}
    for i, d in enumerate(manifest.layers):
        where = f"{source}: layers[{i}]"
        if d.media_type in mt.MODEL_LAYER_TYPES:
            seen = model_paths
        elif d.media_type in mt.EP_LAYER_TYPES:
            name = d.annotations.get(mt.ANNOTATION_EP_NAME)
            try:
                validate_adapter_name(name)
            except InvalidInput as exc:
                raise InvalidInput(f"{where}: {mt.ANNOTATION_EP_NAME}: {exc}") from None
            seen = adapter_paths.setdefault(name, set())
            adapter_types.setdefault(name, set()).add(d.media_type)
        else:
            raise InvalidInput(f"{where}.mediaType: unknown layer type {d.media_type!r} (an aimage holds "
                               "model layers and EP layers only)")
        path = check_filepath(d.filepath, where)
        if path in seen:
            raise InvalidInput(f"{where}: {path} appears twice")
        seen.add(path)
    if not manifest.model_layers:
        raise InvalidInput(f"{source}: layers: an aimage needs at least one model layer")
    if not any(d.media_type == mt.MODEL_WEIGHT for d in manifest.model_layers):
        raise InvalidInput(f"{source}: layers: no weight layer ({mt.MODEL_WEIGHT})")
    base = manifest.model_digest
    for i, d in enumerate(manifest.layers):
        if d.media_type in mt.EP_LAYER_TYPES:
            found = d.annotations.get(mt.ANNOTATION_EP_BASE)
            if found is None:
                raise InvalidInput(f"{source}: layers[{i}]: {mt.ANNOTATION_EP_BASE} annotation is missing")
            if found != base:
                raise InvalidInput(f"{source}: layers[{i}]: adapter {d.annotations[mt.ANNOTATION_EP_NAME]!r} "
                                   f"was built for base {found}, but this aimage's model is {base}")
    for name, types in sorted(adapter_types.items()):
        if types != mt.EP_LAYER_TYPES:
            raise InvalidInput(f"{source}: adapter {name!r} needs both an {mt.EP_CONFIG} and an "
                               f"{mt.EP_WEIGHT} layer")
