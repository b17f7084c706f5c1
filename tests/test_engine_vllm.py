"""The vllm engine against the stand-in for `vllm serve` (tests/openai_server_standin.py) at the process
boundary: the command line, adapters loaded at run time, streaming, errors, restarts, no process left."""
import asyncio
import os
import signal

import httpx
import psutil
import pytest

from clowderd.engines.base import Finished, GenerateRequest, TextDelta
from clowderd.engines.client import EngineClient
from clowderd.engines.errors import AdapterError, EngineError, EngineUnavailable, InvalidRequest, ModelLoadError
from clowderd.engines.registry import check_engine, create_engine
from clowderd.engines.vllm_engine import VllmEngine
from tests.engine_fixtures import LoopThread, collect
from tests.server_engine_fixtures import assert_gone, copy_model, corrupt_weights, served, wait_for, write_adapter
# fixtures `standin` and `standin_model`
from tests.server_engine_fixtures import standin_fixture, standin_model_fixture  # noqa: F401


def test_completion_streams_tokens_and_usage(standin, standin_model):
    with served(VllmEngine, standin_model) as s:
        assert s.engine.health() == {"status": "ok"}
        answer = s.generate(prompt="hello there world", max_tokens=10)
        assert answer.text == "<base> hello there world"
        assert answer.deltas == ["<base>", " hello", " there", " world"]
        assert (answer.finish_reason, answer.usage.prompt_tokens, answer.usage.completion_tokens) == ("stop", 3, 4)
        cut = s.generate(prompt="one two three four five", max_tokens=2)
        assert (cut.text, cut.finish_reason, cut.usage.completion_tokens) == ("<base> one", "length", 2)


def test_chat_and_sampling_fields_reach_the_server(standin, standin_model):
    with served(VllmEngine, standin_model) as s:
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say stop now please"}]
        answer = s.generate(messages=messages, max_tokens=20, temperature=0.5, top_p=0.9, top_k=40, seed=7,
                            stop=[" now"])
        assert (answer.text, answer.finish_reason) == ("<base> say stop", "stop")
        assert answer.usage.prompt_tokens == (2 + 2) + (4 + 2)


def test_command_line_and_environment_from_engine_params(standin, standin_model):
    params = {"dtype": "bfloat16", "max_model_len": 48, "tensor_parallel_size": 1, "pipeline_parallel_size": 1,
              "gpu_memory_utilization": 0.8, "max_num_seqs": 4, "max_loras": 2, "quantization": "fp8",
              "enforce_eager": True, "max_lora_rank": 32, "extra_args": ["--enable-prefix-caching", "--seed", "3"]}
    with served(VllmEngine, standin_model, params=params) as s:
        assert s.engine.context == 48
    [start] = standin.starts()
    port = start["argv"][start["argv"].index("--port") + 1]
    assert start["argv"] == [
        "serve", str(standin_model), "--host", "127.0.0.1", "--port", port, "--served-model-name", "base",
        "--enable-lora", "--max-lora-rank", "32", "--disable-uvicorn-access-log", "--dtype", "bfloat16",
        "--max-model-len", "48", "--tensor-parallel-size", "1", "--pipeline-parallel-size", "1",
        "--gpu-memory-utilization", "0.8", "--max-num-seqs", "4", "--max-loras", "2", "--quantization", "fp8",
        "--enforce-eager", "--enable-prefix-caching", "--seed", "3"]
    assert start["env"] == {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}


def test_max_lora_rank_fits_the_adapters_given_at_load(standin, standin_model, tmp_path):
    big = write_adapter(tmp_path / "big", rank=40)
    with served(VllmEngine, standin_model, adapters={"big": big}) as s:
        assert s.generate(prompt="hi", adapter="big").text == "<big> hi"
    argv = standin.starts()[0]["argv"]
    assert argv[argv.index("--max-lora-rank") + 1] == "64"
    with pytest.raises(ModelLoadError, match="vllm takes a max_lora_rank among 1, 8, 16, 32, 64, 128, 256, 320, "
                                             "512, not 12"):
        VllmEngine().load(standin_model, {}, {"max_lora_rank": 12})


