"""Fixtures for tests of the content store and of building aimages."""
import os
import subprocess

import pytest

from clowderd.store.content import ContentStore
from tests import modelgen


@pytest.fixture
def store(tmp_path):
    s = ContentStore(tmp_path / "store")
    yield s
    s.close()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A random-weight tiny llama in Hugging Face layout (about 200 KB); treat it as read-only."""
    return modelgen.write_llama(tmp_path_factory.mktemp("models") / "tiny-llama", **modelgen.TINY)


@pytest.fixture
def small_fs(tmp_path):
    """Factory: small_fs(size) mounts a tmpfs of size bytes under tmp_path and returns its path, so
    that writes there really fail with ENOSPC. Skips, saying why, without root and the right to mount."""
    mounted = []

    def mount(size: int):
        mnt = tmp_path / f"fs{len(mounted)}"
        mnt.mkdir()
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                                               capture_output=True).returncode != 0:
            pytest.skip("mounting a tmpfs needs root and the mount capability, which this environment lacks")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(fs, leave: int) -> None:
    """Take all but `leave` bytes of the free space on fs with a file (fs/filler)."""
    st = os.statvfs(fs)
    free = st.f_bavail * st.f_frsize
    with open(fs / "filler", "ab") as f:
        os.posix_fallocate(f.fileno(), os.fstat(f.fileno()).st_size, max(0, free - leave))


def flip_byte(path, offset: int) -> None:
    """Flip one byte of a stored file (read-only, as the store keeps them), as a failing disk would."""
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
