import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from clowderd.aimage.safetensors import read_header, tensor_boundaries
from clowderd.errors import InvalidInput


def write_raw(path, header: dict, data: bytes, pad: bytes = b""):
    text = json.dumps(header).encode() + pad
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


@pytest.fixture
def real(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a": np.zeros((2, 3), np.float32), "b": np.ones(4, np.int8), "s": np.array(1.5, np.float16)},
              str(path), metadata={"format": "np"})
    return path


def test_read_header_of_a_real_file_gives_absolute_offsets(real):
    h = read_header(real)
    assert h.metadata == {"format": "np"}
    assert h.file_size == real.stat().st_size
    by_name = {t.name: t for t in h.tensors}
    assert by_name["a"].shape == (2, 3) and by_name["a"].dtype == "F32"
    assert by_name["s"].shape == ()
    data = real.read_bytes()
    a = by_name["a"]
    assert np.frombuffer(data[a.begin:a.end], np.float32).tolist() == [0.0] * 6
    assert max(t.end for t in h.tensors) == h.file_size


def test_tensor_boundaries_are_header_end_and_tensor_edges_without_0_and_file_size(real):
    h = read_header(real)
    cuts = tensor_boundaries(h)
    assert cuts == sorted(set(cuts))
    assert h.data_start in cuts
    assert 0 not in cuts and h.file_size not in cuts
    assert set(cuts) == ({h.data_start} | {t.begin for t in h.tensors} | {t.end for t in h.tensors}) - {h.file_size}


def test_unchanged_tensor_keeps_its_bytes_between_boundaries_when_order_changes(tmp_path):
    big = np.arange(1000, dtype=np.float32)
    save_file({"w": big, "x": np.zeros(3, np.float32)}, str(tmp_path / "1.safetensors"))
    save_file({"a_new": np.ones(7, np.float32), "w": big}, str(tmp_path / "2.safetensors"))
    for name in ("1.safetensors", "2.safetensors"):
        h = read_header(tmp_path / name)
        w = next(t for t in h.tensors if t.name == "w")
        assert w.begin in tensor_boundaries(h) and (w.end in tensor_boundaries(h) or w.end == h.file_size)


def test_header_padding_with_spaces_is_allowed(tmp_path):
    path = write_raw(tmp_path / "p.safetensors", {"t": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}},
                     b"\x01\x02", pad=b"    ")
    assert read_header(path).tensors[0].begin == path.stat().st_size - 2


def test_empty_and_zero_size_tensors_are_allowed(tmp_path):
    path = write_raw(tmp_path / "z.safetensors", {
        "e": {"dtype": "F32", "shape": [0, 4], "data_offsets": [0, 0]},
        "t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\x00")
    assert {t.name for t in read_header(path).tensors} == {"e", "t"}


T = {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}


@pytest.mark.parametrize("header, data, message", [
    ({"t": {**T, "dtype": "X9"}}, b"1234", "tensor 't': unknown dtype 'X9'"),
    ({"t": {**T, "shape": [-1]}}, b"1234", "tensor 't': shape must be a list of non-negative integers"),
    ({"t": {**T, "shape": [True]}}, b"1234", "tensor 't': shape must be a list"),
    ({"t": {**T, "data_offsets": [4]}}, b"1234", "tensor 't': data_offsets must be"),
    ({"t": {**T, "data_offsets": [4, 0]}}, b"1234", "tensor 't': data_offsets must be"),
    ({"t": {**T, "shape": [5]}}, b"1234", "tensor 't': U8 [5] needs 5 bytes but data_offsets [0, 4] span 4"),
    ({"t": {**T, "extra": 1}}, b"1234", "tensor 't': unknown field 'extra'"),
    ({"t": T}, b"12", "truncated: tensor 't' needs"),
    ({"t": T}, b"123456", "2 trailing bytes after the last tensor"),
    ({"t": T, "u": {**T, "data_offsets": [2, 6]}}, b"123456", "tensors 't' and 'u' overlap"),
    ({"t": T, "u": {**T, "data_offsets": [6, 10]}}, b"1234567890", "2 bytes after tensor 't' belong to no tensor"),
    ({"t": {**T, "data_offsets": [2, 6]}}, b"123456", "2 bytes before the first tensor belong to no tensor"),
    ({"__metadata__": {"k": 1}, "t": T}, b"1234", "__metadata__ must map strings to strings"),
])
def test_read_header_rejects_broken_files_naming_file_and_tensor(tmp_path, header, data, message):
    path = write_raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(InvalidInput) as info:
        read_header(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_truncated_real_file_says_how_many_bytes_are_needed(real):
    full = real.stat().st_size
    real.write_bytes(real.read_bytes()[:-3])
    with pytest.raises(InvalidInput, match=f"truncated: tensor '.*' needs {full} bytes, file has {full - 3}"):
        read_header(real)


@pytest.mark.parametrize("raw, message", [
    (b"\x01\x02", "shorter than the 8-byte header length"),
    (struct.pack("<Q", 1000) + b"{}", "header length 1000 is larger than the file"),
    (struct.pack("<Q", 200_000_000) + b"{}", "over the limit"),
    (struct.pack("<Q", 2) + b"\xff\xfe", "header is not UTF-8"),
    (struct.pack("<Q", 2) + b"[]", "header is not a JSON object"),
    (struct.pack("<Q", 3) + b"{x}", "header is not valid JSON"),
    (struct.pack("<Q", 2) + b"{}", None),
])
def test_read_header_checks_the_length_prefix_and_json(tmp_path, raw, message):
    path = tmp_path / "h.safetensors"
    path.write_bytes(raw)
    if message is None:
        assert read_header(path).tensors == [] and tensor_boundaries(read_header(path)) == []
        return
    with pytest.raises(InvalidInput, match=message):
        read_header(path)


def test_duplicate_tensor_names_are_rejected(tmp_path):
    text = b'{"t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'
    path = tmp_path / "d.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\x00")
    with pytest.raises(InvalidInput, match="key 't' twice"):
        read_header(path)


def test_sub_byte_dtypes_need_whole_bytes(tmp_path):
    ok = write_raw(tmp_path / "f4.safetensors", {"t": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}, b"12")
    assert read_header(ok).tensors[0].dtype == "F4"
    bad = write_raw(tmp_path / "f4b.safetensors", {"t": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, b"12")
    with pytest.raises(InvalidInput, match="needs 1.5 bytes"):
        read_header(bad)
