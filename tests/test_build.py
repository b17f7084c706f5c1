"""Building aimages from Clowderfiles into the content store."""
import json
import shutil

import pytest

from clowderd.aimage import mediatypes as mt
from clowderd.aimage.build import build
from clowderd.aimage.clowderfile import load_clowderfile
from clowderd.aimage.manifest import parse_manifest
from clowderd.errors import InvalidInput, NotFound
from clowderd.store.images import ImageIndex
from tests import modelgen


def clowderfile(dir, text: str):
    path = dir / "Clowderfile"
    path.write_text(text)
    return load_clowderfile(path)


def stored_bytes(store) -> int:
    return store.usage().stored_bytes


def test_build_stores_one_layer_per_model_file_and_names_the_manifest(store, tiny_llama, tmp_path):
    cf = clowderfile(tmp_path, f"base: {tiny_llama}\nconfig:\n  priority: 5\n")
    result = build(store, cf, "tiny:v1")
    index = ImageIndex(store)
    assert index.resolve("tiny:v1") == result.manifest_digest
    manifest = parse_manifest(index.manifest_bytes(result.manifest_digest), "m")
    paths = {d.filepath: d for d in manifest.model_layers}
    assert set(paths) == {"config.json", "generation_config.json", "model.safetensors"}
    assert paths["model.safetensors"].media_type == mt.MODEL_WEIGHT
    assert paths["config.json"].media_type == mt.MODEL_WEIGHT_CONFIG
    for rel, desc in paths.items():
        assert store.path(desc.digest).read_bytes() == (tiny_llama / rel).read_bytes()
    config = json.loads(store.read_bytes(manifest.config.digest))
    assert config["priority"] == 5


def test_two_aimages_on_one_base_share_its_layers_byte_for_byte(store, tiny_llama, tmp_path):
    build(store, clowderfile(tmp_path, f"base: {tiny_llama}\n"), "tiny:plain")
    before = stored_bytes(store)
    second = build(store, clowderfile(tmp_path, f"base: {tiny_llama}\nconfig:\n  prompts:\n    system: Be brief.\n"), "tiny:brief")
    weights = [layer for layer in second.layers if layer.descriptor.media_type == mt.MODEL_WEIGHT]
    assert weights and all(not layer.new and layer.stored_bytes == 0 for layer in weights)
    assert second.stored_bytes == 0
    assert stored_bytes(store) - before < 4000  # only the new configuration and manifest


def test_an_adapter_becomes_ep_layers_that_record_their_base(store, tiny_llama, tmp_path):
    adapter = modelgen.write_lora_adapter(tmp_path / "french", tiny_llama)
    cf = clowderfile(tmp_path, f"base: {tiny_llama}\nadapters:\n  - name: french\n    path: {adapter}\n")
    result = build(store, cf, "tiny:french")
    manifest = parse_manifest(ImageIndex(store).manifest_bytes(result.manifest_digest), "m")
    eps = manifest.ep_layers["french"]
    assert {d.media_type for d in eps} == {mt.EP_CONFIG, mt.EP_WEIGHT}
    assert {d.annotations[mt.ANNOTATION_EP_BASE] for d in eps} == {manifest.model_digest}


def test_an_image_base_inherits_layers_and_adds_adapters(store, tiny_llama, tmp_path):
    build(store, clowderfile(tmp_path, f"base: {tiny_llama}\nconfig:\n  priority: 3\n"), "tiny:base")
    adapter = modelgen.write_lora_adapter(tmp_path / "a1", tiny_llama)
    before = stored_bytes(store)
    result = build(store, clowderfile(tmp_path, f"base: tiny:base\nadapters:\n  - name: a1\n    path: {adapter}\n"), "tiny:a1")
    manifest = parse_manifest(ImageIndex(store).manifest_bytes(result.manifest_digest), "m")
    assert len(manifest.model_layers) == 3 and list(manifest.ep_layers) == ["a1"]
    assert json.loads(store.read_bytes(manifest.config.digest))["priority"] == 3
    assert stored_bytes(store) - before < (adapter / "adapter_model.safetensors").stat().st_size + 5000


def test_an_adapter_for_another_base_is_refused_before_anything_is_stored(store, tiny_llama, tmp_path):
    wider = modelgen.write_llama(tmp_path / "wider", **{**modelgen.TINY, "hidden_size": 128})
    adapter = modelgen.write_lora_adapter(tmp_path / "wide-lora", wider)
    cf = clowderfile(tmp_path, f"base: {tiny_llama}\nadapters:\n  - name: wide\n    path: {adapter}\n")
    with pytest.raises(InvalidInput, match="adapter 'wide' does not fit this base"):
        build(store, cf, "tiny:wide")
    assert store.usage().blob_count == 0


@pytest.mark.parametrize("name, message", [("../x", "path components"), ("UPPER", "lowercase"), ("a:b:c", "a:b:c")])
def test_bad_names_are_refused_before_anything_is_stored(store, tiny_llama, tmp_path, name, message):
    with pytest.raises(InvalidInput, match=message):
        build(store, clowderfile(tmp_path, f"base: {tiny_llama}\n"), name)
    assert store.usage().blob_count == 0


def test_a_truncated_weight_file_is_named_and_nothing_is_stored(store, tiny_llama, tmp_path):
    model = shutil.copytree(tiny_llama, tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(InvalidInput, match="model.safetensors.*truncated"):
        build(store, clowderfile(tmp_path, "base: ./model\n"), "tiny:broken")
    assert store.usage().blob_count == 0


def test_a_missing_config_json_is_named(store, tiny_llama, tmp_path):
    model = shutil.copytree(tiny_llama, tmp_path / "model")
    (model / "config.json").unlink()
    with pytest.raises(InvalidInput, match="config.json"):
        build(store, clowderfile(tmp_path, "base: ./model\n"), "tiny:noconfig")


def test_a_missing_base_image_is_named(store, tmp_path):
    with pytest.raises(NotFound, match="nothere"):
        build(store, clowderfile(tmp_path, "base: nothere:v1\n"), "tiny:x")


def test_a_clowderfile_inside_the_model_directory_is_not_packed(store, tiny_llama, tmp_path):
    model = shutil.copytree(tiny_llama, tmp_path / "model")
    result = build(store, clowderfile(model, "base: .\n"), "tiny:here")
    assert "Clowderfile" not in {layer.descriptor.filepath for layer in result.layers}
    assert len(result.layers) == 3
