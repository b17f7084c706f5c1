"""OpenAI request bodies (`/v1/chat/completions`, `/v1/completions`) read into a Call, every field checked
and named in the error when wrong. Fields this server does not implement and whose absence would change
the answer (tools, logprobs, ...) are refused by name; fields that change nothing here are ignored, as
OpenAI-compatible servers do, so that clients sending their usual extras work unchanged.

Both front ends take requests here: the HTTP API parses its body with `parse_json`, the gRPC Inference
service turns its messages into the same JSON shape (`grpc_body`), so that a value reaches the workers
only once checked against the range the worker's protobuf fields and the engines take. Nothing a caller
sends can fail later as an internal error.
"""
from __future__ import annotations

import json
import math

from clowderd.lb.errors import ApiError
from clowderd.middleware.base import Call

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP = 4
MAX_N = 16
MAX_METADATA = 16
MAX_METADATA_KEY = 64      # OpenAI's limits on metadata
MAX_METADATA_VALUE = 512
MAX_DEPTH = 32             # JSON nesting; an OpenAI request needs under 10 levels
UINT32_MAX = 2 ** 32 - 1   # max_tokens and top_k travel to the workers as uint32
INT64_MAX = 2 ** 63 - 1    # seed as int64; the engines take no negative seed
SHOWN = 40                 # characters of a bad value quoted in an error
# Refused unless absent or set to the value that asks for nothing.
UNSUPPORTED = {"tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
               "function_call": (None, "none"), "logprobs": (None, False, 0), "top_logprobs": (None, 0),
               "logit_bias": (None, {}), "suffix": (None, ""), "best_of": (None, 1),
               "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,)}


def _bad(field: str, message: str) -> ApiError:
    return ApiError(400, f"{field}: {message}", param=field)


def _shown(value: object) -> str:
    """A value as an error quotes it: cut short, since it may be megabytes or a 4,000-digit number."""
    text = repr(value)
    return text if len(text) <= SHOWN else f"{text[:SHOWN]}... ({len(text)} characters)"


def parse_json(raw: bytes) -> object:
    """The request body as JSON, refused (400, naming where) when it is not JSON, nests deeper than
    MAX_DEPTH, or holds a string that is not Unicode text (a lone surrogate escape such as "\\ud800",
    which JSON allows and UTF-8, protobuf and the tokenizers do not)."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise ApiError(400, f"the request body nests JSON deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    _check_json(body)
    return body


def _check_json(body: object) -> None:
    stack = [(body, "", 1)]
    while stack:  # a walk without recursion: depth is what it checks
        value, where, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value, where or "the request body")
        elif isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                raise ApiError(400, f"the request body nests JSON deeper than {MAX_DEPTH} levels (at {where})")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    _check_text(key, f"{where or 'the request body'}: a key")
                    path = f"{where}.{key}" if where else key
                else:
                    path = f"{where}[{key}]"
                stack.append((item, path, depth + 1))


def _check_text(value: str, where: str) -> None:
    if value.isascii():
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _bad(where, f"holds a lone surrogate ({value[e.start]!r} at character {e.start}), which is not "
                          "a Unicode character; send the text as UTF-8") from None


def _number(body: dict, field: str, low: float, high: float, *, low_open: bool = False) -> float | None:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (isinstance(value, float) and not math.isfinite(value)):
        raise _bad(field, f"must be a number, not {_shown(value)}")
    if value < low or value > high or (low_open and value == low):  # exact, also for a huge integer
        raise _bad(field, f"must be in {'(' if low_open else '['}{low:g}, {high:g}], not {_shown(value)}")
    return float(value)


def _integer(body: dict, field: str, low: int, high: int) -> int | None:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(field, f"must be an integer, not {_shown(value)}")
    if not low <= value <= high:
        raise _bad(field, f"must be between {low} and {high}, not {_shown(value)}")
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
        raise _bad(field, f"must be true or false, not {_shown(value)}")
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
        out["max_tokens"] = _integer({field: max_tokens}, field, 1, UINT32_MAX)
    for name, low, high, low_open in (("temperature", 0, 2, False), ("top_p", 0, 1, True),
                                      ("presence_penalty", -2, 2, False), ("frequency_penalty", -2, 2, False),
                                      ("repetition_penalty", 0, 10, True)):
        value = _number(body, name, low, high, low_open=low_open)
        if value is not None:
            out[name] = value
    for name, low, high in (("top_k", 0, UINT32_MAX), ("n", 1, MAX_N)):
        value = _integer(body, name, low, high)
        if value is not None:
            out[name] = value
    if body.get("ignore_eos") is not None:  # vLLM's extension: generate up to max_tokens
        out["ignore_eos"] = _flag(body, "ignore_eos")
    seed = _integer(body, "seed", 0, INT64_MAX)
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
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY:
            raise _bad("metadata", f"a key is at most {MAX_METADATA_KEY} characters, not {len(key)} ({_shown(key)})")
        if len(value) > MAX_METADATA_VALUE:
            raise _bad(f"metadata.{key}", f"at most {MAX_METADATA_VALUE} characters, not {len(value)}")
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
            raise _bad(f"{where}.role", f"must be one of {', '.join(ROLES)}, not {_shown(role)}")
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


# The sampling fields of clowder.v1.SamplingParams, named as in OpenAI's JSON.
GRPC_SAMPLING = ("temperature", "top_p", "top_k", "max_tokens", "seed", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "n", "ignore_eos")


def grpc_body(request, stream: bool) -> dict:
    """A clowder.v1 ChatCompletionRequest or CompletionRequest as the JSON body that parse_chat or
    parse_completion takes: the gRPC service checks what the HTTP API checks."""
    s = request.sampling
    body = {"model": request.model, "user": request.user, "metadata": dict(request.metadata), "stream": stream,
            **{name: getattr(s, name) for name in GRPC_SAMPLING if s.HasField(name)}}
    if s.stop:
        body["stop"] = list(s.stop)
    if hasattr(request, "messages"):
        body["messages"] = [{"role": m.role, "content": m.content, "name": m.name or None} for m in request.messages]
    else:
        body["prompt"], body["echo"] = request.prompt, request.echo
    return body
