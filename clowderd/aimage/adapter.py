"""PEFT LoRA adapter directories (EP layers) and the check that an adapter fits a base model."""

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from clowderd.aimage import mediatypes
from clowderd.aimage.modeldir import DOC_PREFIXES, ModelFile, list_files, read_json_object, refuse_unsafe
from clowderd.aimage.safetensors import SafetensorsHeader, read_header
from clowderd.errors import InvalidInput

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MAX_NAME_LENGTH = 64
PEFT_PREFIX = "base_model.model."

_NAME = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*")
# `<module>.lora_A.weight`, also with the adapter name that some PEFT versions leave in: `lora_A.default.weight`.
_LORA = re.compile(r"(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|"
                   r"lora_magnitude_vector)(?:\.[^.]+)?(?:\.weight)?")


@dataclass(frozen=True)
class AdapterFiles:
    name: str
    root: Path
    config: dict  # adapter_config.json
    files: list[ModelFile]  # adapter_config.json and adapter_model.safetensors, as EP layers
    header: SafetensorsHeader  # of adapter_model.safetensors


def validate_adapter_name(name: object) -> str:
    """Adapter names are lowercase letters and digits separated by '.', '_' or '-', at most 64."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or len(name) > MAX_NAME_LENGTH:
        raise InvalidInput(f"{name!r} is not a valid adapter name (lowercase letters and digits separated "
                           f"by '.', '_' or '-', at most {MAX_NAME_LENGTH} characters)")
    return name


def scan_adapter_dir(path: Path, name: str) -> AdapterFiles:
    """Check a PEFT LoRA directory: adapter_config.json (peft_type LORA, r, lora_alpha, target_modules)
    and adapter_model.safetensors. README and licence files are allowed but not packaged."""
    validate_adapter_name(name)
    root = Path(path)
    if not root.is_dir():
        raise InvalidInput(f"adapter {name!r}: {root} is not a directory")
    relpaths = list_files(root)
    for relpath in relpaths:
        refuse_unsafe(root, relpath)
        if relpath not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) and not _is_doc(relpath):
            raise InvalidInput(f"adapter {name!r}: {root}: unexpected file {relpath} (an adapter directory "
                               f"holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    for required in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if required not in relpaths:
            raise InvalidInput(f"adapter {name!r}: {root}: {required} is missing")
    config = read_json_object(root / ADAPTER_CONFIG)
    _check_config(root / ADAPTER_CONFIG, config)
    header = read_header(root / ADAPTER_WEIGHTS)
    files = [ModelFile(rel, (root / rel).resolve(), media, (root / rel).stat().st_size)
             for rel, media in ((ADAPTER_CONFIG, mediatypes.EP_CONFIG), (ADAPTER_WEIGHTS, mediatypes.EP_WEIGHT))]
    return AdapterFiles(name, root, config, files, header)


def check_adapter_matches_base(adapter: AdapterFiles, base_files: list[ModelFile]) -> None:
    """Check, from both safetensors headers, that every LoRA pair `<module>.lora_A` [r, in] /
    `lora_B` [out, r] targets a base weight `<module>.weight` [out, in] ([in, out] with fan_in_fan_out),
    and that any other adapter tensor (modules_to_save) has the shape of the base tensor it replaces."""
    base = {}
    for f in base_files:
        if f.media_type == mediatypes.MODEL_WEIGHT:
            base.update(read_header(f.abspath).shapes())
    transposed = adapter.config.get("fan_in_fan_out") is True
    pairs: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
    for tensor in adapter.header.tensors:
        name = tensor.name.removeprefix(PEFT_PREFIX)
        match = _LORA.fullmatch(name)
        if match:
            pairs.setdefault(match["module"], {})[match["kind"]] = (tensor.name, tensor.shape)
        elif name not in base:
            raise _misfit(adapter, f"tensor {tensor.name!r} matches no base tensor ({name!r} is not in the base)")
        elif base[name] != tensor.shape:
            raise _misfit(adapter, f"tensor {tensor.name!r}: base {name!r} has shape {list(base[name])}, "
                                   f"adapter has {list(tensor.shape)}")
    for module, parts in sorted(pairs.items()):
        _check_module(adapter, module, parts, base, transposed)


def _check_module(adapter: AdapterFiles, module: str, parts: dict, base: dict, transposed: bool) -> None:
    embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
    a_kind, b_kind = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
    for kind in (a_kind, b_kind):
        if kind not in parts:
            present = next(iter(parts.values()))[0]
            raise _misfit(adapter, f"tensor {present!r} has no {kind} partner")
    (a_name, a_shape), (b_name, b_shape) = parts[a_kind], parts[b_kind]
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
        raise _misfit(adapter, f"{a_name!r} {list(a_shape)} and {b_name!r} {list(b_shape)} are not a "
                               "[r, in] / [out, r] pair")
    weight = f"{module}.weight"
    if weight not in base:
        raise _misfit(adapter, f"tensor {a_name!r} targets {weight!r}, which the base does not have")
    found = tuple(base[weight])
    if embedding:  # embedding weight [num_embeddings, dim]; A [r, num_embeddings], B [dim, r]
        expected = (a_shape[1], b_shape[0])
    else:
        expected = (a_shape[1], b_shape[0]) if transposed else (b_shape[0], a_shape[1])
    if found != expected:
        raise _misfit(adapter, f"tensor {a_name!r} expects {weight!r} of shape {list(expected)}, "
                               f"the base has {list(found)}")
    if "lora_magnitude_vector" in parts:
        m_name, m_shape = parts["lora_magnitude_vector"]
        out = expected[1] if transposed else expected[0]
        if m_shape != (out,):
            raise _misfit(adapter, f"tensor {m_name!r} has shape {list(m_shape)}, expected [{out}]")


def _check_config(path: Path, config: dict) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise InvalidInput(f"{path}: peft_type is {peft_type!r}; only LORA adapters are supported")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise InvalidInput(f"{path}: r must be a positive integer, not {r!r}")
    alpha = config.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise InvalidInput(f"{path}: lora_alpha must be a positive number, not {alpha!r}")
    targets = config.get("target_modules")
    valid_list = isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)
    if not (valid_list or (isinstance(targets, str) and targets)):
        raise InvalidInput(f"{path}: target_modules must be a non-empty list of module names or a pattern, "
                           f"not {targets!r}")


def _is_doc(relpath: str) -> bool:
    lower = PurePosixPath(relpath).name.lower()
    return lower.startswith(DOC_PREFIXES) or lower.endswith(".md")


def _misfit(adapter: AdapterFiles, detail: str) -> InvalidInput:
    return InvalidInput(f"adapter {adapter.name!r} does not fit this base: {detail}")
