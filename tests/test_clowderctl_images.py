"""clowderctl's image commands, run as a user runs them: a real process on a real data directory."""
import json
import os
import subprocess
import sys

import pytest

from tests import modelgen


@pytest.fixture
def ctl(tmp_path):
    """Run clowderctl with its own data directory; returns (exit code, stdout, stderr)."""
    env = dict(os.environ, CLOWDER_DATA_DIR=str(tmp_path / "data"), PYTHONPATH=os.getcwd())

    def run(*args, cwd=tmp_path):
        proc = subprocess.run([sys.executable, "-m", "clowderctl.main", *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=300)
        return proc.returncode, proc.stdout, proc.stderr

    return run


def test_build_list_inspect_tag_remove_and_collect(ctl, tiny_llama, tmp_path):
    (tmp_path / "Clowderfile").write_text(f"base: {tiny_llama}\nconfig:\n  access_groups: [research]\n")
    code, out, err = ctl("build", "-t", "tiny:v1")
    assert code == 0, err
    assert "built tiny:v1 sha256:" in out
    code, out, _ = ctl("images", "-o", "json")
    images = json.loads(out)
    assert [i["name"] for i in images] == ["tiny:v1"] and images[0]["size"] > 200_000
    code, out, _ = ctl("inspect", "tiny:v1")
    doc = json.loads(out)
    assert doc["manifest"]["artifactType"] == "application/vnd.clowder.aimage.v1+json"
    assert doc["config"]["access_groups"] == ["research"]
    assert ctl("tag", "tiny:v1", "tiny:stable")[0] == 0
    code, out, _ = ctl("images")
    assert "tiny:stable" in out and "tiny:v1" in out
    assert ctl("rmi", "tiny:v1", "tiny:stable")[0] == 0
    code, out, _ = ctl("gc", "-o", "json")
    assert json.loads(out)["blobs_removed"] == 5
    code, out, _ = ctl("df", "-o", "json")
    assert json.loads(out)["blobs"] == 0


def test_images_disk_shows_logical_and_stored_bytes(ctl, tiny_llama, tmp_path):
    variant = tmp_path / "variant"
    modelgen.write_variant(tiny_llama, variant, change_fraction=0.2)
    for name, base in (("base", tiny_llama), ("variant", variant)):
        (tmp_path / f"{name}.Clowderfile").write_text(f"base: {base}\n")
        assert ctl("build", "-q", "-f", f"{name}.Clowderfile", "-t", f"tiny:{name}")[0] == 0
    code, out, _ = ctl("images", "--disk", "-o", "json")
    store = json.loads(out)["store"]
    assert store["stored_bytes"] < 0.8 * store["logical_bytes"]
    code, out, _ = ctl("images", "--disk")
    assert "logical" in out and "stored" in out


def test_a_clowderfile_typo_is_named_with_a_suggestion_and_exits_non_zero(ctl, tiny_llama, tmp_path):
    (tmp_path / "Clowderfile").write_text(f"base: {tiny_llama}\nconfig:\n  placement:\n    gpu_cuont: 1\n")
    code, out, err = ctl("build", "-t", "tiny:typo")
    assert code == 1
    assert "gpu_cuont" in err and "did you mean 'gpu_count'" in err and "Traceback" not in err
    assert json.loads(ctl("df", "-o", "json")[1])["blobs"] == 0


def test_a_bad_name_exits_non_zero_and_stores_nothing(ctl, tiny_llama, tmp_path):
    (tmp_path / "Clowderfile").write_text(f"base: {tiny_llama}\n")
    code, _, err = ctl("build", "-t", "UPPER")
    assert code == 1 and "lowercase" in err
    assert json.loads(ctl("df", "-o", "json")[1])["blobs"] == 0


def test_fsck_exits_non_zero_and_names_the_corrupt_blob(ctl, tiny_llama, tmp_path):
    (tmp_path / "Clowderfile").write_text(f"base: {tiny_llama}\n")
    assert ctl("build", "-q", "-t", "tiny:v1")[0] == 0
    code, out, _ = ctl("fsck")
    assert code == 0 and out.strip().endswith("ok")
    doc = json.loads(ctl("inspect", "tiny:v1")[1])
    weights = next(l for l in doc["manifest"]["layers"] if l["annotations"]["org.cncf.model.filepath"] == "model.safetensors")
    blob = tmp_path / "data" / "store" / "blobs" / "sha256" / weights["digest"].split(":")[1]
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as f:
        f.write(b"corrupt!")
    code, out, _ = ctl("fsck")
    assert code == 1
    assert f"CORRUPT {weights['digest']}" in out and "tiny:v1" in out


def test_fsck_last_prints_the_last_check_without_checking_again(ctl, tiny_llama, tmp_path):
    (tmp_path / "Clowderfile").write_text(f"base: {tiny_llama}\n")
    assert ctl("build", "-q", "-t", "tiny:v1")[0] == 0
    code, _, err = ctl("fsck", "--last")
    assert code == 1 and "no check of the store" in err and "has finished yet" in err
    assert ctl("fsck")[0] == 0
    for blob in (tmp_path / "data" / "store" / "blobs" / "sha256").iterdir():
        os.chmod(blob, 0o644)
        blob.write_bytes(b"corrupt!")
    code, out, _ = ctl("fsck", "--last")
    assert code == 0 and out.startswith("last check: fsck, finished ") and out.strip().endswith("ok")
    report = json.loads(ctl("fsck", "--last", "-o", "json")[1])
    assert report["kind"] == "fsck" and report["blobs_checked"] == 5 and report["problems"] == []
    assert ctl("fsck")[0] == 1
    assert len(json.loads(ctl("fsck", "--last", "-o", "json")[1])["problems"]) == 5


def test_unknown_image_is_named(ctl):
    code, _, err = ctl("inspect", "nothere:v1")
    assert code == 1 and "'nothere:v1' not found" in err


@pytest.mark.model
def test_demo_builds_the_real_model_into_an_aimage(ctl):
    from clowderd.aimage.demo import locate_demo_gguf
    from clowderd.errors import InvalidInput

    try:
        locate_demo_gguf()
    except InvalidInput as exc:
        pytest.skip(str(exc))
    code, out, err = ctl("demo", "--no-adapter", "-q")
    assert code == 0, err
    doc = json.loads(ctl("inspect", "smollm2:135m-instruct")[1])
    files = {l["annotations"]["org.cncf.model.filepath"]: l["size"] for l in doc["manifest"]["layers"]}
    assert files["model.safetensors"] == 269_060_552 and "tokenizer.json" in files and "config.json" in files
    again = ctl("demo", "--no-adapter", "-q")  # the same model converts to the same bytes: the same manifest
    assert again[0] == 0 and again[1] == out
