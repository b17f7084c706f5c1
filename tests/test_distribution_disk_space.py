"""A pull checks, before its first byte, that the store has room for all it will write (what is
missing of each blob, the manifest) and for its reserve; a disk that refuses a write is one error
line naming the registry, the blob and the store. Stores on a small tmpfs (root only; skipped
otherwise), a real clowderd storage node, Debian's docker-registry and clowderctl processes."""
from __future__ import annotations

import hashlib
import json
import re
import resource

import pytest

from clowderd.distribution.errors import TransferError
from clowderd.distribution.progress import Progress
from clowderd.distribution.pull import pull
from clowderd.distribution.refs import parse_remote
from clowderd.errors import StoreError
from clowderd.store.content import DEFAULT_RESERVE_BYTES, ContentStore
from clowderd.store.images import ImageIndex
from tests import modelgen
from tests.store_fixtures import fill
from tests.test_distribution_oci import ctl, error_line
from tests.test_transfer_chunks import MID, build_into


@pytest.fixture
def source(clowderd, docker_registry, tmp_path):
    """Factory: source(kind) gives (reference, bytes a pull into an empty store writes) of an image
    of MID's shape on a Clowder storage node ("clowder") or on docker-registry ("oci")."""
    model = modelgen.write_llama(tmp_path / "m", **MID)

    def make(kind: str) -> tuple[str, int]:
        if kind == "clowder":
            node = clowderd(roles=("storage",))
            data_dir, ref = node.data_dir, f"clowder://{node.addresses['storage']}/mid:v1"
            build_into(data_dir, model, "mid:v1")
        else:
            data_dir, ref = tmp_path / "src", f"{docker_registry().host}/models/mid:v1"
            build_into(data_dir, model, "mid:v1")
            assert ctl(data_dir, "push", "-q", "mid:v1", ref).returncode == 0
        store = ContentStore(data_dir / "store")
        try:
            index = ImageIndex(store)
            digest = index.resolve("mid:v1")
            needed = sum(store.info(d).size for d in index.image_blobs(digest))  # the manifest is one of them
        finally:
            store.close()
        return ref, needed

    return make


def store_is_empty(data_dir) -> bool:
    store = ContentStore(data_dir / "store")
    try:
        return store.blobs() == [] and store.ingest_statuses() == []
    finally:
        store.close()


@pytest.mark.parametrize("kind", ["clowder", "oci"])
def test_a_pull_that_would_eat_the_reserve_is_refused_before_its_first_byte(source, small_fs, kind):
    ref, needed = source(kind)
    fs = small_fs(DEFAULT_RESERVE_BYTES + 2 * needed)
    data_dir = fs / "d"
    ContentStore(data_dir / "store").close()
    fill(fs, leave=DEFAULT_RESERVE_BYTES + needed // 2)  # the blobs would fit; with the reserve, not

    line = error_line(ctl(data_dir, "pull", "-q", ref))
    m = re.fullmatch(rf"error: not enough space in the store at {re.escape(str(data_dir / 'store'))} for pulling "
                     rf"{re.escape(ref)} \(\d+ blobs and the manifest\) \(([0-9,]+) bytes\): ([0-9,]+) bytes are free "
                     rf"and {DEFAULT_RESERVE_BYTES:,} are kept in reserve", line)
    assert m, line
    assert int(m.group(1).replace(",", "")) == needed
    assert needed < int(m.group(2).replace(",", "")) < needed + DEFAULT_RESERVE_BYTES  # fits, but not with the reserve
    assert store_is_empty(data_dir)  # not a byte written: no orphan blob, no partial file

    (fs / "filler").unlink()
    r = ctl(data_dir, "pull", "-o", "json", ref)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["resumed_bytes"] == 0


class FailHalfWay(Progress):
    """A pull's progress that breaks it off half way through its weights (as a lost source would)."""

    def start(self, key: str, description: str, total: int) -> None:
        if description == "model.safetensors":
            self.key, self.left = key, total // 2

    def advance(self, key: str, nbytes: int) -> None:
        if key == getattr(self, "key", None):
            self.left -= nbytes
            if self.left < 0:
                raise TransferError("the source went away")


def test_the_space_check_counts_what_an_interrupted_pull_holds_on_disk_already(source, small_fs, tmp_path):
    from clowderd.distribution.chunk_client import ingest_ref

    ref, needed = source("clowder")
    weights_file = tmp_path / "m" / "model.safetensors"
    weights, weights_digest = weights_file.stat().st_size, "sha256:" + hashlib.sha256(weights_file.read_bytes()).hexdigest()
    fs = small_fs(DEFAULT_RESERVE_BYTES + 2 * needed)
    store = ContentStore(fs / "d" / "store")
    try:
        with pytest.raises(TransferError, match="the source went away"):
            pull(store, parse_remote(ref), progress=FailHalfWay())
        held = store.ingest_status(ingest_ref(weights_digest))
        assert held.allocated == weights  # allocated whole up front, and kept for a resume
    finally:
        store.close()
    fill(fs, leave=DEFAULT_RESERVE_BYTES + needed - weights + (64 << 10))  # room for all but the weights
    r = ctl(fs / "d", "pull", "-o", "json", ref)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["resumed_bytes"] > 0


def test_a_pull_into_a_store_without_room_for_its_reserve_writes_nothing(source, tmp_path):
    ref, needed = source("clowder")
    store = ContentStore(tmp_path / "store", reserve_bytes=1 << 60)
    try:
        with pytest.raises(StoreError, match=rf"not enough space in the store at .* \({needed:,} bytes\)"):
            pull(store, parse_remote(ref))
        assert store.blobs() == [] and store.ingest_statuses() == []
    finally:
        store.close()


def test_a_disk_error_while_writing_an_oci_blob_is_one_error_line_and_the_next_pull_resumes(source, tmp_path):
    ref, _ = source("oci")
    data_dir = tmp_path / "d"
    limit = 2 << 20  # the largest file this process may write: the weights' partial file fails there

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    line = error_line(ctl(data_dir, "pull", "-q", ref, preexec_fn=limited))
    host = ref.split("/")[0]
    m = re.fullmatch(rf"error: {re.escape(host)}: download of blob (sha256:[0-9a-f]{{64}}) stopped after {limit:,} "
                     rf"of [0-9,]+ bytes: cannot write ingest [0-9a-f]{{64}}\.oci in the store at "
                     rf"{re.escape(str(data_dir / 'store'))}: File too large; the {limit:,} bytes written are kept "
                     "for the next pull to resume from", line)
    assert m, line

    r = ctl(data_dir, "pull", "-o", "json", ref)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["resumed_bytes"] == limit
