"""Fixtures for the engines that run a server (vllm, tensorrt_llm): the stand-in server
(openai_server_standin.py) on PATH as `vllm` and `trtllm-serve`, a model directory and adapters it
accepts, and an engine loaded on it with short timings."""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
from safetensors.numpy import save_file

from clowderd.engines.base import GenerateRequest
from tests.engine_fixtures import Answer, LoopThread, collect

STANDIN = Path(__file__).with_name("openai_server_standin.py")
CONTEXT = 64  # the stand-in model's max_position_embeddings, in stand-in tokens (words)
# an engine that notices a dead server and restarts it within a second
FAST = dict(health_interval=0.1, health_timeout=2.0, restart_backoff=0.1, stop_timeout=3.0, startup_timeout=60.0)


@dataclass
class StandIn:
    """The stand-in's bin directory (on PATH while the test runs), its control files and its record."""
    bin_dir: Path
    control_dir: Path
    record: Path

    def ask(self, behaviour: str, value: float | str = "") -> None:
        (self.control_dir / behaviour).write_text(str(value))

    def stop_asking(self, behaviour: str) -> None:
        (self.control_dir / behaviour).unlink(missing_ok=True)

    def starts(self) -> list[dict]:
        """One entry per server started: {"flavor", "argv", "pid", "env", "options"}."""
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines()]


@pytest.fixture(name="standin")
def standin_fixture(tmp_path, monkeypatch) -> StandIn:
    bin_dir, control_dir = tmp_path / "bin", tmp_path / "standin-control"
    bin_dir.mkdir()
    control_dir.mkdir()
    for command, flavor in (("vllm", "vllm"), ("trtllm-serve", "trtllm")):
        wrapper = bin_dir / command
        wrapper.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(STANDIN))} {flavor} "
                           '"$@"\n')
        wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("STANDIN_CONTROL", str(control_dir))
    monkeypatch.setenv("STANDIN_RECORD", str(tmp_path / "standin-starts.jsonl"))
    return StandIn(bin_dir, control_dir, tmp_path / "standin-starts.jsonl")


def write_adapter(path: Path, rank: int = 8, weights: bool = True) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "stand-in"}))
    if weights:
        save_file({"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((rank, 4), np.float32)},
                  str(path / "adapter_model.safetensors"))
    return path


def write_model(root: Path) -> Path:
    """A model directory the stand-in loads (config.json, a small safetensors file), with LoRA adapters
    a and b (rank 8) under adapters/."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                  "max_position_embeddings": CONTEXT}))
    save_file({"model.embed_tokens.weight": np.zeros((8, 4), np.float32)}, str(root / "model.safetensors"))
    for name in ("a", "b"):
        write_adapter(root / "adapters" / name)
    return root


@pytest.fixture(name="standin_model", scope="session")
def standin_model_fixture(tmp_path_factory) -> Path:
    """A model directory for the stand-in (read-only: copy it to change it)."""
    return write_model(tmp_path_factory.mktemp("standin-models") / "model")


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def corrupt_weights(model_dir: Path) -> None:
    (model_dir / "model.safetensors").write_bytes(b"\xff" * 64)


@dataclass
class Served:
    """An engine loaded in this process, and the loop its requests run on."""
    engine: object
    loop: LoopThread

    def run(self, coro, timeout: float = 60):
        return self.loop.run(coro, timeout)

    def generate(self, **fields) -> Answer:
        return self.run(collect(self.engine, GenerateRequest(**fields)))


@contextlib.contextmanager
def served(engine_cls, model_dir: Path, adapters: dict | None = None, params: dict | None = None, **timings):
    """Load an engine of `engine_cls` on the stand-in; unload it at the end."""
    engine = engine_cls()
    for key, value in {**FAST, **timings}.items():
        setattr(engine, key, value)
    loop = LoopThread()
    try:
        engine.load(model_dir, adapters or {}, params or {})
        yield Served(engine, loop)
    finally:
        engine.unload()
        loop.close()


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group `pgid`."""
    members = []
    for proc in psutil.process_iter(["status"]):
        with contextlib.suppress(ProcessLookupError, psutil.Error):
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
    return members


def assert_gone(pid: int, timeout: float = 10.0) -> None:
    """The server `pid` and every process of its group have exited."""
    deadline = time.monotonic() + timeout
    while group_members(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert group_members(pid) == [], f"processes of the server's group {pid} are still running"
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def wait_for(predicate, timeout: float = 20.0, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
