"""Engines by name. "transformers" is embedded; "vllm" and "tensorrt_llm" are known names whose wrappers
come later: until then they are reported as not installed (or not yet wrapped) on this node."""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

from clowderd.engines.base import Engine
from clowderd.engines.errors import EngineUnavailable


@dataclass(frozen=True)
class EngineSpec:
    name: str
    packages: tuple[str, ...]   # import names that must be installed
    install_hint: str
    factory: str | None         # "module:Class", None while there is no wrapper


ENGINES: dict[str, EngineSpec] = {s.name: s for s in (
    EngineSpec("transformers", ("torch", "transformers"), "pip install 'clowder[engine]'",
               "clowderd.engines.transformers_engine:TransformersEngine"),
    EngineSpec("vllm", ("vllm",), "pip install 'clowder[vllm]'", None),
    EngineSpec("tensorrt_llm", ("tensorrt_llm",), "pip install 'clowder[tensorrt-llm]'", None),
)}


def check_engine(name: str) -> EngineSpec:
    """The engine's spec when it can run on this node; EngineUnavailable saying why not otherwise."""
    spec = ENGINES.get(name)
    if spec is None:
        raise EngineUnavailable(f"unknown engine {name!r}; known engines: {', '.join(sorted(ENGINES))}")
    missing = [p for p in spec.packages if importlib.util.find_spec(p) is None]
    if missing:
        raise EngineUnavailable(f"engine {name!r} is not installed on this node (missing "
                                f"{', '.join(missing)}): {spec.install_hint}")
    if spec.factory is None:
        raise EngineUnavailable(f"engine {name!r} is installed on this node but clowder has no wrapper for "
                                "it yet")
    return spec


def create_engine(name: str) -> Engine:
    module, cls = check_engine(name).factory.split(":")
    return getattr(importlib.import_module(module), cls)()
