"""clowder.v1.GenerateRequest (a chat or a completion, after the middleware chain) as an engine request.

Unset sampling fields are left to the engine's defaults. Penalties have no engine support yet: a
request that sets one to anything but its neutral value is refused, naming the field, rather than
answered as if it had not been asked for.
"""
from __future__ import annotations

import uuid

from clowder.v1 import inference_pb2, worker_pb2
from clowderd.engines.base import GenerateRequest
from clowderd.errors import InvalidInput

# Penalty fields and the value at which each changes nothing.
NEUTRAL_PENALTIES = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0}


def engine_request(request: worker_pb2.GenerateRequest) -> tuple[GenerateRequest, str]:
    """The engine request, and the text to send before the generated text (the prompt of a
    completion with echo, else "")."""
    kind = request.WhichOneof("request")
    if kind is None:
        raise InvalidInput("request: give a chat or a completion")
    out = GenerateRequest(request_id=request.request_id or uuid.uuid4().hex)
    echo = ""
    if kind == "chat":
        out.messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
        sampling = request.chat.sampling
    else:
        out.prompt = request.completion.prompt
        echo = request.completion.prompt if request.completion.echo else ""
        sampling = request.completion.sampling
    _apply_sampling(out, sampling, kind)
    return out, echo


def _apply_sampling(out: GenerateRequest, s: inference_pb2.SamplingParams, kind: str) -> None:
    for name in ("temperature", "top_p", "top_k", "max_tokens", "seed", "n", "ignore_eos"):
        if s.HasField(name):
            setattr(out, name, getattr(s, name))
    out.stop = list(s.stop)
    for name, neutral in NEUTRAL_PENALTIES.items():
        if s.HasField(name) and getattr(s, name) != neutral:
            raise InvalidInput(f"{kind}.sampling.{name}: not supported by this worker's engines "
                               f"(leave it unset or {neutral:g})")
