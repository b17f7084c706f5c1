"""Fixtures for engine tests: a tiny llama with a tokenizer, LoRA adapters for it, a running engine host."""
from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from clowderd.engines.base import Finished, GenerateRequest, Usage
from clowderd.engines.client import EngineClient
from tests import modelgen

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def write_tiny_tokenizer(model_dir, vocab_size: int = modelgen.TINY["vocab_size"]) -> Path:
    """Save a byte-level BPE tokenizer of exactly `vocab_size` tokens with a ChatML chat template into
    `model_dir` (tokenizer.json, tokenizer_config.json, ...). Ids 0-2 are <|endoftext|>, <|im_start|> and
    <|im_end|>; <|im_end|> (2) is the end of sequence, matching modelgen.llama_config's eos_token_id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens, _types, merges = modelgen.tiny_bpe_vocab(vocab_size)
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                     merges=[tuple(m.split(" ")) for m in merges])
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML
    fast.save_pretrained(str(model_dir))
    return Path(model_dir)


def write_tiny_chat_llama(model_dir, *, seed: int = 0, dtype: str = "float32", **overrides) -> Path:
    """A random-weight TINY llama with the tiny tokenizer: a complete model directory. Its embeddings are
    not tied to the output layer (a tied random model only repeats its last token)."""
    overrides = {**modelgen.TINY, "tie_word_embeddings": False, **overrides}
    modelgen.write_llama(model_dir, **overrides, dtype=dtype, seed=seed)
    return write_tiny_tokenizer(model_dir, overrides["vocab_size"])


@pytest.fixture(scope="session")
def tiny_chat_llama(tmp_path_factory) -> Path:
    """A tiny llama with a tokenizer (read-only), and two LoRA adapters for it under adapters/a and b."""
    root = tmp_path_factory.mktemp("engine-models") / "tiny-chat"
    write_tiny_chat_llama(root)
    for name, seed in (("a", 1), ("b", 2)):
        write_tiny_adapter(root / "adapters" / name, root, seed=seed)
    return root


def write_tiny_adapter(out_dir, base_dir, *, seed: int, **kwargs) -> Path:
    """A LoRA adapter strong enough to change a tiny model's greedy answer within a few tokens."""
    kwargs = {"r": 8, "lora_alpha": 256, "target_modules": ("q_proj", "v_proj", "o_proj", "down_proj"), **kwargs}
    return modelgen.write_lora_adapter(out_dir, base_dir, seed=seed, **kwargs)


class LoopThread:
    """An asyncio loop in a thread, so that one engine client can serve every test of a module."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


@dataclass
class Host:
    """A running engine host and the loop its client lives on."""
    client: EngineClient
    loop: LoopThread

    def run(self, coro, timeout: float = 120):
        return self.loop.run(coro, timeout)

    def generate(self, **fields) -> "Answer":
        return self.run(collect(self.client, GenerateRequest(**fields)))


@dataclass
class Answer:
    text: str
    deltas: list[str]
    finish_reason: str
    usage: Usage


async def collect(client, request: GenerateRequest) -> Answer:
    deltas, finished = [], None
    async for event in client.generate(request):
        if isinstance(event, Finished):
            finished = event
        else:
            deltas.append(event.text)
    return Answer("".join(deltas), deltas, finished.finish_reason, finished.usage)


@contextlib.contextmanager
def running_host(model_dir, **client_kwargs):
    loop = LoopThread()
    client = EngineClient("transformers", model_dir, **client_kwargs)
    try:
        loop.run(client.start())
        yield Host(client, loop)
    finally:
        loop.run(client.unload())
        loop.close()


@pytest.fixture(scope="module")
def tiny_host(tiny_chat_llama):
    """An engine host serving the tiny chat llama with adapters a and b, shared by a module's tests."""
    with running_host(tiny_chat_llama, adapters={n: tiny_chat_llama / "adapters" / n for n in ("a", "b")}) as host:
        yield host


def rewrite_json(path: Path, **changes) -> None:
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))
