"""The aimage Configuration: a versioned JSON document checked against schema/aimage-config.v1.json."""

import difflib
import json
import math
import re
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

from clowderd.engines.registry import installed_engines
from clowderd.errors import InvalidInput

CONFIG_VERSION = "clowder.aimage.config/v1"
SCHEMA_FILE = "aimage-config.v1.json"

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def canonical_json(obj: Any) -> bytes:
    """The one byte form of a JSON document: sorted keys, no spaces, UTF-8. Equal content, equal digest."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


@cache
def config_schema() -> dict:
    """The published JSON Schema (draft 2020-12) of the Configuration."""
    text = resources.files("clowderd.aimage").joinpath("schema").joinpath(SCHEMA_FILE).read_text("utf-8")
    return json.loads(text)


@cache
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(
        config_schema(), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def load_config(obj: Any, source: str, at: str = "") -> dict:
    """Validate a Configuration and return it with `version` filled in (so `{}` and the explicit
    default have one canonical form). Errors read `<source>: <at><json path>: <problem>` and report
    the first problem in path order, so the same document always gives the same message."""
    if not isinstance(obj, dict):
        raise InvalidInput(f"{source}: {at or 'configuration'}: must be a JSON object, not {_type_name(obj)}")
    version = obj.get("version", CONFIG_VERSION)
    if version != CONFIG_VERSION:
        raise InvalidInput(f"{source}: {_join(at, ['version'])}: {version!r} is not supported "
                           f"(this Clowder reads {CONFIG_VERSION!r})")
    problems = sorted(p for error in _validator().iter_errors(obj) for p in _explain(error))
    problems = problems or _non_finite(obj, [])
    problems = problems or _semantic_problems(obj)
    if problems:
        _, path, message = problems[0]
        raise InvalidInput(f"{source}: {_join(at, path)}: {message}" if path or at else f"{source}: {message}")
    return json.loads(canonical_json({**obj, "version": CONFIG_VERSION}))


def load_config_file(path: Path) -> dict:
    """Read a JSON Configuration file and validate it; errors name the file."""
    try:
        text = Path(path).read_text("utf-8")
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise InvalidInput(f"{path}: not UTF-8 text") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{path}: not valid JSON: line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    return load_config(obj, str(path))


def _explain(error: jsonschema.ValidationError) -> list[tuple[tuple, list, str]]:
    """Turn one jsonschema error into (sort key, path, message) triples naming the offending field."""
    path = list(error.absolute_path)
    if "propertyNames" in error.relative_schema_path:
        path.append(error.instance)
    schema = error.schema if isinstance(error.schema, dict) else {}
    if error.validator == "additionalProperties":
        known = list(schema.get("properties", {}))
        return [_problem(path + [key], "unknown field" + _did_you_mean(key, known))
                for key in error.instance if key not in known]
    if error.validator == "required":
        return [_problem(path + [key], "required field is missing")
                for key in error.validator_value if key not in error.instance]
    if error.validator == "pattern" and "description" in schema:
        return [_problem(path, f"{error.instance!r} is not {schema['description']}")]
    if error.validator == "format" and error.validator_value == "regex":
        return [_problem(path, f"{error.instance!r} is not a valid regular expression")]
    if error.validator == "anyOf":  # the alternative of the value's type says what is wrong with it
        fitting = [e for e in error.context if e.validator != "type"]
        if fitting:
            return [p for e in fitting for p in _explain(e)]
        kinds = " or ".join(str(s.get("type")) for s in error.validator_value)
        return [_problem(path, f"{error.instance!r} is not a {kinds}")]
    return [_problem(path, error.message)]


def _problem(path: list, message: str) -> tuple[tuple, list, str]:
    key = tuple((0, p, "") if isinstance(p, int) else (1, 0, str(p)) for p in path)
    return key, path, message


def _non_finite(value: Any, path: list) -> list[tuple[tuple, list, str]]:
    """JSON has no NaN or infinity (YAML has), and the schema's bounds do not catch NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return [_problem(path, f"{value!r} is not a finite number")]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return [p for key, child in items for p in _non_finite(child, path + [key])][:1]


def _semantic_problems(obj: dict) -> list[tuple[tuple, list, str]]:
    """Rules across fields that JSON Schema cannot say clearly."""
    problems = []
    preemption = obj.get("preemption", {})
    if preemption.get("preemptible") is True and preemption.get("must_stay") is True:
        problems.append(_problem(["preemption"], "preemptible and must_stay cannot both be true"))
    gpu_count = obj.get("placement", {}).get("gpu_count")
    engine = obj.get("engine", {})
    needs = {
        "vllm": engine.get("vllm", {}).get("tensor_parallel_size", 1)
        * engine.get("vllm", {}).get("pipeline_parallel_size", 1),
        "tensorrt_llm": engine.get("tensorrt_llm", {}).get("tp_size", 1)
        * engine.get("tensorrt_llm", {}).get("pp_size", 1),
    }
    for name, gpus in needs.items():
        if isinstance(gpu_count, int) and isinstance(gpus, int) and gpus > gpu_count:
            problems.append(_problem(["engine", name], f"parallelism needs {gpus} GPUs but "
                                                       f"placement.gpu_count is {gpu_count}"))
    return problems + _unknown_engines(engine)


def _unknown_engines(engine: dict) -> list[tuple[tuple, list, str]]:
    """An engine name, or a section of engine parameters, that names no engine installed here (the
    built-ins and the plugins): most often a typo."""
    known = sorted(installed_engines())
    problems = []
    name = engine.get("name")
    if isinstance(name, str) and name not in known:
        problems.append(_problem(["engine", "name"], f"{name!r} is not one of the engines installed here "
                                                     f"({', '.join(known)}){_did_you_mean(name, known)}"))
    for section in engine:
        if section != "name" and section not in known:
            problems.append(_problem(["engine", section], "unknown field: no engine of that name is installed "
                                                          f"here{_did_you_mean(section, known)}"))
    return problems


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(str(word), choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _join(at: str, path: list) -> str:
    text = at
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif _IDENTIFIER.fullmatch(str(part)):
            text += f".{part}" if text else str(part)
        else:
            text += f"[{str(part)!r}]"
    return text


def _type_name(obj: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number",
            type(None): "null"}.get(type(obj), type(obj).__name__)
