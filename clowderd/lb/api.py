"""OpenAI request bodies (`/v1/chat/completions`, `/v1/completions`) read into a Call, every field checked
and named in the error when wrong. Fields this server does not implement and whose absence would change
the answer (tools, logprobs, ...) are refused by name; fields that change nothing here are ignored, as
OpenAI-compatible servers do, so that clients sending their usual extras work unchanged.
"""
from __future__ import annotations

import math

from clowderd.lb.errors import ApiError
from clowderd.middleware.base import Call

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP = 4
MAX_N = 16
MAX_METADATA = 16
# Refused unless absent or set to the value that asks for nothing.
UNSUPPORTED = {"tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
               "function_call": (None, "none"), "logprobs": (None, False, 0), "top_logprobs": (None, 0),
               "logit_bias": (None, {}), "suffix": (None, ""), "best_of": (None, 1),
               "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,)}


def _bad(field: str, message: str) -> ApiError:
    return ApiError(400, f"{field}: {message}", param=field)


def _number(body: dict, field: str, low: float, high: float, *, low_open: bool = False) -> float | None:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(field, f"must be a number, not {value!r}")
    if value < low or value > high or (low_open and value == low):
        raise _bad(field, f"must be in {'(' if low_open else '['}{low:g}, {high:g}], not {value!r}")
    return float(value)


def _integer(body: dict, field: str, low: int, high: int | None = None) -> int | None:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(field, f"must be an integer, not {value!r}")
    if value < low or (high is not None and value > high):
        limit = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise _bad(field, f"must be {limit}, not {value}")
    return value


def _string(body: dict, field: str, default: str = "") -> str:
    value = body.get(field, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise _bad(field, f"must be a string, not {type(value).__name__}")
    return value


def _flag(body: dict, field: str) -> bool:
    value = body.get(field, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(field, f"must be true or false, not {value!r}")
    return value


def _model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "required: the name of a deployment (GET /v1/models lists them)")
    return model


def _sampling(body: dict) -> dict:
    out = {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if max_tokens is not None:
        out["max_tokens"] = _integer({field: max_tokens}, field, 1)
    for name, low, high, low_open in (("temperature", 0, 2, False), ("top_p", 0, 1, True),
                                      ("presence_penalty", -2, 2, False), ("frequency_penalty", -2, 2, False),
                                      ("repetition_penalty", 0, 10, True)):
        value = _number(body, name, low, high, low_open=low_open)
        if value is not None:
            out[name] = value
    for name, low, high in (("top_k", 0, None), ("n", 1, MAX_N)):
        value = _integer(body, name, low, high)
        if value is not None:
            out[name] = value
    if body.get("ignore_eos") is not None:  # vLLM's extension: generate up to max_tokens
        out["ignore_eos"] = _flag(body, "ignore_eos")
    seed = _integer(body, "seed", -(2 ** 63), 2 ** 63 - 1)
    if seed is not None:
        out["seed"] = seed
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise _bad("stop", "must be a non-empty string or a list of them")
        if len(stops) > MAX_STOP:
            raise _bad("stop", f"at most {MAX_STOP} sequences, not {len(stops)}")
        out["stop"] = stops
    return out


def _common(body: object, method: str) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for field, allowed in UNSUPPORTED.items():
        if body.get(field) not in allowed:
            raise _bad(field, "not supported by this server")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise _bad("response_format", "only {\"type\": \"text\"} is supported by this server")
    options = body.get("stream_options")
    stream = _flag(body, "stream")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise _bad("stream_options", "must be an object")
        if not stream:
            raise _bad("stream_options", "only allowed when stream is true")
        include_usage = _flag(options, "include_usage")
    metadata = body.get("metadata") or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise _bad("metadata", "must be an object of strings")
    if len(metadata) > MAX_METADATA:
        raise _bad("metadata", f"at most {MAX_METADATA} keys, not {len(metadata)}")
    return dict(method=method, model=_model(body), sampling=_sampling(body), stream=stream,
                include_usage=include_usage, user=_string(body, "user"), metadata=dict(metadata))


def _content(value: object, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # content parts: text only
        texts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"{where}[{i}]", "only text content parts ({\"type\": \"text\", \"text\": ...}) "
                                            "are supported")
            texts.append(part["text"])
        return "".join(texts)
    if value is None:
        return ""
    raise _bad(where, "must be a string or a list of text parts")


def parse_chat(body: object) -> Call:
    fields = _common(body, "chat")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "required: a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(where, "must be an object with role and content")
        role = m.get("role")
        if role not in ROLES:
            raise _bad(f"{where}.role", f"must be one of {', '.join(ROLES)}, not {role!r}")
        message = {"role": role, "content": _content(m.get("content"), f"{where}.content")}
        if m.get("name") is not None:
            message["name"] = _string(m, "name")
        out.append(message)
    return Call(messages=out, **fields)


def parse_completion(body: object) -> Call:
    fields = _common(body, "completion")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _bad("prompt", "required: a string (lists of several prompts or of token ids are not supported)")
    return Call(prompt=prompt, echo=_flag(body, "echo"), **fields)
