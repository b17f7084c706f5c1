"""The Clowderfile: a YAML recipe naming a base model, adapters, a configuration and annotations."""

import difflib
from dataclasses import dataclass
from pathlib import Path

import yaml

from clowderd.aimage.adapter import validate_adapter_name
from clowderd.aimage.config import load_config, load_config_file
from clowderd.aimage.reference import Reference, parse_reference
from clowderd.errors import InvalidInput

FIELDS = ("base", "adapters", "config", "config_file", "annotations")
ADAPTER_FIELDS = ("name", "path")
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class BaseSpec:
    kind: str  # 'dir' (Hugging Face layout), 'gguf' (a file to convert) or 'image' (an aimage reference)
    value: Path | Reference


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    path: Path


@dataclass(frozen=True)
class Clowderfile:
    path: Path
    base: BaseSpec
    adapters: list[AdapterSpec]
    config: dict  # validated, version filled in; {"version": ...} when none is given
    annotations: dict[str, str]
    config_given: bool  # config or config_file present (else an image base keeps its own configuration)


class _StrictLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping instead of keeping the last."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_clowderfile(path: Path) -> Clowderfile:
    """Read and check a Clowderfile; relative paths resolve against its directory. Errors read
    `<file>: <key path>: <problem>`."""
    path = Path(path)
    src = str(path)
    try:
        text = path.read_text("utf-8")
    except OSError as exc:
        raise InvalidInput(f"{src}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise InvalidInput(f"{src}: not UTF-8 text") from None
    try:
        doc = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise InvalidInput(f"{src}: not valid YAML: {at}{getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInput(f"{src}: must be a YAML mapping with at least 'base'")
    _check_keys(src, "", doc, FIELDS)
    here = path.parent
    if "base" not in doc:
        raise InvalidInput(f"{src}: base: required (a model directory, a .gguf file or an aimage reference)")
    base = _base(src, here, doc["base"])
    adapters = _adapters(src, here, doc.get("adapters", []))
    if "config" in doc and "config_file" in doc:
        raise InvalidInput(f"{src}: config and config_file are mutually exclusive; give one")
    if "config_file" in doc:
        config = load_config_file(_existing(src, "config_file", here, doc["config_file"]))
    else:
        config = load_config(doc.get("config", {}), src, at="config")
    annotations = _annotations(src, doc.get("annotations", {}))
    return Clowderfile(path, base, adapters, config, annotations, "config" in doc or "config_file" in doc)


def _base(src: str, here: Path, value: object) -> BaseSpec:
    """A value starting with '.', '/' or '~', or ending with '.gguf', or naming an existing path, is a
    path; anything else is an aimage reference."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{src}: base: must be a path or an aimage reference, not {value!r}")
    looks_like_path = value.startswith((".", "/", "~")) or value.lower().endswith(".gguf")
    if looks_like_path or (here / value).exists():
        target = _existing(src, "base", here, value)
        if target.is_dir():
            return BaseSpec("dir", target)
        with open(target, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise InvalidInput(f"{src}: base: {value} is neither a model directory nor a GGUF file")
        return BaseSpec("gguf", target)
    try:
        return BaseSpec("image", parse_reference(value))
    except InvalidInput as exc:
        raise InvalidInput(f"{src}: base: {exc} (for a directory, write ./{value})") from None


def _adapters(src: str, here: Path, value: object) -> list[AdapterSpec]:
    if not isinstance(value, list):
        raise InvalidInput(f"{src}: adapters: must be a list of {{name, path}}")
    adapters, names = [], set()
    for i, item in enumerate(value):
        at = f"adapters[{i}]"
        if not isinstance(item, dict):
            raise InvalidInput(f"{src}: {at}: must be a mapping with name and path")
        _check_keys(src, f"{at}.", item, ADAPTER_FIELDS)
        for key in ADAPTER_FIELDS:
            if key not in item:
                raise InvalidInput(f"{src}: {at}.{key}: required")
        try:
            name = validate_adapter_name(item["name"])
        except InvalidInput as exc:
            raise InvalidInput(f"{src}: {at}.name: {exc}") from None
        if name in names:
            raise InvalidInput(f"{src}: {at}.name: adapter {name!r} is given twice")
        names.add(name)
        target = _existing(src, f"{at}.path", here, item["path"])
        if not target.is_dir():
            raise InvalidInput(f"{src}: {at}.path: {item['path']} is not a directory (a PEFT adapter directory)")
        adapters.append(AdapterSpec(name, target))
    return adapters


def _annotations(src: str, value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        raise InvalidInput(f"{src}: annotations: must be a mapping of strings to strings")
    for key, text in value.items():
        if not isinstance(key, str) or not key:
            raise InvalidInput(f"{src}: annotations: key {key!r} must be a non-empty string")
        if not isinstance(text, str):
            raise InvalidInput(f"{src}: annotations.{key}: must be a string, not {text!r} (quote it)")
    return dict(value)


def _existing(src: str, at: str, here: Path, value: object) -> Path:
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"{src}: {at}: must be a path, not {value!r}")
    target = here / Path(value).expanduser()
    if not target.exists():
        raise InvalidInput(f"{src}: {at}: {value} does not exist")
    return target.resolve()


def _check_keys(src: str, at: str, mapping: dict, known: tuple[str, ...]) -> None:
    for key in mapping:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})"
            raise InvalidInput(f"{src}: {at}{key}: unknown field{hint}")
