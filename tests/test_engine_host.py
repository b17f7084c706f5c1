"""The engine host serving a tiny llama through the client: streaming, stops, usage, batching, cancellation."""
import asyncio
import time

from transformers import AutoTokenizer

from clowderd.engines.base import GenerateRequest
from tests.engine_fixtures import collect

GREEDY = dict(temperature=0, ignore_eos=True)


def test_host_reports_ready_with_its_context_and_adapters(tiny_host):
    info = tiny_host.client.ready_info
    assert info["engine"] == "transformers"
    assert info["context"] == 2048
    assert info["adapters"] == ["a", "b"]
    assert tiny_host.run(tiny_host.client.health()) == {"status": "ok"}


def test_completion_streams_deltas_and_counts_usage(tiny_host, tiny_chat_llama):
    answer = tiny_host.generate(prompt="hello there", max_tokens=7, **GREEDY)
    prompt_tokens = len(AutoTokenizer.from_pretrained(tiny_chat_llama)("hello there").input_ids)
    assert answer.finish_reason == "length"
    assert answer.usage.prompt_tokens == prompt_tokens
    assert answer.usage.completion_tokens == 7
    # Text that arrives while the reader is busy comes joined, so a busy machine may see a single delta.
    assert answer.deltas and all(answer.deltas) and "".join(answer.deltas) == answer.text


def test_chat_applies_the_chat_template(tiny_host, tiny_chat_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_llama)
    messages = [{"role": "user", "content": "hello there"}]
    templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    answer = tiny_host.generate(messages=messages, max_tokens=3, **GREEDY)
    assert answer.usage.prompt_tokens == len(tokenizer(templated, add_special_tokens=False).input_ids)


def test_stop_string_ends_the_text_just_before_it(tiny_host):
    full = tiny_host.generate(prompt="the quick brown fox", max_tokens=24, **GREEDY).text
    stop = full[8:11]
    answer = tiny_host.generate(prompt="the quick brown fox", max_tokens=24, stop=[stop], **GREEDY)
    assert answer.finish_reason == "stop"
    assert answer.text == full[:full.find(stop)]


def test_same_seed_samples_the_same_text(tiny_host):
    first, second, other = (tiny_host.generate(prompt="once upon", max_tokens=16, temperature=1.0, top_p=0.9,
                                               top_k=50, seed=seed, ignore_eos=True) for seed in (7, 7, 8))
    assert first.text == second.text
    assert first.text != other.text


def test_concurrent_requests_answer_as_they_would_alone(tiny_host):
    prompts = ["hello there", "the quick brown fox jumps", "a", "what is the capital of france?"]
    alone = [tiny_host.generate(prompt=p, max_tokens=12, **GREEDY).text for p in prompts]

    async def together():
        return await asyncio.gather(*(collect(tiny_host.client, GenerateRequest(prompt=p, max_tokens=12, **GREEDY))
                                      for p in prompts))
    assert [a.text for a in tiny_host.run(together())] == alone


def test_requests_joining_a_running_batch_answer_as_they_would_alone(tiny_host):
    prompts = ["a much longer prompt than the others, to pad", "hi", "the quick brown fox"]
    requests = [dict(prompt=p, max_tokens=n, **GREEDY) for p, n in zip(prompts, (40, 12, 20))]
    alone = [tiny_host.generate(**r) for r in requests]

    async def staggered():
        before = (await tiny_host.client.metrics())["generation_tokens"]
        first = asyncio.create_task(collect(tiny_host.client, GenerateRequest(**requests[0])))
        while (await tiny_host.client.metrics())["generation_tokens"] < before + 5:
            await asyncio.sleep(0.005)
        rest = [collect(tiny_host.client, GenerateRequest(**r)) for r in requests[1:]]
        return [await first, *await asyncio.gather(*rest)]
    together = tiny_host.run(staggered())
    assert [(a.text, a.usage) for a in together] == [(a.text, a.usage) for a in alone]


def test_eight_concurrent_requests_finish_faster_than_eight_sequential(tiny_host):
    def request():
        return GenerateRequest(prompt="count with me", max_tokens=48, **GREEDY)

    async def sequential():
        for _ in range(8):
            await collect(tiny_host.client, request())

    async def concurrent():
        await asyncio.gather(*(collect(tiny_host.client, request()) for _ in range(8)))

    t0 = time.perf_counter()
    tiny_host.run(sequential())
    t1 = time.perf_counter()
    tiny_host.run(concurrent())
    t2 = time.perf_counter()
    assert t2 - t1 < t1 - t0, f"8 concurrent took {t2 - t1:.2f} s, 8 sequential {t1 - t0:.2f} s"


def test_leaving_a_stream_cancels_the_request_in_the_engine(tiny_host):
    client = tiny_host.client
    before = tiny_host.run(client.metrics())

    async def read_three_then_leave():
        n = 0
        async for _ in client.generate(GenerateRequest(prompt="go on", max_tokens=2000, **GREEDY)):
            n += 1
            if n == 3:
                break

    tiny_host.run(read_three_then_leave())
    deadline = time.monotonic() + 10
    while (m := tiny_host.run(client.metrics()))["requests_cancelled"] == before["requests_cancelled"]:
        assert time.monotonic() < deadline, f"the request was not cancelled: {m}"
        time.sleep(0.05)
    assert m["requests_running"] == 0 and m["requests_waiting"] == 0
    generated = m["generation_tokens"] - before["generation_tokens"]
    assert generated < 200, f"{generated} tokens were generated after the caller left"
    time.sleep(0.2)
    assert tiny_host.run(client.metrics())["generation_tokens"] == m["generation_tokens"]


def test_health_is_answered_while_generating(tiny_host):
    async def both():
        stream = asyncio.create_task(collect(tiny_host.client, GenerateRequest(prompt="x", max_tokens=400, **GREEDY)))
        await asyncio.sleep(0.05)
        health = await tiny_host.client.health(timeout=2)
        await stream
        return health
    assert tiny_host.run(both()) == {"status": "ok"}
