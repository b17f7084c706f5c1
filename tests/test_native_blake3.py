"""clowderd._native.blake3: BLAKE3 written in C must equal the reference `blake3` package."""
import mmap
import os
import random

import blake3 as reference
import pytest
from hypothesis import given, settings, strategies as st

from clowderd import _native

SPEC_LENGTHS = [0, 1, 63, 64, 65, 1023, 1024, 1025, 2047, 2048, 2049, 3072, 4096, 8192,
                65535, 65536, 65537, 131072, 131073, 1000003]


@pytest.mark.parametrize("length", SPEC_LENGTHS)
def test_blake3_matches_reference_at_block_chunk_and_tree_edges(length):
    data = random.Random(length).randbytes(length)
    assert _native.blake3(data) == reference.blake3(data).digest()


def test_blake3_matches_reference_on_a_large_input_with_a_deep_tree():
    data = os.urandom((3 << 20) + 12345)
    assert _native.blake3(data) == reference.blake3(data).digest()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=20000))
def test_blake3_matches_reference_for_any_bytes(data):
    assert _native.blake3(data) == reference.blake3(data).digest()


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=0, max_value=600_000), st.integers(min_value=0, max_value=2**32 - 1))
def test_blake3_matches_reference_for_random_lengths(length, seed):
    data = random.Random(seed).randbytes(length)
    assert _native.blake3(data) == reference.blake3(data).digest()


def test_blake3_accepts_any_contiguous_buffer():
    data = os.urandom(70000)
    want = reference.blake3(data).digest()
    anon = mmap.mmap(-1, len(data))
    anon[:] = data
    for buf in (data, bytearray(data), memoryview(data), anon):
        assert _native.blake3(buf) == want
    assert _native.blake3(memoryview(data)[100:5000]) == reference.blake3(data[100:5000]).digest()


def test_blake3_rejects_non_contiguous_buffers_and_non_buffers():
    with pytest.raises((TypeError, BufferError, ValueError)):
        _native.blake3(memoryview(b"abcdef")[::2])
    with pytest.raises(TypeError):
        _native.blake3("text")


def test_blake3_kernel_is_reported():
    assert _native.BLAKE3_KERNEL in ("avx512", "portable")


@settings(max_examples=50, deadline=None)
@given(st.lists(st.binary(max_size=5000), max_size=20))
def test_blake3_many_is_the_blake3_of_each_piece(pieces):
    data = b"".join(pieces)
    got = _native.blake3_many(memoryview(data), [len(p) for p in pieces])
    assert got == b"".join(_native.blake3(p) for p in pieces)


@pytest.mark.parametrize("lengths, message", [([5], "add up to 5 bytes, data has 10"), ([11], "add up to 11"),
                                              ([-1, 11], "must not be negative"), ("ab", "integer")])
def test_blake3_many_refuses_lengths_that_do_not_cut_data(lengths, message):
    with pytest.raises((ValueError, TypeError), match=message):
        _native.blake3_many(b"x" * 10, lengths)
