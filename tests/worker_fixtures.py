"""Aimages of tiny chat llamas built into a node's store, and a worker clowderd serving that store: for the
tests of the worker and of the lb in front of it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from clowderd.aimage.build import build
from clowderd.aimage.clowderfile import load_clowderfile
from clowderd.aimage.config import canonical_json
from clowderd.aimage.manifest import parse_manifest
from clowderd.store.content import ContentStore
from clowderd.store.images import ImageIndex
from tests.clowderd_proc import ClowderdProcess, _default_config
from tests.engine_fixtures import write_tiny_adapter, write_tiny_chat_llama

CPU_ENGINE = {"name": "transformers", "transformers": {"device": "cpu", "dtype": "float32"}}


@dataclass
class Image:
    name: str
    digest: str
    adapters: dict[str, list[str]]  # EP name -> digests of its layers
    model_digest: str  # selects the base model alone


def build_chat_image(store_dir: Path, models: Path, name: str, *, seed: int = 0,
                     adapter: str | None = None, adapter_seed: int = 1, shape: dict | None = None) -> Image:
    """Build a tiny chat llama (with one LoRA EP layer when adapter names it; `shape` overrides the
    tiny one) into the store."""
    model = models / (f"model-{seed}" + "".join(f"-{k}{v}" for k, v in sorted((shape or {}).items())))
    if not model.exists():
        write_tiny_chat_llama(model, seed=seed, **(shape or {}))
    recipe = {"base": str(model), "config": {"engine": CPU_ENGINE}}
    if adapter:
        path = write_tiny_adapter(models / f"{adapter}-{seed}-{adapter_seed}", model, seed=adapter_seed)
        recipe["adapters"] = [{"name": adapter, "path": str(path)}]
    clowderfile = models / f"Clowderfile-{name.replace(':', '-')}"
    clowderfile.write_text(json.dumps(recipe))  # JSON is YAML
    store = ContentStore(store_dir)
    try:
        digest = build(store, load_clowderfile(clowderfile), name).manifest_digest
        manifest = parse_manifest(ImageIndex(store).manifest_bytes(digest), name)
        adapters = {ep: [d.digest for d in layers] for ep, layers in manifest.ep_layers.items()}
    finally:
        store.close()
    return Image(name, digest, adapters, manifest.model_digest)


def with_configuration(store_dir: Path, image: Image, name: str, config: dict) -> Image:
    """The image's manifest with another configuration, stored as is: the way an image pulled
    from elsewhere could arrive, unchecked by this node's build."""
    store = ContentStore(store_dir)
    try:
        index = ImageIndex(store)
        doc = json.loads(index.manifest_bytes(image.digest))
        blob = canonical_json(config)
        doc["config"].update(digest=store.ingest_bytes(blob).info.digest, size=len(blob))
        digest = index.add_manifest(json.dumps(doc).encode(), doc.get("artifactType", ""))
        index.tag(name, digest)
    finally:
        store.close()
    return Image(name, digest, image.adapters, image.model_digest)


def start_worker(workdir: Path, data_dir: Path) -> ClowderdProcess:
    config = _default_config(workdir, ("worker",))
    config["data_dir"] = str(data_dir)
    proc = ClowderdProcess(workdir, config, ("worker",))
    proc.wait_ready()
    return proc
