"""Engines by name, and whether each can run on this node.

"transformers" is embedded: it runs in the engine host and needs its Python packages there. "vllm" and
"tensorrt_llm" run their own server program as a child of the engine host: they need that executable,
found on PATH or named by the engine parameter `command`, and no package in clowder's environment.
Other engines install as plugins (entry point group "clowder.engines").
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from importlib.metadata import entry_points

from clowderd.engines.base import Engine
from clowderd.engines.errors import EngineUnavailable


ENTRY_POINT_GROUP = "clowder.engines"


@dataclass(frozen=True)
class EngineSpec:
    name: str
    factory: str                      # "module:Class"
    install_hint: str
    packages: tuple[str, ...] = ()    # import names the engine host needs
    executable: str | None = None     # the server program the engine runs, when it runs one


ENGINES: dict[str, EngineSpec] = {s.name: s for s in (
    EngineSpec("transformers", "clowderd.engines.transformers_engine:TransformersEngine",
               "pip install 'clowder[engine]'", packages=("torch", "transformers")),
    EngineSpec("vllm", "clowderd.engines.vllm_engine:VllmEngine", "pip install 'clowder[vllm]'",
               executable="vllm"),
    EngineSpec("tensorrt_llm", "clowderd.engines.tensorrt_llm_engine:TensorRTLLMEngine",
               "pip install 'clowder[tensorrt-llm]'", executable="trtllm-serve"),
)}


def check_engine(name: str, params: dict | None = None) -> EngineSpec:
    """The engine's spec when it can run on this node; EngineUnavailable saying why not otherwise.
    `params` are the engine parameters, whose `command` may name the server program."""
    spec = _known(name)
    _check_packages(spec)
    if spec.executable is not None:
        server_executable(spec, params or {})
    return spec


def server_executable(spec: EngineSpec, params: dict) -> str:
    """The path of the engine's server program: the `command` parameter, else its usual name on PATH."""
    command = params.get("command") or spec.executable
    if not isinstance(command, str):
        raise EngineUnavailable(f"engine {spec.name!r}: `command` must be a string, not {command!r}")
    path = shutil.which(command)
    if path is None:
        where = "" if os.sep in command else " on PATH"
        raise EngineUnavailable(f"engine {spec.name!r} is not installed on this node (no `{command}` executable"
                                f"{where}): {spec.install_hint}")
    return path


def create_engine(name: str) -> Engine:
    """A new engine object. An engine that runs a server finds its program when it loads, because its
    parameters may name it."""
    spec = _known(name)
    _check_packages(spec)
    module, cls = spec.factory.split(":")
    return getattr(importlib.import_module(module), cls)()


def installed_engines() -> dict[str, EngineSpec]:
    """The built-in engines and those installed as plugins: an Engine class registered under the entry
    point group "clowder.engines" as `NAME = "module:Class"` (a built-in name cannot be taken)."""
    plugins = {ep.name: EngineSpec(ep.name, ep.value, f"reinstall the package that provides {ep.value}")
               for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in ENGINES}
    return {**plugins, **ENGINES}


def _known(name: str) -> EngineSpec:
    engines = installed_engines()
    spec = engines.get(name)
    if spec is None:
        raise EngineUnavailable(f"unknown engine {name!r}; known engines: {', '.join(sorted(engines))}")
    return spec


def _check_packages(spec: EngineSpec) -> None:
    missing = [p for p in spec.packages if importlib.util.find_spec(p) is None]
    if missing:
        raise EngineUnavailable(f"engine {spec.name!r} is not installed on this node (missing "
                                f"{', '.join(missing)}): {spec.install_hint}")
