"""A clowder.v1.GenerateRequest becomes the engine request the worker sends to a replica's engine."""
import pytest

from clowder.v1 import inference_pb2, worker_pb2
from clowderd.errors import InvalidInput
from clowderd.worker.engine_requests import engine_request


def test_a_chat_keeps_its_messages_and_only_the_sampling_fields_set():
    chat = inference_pb2.ChatCompletionRequest(
        messages=[inference_pb2.ChatMessage(role="system", content="Be brief."),
                  inference_pb2.ChatMessage(role="user", content="Hi", name="ann")],
        sampling=inference_pb2.SamplingParams(temperature=0.0, max_tokens=5, stop=["\n"], seed=3))
    request, echo = engine_request(worker_pb2.GenerateRequest(request_id="r1", chat=chat))
    assert request.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert request.prompt is None and echo == ""
    assert (request.request_id, request.temperature, request.max_tokens, request.stop, request.seed) == \
        ("r1", 0.0, 5, ["\n"], 3)
    assert (request.top_p, request.top_k, request.n) == (1.0, 0, 1)  # the engine's defaults


def test_a_completion_with_echo_sends_its_prompt_first():
    completion = inference_pb2.CompletionRequest(prompt="Once", echo=True)
    request, echo = engine_request(worker_pb2.GenerateRequest(completion=completion))
    assert request.prompt == "Once" and request.messages is None and echo == "Once"
    assert request.request_id  # one is made up when the caller gives none


def test_a_request_without_chat_or_completion_is_refused():
    with pytest.raises(InvalidInput, match="chat or a completion"):
        engine_request(worker_pb2.GenerateRequest(replica_id="r"))


@pytest.mark.parametrize("field, neutral", [("presence_penalty", 0.0), ("frequency_penalty", 0.0),
                                            ("repetition_penalty", 1.0)])
def test_a_penalty_is_refused_naming_it_unless_neutral(field, neutral):
    def with_penalty(value):
        sampling = inference_pb2.SamplingParams(**{field: value})
        return worker_pb2.GenerateRequest(completion=inference_pb2.CompletionRequest(prompt="x", sampling=sampling))

    engine_request(with_penalty(neutral))
    with pytest.raises(InvalidInput, match=f"completion.sampling.{field}: not supported"):
        engine_request(with_penalty(0.5))
