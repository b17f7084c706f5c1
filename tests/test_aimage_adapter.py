import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from clowderd.aimage import mediatypes as mt
from clowderd.aimage.adapter import check_adapter_matches_base, scan_adapter_dir, validate_adapter_name
from clowderd.aimage.modeldir import scan_model_dir
from clowderd.errors import InvalidInput

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"


def make_base(root, q_shape=(8, 16)):
    root.mkdir()
    (root / "config.json").write_text("{}")
    save_file({f"{Q}.weight": np.zeros(q_shape, np.float32), f"{V}.weight": np.zeros((4, 16), np.float32),
               "lm_head.weight": np.zeros((32, 16), np.float32)}, str(root / "model.safetensors"))
    return scan_model_dir(root)


def make_adapter(root, tensors=None, **config):
    root.mkdir()
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], **config}
    (root / "adapter_config.json").write_text(json.dumps(cfg))
    (root / "README.md").write_text("trained on tiny")
    if tensors is None:
        tensors = {f"base_model.model.{Q}.lora_A.weight": (2, 16), f"base_model.model.{Q}.lora_B.weight": (8, 2),
                   f"base_model.model.{V}.lora_A.weight": (2, 16), f"base_model.model.{V}.lora_B.weight": (4, 2)}
    save_file({k: np.zeros(s, np.float32) for k, s in tensors.items()}, str(root / "adapter_model.safetensors"))
    return root


def test_scan_adapter_dir_gives_ep_layers(tmp_path):
    adapter = scan_adapter_dir(make_adapter(tmp_path / "fr"), "french")
    assert adapter.name == "french" and adapter.config["r"] == 2
    assert [(f.relpath, f.media_type) for f in adapter.files] == [
        ("adapter_config.json", mt.EP_CONFIG), ("adapter_model.safetensors", mt.EP_WEIGHT)]


@pytest.mark.parametrize("config, message", [
    ({"peft_type": "IA3"}, "peft_type is 'IA3'; only LORA"),
    ({"r": 0}, "r must be a positive integer"),
    ({"lora_alpha": "x"}, "lora_alpha must be a positive number"),
    ({"target_modules": []}, "target_modules must be"),
])
def test_adapter_config_is_checked(tmp_path, config, message):
    with pytest.raises(InvalidInput, match=message):
        scan_adapter_dir(make_adapter(tmp_path / "a", **config), "a")


def test_adapter_dir_refuses_pickles_and_unexpected_files(tmp_path):
    root = make_adapter(tmp_path / "a")
    (root / "adapter_model.bin").write_bytes(b"\x80")
    with pytest.raises(InvalidInput, match="adapter_model.bin is a pickle"):
        scan_adapter_dir(root, "a")
    (root / "adapter_model.bin").unlink()
    (root / "tokenizer.json").write_text("{}")
    with pytest.raises(InvalidInput, match="unexpected file tokenizer.json"):
        scan_adapter_dir(root, "a")
    (root / "tokenizer.json").unlink()
    (root / "adapter_model.safetensors").unlink()
    with pytest.raises(InvalidInput, match="adapter_model.safetensors is missing"):
        scan_adapter_dir(root, "a")


@pytest.mark.parametrize("name", ["French", "a b", "", "-x", "x" * 65, 3])
def test_adapter_names_follow_the_grammar(name):
    with pytest.raises(InvalidInput, match="not a valid adapter name"):
        validate_adapter_name(name)


def test_adapter_fits_its_base(tmp_path):
    base = make_base(tmp_path / "base")
    check_adapter_matches_base(scan_adapter_dir(make_adapter(tmp_path / "fr"), "french"), base)


def test_adapter_on_a_base_of_another_shape_names_tensor_and_shapes(tmp_path):
    base = make_base(tmp_path / "base", q_shape=(12, 16))
    adapter = scan_adapter_dir(make_adapter(tmp_path / "fr"), "french")
    with pytest.raises(InvalidInput) as info:
        check_adapter_matches_base(adapter, base)
    assert str(info.value) == (f"adapter 'french' does not fit this base: tensor 'base_model.model.{Q}.lora_A.weight' "
                               f"expects '{Q}.weight' of shape [8, 16], the base has [12, 16]")


def test_adapter_targeting_a_missing_module_is_refused(tmp_path):
    base = make_base(tmp_path / "base")
    adapter = scan_adapter_dir(make_adapter(tmp_path / "a", {
        "base_model.model.model.layers.9.mlp.up_proj.lora_A.weight": (2, 16),
        "base_model.model.model.layers.9.mlp.up_proj.lora_B.weight": (8, 2)}), "a")
    with pytest.raises(InvalidInput, match="targets 'model.layers.9.mlp.up_proj.weight', which the base does not have"):
        check_adapter_matches_base(adapter, base)


def test_lora_pair_with_inconsistent_rank_is_refused(tmp_path):
    base = make_base(tmp_path / "base")
    adapter = scan_adapter_dir(make_adapter(tmp_path / "a", {
        f"base_model.model.{Q}.lora_A.weight": (2, 16), f"base_model.model.{Q}.lora_B.weight": (8, 3)}), "a")
    with pytest.raises(InvalidInput, match=r"are not a \[r, in\] / \[out, r\] pair"):
        check_adapter_matches_base(adapter, base)


def test_lora_a_without_b_is_refused(tmp_path):
    base = make_base(tmp_path / "base")
    adapter = scan_adapter_dir(make_adapter(tmp_path / "a", {f"base_model.model.{Q}.lora_A.weight": (2, 16)}), "a")
    with pytest.raises(InvalidInput, match="has no lora_B partner"):
        check_adapter_matches_base(adapter, base)


def test_modules_to_save_tensors_must_match_the_base_shape(tmp_path):
    base = make_base(tmp_path / "base")
    good = scan_adapter_dir(make_adapter(tmp_path / "g", {"base_model.model.lm_head.weight": (32, 16)}), "g")
    check_adapter_matches_base(good, base)
    bad = scan_adapter_dir(make_adapter(tmp_path / "b", {"base_model.model.lm_head.weight": (33, 16)}), "b")
    with pytest.raises(InvalidInput, match=r"base 'lm_head.weight' has shape \[32, 16\], adapter has \[33, 16\]"):
        check_adapter_matches_base(bad, base)


def test_fan_in_fan_out_adapters_expect_a_transposed_base(tmp_path):
    base = make_base(tmp_path / "base", q_shape=(16, 8))
    adapter = scan_adapter_dir(make_adapter(tmp_path / "a", {
        f"base_model.model.{Q}.lora_A.weight": (2, 16), f"base_model.model.{Q}.lora_B.weight": (8, 2)},
        fan_in_fan_out=True), "a")
    check_adapter_matches_base(adapter, base)
