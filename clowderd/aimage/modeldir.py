"""Scan a Hugging Face layout model directory into the files that become an aimage's model layers."""

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from clowderd.aimage import mediatypes
from clowderd.aimage.safetensors import read_header
from clowderd.errors import InvalidInput

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"})
NUMPY_SUFFIXES = frozenset({".npy", ".npz"})  # may hold pickled objects
CODE_SUFFIXES = frozenset({".py", ".pyc", ".pyo", ".so", ".dylib", ".dll", ".exe", ".sh", ".ipynb"})

WEIGHT_CONFIG_NAMES = frozenset({
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.json", "chat_template.jinja", "preprocessor_config.json", "processor_config.json",
})
WEIGHT_CONFIG_SUFFIXES = frozenset({".model", ".tiktoken", ".jinja"})  # sentencepiece, tiktoken, chat templates
DOC_PREFIXES = ("readme", "license", "licence", "notice", "copying", "use_policy", "citation")
DOC_SUFFIXES = frozenset({".md", ".txt", ".rst", ".json", ".yaml", ".yml", ".cff", ".pdf",
                          ".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp"})
INDEX_SUFFIX = ".safetensors.index.json"
CLOWDERFILE = "Clowderfile"


@dataclass(frozen=True)
class ModelFile:
    relpath: str  # POSIX path relative to the model directory: the org.cncf.model.filepath annotation
    abspath: Path  # the regular file it resolves to
    media_type: str
    size: int


def scan_model_dir(path: Path) -> list[ModelFile]:
    """The files of a model directory, sorted by relpath, each checked and given its media type.

    Requires config.json (a JSON object) and at least one valid safetensors file; refuses pickles and
    code, which could run on load; skips hidden files and directories (.git, .cache)."""
    root = Path(path)
    if not root.is_dir():
        raise InvalidInput(f"{root}: not a directory")
    # A Clowderfile kept beside the model (`base: .`) is the recipe, not part of the model.
    files = [_model_file(root, relpath) for relpath in list_files(root) if relpath != CLOWDERFILE]
    by_path = {f.relpath: f for f in files}
    if "config.json" not in by_path:
        raise InvalidInput(f"{root}: config.json is missing (a model directory has the Hugging Face layout)")
    read_json_object(by_path["config.json"].abspath)
    weights = {f.relpath: read_header(f.abspath) for f in files if f.media_type == mediatypes.MODEL_WEIGHT}
    if not weights:
        raise InvalidInput(f"{root}: no *.safetensors weights")
    for f in files:
        if f.relpath.endswith(INDEX_SUFFIX):
            _check_index(f, weights)
    return files


def list_files(root: Path) -> list[str]:
    """POSIX relative paths of the visible regular files under root (following file symlinks), sorted."""
    found = []
    for directory, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for d in dirnames:
            if os.path.islink(os.path.join(directory, d)):
                raise InvalidInput(f"{os.path.join(directory, d)}: a symlink to a directory is not supported")
        for name in filenames:
            if name.startswith("."):
                continue
            full = os.path.join(directory, name)
            try:
                mode = os.stat(full).st_mode
            except OSError:
                raise InvalidInput(f"{full}: broken symlink") from None
            if not stat.S_ISREG(mode):
                raise InvalidInput(f"{full}: not a regular file")
            found.append(PurePosixPath(Path(full).relative_to(root)).as_posix())
    return sorted(found)


def refuse_unsafe(root: Path, relpath: str) -> None:
    """Raise InvalidInput for files that can run code when loaded: pickles and source or binaries."""
    suffix = PurePosixPath(relpath).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise InvalidInput(f"{root}: models are pure data: {relpath} is a pickle, which can run code; "
                           "convert it to safetensors")
    if suffix in CODE_SUFFIXES:
        raise InvalidInput(f"{root}: models are pure data: {relpath} is executable code (models that need "
                           f"trust_remote_code are not supported); remove it")
    if suffix in NUMPY_SUFFIXES:
        raise InvalidInput(f"{root}: {relpath}: numpy files may hold pickles; convert them to safetensors")


def read_json_object(path: Path) -> dict:
    """Parse a JSON file that must hold an object; errors name the file."""
    try:
        obj = json.loads(Path(path).read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidInput(f"{path}: must hold a JSON object")
    return obj


def _model_file(root: Path, relpath: str) -> ModelFile:
    abspath = (root / relpath).resolve()
    return ModelFile(relpath, abspath, _media_type(root, relpath), abspath.stat().st_size)


def _media_type(root: Path, relpath: str) -> str:
    refuse_unsafe(root, relpath)
    name = PurePosixPath(relpath).name
    lower = name.lower()
    suffix = PurePosixPath(lower).suffix
    if lower.endswith(".safetensors"):
        return mediatypes.MODEL_WEIGHT
    if name in WEIGHT_CONFIG_NAMES or lower.endswith(INDEX_SUFFIX) or suffix in WEIGHT_CONFIG_SUFFIXES:
        return mediatypes.MODEL_WEIGHT_CONFIG
    if lower.startswith(DOC_PREFIXES) or suffix in DOC_SUFFIXES:
        return mediatypes.MODEL_DOC
    raise InvalidInput(f"{root}: {relpath}: unsupported file type (a model directory holds safetensors "
                       "weights, their configuration and tokenizer files, and documents); remove it")


def _check_index(index: ModelFile, weights: dict) -> None:
    obj = read_json_object(index.abspath)
    weight_map = obj.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InvalidInput(f"{index.abspath}: weight_map must map tensor names to file names")
    folder = PurePosixPath(index.relpath).parent
    shards: dict[str, set[str]] = {}
    for tensor, shard in weight_map.items():
        shards.setdefault((folder / shard).as_posix(), set()).add(tensor)
    for shard, listed in sorted(shards.items()):
        if shard not in weights:
            raise InvalidInput(f"{index.abspath}: weight_map names {PurePosixPath(shard).name}, which is "
                               "not a safetensors file of this directory")
        present = set(weights[shard].shapes())
        if listed - present:
            raise InvalidInput(f"{index.abspath}: tensor {min(listed - present)!r} is not in {shard}")
        if present - listed:
            raise InvalidInput(f"{index.abspath}: tensor {min(present - listed)!r} of {shard} is not in weight_map")
