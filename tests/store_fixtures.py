"""Fixtures for tests of the content store and of building aimages."""
import os

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


def flip_byte(path, offset: int) -> None:
    """Flip one byte of a stored file (read-only, as the store keeps them), as a failing disk would."""
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
