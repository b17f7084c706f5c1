"""clowderd._native.ingest: one pass that copies, sha256s and chunks a file."""
import errno
import fcntl
import hashlib
import os
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings, strategies as st

from clowderd import _native

from .test_native_chunker import bf16_like


@pytest.fixture
def make_src(tmp_path):
    def make(data, name="src"):
        path = tmp_path / name
        path.write_bytes(data)
        fd = os.open(path, os.O_RDONLY)
        opened.append(fd)
        return fd
    opened = []
    yield make
    for fd in opened:
        os.close(fd)


def ingest_to_file(tmp_path, src_fd, *args, **kw):
    dst = tmp_path / "dst"
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        result = _native.ingest(src_fd, fd, *args, **kw)
    finally:
        os.close(fd)
    return result, dst.read_bytes()


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_ingest_copies_bytes_and_matches_hashlib_and_chunk(tmp_path, make_src, threads):
    data = bf16_like(6 << 20) + os.urandom(12345)
    cuts = [100, 3 << 20, (3 << 20) + 5000]
    (sha, chunks), copy = ingest_to_file(tmp_path, make_src(data), cuts, threads=threads)
    assert copy == data
    assert sha == hashlib.sha256(data).digest()
    assert chunks == _native.chunk(data, cuts, threads=1)


@pytest.mark.parametrize("size", [1, 4095, 4096, 4097, 8 << 20, (8 << 20) + 1, (16 << 20) + 4095])
def test_ingest_direct_copy_is_exact_at_every_block_alignment(tmp_path, make_src, size):
    # On a filesystem that takes O_DIRECT the copy is aligned direct writes plus a padded tail block
    # that ftruncate trims; any other size or byte would show here.
    data = os.urandom(size)
    dst = tmp_path / "dst"
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        sha, chunks = _native.ingest(make_src(data), fd)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    finally:
        os.close(fd)
    assert dst.read_bytes() == data
    assert sha == hashlib.sha256(data).digest()
    assert chunks == _native.chunk(data)
    assert not flags & os.O_DIRECT, "the caller's descriptor is left as it was given"


def test_ingest_copies_with_plain_writes_where_direct_io_is_refused(make_src):
    # /dev/null refuses O_DIRECT, so this takes the pwrite path; the result must not change.
    data = bf16_like(3 << 20) + b"tail"
    null = os.open("/dev/null", os.O_WRONLY)
    try:
        assert _native.ingest(make_src(data), null) == (hashlib.sha256(data).digest(), _native.chunk(data))
    finally:
        os.close(null)


def test_ingest_without_copy(make_src):
    data = os.urandom(3 << 20)
    sha, chunks = _native.ingest(make_src(data), -1)
    assert sha == hashlib.sha256(data).digest()
    assert chunks == _native.chunk(data)


def test_ingest_of_empty_file(tmp_path, make_src):
    (sha, chunks), copy = ingest_to_file(tmp_path, make_src(b""))
    assert (sha, chunks, copy) == (hashlib.sha256(b"").digest(), [], b"")


@settings(max_examples=30, deadline=None)
@given(st.binary(max_size=50000), st.integers(1, 4))
def test_ingest_matches_chunk_for_any_bytes(tmp_path_factory, data, threads):
    path = tmp_path_factory.mktemp("ingest") / "src"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        sha, chunks = _native.ingest(fd, -1, min_size=256, avg_size=1024, max_size=4096, threads=threads)
    finally:
        os.close(fd)
    assert sha == hashlib.sha256(data).digest()
    assert chunks == _native.chunk(data, min_size=256, avg_size=1024, max_size=4096, threads=1)


@pytest.mark.parametrize("cuts", [[10, 5], [0], [4096]])
def test_ingest_bad_cuts_raise_value_error(make_src, cuts):
    with pytest.raises(ValueError):
        _native.ingest(make_src(bytes(4096)), -1, cuts)


def test_ingest_closed_source_fd_raises_oserror_ebadf(tmp_path):
    path = tmp_path / "src"
    path.write_bytes(b"x" * 100)
    fd = os.open(path, os.O_RDONLY)
    os.close(fd)
    with pytest.raises(OSError) as e:
        _native.ingest(fd, -1)
    assert e.value.errno == errno.EBADF


def test_ingest_invalid_destination_fd_raises_oserror_ebadf(make_src):
    with pytest.raises(OSError) as e:
        _native.ingest(make_src(os.urandom(1 << 20)), 987654)
    assert e.value.errno == errno.EBADF


def test_ingest_into_full_device_raises_enospc(make_src):
    src = make_src(os.urandom(1 << 20))
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        with pytest.raises(OSError) as e:
            _native.ingest(src, full, threads=2)
    finally:
        os.close(full)
    assert e.value.errno == errno.ENOSPC


def test_ingest_past_file_size_limit_raises_efbig(tmp_path):
    # RLIMIT_FSIZE makes write fail with EFBIG (Python ignores SIGXFSZ); run in a child so the limit
    # does not leak into this process.
    src = tmp_path / "src"
    src.write_bytes(os.urandom(4 << 20))
    code = textwrap.dedent(f"""
        import errno, os, resource
        from clowderd import _native
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        src = os.open({str(src)!r}, os.O_RDONLY)
        dst = os.open({str(tmp_path / "dst")!r}, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            _native.ingest(src, dst, threads=2)
        except OSError as e:
            print(e.errno)
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    assert out.stdout.strip() == str(errno.EFBIG)


def test_ingest_of_a_directory_raises_oserror(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        with pytest.raises(OSError):
            _native.ingest(fd, -1)
    finally:
        os.close(fd)
