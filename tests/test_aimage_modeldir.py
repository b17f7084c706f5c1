import json
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from clowderd.aimage import mediatypes as mt
from clowderd.aimage.modeldir import scan_model_dir
from clowderd.errors import InvalidInput


def make_model(root):
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16}))
    (root / "tokenizer.json").write_text("{}")
    (root / "chat_template.jinja").write_text("{{ messages }}")
    (root / "README.md").write_text("# tiny")
    save_file({"model.embed_tokens.weight": np.zeros((32, 16), np.float32),
               "model.layers.0.self_attn.q_proj.weight": np.zeros((8, 16), np.float32)},
              str(root / "model.safetensors"))
    return root


def test_scan_model_dir_classifies_files_in_path_order(tmp_path):
    root = make_model(tmp_path / "m")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref")
    (root / ".gitattributes").write_text("*")
    files = scan_model_dir(root)
    assert [(f.relpath, f.media_type) for f in files] == [
        ("README.md", mt.MODEL_DOC),
        ("chat_template.jinja", mt.MODEL_WEIGHT_CONFIG),
        ("config.json", mt.MODEL_WEIGHT_CONFIG),
        ("model.safetensors", mt.MODEL_WEIGHT),
        ("tokenizer.json", mt.MODEL_WEIGHT_CONFIG),
    ]
    assert all(f.size == (root / f.relpath).stat().st_size for f in files)


@pytest.mark.parametrize("name, message", [
    ("pytorch_model.bin", "models are pure data: pytorch_model.bin is a pickle, which can run code; "
                          "convert it to safetensors"),
    ("original/consolidated.00.pth", "original/consolidated.00.pth is a pickle"),
    ("modeling_custom.py", "modeling_custom.py is executable code (models that need trust_remote_code"),
    ("model.onnx", "model.onnx: unsupported file type"),
])
def test_unsafe_or_unknown_files_are_refused(tmp_path, name, message):
    root = make_model(tmp_path / "m")
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(b"\x80\x04")
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(")):
        scan_model_dir(root)


def test_config_json_is_required_and_must_be_an_object(tmp_path):
    root = make_model(tmp_path / "m")
    (root / "config.json").write_text("[1]")
    with pytest.raises(InvalidInput, match=r"config.json: must hold a JSON object"):
        scan_model_dir(root)
    (root / "config.json").write_text("{nope")
    with pytest.raises(InvalidInput, match=r"config.json: not valid JSON"):
        scan_model_dir(root)
    (root / "config.json").unlink()
    with pytest.raises(InvalidInput, match="config.json is missing"):
        scan_model_dir(root)


def test_weights_are_required_and_checked(tmp_path):
    root = make_model(tmp_path / "m")
    data = (root / "model.safetensors").read_bytes()
    (root / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(InvalidInput, match="model.safetensors: truncated"):
        scan_model_dir(root)
    (root / "model.safetensors").unlink()
    with pytest.raises(InvalidInput, match=r"no \*.safetensors weights"):
        scan_model_dir(root)


def test_symlinks_are_followed_to_regular_files(tmp_path):
    blobs = make_model(tmp_path / "blobs")
    root = tmp_path / "snapshot"
    root.mkdir()
    for name in ("config.json", "model.safetensors"):
        os.symlink(blobs / name, root / name)
    files = scan_model_dir(root)
    assert [f.relpath for f in files] == ["config.json", "model.safetensors"]
    assert files[1].abspath == (blobs / "model.safetensors").resolve()
    os.symlink(tmp_path / "missing", root / "tokenizer.json")
    with pytest.raises(InvalidInput, match="broken symlink"):
        scan_model_dir(root)


def test_symlinked_directory_is_refused(tmp_path):
    root = make_model(tmp_path / "m")
    (tmp_path / "other").mkdir()
    os.symlink(tmp_path / "other", root / "sub")
    with pytest.raises(InvalidInput, match="symlink to a directory"):
        scan_model_dir(root)


def sharded(root):
    root.mkdir()
    (root / "config.json").write_text("{}")
    save_file({"a": np.zeros(2, np.float32)}, str(root / "model-00001-of-00002.safetensors"))
    save_file({"b": np.zeros(2, np.float32)}, str(root / "model-00002-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    return root, index


def test_index_must_match_the_shards(tmp_path):
    root, index = sharded(tmp_path / "m")
    files = scan_model_dir(root)
    assert {f.relpath: f.media_type for f in files}["model.safetensors.index.json"] == mt.MODEL_WEIGHT_CONFIG
    for weight_map, message in [
        ({**index["weight_map"], "b": "model-00003-of-00002.safetensors"}, "names model-00003-of-00002"),
        ({**index["weight_map"], "c": "model-00002-of-00002.safetensors"}, "tensor 'c' is not in"),
        ({"a": index["weight_map"]["a"]}, None),
    ]:
        (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        if message:
            with pytest.raises(InvalidInput, match=message):
                scan_model_dir(root)
        else:
            scan_model_dir(root)
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"b": "model-00001-of-00002.safetensors",
                                                                                  "a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(InvalidInput, match="tensor 'b' is not in model-00001"):
        scan_model_dir(root)
