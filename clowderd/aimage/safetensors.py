"""Strict reader of safetensors headers (https://github.com/huggingface/safetensors, format section).

Rules enforced, as the reference implementation does: the 8-byte little-endian header length; a header
of at most 100 MB that fits in the file, is UTF-8 JSON, starts with '{' (trailing spaces allowed) and
has no duplicate keys; `__metadata__` maps strings to strings; each tensor has a known dtype, a shape of
non-negative ints and `data_offsets` [begin, end] whose length is numel x dtype size; the tensors cover
the byte buffer exactly: no overlap, no hole (no polyglot files), and the file ends at the buffer end
(no trailing bytes).
"""

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from clowderd.errors import InvalidInput

MAX_HEADER_SIZE = 100_000_000
METADATA_KEY = "__metadata__"

# Size in bits of one element of each dtype.
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute offset in the file
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    file_size: int
    header_size: int  # length of the JSON header, not counting the 8-byte length prefix
    metadata: dict[str, str]
    tensors: list[TensorInfo]  # in file order

    @property
    def data_start(self) -> int:
        return 8 + self.header_size

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {t.name: t.shape for t in self.tensors}


def read_header(path: Path) -> SafetensorsHeader:
    """Read and check the header of a safetensors file; InvalidInput names the file and the tensor."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return read_open_header(f, path)
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read: {exc.strerror}") from None


def read_open_header(f: BinaryIO, path: Path | str) -> SafetensorsHeader:
    """read_header of a file open for reading at its start (path names it in errors)."""
    file_size = os.fstat(f.fileno()).st_size
    prefix = f.read(8)
    if len(prefix) < 8:
        raise InvalidInput(f"{path}: not a safetensors file: {file_size} bytes, shorter than the "
                           "8-byte header length")
    (header_size,) = struct.unpack("<Q", prefix)
    if header_size > MAX_HEADER_SIZE:
        raise InvalidInput(f"{path}: header length {header_size} is over the limit of {MAX_HEADER_SIZE}")
    if header_size > file_size - 8:
        raise InvalidInput(f"{path}: header length {header_size} is larger than the file "
                           f"({file_size} bytes)")
    raw = f.read(header_size)
    metadata, entries = _parse_json(path, raw)
    data_start = 8 + header_size
    tensors = [_tensor(path, name, entry, data_start) for name, entry in entries]
    _check_layout(path, tensors, data_start, file_size)
    return SafetensorsHeader(Path(path), file_size, header_size, metadata, tensors)


def content_cuts(f: BinaryIO) -> list[int]:
    """The tensor boundaries of a file open at its start if it is a safetensors file, else none:
    for content that arrives without a name that says what it is (a pushed or pulled blob)."""
    try:
        return tensor_boundaries(read_open_header(f, "blob"))
    except (InvalidInput, OSError):
        return []


def tensor_boundaries(header: SafetensorsHeader) -> list[int]:
    """Sorted absolute offsets where a chunker must cut: the header end and every tensor's begin and
    end, without 0 and the file size. An unchanged tensor then chunks the same wherever it moves."""
    cuts = {header.data_start}
    for t in header.tensors:
        cuts.update((t.begin, t.end))
    return sorted(c for c in cuts if 0 < c < header.file_size)


def _parse_json(path: Path, raw: bytes) -> tuple[dict[str, str], list[tuple[str, object]]]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{path}: header is not UTF-8 (byte {8 + exc.start})") from None
    if not text.startswith("{"):
        raise InvalidInput(f"{path}: header is not a JSON object (it must start with '{{')")

    def pairs(items: list[tuple[str, object]]) -> dict:
        seen = set()
        for key, _ in items:
            if key in seen:
                raise InvalidInput(f"{path}: header has the key {key!r} twice")
            seen.add(key)
        return dict(items)

    try:
        header = json.loads(text.rstrip(" "), object_pairs_hook=pairs)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{path}: header is not valid JSON: {exc.msg} at character {exc.pos}") from None
    metadata = header.pop(METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidInput(f"{path}: {METADATA_KEY} must map strings to strings")
    return metadata, list(header.items())


def _tensor(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise InvalidInput(f"{where}: must be an object with dtype, shape and data_offsets")
    unknown = set(entry) - {"dtype", "shape", "data_offsets"}
    if unknown:
        raise InvalidInput(f"{where}: unknown field {sorted(unknown)[0]!r}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise InvalidInput(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise InvalidInput(f"{where}: shape must be a list of non-negative integers, not {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_uint(o) for o in offsets)
            or offsets[0] > offsets[1]):
        raise InvalidInput(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, not {offsets!r}")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    length = offsets[1] - offsets[0]
    if bits % 8 or bits // 8 != length:
        raise InvalidInput(f"{where}: {dtype} {shape} needs {bits / 8:g} bytes but data_offsets "
                           f"{offsets} span {length}")
    return TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _check_layout(path: Path, tensors: list[TensorInfo], data_start: int, file_size: int) -> None:
    position, previous = data_start, None
    for t in sorted(tensors, key=lambda t: (t.begin, t.end)):
        if t.begin < position:
            raise InvalidInput(f"{path}: tensors {previous.name!r} and {t.name!r} overlap (bytes "
                               f"{previous.begin}-{previous.end} and {t.begin}-{t.end})")
        if t.begin > position:
            after = f"after tensor {previous.name!r}" if previous else "before the first tensor"
            raise InvalidInput(f"{path}: {t.begin - position} bytes {after} belong to no tensor "
                               f"(the format forbids holes)")
        if t.end > position or previous is None:
            position, previous = t.end, t
    if position > file_size:
        raise InvalidInput(f"{path}: truncated: tensor {previous.name!r} needs {position} bytes, "
                           f"file has {file_size}")
    if position < file_size:
        raise InvalidInput(f"{path}: {file_size - position} trailing bytes after the last tensor "
                           f"(the file must end at byte {position})")


def _is_uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
