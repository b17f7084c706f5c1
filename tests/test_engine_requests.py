"""Requests the engine refuses, each with an error that names the problem."""
import pytest

from clowderd.engines.errors import InvalidRequest



def test_prompt_longer_than_the_context_is_refused(tiny_host):
    with pytest.raises(InvalidRequest, match=r"the prompt has \d+ tokens; this model's context is 2048 tokens"):
        tiny_host.generate(prompt="word " * 3000, max_tokens=1)


@pytest.mark.parametrize("max_tokens, message", [
    (0, "max_tokens must be a positive integer, not 0"),
    (1_000_000, r"max_tokens 1000000 does not fit: the context is 2048 tokens and the prompt takes \d+"),
])
def test_max_tokens_out_of_range_is_refused(tiny_host, max_tokens, message):
    with pytest.raises(InvalidRequest, match=message):
        tiny_host.generate(prompt="hi", max_tokens=max_tokens)


@pytest.mark.parametrize("fields, message", [
    (dict(temperature=-1), "temperature must be a number >= 0"),
    (dict(top_p=0), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-3), "top_k must be an integer >= 0"),
    (dict(stop=[""]), "stop must be a list of non-empty strings"),
    (dict(n=2), "n=2: this engine returns one completion per request"),
    (dict(seed=-1), "seed must be a non-negative integer"),
    (dict(adapter="nope"), "unknown adapter 'nope'; loaded: a, b"),
    (dict(messages=[{"role": "user"}]), "give exactly one of `prompt`"),
])
def test_bad_request_values_are_refused(tiny_host, fields, message):
    with pytest.raises(InvalidRequest, match=message):
        tiny_host.generate(**{"prompt": "hi", "max_tokens": 4, **fields})
