"""The engine host as a process: load failures, crashes, unload, and never outliving the worker."""
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from clowderd.engines.base import GenerateRequest
from clowderd.engines.client import EngineClient
from clowderd.engines.errors import EngineCrashed, EngineError, EngineUnavailable, ModelLoadError
from tests.engine_fixtures import LoopThread, running_host


def start(model_dir, engine="transformers"):
    loop = LoopThread()
    client = EngineClient(engine, model_dir)
    try:
        loop.run(client.start())
    finally:
        loop.close()
    return client


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("adapters"))
    return dst


async def stream_then(client: EngineClient, act) -> None:
    """Stream a long generation and call act() once its third piece has arrived."""
    n = 0
    async for _ in client.generate(GenerateRequest(prompt="go", max_tokens=2000, temperature=0, ignore_eos=True)):
        n += 1
        if n == 3:
            act()


def test_killing_the_host_mid_stream_fails_the_stream_with_the_exit_status(tiny_chat_llama):
    with running_host(tiny_chat_llama) as host:
        client = host.client
        with pytest.raises(EngineCrashed, match=r"exited with status -9 \(killed by SIGKILL\); last stderr lines") as e:
            host.run(stream_then(client, lambda: os.kill(client.pid, signal.SIGKILL)), timeout=30)
        assert e.value.exit_status == -9
        assert client.returncode == -9
        assert host.run(client.health()) == {"status": "exited", "exit_status": -9}
        with pytest.raises(EngineCrashed):
            host.run(client.metrics())


def test_unload_ends_the_host_with_status_zero(tiny_chat_llama):
    loop = LoopThread()
    client = EngineClient("transformers", tiny_chat_llama)
    try:
        loop.run(client.start())
        assert loop.run(client.unload()) == 0
    finally:
        loop.close()


def test_unloading_the_host_mid_stream_ends_the_stream_with_an_error(tiny_chat_llama):
    with running_host(tiny_chat_llama) as host:
        client = host.client
        with pytest.raises(EngineError, match="was unloaded"):  # at once, not after a wait for ever
            host.run(stream_then(client, lambda: asyncio.get_running_loop().create_task(client.unload())), timeout=30)
        assert client.returncode == 0


def test_missing_weights_are_reported_naming_the_directory(tiny_chat_llama, tmp_path):
    model = copy_model(tiny_chat_llama, tmp_path / "m")
    (model / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=f"{model}: no \\*.safetensors weights"):
        start(model)


def test_corrupt_weights_are_reported_naming_the_directory(tiny_chat_llama, tmp_path):
    model = copy_model(tiny_chat_llama, tmp_path / "m")
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])
    with pytest.raises(ModelLoadError, match=f"{model}: cannot load the model: "):
        start(model)


def test_missing_model_directory_is_reported(tmp_path):
    with pytest.raises(ModelLoadError, match="no such model directory"):
        start(tmp_path / "absent")


def test_unknown_engine_name_is_refused_without_starting_a_process(tiny_chat_llama):
    with pytest.raises(EngineUnavailable, match="unknown engine 'llamafile'; known engines: tensorrt_llm, "
                                                "transformers, vllm"):
        start(tiny_chat_llama, engine="llamafile")


@pytest.mark.parametrize("engine, package", [("vllm", "vllm"), ("tensorrt_llm", "tensorrt_llm")])
def test_known_engine_without_its_package_is_reported_not_installed(tiny_chat_llama, engine, package):
    import importlib.util
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    with pytest.raises(EngineUnavailable, match=f"engine '{engine}' is not installed on this node"):
        start(tiny_chat_llama, engine=engine)


def test_host_exits_when_its_parent_dies(tiny_chat_llama):
    worker = textwrap.dedent(f"""
        import asyncio, sys
        from clowderd.engines.client import EngineClient
        async def main():
            client = EngineClient("transformers", {str(tiny_chat_llama)!r})
            await client.start()
            print(client.pid, flush=True)
            await asyncio.sleep(600)
        asyncio.run(main())
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    parent = subprocess.Popen([sys.executable, "-c", worker], stdout=subprocess.PIPE, env=env, text=True)
    try:
        host_pid = int(parent.stdout.readline())
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 5
        while alive(host_pid):
            assert time.monotonic() < deadline, f"engine host {host_pid} outlived its parent"
            time.sleep(0.05)
    finally:
        parent.kill()
        parent.wait()


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for a reaper."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_killing_a_host_that_is_still_loading_ends_the_start_at_once(tiny_chat_llama):
    import asyncio

    from clowderd.engines.errors import EngineError

    async def start_then_kill():
        client = EngineClient("transformers", tiny_chat_llama)
        starting = asyncio.create_task(client.start())
        while client.proc is None:
            await asyncio.sleep(0.01)
        await client.kill()
        t = time.monotonic()
        with pytest.raises(EngineError, match="stopped before it had loaded"):
            await starting
        return time.monotonic() - t

    loop = LoopThread()
    try:
        assert loop.run(start_then_kill()) < 5.0
    finally:
        loop.close()