def test_adapter_added_answers_then_removed_leaves_the_base(standin, standin_model):
    with served(VllmEngine, standin_model) as s:
        s.engine.add_adapter("a", standin_model / "adapters" / "a")
        s.engine.add_adapter("b", standin_model / "adapters" / "b")
        assert s.generate(prompt="bonjour", adapter="a").text == "<a> bonjour"
        assert s.generate(prompt="hallo", adapter="b").text == "<b> hallo"
        assert s.engine.metrics()["adapters"] == ["a", "b"]
        s.engine.remove_adapter("a")
        models = httpx.get(s.engine._base_url + "/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["base", "b"]
        with pytest.raises(InvalidRequest, match="unknown adapter 'a'; loaded: b"):
            s.generate(prompt="bonjour", adapter="a")
        assert s.generate(prompt="bonjour").text == "<base> bonjour"


def test_adapter_errors_name_what_is_wrong(standin, standin_model, tmp_path):
    with served(VllmEngine, standin_model, adapters={"a": standin_model / "adapters" / "a"}) as s:
        with pytest.raises(AdapterError, match="adapter 'a' is already loaded"):
            s.engine.add_adapter("a", standin_model / "adapters" / "b")
        with pytest.raises(AdapterError, match=r"has rank 32, above the max_lora_rank 16 the vllm server was "
                                               r"started with"):
            s.engine.add_adapter("wide", write_adapter(tmp_path / "wide", rank=32))
        with pytest.raises(AdapterError, match="adapter_config.json does not exist"):
            s.engine.add_adapter("empty", tmp_path)
        with pytest.raises(AdapterError, match=r"vllm could not load adapter 'hollow' .*: Loading lora hollow "
                                               r"failed: No adapter found for"):
            s.engine.add_adapter("hollow", write_adapter(tmp_path / "hollow", weights=False))
        with pytest.raises(AdapterError, match="adapter 'zz' is not loaded; loaded: \\['a'\\]"):
            s.engine.remove_adapter("zz")
        assert s.engine.metrics()["adapters"] == ["a"]
        assert s.engine.health() == {"status": "ok"}


def test_requests_the_server_refuses_are_invalid_requests(standin, standin_model):
    with served(VllmEngine, standin_model) as s:
        with pytest.raises(InvalidRequest, match=r"vllm refused the request: This model's maximum context length "
                                                 r"is 64 tokens. However, your request has 70 input tokens"):
            s.generate(prompt="word " * 70)
        with pytest.raises(InvalidRequest, match=r"you requested 1000001 tokens \(1 in the messages, 1000000 in "
                                                 r"the completion\)"):
            s.generate(prompt="hi", max_tokens=1_000_000)
        with pytest.raises(InvalidRequest, match="max_tokens must be a positive integer, not 0"):
            s.generate(prompt="hi", max_tokens=0)
        assert s.generate(prompt="still fine").text == "<base> still fine"
        assert s.engine.health() == {"status": "ok"}


def test_cancel_closes_the_stream_and_the_server_aborts(standin, standin_model):
    standin.ask("token-delay", 0.05)
    with served(VllmEngine, standin_model) as s:
        request = GenerateRequest(prompt="go on and on", max_tokens=50, ignore_eos=True)

        async def cancel_after_two():
            events = []
            async for event in s.engine.generate(request):
                events.append(event)
                if len(events) == 2:
                    s.engine.cancel(request.request_id)
            return events

        events = s.run(cancel_after_two())
        assert all(isinstance(e, TextDelta) for e in events[:-1])
        finished = events[-1]
        assert isinstance(finished, Finished) and finished.finish_reason == "cancelled"
        assert finished.usage.prompt_tokens == 4 and finished.usage.completion_tokens >= 2

        async def leave_early():
            async for _ in s.engine.generate(GenerateRequest(prompt="again", max_tokens=50, ignore_eos=True)):
                break
        s.run(leave_early())

        def aborted():
            text = httpx.get(s.engine._base_url + "/metrics").text
            return 'finished_reason="abort"} 2.0' in text
        wait_for(aborted, what="the server to count both requests as aborted")
        assert s.engine.metrics()["requests_cancelled"] == 2


def test_queue_gauges_come_from_the_server_metrics(standin, standin_model):
    standin.ask("token-delay", 0.05)
    with served(VllmEngine, standin_model, params={"max_num_seqs": 1}) as s:
        async def two_at_once():
            tasks = [asyncio.create_task(collect(s.engine, GenerateRequest(prompt="x", max_tokens=60,
                                                                           ignore_eos=True))) for _ in range(2)]
            while True:
                m = s.engine.metrics()
                if (m["requests_running"], m["requests_waiting"]) == (1, 1):
                    break
                await asyncio.sleep(0.05)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        s.run(two_at_once(), timeout=30)


def test_server_dying_mid_stream_fails_the_request_and_the_restart_reapplies_adapters(standin, standin_model):
    with served(VllmEngine, standin_model, adapters={"a": standin_model / "adapters" / "a"}) as s:
        first = s.engine.server_pid
        standin.ask("die-mid-stream")
        with pytest.raises(EngineError, match=r"^the vllm server \(pid \d+\) was killed by SIGKILL \(during the "
                                              r"request\)$"):
            s.generate(prompt="one two three four five six", adapter="a", max_tokens=20)
        wait_for(lambda: s.engine.health()["status"] == "failed", what="health to report the death")
        assert "was killed by SIGKILL" in s.engine.health()["detail"]
        wait_for(lambda: s.engine.health() == {"status": "ok"}, what="the restarted server")
        assert s.engine.server_pid != first
        assert_gone(first)
        assert s.generate(prompt="back again", adapter="a").text == "<a> back again"
        assert [len(start["argv"]) for start in standin.starts()] == [len(standin.starts()[0]["argv"])] * 2


def test_requests_while_the_server_is_down_fail_at_once(standin, standin_model):
    with served(VllmEngine, standin_model, restart_backoff=30.0) as s:
        os.kill(s.engine.server_pid, signal.SIGKILL)
        wait_for(lambda: s.engine.health()["status"] == "failed", what="health to report the death")
        assert s.engine.health()["detail"].endswith("restarting it in 30 s (1 of 3)")
        with pytest.raises(EngineError, match="the vllm server is not serving: the vllm server .* was killed by "
                                              "SIGKILL; restarting it in 30 s"):
            s.generate(prompt="hello")


def test_restarts_are_bounded_and_the_reason_stays_in_health(standin, standin_model, tmp_path):
    model = copy_model(standin_model, tmp_path / "model")
    with served(VllmEngine, model, max_restarts=2) as s:
        corrupt_weights(model)  # every restart now fails to load
        os.kill(s.engine.server_pid, signal.SIGKILL)
        wait_for(lambda: "gave up" in s.engine.health().get("detail", ""), what="the engine to give up")
        detail = s.engine.health()["detail"]
        assert "exited with status 1 before it answered /health" in detail
        assert detail.endswith("gave up after 2 restarts in a row")
        assert len(standin.starts()) == 3
        for start in standin.starts():
            assert_gone(start["pid"])


def test_an_unresponsive_server_is_restarted(standin, standin_model):
    with served(VllmEngine, standin_model, unhealthy_limit=3) as s:
        first = s.engine.server_pid
        standin.ask("unhealthy")
        wait_for(lambda: s.engine.server_pid != first, what="a restart")
        standin.stop_asking("unhealthy")
        wait_for(lambda: s.engine.health() == {"status": "ok"}, what="the restarted server")
        assert_gone(first)
        assert s.generate(prompt="awake").text == "<base> awake"


def test_unload_leaves_no_process(standin, standin_model):
    with served(VllmEngine, standin_model) as s:
        pid = s.engine.server_pid
        assert psutil.pid_exists(pid)
    assert_gone(pid)
    assert s.engine.health() == {"status": "failed", "detail": "the vllm engine was unloaded"}


def test_startup_failure_reports_the_servers_last_lines(standin, standin_model, tmp_path):
    model = copy_model(standin_model, tmp_path / "model")
    corrupt_weights(model)
    with pytest.raises(ModelLoadError, match=r"(?s)the vllm server \(pid \d+\) exited with status 1 before it "
                                             r"answered /health; its last lines:\n.*SafetensorError: Error while "
                                             r"deserializing header"):
        VllmEngine().load(model, {}, {})
    assert_gone(standin.starts()[0]["pid"])


def test_missing_model_files_are_refused_before_starting(standin, standin_model, tmp_path):
    with pytest.raises(ModelLoadError, match="no such model directory"):
        VllmEngine().load(tmp_path / "absent", {}, {})
    model = copy_model(standin_model, tmp_path / "model")
    (model / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=f"{model}: no config.json"):
        VllmEngine().load(model, {}, {})
    with pytest.raises(ModelLoadError, match="unknown vllm engine parameters: max_batch_size; known: command, "):
        VllmEngine().load(standin_model, {}, {"max_batch_size": 4})
    with pytest.raises(ModelLoadError, match="extra_args must be a list of strings"):
        VllmEngine().load(standin_model, {}, {"extra_args": "--enforce-eager"})
    assert standin.starts() == []


def test_a_slow_start_is_waited_for_and_a_stuck_one_times_out(standin, standin_model):
    standin.ask("start-delay", 1.0)
    with served(VllmEngine, standin_model) as s:
        assert s.generate(prompt="late").text == "<base> late"
    standin.ask("start-delay", 30)
    engine = VllmEngine()
    engine.startup_timeout = 0.5
    with pytest.raises(ModelLoadError, match=r"did not answer /health within 0.5 s; its last lines:\nstandin "
                                             r"vllm: loading"):
        engine.load(standin_model, {}, {})
    assert_gone(standin.starts()[-1]["pid"])


def test_engine_not_installed_is_reported_with_the_install_hint(standin, standin_model, monkeypatch):
    monkeypatch.setenv("PATH", os.environ["PATH"].replace(str(standin.bin_dir) + os.pathsep, ""))
    with pytest.raises(EngineUnavailable, match=r"^engine 'vllm' is not installed on this node \(no `vllm` "
                                                r"executable on PATH\): pip install 'clowder\[vllm\]'$"):
        check_engine("vllm")
    with pytest.raises(EngineUnavailable, match=r"\(no `/opt/none/vllm` executable\)"):
        check_engine("vllm", {"command": "/opt/none/vllm"})
    command = str(standin.bin_dir / "vllm")
    assert check_engine("vllm", {"command": command}).name == "vllm"
    with served(VllmEngine, standin_model, params={"command": command}) as s:
        assert s.generate(prompt="found").text == "<base> found"
    with pytest.raises(EngineUnavailable, match="no `vllm` executable on PATH"):
        create_engine("vllm").load(standin_model, {}, {})


def test_through_the_engine_host_process(standin, standin_model):
    loop = LoopThread()
    client = EngineClient("vllm", standin_model, params={"max_model_len": 32},
                          adapters={"a": standin_model / "adapters" / "a"})
    try:
        info = loop.run(client.start())
        assert (info["engine"], info["context"], info["adapters"]) == ("vllm", 32, ["a"])
        answer = loop.run(collect(client, GenerateRequest(messages=[{"role": "user", "content": "hi"}],
                                                          adapter="a")))
        assert (answer.text, answer.finish_reason) == ("<a> hi", "stop")
        with pytest.raises(InvalidRequest, match="maximum context length is 32 tokens"):
            loop.run(collect(client, GenerateRequest(prompt="hi", max_tokens=100)))
        assert loop.run(client.health()) == {"status": "ok"}
        assert loop.run(client.metrics())["requests_finished"] == 1
        assert loop.run(client.add_adapter("b", standin_model / "adapters" / "b")) == {"adapters": ["a", "b"]}
        server = standin.starts()[0]["pid"]
        assert loop.run(client.unload()) == 0
        assert_gone(server)
    finally:
        loop.run(client.kill())
        loop.close()


def test_killing_the_engine_host_takes_its_server_with_it(standin, standin_model):
    loop = LoopThread()
    client = EngineClient("vllm", standin_model)
    try:
        loop.run(client.start())
        server = standin.starts()[0]["pid"]
        assert server in [p.pid for p in psutil.Process(client.pid).children(recursive=True)]
        os.kill(client.pid, signal.SIGKILL)
        assert_gone(server)
    finally:
        loop.run(client.kill())
        loop.close()
