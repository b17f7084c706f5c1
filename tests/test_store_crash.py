"""A kill -9 at any moment of an ingest leaves either no blob or a whole, correct one; what a killed
writer leaves under tmp/ goes when the store is next opened."""
import hashlib
import os
import random
import signal
import subprocess
import sys
import time

from clowderd.store import fsck, gc
from clowderd.store.content import ContentStore

INGEST = """
import sys
from clowderd.store.content import ContentStore
store = ContentStore(sys.argv[1])
print("ready", flush=True)
for path in sys.argv[2:]:
    store.ingest_file(path, cuts=[1 << 20])
print("done", flush=True)
"""


def test_killing_an_ingest_at_any_moment_leaves_no_partial_blob(tmp_path):
    sources = []
    for i in range(3):
        data = os.urandom(64 << 20)
        (tmp_path / f"src{i}").write_bytes(data)
        sources.append(str(tmp_path / f"src{i}"))
    root = tmp_path / "store"
    rng = random.Random(7)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    killed_mid_way = 0
    for attempt in range(8):
        proc = subprocess.Popen([sys.executable, "-c", INGEST, str(root), *sources], stdout=subprocess.PIPE, env=env)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.0, 0.15))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        store = ContentStore(root)
        # Whatever is visible under blobs/ is whole and correct, in the index or not.
        for path in (root / "blobs" / "sha256").iterdir():
            assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name
        report = fsck.check(store)
        assert report.ok, report.problems
        killed_mid_way += store.usage().blob_count < len(sources)
        gc.collect(store)  # no name references these blobs: all go, and so does any temp file
        assert not list(store.tmp_dir.iterdir()) and store.usage().blob_count == 0
        store.close()
    assert killed_mid_way >= 1, "no kill landed during an ingest; the test proved nothing"


BUILD = """
import sys
from clowderd.aimage.build import build
from clowderd.aimage.clowderfile import load_clowderfile
from clowderd.store.content import ContentStore

def progress(event, filepath, size):
    if event == "done":  # held here, mid-build, until the test lets go or kills it
        print("building", flush=True)
        sys.stdin.readline()

build(ContentStore(sys.argv[1]), load_clowderfile(sys.argv[2]), "m:v1", progress)
print("built", flush=True)
"""


def test_a_killed_build_leaves_its_temp_files_only_until_the_store_is_next_opened(tmp_path, tiny_llama):
    root = tmp_path / "store"
    cf = tmp_path / "Clowderfile"
    cf.write_text(f"base: {tiny_llama}\n")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.Popen([sys.executable, "-c", BUILD, str(root), str(cf)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline().strip() == b"building"
        scratch = [p.name for p in (root / "tmp").iterdir()]
        assert len(scratch) == 1 and scratch[0].startswith("build-")
        # Opened beside a live build (as clowderctl beside clowderd): its files are not touched.
        beside = ContentStore(root)
        assert beside.remove_stale_temp_files() == []
        beside.close()
        assert [p.name for p in (root / "tmp").iterdir()] == scratch
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()
    store = ContentStore(root)  # the first opening after the kill sweeps
    try:
        assert not list((root / "tmp").iterdir())
        assert store.remove_stale_temp_files() == []
        assert fsck.check(store).ok
    finally:
        store.close()
