"""Several LoRA adapters on one loaded base, chosen per request, added and removed at run time."""
import asyncio

import pytest

from clowderd.engines.base import GenerateRequest
from clowderd.engines.errors import AdapterError, InvalidRequest
from tests import modelgen
from tests.engine_fixtures import collect, rewrite_json, write_tiny_adapter

ASK = dict(prompt="hello there", max_tokens=16, temperature=0, ignore_eos=True)


def test_two_adapters_answer_differently_from_each_other_and_from_the_base(tiny_host):
    base, a, b = (tiny_host.generate(adapter=name, **ASK).text for name in (None, "a", "b"))
    assert len({base, a, b}) == 3


def test_one_batch_mixes_adapters_and_each_row_gets_its_own(tiny_host):
    alone = [tiny_host.generate(adapter=name, **ASK).text for name in (None, "a", "b")]

    async def together():
        return await asyncio.gather(*(collect(tiny_host.client, GenerateRequest(adapter=name, **ASK))
                                      for name in (None, "a", "b")))
    assert [x.text for x in tiny_host.run(together())] == alone


def test_removing_an_adapter_restores_the_base_answer_and_leaves_the_others(tiny_host, tiny_chat_llama, tmp_path):
    client = tiny_host.client
    base, a = (tiny_host.generate(adapter=name, **ASK).text for name in (None, "a"))
    write_tiny_adapter(tmp_path / "c", tiny_chat_llama, seed=3)
    assert tiny_host.run(client.add_adapter("c", tmp_path / "c")) == {"adapters": ["a", "b", "c"]}
    assert tiny_host.generate(adapter="c", **ASK).text not in (base, a)
    assert tiny_host.run(client.remove_adapter("c")) == {"adapters": ["a", "b"]}
    assert tiny_host.generate(**ASK).text == base
    assert tiny_host.generate(adapter="a", **ASK).text == a
    with pytest.raises(InvalidRequest, match="unknown adapter 'c'; loaded: a, b"):
        tiny_host.generate(adapter="c", **ASK)


def test_adapter_for_another_base_is_refused_naming_the_shapes(tiny_host, tmp_path):
    other = modelgen.write_llama(tmp_path / "other", **{**modelgen.TINY, "hidden_size": 96, "num_heads": 4})
    write_tiny_adapter(tmp_path / "x", other, seed=4)
    with pytest.raises(AdapterError, match=r"adapter 'x' .* does not fit this base model: .*size mismatch"):
        tiny_host.run(tiny_host.client.add_adapter("x", tmp_path / "x"))
    assert tiny_host.generate(**ASK).usage.completion_tokens == 16  # the engine still serves


def test_adapter_whose_rank_disagrees_with_its_weights_is_refused(tiny_host, tiny_chat_llama, tmp_path):
    write_tiny_adapter(tmp_path / "r", tiny_chat_llama, seed=5, r=4)
    rewrite_json(tmp_path / "r" / "adapter_config.json", r=16)
    with pytest.raises(AdapterError, match=r"adapter 'r' .* does not fit this base model: .*size mismatch"):
        tiny_host.run(tiny_host.client.add_adapter("r", tmp_path / "r"))
    assert tiny_host.run(tiny_host.client.metrics())["adapters"] == ["a", "b"]


def test_adapter_without_config_is_refused(tiny_host, tmp_path):
    with pytest.raises(AdapterError, match="adapter_config.json does not exist"):
        tiny_host.run(tiny_host.client.add_adapter("nothing", tmp_path))


def test_removing_an_unknown_adapter_is_refused(tiny_host):
    with pytest.raises(AdapterError, match="adapter 'zz' is not loaded; loaded: \\['a', 'b'\\]"):
        tiny_host.run(tiny_host.client.remove_adapter("zz"))
