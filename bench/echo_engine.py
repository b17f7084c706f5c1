"""A benchmark fixture, not a model: an engine that answers at once with the caller's last message, word
by word, so that what a benchmark measures is Clowder's own path (lb, middleware, worker, engine host).
With the engine parameter `tokens_per_second` it paces its words as a model decodes, a word a token.

The benchmarks install it as an engine plugin named "echo" (entry point group clowder.engines)."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import AsyncIterator

from clowderd.engines.base import Engine, Event, Finished, GenerateRequest, TextDelta, Usage
from clowderd.engines.errors import AdapterError


class EchoEngine(Engine):
    name = "echo"

    def __init__(self):
        self.adapters: dict[str, Path] = {}
        self.finished = 0
        self.pace = 0.0  # words a second; 0: all at once

    def load(self, model_dir: Path, ep_layers: dict[str, Path], params: dict) -> None:
        self.adapters = dict(ep_layers)
        self.pace = float(params.get("tokens_per_second", 0))

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Event]:
        request.validate()
        text = request.prompt if request.prompt is not None else request.messages[-1]["content"]
        words = text.split(" ")
        if request.max_tokens is not None:
            words = words[:request.max_tokens]
        start = time.perf_counter()
        for i, word in enumerate(words):
            if self.pace:
                due = start + i / self.pace - time.perf_counter()
                if due > 0:
                    await asyncio.sleep(due)
            yield TextDelta(word if i == 0 else " " + word)
        self.finished += 1
        yield Finished("length" if request.max_tokens == len(words) else "stop",
                       Usage(prompt_tokens=len(text.split()), completion_tokens=len(words)))

    def cancel(self, request_id: str) -> None:
        pass  # each answer is sent at once

    def add_adapter(self, name: str, path: Path) -> None:
        if name in self.adapters:
            raise AdapterError(f"adapter {name!r} is already loaded")
        self.adapters[name] = path

    def remove_adapter(self, name: str) -> None:
        if self.adapters.pop(name, None) is None:
            raise AdapterError(f"adapter {name!r} is not loaded")

    def health(self) -> dict:
        return {"status": "ok"}

    def metrics(self) -> dict:
        return {"requests_running": 0, "requests_waiting": 0, "requests_finished": self.finished,
                "requests_cancelled": 0, "prompt_tokens": 0, "generation_tokens": 0,
                "adapters": sorted(self.adapters)}

    def unload(self) -> None:
        self.adapters.clear()


def install_as_plugin(site: Path) -> Path:
    """Make `site` a directory that, on PYTHONPATH, installs this engine as the plugin "echo": a
    distribution's metadata with its entry point, and this module beside it. Returns `site`."""
    import shutil

    site.mkdir(parents=True, exist_ok=True)
    shutil.copy(__file__, site / "clowder_echo_engine.py")
    info = site / "clowder_echo_engine-0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: clowder-echo-engine\nVersion: 0\n")
    (info / "entry_points.txt").write_text("[clowder.engines]\necho = clowder_echo_engine:EchoEngine\n")
    return site
