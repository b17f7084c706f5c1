"""Engines installed as plugins (entry point group clowder.engines): named in an aimage configuration,
run by the engine host like the built-in ones; a name that no engine has is refused with a suggestion."""
from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from clowderd.aimage.config import load_config
from clowderd.engines.base import Finished, GenerateRequest, TextDelta
from clowderd.engines.client import EngineClient
from clowderd.engines.registry import installed_engines
from clowderd.errors import InvalidInput

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from echo_engine import install_as_plugin  # noqa: E402


@pytest.fixture
def echo_plugin(tmp_path, monkeypatch):
    site = install_as_plugin(tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    return site


def test_an_installed_plugin_engine_is_known_and_configurable(echo_plugin):
    assert installed_engines()["echo"].factory == "clowder_echo_engine:EchoEngine"
    config = load_config({"engine": {"name": "echo", "echo": {"anything": 1}}}, "config.json")
    assert config["engine"]["name"] == "echo"
    with pytest.raises(InvalidInput) as e:
        load_config({"engine": {"name": "ecko"}}, "config.json")
    assert "'ecko' is not one of the engines installed here" in str(e.value) and "did you mean 'echo'" in str(e.value)
    with pytest.raises(InvalidInput) as e:
        load_config({"engine": {"transfomers": {}}}, "config.json")
    assert "engine.transfomers: unknown field" in str(e.value) and "'transformers'" in str(e.value)


def test_the_engine_host_runs_a_plugin_engine(echo_plugin, tmp_path):
    async def main():
        async with EngineClient("echo", tmp_path, env=dict(os.environ)) as client:
            events = [e async for e in client.generate(GenerateRequest(prompt="say it back", max_tokens=5))]
        return events
    events = asyncio.run(main())
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "say it back"
    assert isinstance(events[-1], Finished) and events[-1].usage.completion_tokens == 3
