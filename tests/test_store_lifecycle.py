"""Model views (hard links), reference counting with gc, and fsck."""
import os

import pytest

from clowderd.aimage.build import build
from clowderd.aimage.clowderfile import load_clowderfile
from clowderd.errors import InvalidInput
from clowderd.store import fsck, gc
from clowderd.store.images import ImageIndex
from clowderd.store.views import ViewManager
from tests import modelgen


def build_dir(store, tmp_path, model_dir, name):
    cf = tmp_path / f"{name.replace(':', '_')}.Clowderfile"
    cf.write_text(f"base: {model_dir}\n")
    return build(store, load_clowderfile(cf), name)


@pytest.fixture
def views(store):
    return ViewManager(store, ImageIndex(store))


def test_two_views_of_one_base_are_hard_links_to_one_file(store, views, tiny_llama, tmp_path):
    build_dir(store, tmp_path, tiny_llama, "tiny:v1")
    a = views.create("deploy-a", "tiny:v1")
    b = views.create("deploy-b", "tiny:v1")
    wa, wb = a / "model.safetensors", b / "model.safetensors"
    assert wa.read_bytes() == (tiny_llama / "model.safetensors").read_bytes()
    assert os.stat(wa).st_ino == os.stat(wb).st_ino and os.stat(wa).st_nlink >= 3
    assert not os.access(wa, os.W_OK) or os.geteuid() == 0  # read-only file (root bypasses the check)
    assert oct(os.stat(wa).st_mode & 0o777) == "0o444"
    assert (a / "clowder" / "config.json").exists() and (a / "clowder" / "manifest.json").exists()


def test_a_view_of_a_fine_tune_materializes_it_once(store, views, tiny_llama, tmp_path):
    build_dir(store, tmp_path, tiny_llama, "tiny:base")
    variant = tmp_path / "variant"
    modelgen.write_variant(tiny_llama, variant, change_fraction=0.3)
    build_dir(store, tmp_path, variant, "tiny:variant")
    view = views.create("v", "tiny:variant")
    assert (view / "model.safetensors").read_bytes() == (variant / "model.safetensors").read_bytes()


def test_views_keep_content_alive_until_removed(store, views, tiny_llama, tmp_path):
    build_dir(store, tmp_path, tiny_llama, "tiny:v1")
    view = views.create("keep", "tiny:v1")
    ImageIndex(store).untag("tiny:v1")
    assert gc.collect(store).blobs_removed == 0
    assert (view / "model.safetensors").exists()
    views.remove("keep")
    report = gc.collect(store)
    assert report.blobs_removed == 5 and store.usage().blob_count == 0  # 3 files, config, manifest
    assert not view.exists()


def test_a_view_name_is_checked(store, views, tiny_llama, tmp_path):
    build_dir(store, tmp_path, tiny_llama, "tiny:v1")
    with pytest.raises(InvalidInput, match="view name"):
        views.create("../escape", "tiny:v1")


def test_gc_keeps_chunks_a_fine_tune_shares_with_a_removed_base(store, tiny_llama, tmp_path):
    base = modelgen.write_llama(tmp_path / "base", **{**modelgen.TINY, "vocab_size": 8192})
    variant = tmp_path / "variant"
    modelgen.write_variant(base, variant, change_fraction=0.1)
    build_dir(store, tmp_path, base, "m:base")
    build_dir(store, tmp_path, variant, "m:variant")
    stored_both = store.usage().stored_bytes
    ImageIndex(store).untag("m:base")
    report = gc.collect(store)
    assert report.chunks_relocated > 0 and report.bytes_freed > 0
    assert store.usage().stored_bytes < stored_both
    assert fsck.check(store).ok
    digest = ImageIndex(store).resolve("m:variant")
    view = ViewManager(store, ImageIndex(store)).create("after-gc", digest)
    assert (view / "model.safetensors").read_bytes() == (variant / "model.safetensors").read_bytes()


def test_gc_dry_run_removes_nothing(store, tiny_llama, tmp_path):
    build_dir(store, tmp_path, tiny_llama, "tiny:v1")
    ImageIndex(store).untag("tiny:v1")
    report = gc.collect(store, dry_run=True)
    assert report.blobs_removed == 5 and store.usage().blob_count == 5


