"""clowderd._native.chunk: FastCDC with forced cuts, BLAKE3 ids, identical for any thread count."""
import hashlib
import os
import random

import blake3 as reference
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from clowderd import _native

SMALL = dict(min_size=256, avg_size=1024, max_size=4096)  # many chunks from little data


def bf16_like(n_bytes, seed=0):
    """Bytes that look like model weights: normal floats truncated to bf16 bit patterns."""
    x = np.random.default_rng(seed).standard_normal(n_bytes // 2, dtype=np.float32)
    return (x.view(np.uint32) >> 16).astype(np.uint16).tobytes()


def assert_well_formed(data, chunks, cuts=(), min_size=_native.MIN_SIZE, max_size=_native.MAX_SIZE):
    ends = set(cuts) | {len(data)}
    pos = 0
    for off, length, cid in chunks:
        assert off == pos and length > 0
        assert length <= max_size
        end = off + length
        # Only the last chunk of a segment may be shorter than min_size.
        if length < min_size:
            assert end in ends
        assert cid == reference.blake3(data[off:end]).digest()
        pos = end
    assert pos == len(data)


def chunks_digest(chunks):
    return hashlib.sha256(b"".join(off.to_bytes(8, "little") + length.to_bytes(8, "little") + cid
                                   for off, length, cid in chunks)).hexdigest()


# The store's chunk ids depend on these boundaries: they were cut by the byte-at-a-time loop the
# format was defined with, and no faster cutting loop may move one.
PINNED_INPUT = (hashlib.shake_256(b"clowder cut points").digest(3 << 20) + bytes(300_000)
                + hashlib.shake_256(b"tail").digest(50_000))
PINNED_LENGTHS = [39119, 79670, 67328, 105921, 78506, 42585, 79539, 92611, 21036, 70259, 73463, 38017, 124255,
                  77473, 23740, 35054, 73659, 68463, 67624, 76733, 67794, 67496, 91779, 78181, 67315, 92048, 12594,
                  120623, 115535, 79952, 111790, 72289, 66777, 66931, 16446, 73832, 67495, 14906, 71217, 67534,
                  29390, 94930, 73271, 93740, 41847, 131072, 131072, 93912, 48905]


@pytest.mark.parametrize("threads", [1, 2])
def test_cut_points_and_ids_are_pinned(threads):
    chunks = _native.chunk(PINNED_INPUT, [1 << 20], threads=threads)
    assert [length for _, length, _ in chunks] == PINNED_LENGTHS
    assert chunks_digest(chunks) == "3aef099dbc51043dcc408a7a2f72c6777d3f464ddc25f785cc91d85405ac20a5"
    small = _native.chunk(PINNED_INPUT, [1 << 20], threads=threads, **SMALL)
    assert len(small) == 2816
    assert chunks_digest(small) == "dd976ba88c3d83ab3178142f0d1fcfa0c173e043e109b64665566eb4015ca8ee"


def reference_lengths(data, min_size, avg_size, max_size):
    """Chunk lengths by the definition in native/README.md, one byte at a time."""
    gear, x = [], 0x636C6F7764657221
    for _ in range(256):  # splitmix64
        x = (x + 0x9E3779B97F4A7C15) % 2**64
        z = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
        gear.append(z ^ (z >> 31))
    bits = avg_size.bit_length() - 1
    mask_s, mask_l = (2**64 - 1) ^ (2**(64 - bits - 2) - 1), (2**64 - 1) ^ (2**(64 - bits + 2) - 1)
    lengths, pos = [], 0
    while pos < len(data):
        n = len(data) - pos
        length = n
        if n > min_size:
            end = min(n, max_size)
            length, h = end, 0
            for i in range(min_size, end):
                h = ((h << 1) + gear[data[pos + i]]) % 2**64
                if not h & (mask_s if i < min(avg_size, end) else mask_l):
                    length = i + 1
                    break
        lengths.append(length)
        pos += length
    return lengths


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=0, max_size=12000), st.integers(64, 700), st.integers(8, 11), st.integers(0, 3000))
def test_cut_points_follow_the_byte_at_a_time_definition(data, min_size, avg_bits, extra):
    avg_size = max(1 << avg_bits, min_size)
    avg_size = 1 << (avg_size - 1).bit_length()  # a power of two >= min_size
    sizes = dict(min_size=min_size, avg_size=avg_size, max_size=avg_size + extra)
    chunks = _native.chunk(data, threads=1, **sizes)
    assert [length for _, length, _ in chunks] == reference_lengths(data, **sizes)


def test_defaults_are_xet_sizes():
    assert (_native.MIN_SIZE, _native.AVG_SIZE, _native.MAX_SIZE) == (8 << 10, 64 << 10, 128 << 10)


def test_chunks_reassemble_input_with_sizes_in_bounds_and_blake3_ids():
    data = bf16_like(8 << 20)
    chunks = _native.chunk(data)
    assert_well_formed(data, chunks)
    sizes = [c[1] for c in chunks[:-1]]
    assert 32 << 10 < sum(sizes) / len(sizes) < 128 << 10  # normalized chunking centres near avg


