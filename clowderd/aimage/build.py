"""Build an aimage from a Clowderfile into a node's content store.

Everything that can be checked is checked before the first byte is written: the name, the
Clowderfile, every safetensors header, each adapter against its base, the configuration, and the
free space. Then each file is ingested (tensor boundaries forced as chunk cuts, so a fine-tune or a
re-ordered file shares the chunks of the tensors it did not change), the configuration and the
manifest are stored, and the name is pointed at the manifest last: a build that fails leaves no
name, and the content it had written is unreferenced, which gc removes.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from clowderd.aimage import mediatypes as mt
from clowderd.aimage.adapter import check_adapter_matches_base, scan_adapter_dir
from clowderd.aimage.clowderfile import Clowderfile
from clowderd.aimage.config import canonical_json
from clowderd.aimage.manifest import Descriptor, build_manifest, model_digest, parse_manifest
from clowderd.aimage.modeldir import ModelFile, scan_model_dir
from clowderd.aimage.safetensors import read_header, tensor_boundaries
from clowderd.errors import InvalidInput
from clowderd.store.content import ContentStore
from clowderd.store.images import ImageIndex, normalize_name

# progress(event, what, size): event is 'start' or 'done'; size 0 when unknown.
Progress = Callable[[str, str, int], None]


@dataclass
class LayerResult:
    descriptor: Descriptor
    new: bool
    stored_bytes: int


@dataclass
class BuildResult:
    name: str
    manifest_digest: str
    layers: list[LayerResult] = field(default_factory=list)

    @property
    def logical_bytes(self) -> int:
        return sum(layer.descriptor.size for layer in self.layers)

    @property
    def stored_bytes(self) -> int:
        return sum(layer.stored_bytes for layer in self.layers)


def _no_progress(event: str, filepath: str, size: int) -> None:
    pass


def build(store: ContentStore, cf: Clowderfile, name: str, progress: Progress = _no_progress) -> BuildResult:
    name = normalize_name(name)
    index = ImageIndex(store)
    with store.shared_lock(), tempfile.TemporaryDirectory(dir=store.tmp_dir, prefix="build-") as scratch:
        base_files, inherited, base_config = _resolve_base(store, index, cf, Path(scratch), progress)
        adapters = [scan_adapter_dir(a.path, a.name) for a in cf.adapters]
        inherited_names = {d.annotations.get(mt.ANNOTATION_EP_NAME) for d in inherited if d.media_type in mt.EP_LAYER_TYPES}
        for adapter in adapters:
            if adapter.name in inherited_names:
                raise InvalidInput(f"{cf.path}: adapters: {adapter.name!r} is already an EP layer of the base image")
            check_adapter_matches_base(adapter, [f.file for f in base_files])
        config = cf.config if (cf.config_given or base_config is None) else base_config
        to_ingest = [f.file for f in base_files if not (f.digest or f.owned)] + [f for a in adapters for f in a.files]
        store.check_free_space(sum(f.size for f in to_ingest), f"the files of {name}")

        result = BuildResult(name, "")
        model_layers = [d for d in inherited if d.media_type in mt.MODEL_LAYER_TYPES]
        for f in base_files:
            if f.digest:
                continue
            layer = _ingest(store, f.file, f.file.relpath, {}, progress, move=f.owned)
            result.layers.append(layer)
            model_layers.append(layer.descriptor)
        base_id = model_digest(model_layers)
        ep_layers = [d for d in inherited if d.media_type in mt.EP_LAYER_TYPES]
        for adapter in adapters:
            for f in adapter.files:
                ann = {mt.ANNOTATION_EP_NAME: adapter.name, mt.ANNOTATION_EP_BASE: base_id}
                layer = _ingest(store, f, f"adapters/{adapter.name}/{f.relpath}", ann, progress, f.relpath)
                result.layers.append(layer)
                ep_layers.append(layer.descriptor)

        config_blob = store.ingest_bytes(canonical_json(config))
        config_desc = Descriptor(mt.AIMAGE_CONFIG, config_blob.info.digest, config_blob.info.size)
        manifest = build_manifest(config_desc, model_layers + ep_layers, cf.annotations)
        result.manifest_digest = index.add_manifest(manifest, mt.AIMAGE_ARTIFACT)
        index.tag(name, result.manifest_digest)
        return result


@dataclass
class _BaseFile:
    """A model file of the base: either on disk (to ingest) or already in the store (digest)."""

    file: ModelFile
    digest: str = ""
    owned: bool = False  # written by this build (a GGUF conversion): moved into the store, not copied


def _resolve_base(store: ContentStore, index: ImageIndex, cf: Clowderfile, scratch: Path, progress: Progress):
    """The base's model files as ModelFile (for adapter checks), the descriptors inherited from a
    base image, and the base image's configuration (None for a directory or GGUF base)."""
    kind, value = cf.base.kind, cf.base.value
    if kind == "dir":
        return [_BaseFile(f) for f in scan_model_dir(value)], [], None
    if kind == "gguf":
        from clowderd.aimage.gguf import convert_gguf

        shown = f"converting {value.name}"
        progress("start", shown, 0)
        converted = convert_gguf(value, scratch / "model")
        progress("done", shown, 0)
        return [_BaseFile(f, owned=True) for f in scan_model_dir(converted)], [], None
    manifest_digest = index.resolve(str(value))
    manifest = parse_manifest(index.manifest_bytes(manifest_digest), f"image {value}")
    files = []
    for d in manifest.model_layers:
        path = store.path(d.digest)
        files.append(_BaseFile(ModelFile(d.filepath, path, d.media_type, d.size), d.digest))
    config = json.loads(store.read_bytes(manifest.config.digest))
    return files, list(manifest.layers), config


def _ingest(store: ContentStore, f: ModelFile, shown: str, annotations: dict, progress: Progress,
            filepath: str | None = None, move: bool = False) -> LayerResult:
    progress("start", shown, f.size)
    cuts = tensor_boundaries(read_header(f.abspath)) if f.relpath.endswith(".safetensors") else ()
    res = store.ingest_temp_file(f.abspath, cuts) if move else store.ingest_file(f.abspath, cuts)
    progress("done", shown, f.size)
    ann = {mt.ANNOTATION_FILEPATH: filepath or f.relpath, **annotations}
    return LayerResult(Descriptor(f.media_type, res.info.digest, res.info.size, ann), res.new, res.stored_bytes)