def test_fsck_names_a_corrupt_blob_and_the_images_using_it(store, tiny_llama, tmp_path):
    build_dir(store, tmp_path, tiny_llama, "tiny:v1")
    assert fsck.check(store).ok
    weights = next(b for b in store.blobs() if b.size == (tiny_llama / "model.safetensors").stat().st_size)
    path = store.blob_path(weights.digest)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    report = fsck.check(store)
    assert [p.digest for p in report.problems] == [weights.digest]
    assert report.problems[0].images == ["tiny:v1"]


def test_fsck_finds_a_corrupt_chunk_of_a_chunked_blob(store, tiny_llama, tmp_path):
    build_dir(store, tmp_path, tiny_llama, "tiny:base")
    variant = tmp_path / "variant"
    modelgen.write_variant(tiny_llama, variant, change_fraction=0.3)
    build_dir(store, tmp_path, variant, "tiny:variant")
    pack = next(store.pack_dir.glob("*.pack"))
    os.chmod(pack, 0o644)
    with open(pack, "r+b") as f:
        f.write(b"\0" * 16)
    report = fsck.check(store)
    assert len(report.problems) == 1 and "corrupt" in report.problems[0].what
    assert report.problems[0].images == ["tiny:variant"]


def _push(index, repository, tag=None):
    """What the registry API does for a push: blobs linked into the repository, then the manifest."""
    config = index.store.ingest_bytes(b'{"version": "clowder.aimage.config/v1"}').info
    layer = index.store.ingest_bytes(os.urandom(5000)).info
    for blob in (config, layer):
        index.link_blob(repository, blob.digest)
    manifest = (
        '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",'
        f'"config":{{"mediaType":"application/vnd.clowder.aimage.config.v1+json","digest":"{config.digest}","size":{config.size}}},'
        f'"layers":[{{"mediaType":"application/vnd.cncf.model.weight.v1.raw","digest":"{layer.digest}","size":{layer.size}}}]}}'
    ).encode()
    return index.add_repository_manifest(repository, manifest, "application/vnd.oci.image.manifest.v1+json",
                                         "application/vnd.clowder.aimage.v1+json", [config.digest, layer.digest],
                                         [], None, tag)


def test_gc_keeps_manifests_pushed_by_digest_and_blobs_waiting_for_their_manifest(store, monkeypatch):
    index = ImageIndex(store)
    digest = _push(index, "team/model")  # no tag: pushed by digest, as referrers and index children are
    waiting = store.ingest_bytes(b"uploaded before its manifest").info.digest
    index.link_blob("team/model", waiting)
    assert gc.collect(store).blobs_removed == 0
    index.delete_repository_manifest("team/model", digest)
    assert gc.collect(store).manifests_removed == 1 and store.exists(waiting)
    monkeypatch.setattr(gc, "UPLOAD_GRACE_SECONDS", 0)
    gc.collect(store)
    assert store.usage().blob_count == 0


def test_removing_the_last_name_of_a_pushed_manifest_lets_gc_free_it(store, monkeypatch):
    monkeypatch.setattr(gc, "UPLOAD_GRACE_SECONDS", 0)
    index = ImageIndex(store)
    _push(index, "team/model", tag="v1")
    index.untag("team/model:v1")
    report = gc.collect(store)
    assert report.manifests_removed == 1 and store.usage().blob_count == 0


def test_the_names_using_a_blob_are_those_under_the_prefix_whose_image_references_it(store):
    index = ImageIndex(store)
    digest = _push(index, "team/model", tag="v1")
    layer = next(b for b in index.image_blobs(digest) if b != digest and store.info(b).size == 5000)
    for name in ("reg_1/a/model:v1", "regx1/a/model:v1", "reg_1/b/model:v2"):
        index.tag(name, digest)
    assert index.names_using(layer) == ["reg_1/a/model:v1", "reg_1/b/model:v2", "regx1/a/model:v1",
                                        "team/model:v1"]
    assert index.names_using(layer, "reg_1/") == ["reg_1/a/model:v1", "reg_1/b/model:v2"]  # '_' is no wildcard
    assert index.tagged_repositories() == ["reg_1/a/model", "reg_1/b/model", "regx1/a/model", "team/model"]
    assert index.artifact_type(digest) == "application/vnd.clowder.aimage.v1+json"
    assert index.artifact_type("sha256:" + "0" * 64) is None
