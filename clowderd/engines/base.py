"""The single engine interface: what the engine host asks of every engine (transformers, vllm, tensorrt_llm).

An engine loads one model directory (a view: safetensors, config, tokenizer) and its EP layers (PEFT LoRA
adapters, by name), then answers generation requests. `generate` is an async iterator of events: text
deltas, then one Finished event. Prompts are either a completion `prompt` or chat `messages` (the engine
applies the tokenizer's chat template; the aimage's system prompt is the caller's business).
"""
from __future__ import annotations

import math
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import AsyncIterator, Union

from clowderd.engines.errors import InvalidRequest

FINISH_REASONS = ("stop", "length", "cancelled")


@dataclass
class GenerateRequest:
    """One generation: a completion (`prompt`) or a chat (`messages`), with its sampling values."""
    prompt: str | None = None
    messages: list[dict] | None = None
    adapter: str | None = None        # an EP layer's name; None: the base model
    max_tokens: int | None = None     # None: up to the end of the context
    temperature: float = 1.0          # 0: greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0: no limit
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    n: int = 1
    ignore_eos: bool = False          # keep generating past the end-of-sequence token (benchmarks)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def validate(self) -> None:
        """Check what can be checked without the model; raise InvalidRequest naming the field."""
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequest("give exactly one of `prompt` (a completion) or `messages` (a chat)")
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise InvalidRequest("`prompt` must be a string")
        if self.messages is not None:
            if not isinstance(self.messages, list) or not self.messages:
                raise InvalidRequest("`messages` must be a non-empty list of {role, content}")
            for i, m in enumerate(self.messages):
                if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                        or not isinstance(m.get("content"), str):
                    raise InvalidRequest(f"messages[{i}] must have a string `role` and a string `content`")
        if self.n != 1:
            raise InvalidRequest(f"n={self.n}: this engine returns one completion per request; send n "
                                 "requests instead")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise InvalidRequest(f"max_tokens must be a positive integer, not {self.max_tokens!r}")
        if not _finite(self.temperature) or self.temperature < 0:
            raise InvalidRequest(f"temperature must be a number >= 0 (0 is greedy), not {self.temperature!r}")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], not {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequest(f"top_k must be an integer >= 0 (0: no limit), not {self.top_k!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequest("stop must be a list of non-empty strings")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise InvalidRequest(f"seed must be a non-negative integer, not {self.seed!r}")

    def to_dict(self) -> dict:
        """The fields, for JSON: a shallow copy (asdict's deep copy of every list cost a tenth of a
        worker's time per call)."""
        return {name: getattr(self, name) for name in _REQUEST_FIELDS}

    @classmethod
    def from_dict(cls, d: dict) -> "GenerateRequest":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InvalidRequest(f"unknown request fields: {', '.join(unknown)}")
        return cls(**d)


_REQUEST_FIELDS = tuple(f.name for f in fields(GenerateRequest))


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass
class TextDelta:
    """Newly generated text (never cut inside a UTF-8 character or a possible stop string)."""
    text: str


@dataclass
class Finished:
    """The last event of every generation."""
    finish_reason: str  # one of FINISH_REASONS
    usage: Usage


Event = Union[TextDelta, Finished]


class Engine(ABC):
    """An engine runs inside the engine host process, one per replica."""

    name: str

    @abstractmethod
    def load(self, model_dir: Path, ep_layers: dict[str, Path], params: dict) -> None:
        """Load the model and its EP layers (blocking). Raises ModelLoadError or AdapterError."""

    @abstractmethod
    def generate(self, request: GenerateRequest) -> AsyncIterator[Event]:
        """Stream the request's events. Raises InvalidRequest before the first event when the request
        cannot run. Closing the iterator early cancels the request."""

    @abstractmethod
    def cancel(self, request_id: str) -> None:
        """Stop a running or waiting request; its stream ends with finish_reason 'cancelled'."""

    @abstractmethod
    def add_adapter(self, name: str, path: Path) -> None:
        """Load a PEFT LoRA adapter under `name` onto the loaded base. Raises AdapterError."""

    @abstractmethod
    def remove_adapter(self, name: str) -> None:
        """Drop an adapter. Raises AdapterError when unknown or in use."""

    @abstractmethod
    def health(self) -> dict:
        """{"status": "ok"} or {"status": "failed", "detail": ...}."""

    @abstractmethod
    def metrics(self) -> dict:
        """requests_running, requests_waiting, requests_finished, requests_cancelled, prompt_tokens,
        generation_tokens, adapters."""

    @abstractmethod
    def unload(self) -> None:
        """Stop serving and free the model's memory (on CUDA, empty the cache too)."""
