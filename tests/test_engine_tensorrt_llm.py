"""The tensorrt_llm engine against the stand-in for `trtllm-serve` (tests/openai_server_standin.py) at the
process boundary: the command line and its LLM API options, a LoRA adapter named in each request,
errors, restarts, no process left."""
import os
import signal

import pytest

from clowderd.engines.base import GenerateRequest
from clowderd.engines.client import EngineClient
from clowderd.engines.errors import AdapterError, EngineUnavailable, InvalidRequest
from clowderd.engines.registry import check_engine
from clowderd.engines.tensorrt_llm_engine import LORA_TARGET_MODULES, TensorRTLLMEngine
from tests.engine_fixtures import LoopThread, collect
from tests.server_engine_fixtures import assert_gone, served, wait_for, write_adapter
# fixtures `standin` and `standin_model`
from tests.server_engine_fixtures import standin_fixture, standin_model_fixture  # noqa: F401


def test_command_line_and_llm_api_options_from_engine_params(standin, standin_model):
    params = {"dtype": "bfloat16", "max_seq_len": 48, "max_batch_size": 8, "max_num_tokens": 256, "tp_size": 1,
              "pp_size": 1, "kv_cache_free_gpu_memory_fraction": 0.7, "max_lora_rank": 32,
              "extra_args": ["--log_level", "info"]}
    with served(TensorRTLLMEngine, standin_model, params=params) as s:
        assert s.engine.context == 48
    [start] = standin.starts()
    port = start["argv"][start["argv"].index("--port") + 1]
    options_file = start["argv"][start["argv"].index("--extra_llm_api_options") + 1]
    assert start["argv"] == [
        str(standin_model), "--host", "127.0.0.1", "--port", port, "--backend", "pytorch",
        "--extra_llm_api_options", options_file, "--max_seq_len", "48", "--max_batch_size", "8",
        "--max_num_tokens", "256", "--tp_size", "1", "--pp_size", "1", "--kv_cache_free_gpu_memory_fraction", "0.7",
        "--log_level", "info"]
    assert start["options"] == {"lora_config": {"max_lora_rank": 32, "lora_target_modules": LORA_TARGET_MODULES},
                                "dtype": "bfloat16"}
    assert not os.path.exists(options_file)  # removed with the engine


def test_each_request_names_its_adapter(standin, standin_model):
    adapters = {name: standin_model / "adapters" / name for name in ("a", "b")}
    with served(TensorRTLLMEngine, standin_model, adapters=adapters) as s:
        assert s.engine.served_model == str(standin_model)
        assert s.generate(prompt="bonjour", adapter="a").text == "<a> bonjour"
        answer = s.generate(messages=[{"role": "user", "content": "hallo"}], adapter="b", max_tokens=5)
        assert (answer.text, answer.usage.prompt_tokens, answer.usage.completion_tokens) == ("<b> hallo", 3, 2)
        assert s.generate(prompt="hello").text == "<base> hello"
        s.engine.remove_adapter("a")
        with pytest.raises(InvalidRequest, match="unknown adapter 'a'; loaded: b"):
            s.generate(prompt="bonjour", adapter="a")
        # the same name for another adapter gets a new lora_int_id: the server never confuses the two
        s.engine.add_adapter("a", standin_model / "adapters" / "b")
        assert s.generate(prompt="again", adapter="a").text == "<a> again"
        assert s.engine.metrics()["adapters"] == ["a", "b"]


def test_adapter_checks_happen_when_it_is_added(standin, standin_model, tmp_path):
    with served(TensorRTLLMEngine, standin_model) as s:
        with pytest.raises(AdapterError, match="has rank 128, above the max_lora_rank 64 the tensorrt_llm server "
                                               "was started with"):
            s.engine.add_adapter("wide", write_adapter(tmp_path / "wide", rank=128))
        with pytest.raises(AdapterError, match="adapter_config.json does not exist"):
            s.engine.add_adapter("empty", tmp_path)
        assert s.engine.metrics()["adapters"] == []


def test_requests_the_server_refuses_are_invalid_requests(standin, standin_model):
    with served(TensorRTLLMEngine, standin_model) as s:
        with pytest.raises(InvalidRequest, match=r"tensorrt_llm refused the request: The sum of prompt length "
                                                 r"\(1\) and max_tokens \(1000000\) should not exceed max_seq_len"):
            s.generate(prompt="hi", max_tokens=1_000_000)
        assert s.generate(prompt="fine").text == "<base> fine"


def test_a_restarted_server_answers_with_the_adapters_again(standin, standin_model):
    with served(TensorRTLLMEngine, standin_model, adapters={"a": standin_model / "adapters" / "a"}) as s:
        first = s.engine.server_pid
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: s.engine.health()["status"] == "failed", what="health to report the death")
        assert "was killed by SIGKILL" in s.engine.health()["detail"]
        wait_for(lambda: s.engine.health() == {"status": "ok"}, what="the restarted server")
        assert_gone(first)
        assert s.generate(prompt="back", adapter="a").text == "<a> back"


def test_engine_not_installed_is_reported_with_the_install_hint(standin, monkeypatch):
    monkeypatch.setenv("PATH", os.environ["PATH"].replace(str(standin.bin_dir) + os.pathsep, ""))
    with pytest.raises(EngineUnavailable, match=r"^engine 'tensorrt_llm' is not installed on this node \(no "
                                                r"`trtllm-serve` executable on PATH\): pip install "
                                                r"'clowder\[tensorrt-llm\]'$"):
        check_engine("tensorrt_llm")


def test_through_the_engine_host_process(standin, standin_model):
    loop = LoopThread()
    client = EngineClient("tensorrt_llm", standin_model, adapters={"a": standin_model / "adapters" / "a"})
    try:
        info = loop.run(client.start())
        assert (info["engine"], info["adapters"]) == ("tensorrt_llm", ["a"])
        answer = loop.run(collect(client, GenerateRequest(prompt="hi there", adapter="a")))
        assert (answer.text, answer.finish_reason) == ("<a> hi there", "stop")
        server = standin.starts()[0]["pid"]
        assert loop.run(client.unload()) == 0
        assert_gone(server)
    finally:
        loop.run(client.kill())
        loop.close()