def test_empty_input_has_no_chunks():
    assert _native.chunk(b"") == []


def test_input_shorter_than_min_is_one_chunk():
    data = os.urandom(5000)
    assert _native.chunk(data) == [(0, 5000, reference.blake3(data).digest())]


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=0, max_size=40000), st.data())
def test_forced_cuts_are_boundaries_and_chunks_cover_input(data, draw):
    cuts = sorted(draw.draw(st.sets(st.integers(1, max(1, len(data) - 1)), max_size=8))) if len(data) > 1 else []
    chunks = _native.chunk(data, cuts, **SMALL)
    assert_well_formed(data, chunks, cuts, SMALL["min_size"], SMALL["max_size"])
    starts = {c[0] for c in chunks}
    assert all(c in starts for c in cuts)


def test_insertion_near_start_changes_only_nearby_chunks():
    data = bf16_like(4 << 20, seed=3)
    edited = data[:1000] + b"inserted!" + data[1000:]
    before, after = _native.chunk(data), _native.chunk(edited)
    tail_before = {(off + 9, length, cid) for off, length, cid in before[3:]}
    tail_after = set(after)
    assert len(tail_before - tail_after) == 0
    assert len(after) - len(tail_before & tail_after) <= 4


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_threads_give_identical_chunks(threads):
    data = bf16_like(8 << 20, seed=1)
    cuts = sorted(random.Random(1).sample(range(1, len(data)), 40))
    assert _native.chunk(data, threads=threads) == _native.chunk(data, threads=1)
    assert _native.chunk(data, cuts, threads=threads) == _native.chunk(data, cuts, threads=1)


def test_threads_agree_on_data_that_never_resyncs():
    # All-zero data never matches a mask: every chunk is max_size, so chunking from a split point
    # never meets the serial boundaries and the earlier thread has to carry on to the end.
    data = bytes(6 << 20) + os.urandom(1 << 20) + bytes(3 << 20)
    ref = _native.chunk(data, threads=1)
    assert_well_formed(data, ref)
    for threads in (2, 3, 8):
        assert _native.chunk(data, threads=threads) == ref


def test_threads_agree_with_long_segments_and_small_sizes():
    data = bf16_like(4 << 20, seed=2)
    cuts = [7, 1 << 20, (1 << 20) + 1, 3 << 20]  # one tiny segment, several long ones
    ref = _native.chunk(data, cuts, threads=1, **SMALL)
    assert_well_formed(data, ref, cuts, SMALL["min_size"], SMALL["max_size"])
    for threads in (2, 3, 8):
        assert _native.chunk(data, cuts, threads=threads, **SMALL) == ref


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1 << 16, 1 << 20), st.integers(1, 9))
def test_threads_identical_for_random_data_and_cuts(seed, size, threads):
    rnd = random.Random(seed)
    data = rnd.randbytes(size)
    cuts = sorted(rnd.sample(range(1, size), rnd.randrange(0, 6)))
    assert _native.chunk(data, cuts, threads=threads, **SMALL) == _native.chunk(data, cuts, threads=1, **SMALL)


@pytest.mark.parametrize("kernel", _native.BLAKE3_KERNELS)
def test_chunk_ids_are_the_same_with_every_blake3_kernel(kernel):
    data = bf16_like(2 << 20, seed=4)
    cuts = [5, 100_000, 100_001, 1 << 20]  # a one-byte chunk and chunks of every size class
    want = _native.chunk(data, cuts, threads=1)
    previous = _native.blake3_use_kernel(kernel)
    try:
        got = _native.chunk(data, cuts, threads=2)
    finally:
        _native.blake3_use_kernel(previous)
    assert got == want
    assert_well_formed(data, got, cuts)


def test_chunk_accepts_bytearray_and_memoryview():
    data = bf16_like(1 << 20)
    ref = _native.chunk(data)
    assert _native.chunk(bytearray(data)) == ref
    assert _native.chunk(memoryview(data)) == ref


@pytest.mark.parametrize("cuts, message", [
    ([5, 3], "increasing"),
    ([3, 3], "increasing"),
    ([0], "out of range"),
    ([-1], "out of range"),
    ([100], "out of range"),
    ([2**70], "out of range"),
])
def test_bad_cuts_raise_value_error(cuts, message):
    with pytest.raises(ValueError, match=message):
        _native.chunk(bytes(100), cuts)


@pytest.mark.parametrize("sizes, message", [
    (dict(avg_size=65535), "power of two"),
    (dict(min_size=1 << 17), "min_size <= avg_size <= max_size"),
    (dict(max_size=1 << 15), "min_size <= avg_size <= max_size"),
    (dict(min_size=0), "positive"),
    (dict(min_size=8), "at least 64"),
])
def test_bad_sizes_raise_value_error(sizes, message):
    with pytest.raises(ValueError, match=message):
        _native.chunk(bytes(100), **sizes)


def test_negative_threads_raise_value_error():
    with pytest.raises(ValueError, match="threads"):
        _native.chunk(bytes(100), threads=-1)
