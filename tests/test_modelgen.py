"""tests/modelgen.py: synthetic safetensors models for the tests and the benchmarks."""
from __future__ import annotations

import importlib.util
import json
import struct

import numpy as np
import pytest

from tests import modelgen as mg


def tensor_bytes(path) -> dict[str, bytes]:
    """name -> raw bytes of every tensor of a safetensors file."""
    header, start = mg.read_safetensors_header(path)
    data = open(path, "rb").read()
    return {name: data[start + e["data_offsets"][0]:start + e["data_offsets"][1]]
            for name, e in header.items() if name != "__metadata__"}


def model_tensor_bytes(model_dir) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for p in mg.safetensors_files(model_dir):
        out.update(tensor_bytes(p))
    return out


def check_safetensors_layout(path) -> dict:
    """The header is 8-byte aligned, the offsets tile the data section and the file ends with it."""
    raw = open(path, "rb").read(8)
    (n,) = struct.unpack("<Q", raw)
    assert (8 + n) % 8 == 0
    header, start = mg.read_safetensors_header(path)
    items = mg._tensor_items(header)
    pos = 0
    for name, e in items:
        a, b = e["data_offsets"]
        assert a == pos, name
        assert b - a == mg._nbytes(e["dtype"], e["shape"]), name
        pos = b
    assert start + pos == path.stat().st_size
    return header


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return mg.write_llama(tmp_path_factory.mktemp("tiny") / "model", **mg.TINY)


def test_write_safetensors_roundtrip(tmp_path):
    from safetensors.numpy import load_file, safe_open

    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.arange(5, dtype=np.int64)
    path = tmp_path / "x.safetensors"
    size = mg.write_safetensors(path, [
        ("a", "float32", a.shape, (a[i] for i in range(3))),  # a generator of blocks
        ("b", "I64", b.shape, b.tobytes()),
        ("empty", "float32", (0, 4), b""),
    ], metadata={"format": "np", "k": 1})
    assert size == path.stat().st_size
    check_safetensors_layout(path)
    loaded = load_file(path)
    np.testing.assert_array_equal(loaded["a"], a)
    np.testing.assert_array_equal(loaded["b"], b)
    assert loaded["empty"].shape == (0, 4)
    with safe_open(path, framework="np") as f:
        assert f.metadata() == {"format": "np", "k": "1"}


def test_write_safetensors_wrong_size_leaves_nothing(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match="needs 16 bytes"):
        mg.write_safetensors(path, [("a", "float32", (4,), b"\0" * 12)])
    assert list(tmp_path.iterdir()) == []


def test_tiny_files_and_config(tiny):
    assert sorted(p.name for p in tiny.iterdir()) == ["config.json", "generation_config.json",
                                                     "model.safetensors"]
    config = json.loads((tiny / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["torch_dtype"] == "bfloat16" and config["tie_word_embeddings"] is True
    header = check_safetensors_layout(tiny / "model.safetensors")
    assert header["__metadata__"] == {"format": "pt"}
    names = [n for n, _ in mg._tensor_items(header)]
    assert names == [n for n, _ in mg.llama_tensor_specs(config)]
    assert "lm_head.weight" not in names
    assert header["model.layers.0.self_attn.k_proj.weight"]["shape"] == [32, 64]  # 2 kv heads x 16
    assert header["model.layers.1.mlp.down_proj.weight"]["shape"] == [64, 128]
    assert all(e["dtype"] == "BF16" for _, e in mg._tensor_items(header))
    assert mg.llama_param_count(config) == 106_816
    assert 100_000 < (tiny / "model.safetensors").stat().st_size < 4 << 20


def _bf16_to_f32(raw: bytes) -> np.ndarray:
    return (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def test_values_are_normal_and_deterministic(tiny, tmp_path):
    t = tensor_bytes(tiny / "model.safetensors")
    w = _bf16_to_f32(t["model.embed_tokens.weight"])
    assert abs(w.mean()) < 0.002 and 0.018 < w.std() < 0.022
    norm = _bf16_to_f32(t["model.norm.weight"])
    assert abs(norm.mean() - 1) < 0.01
    assert t["model.layers.0.self_attn.q_proj.weight"] != t["model.layers.1.self_attn.q_proj.weight"]
    again = mg.write_llama(tmp_path / "again", **mg.TINY)
    assert (again / "model.safetensors").read_bytes() == (tiny / "model.safetensors").read_bytes()
    other = mg.write_llama(tmp_path / "other", seed=5, **mg.TINY)
    assert tensor_bytes(other / "model.safetensors")["model.norm.weight"] != t["model.norm.weight"]


def test_untied_and_float32(tmp_path):
    d = mg.write_llama(tmp_path / "m", dtype="float32", tie_word_embeddings=False, **mg.TINY)
    header = check_safetensors_layout(d / "model.safetensors")
    assert header["lm_head.weight"] == {"dtype": "F32", "shape": [512, 64],
                                        "data_offsets": header["lm_head.weight"]["data_offsets"]}


def test_tensor_order_keeps_bytes(tiny, tmp_path):
    d = mg.write_llama(tmp_path / "sorted", tensor_order="sorted", **mg.TINY)
    header, _ = mg.read_safetensors_header(d / "model.safetensors")
    names = [n for n, _ in mg._tensor_items(header)]
    assert names == sorted(names)
    assert tensor_bytes(d / "model.safetensors") == tensor_bytes(tiny / "model.safetensors")


def test_sharded_index_is_consistent(tiny, tmp_path):
    d = mg.write_llama(tmp_path / "sharded", shards=3, **mg.TINY)
    files = mg.safetensors_files(d)
    assert [p.name for p in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((d / "model.safetensors.index.json").read_text())
    seen: dict[str, str] = {}
    total = 0
    for p in files:
        header = check_safetensors_layout(p)
        for name, e in mg._tensor_items(header):
            assert name not in seen
            seen[name] = p.name
            total += e["data_offsets"][1] - e["data_offsets"][0]
    assert index["weight_map"] == seen
    assert index["metadata"]["total_size"] == total
    assert model_tensor_bytes(d) == tensor_bytes(tiny / "model.safetensors")


def test_variant_changes_about_a_tenth(tiny, tmp_path):
    base = tiny
    v = tmp_path / "variant"
    changed = mg.write_variant(base, v, change_fraction=0.1, seed=1)
    a, b = model_tensor_bytes(base), model_tensor_bytes(v)
    assert a.keys() == b.keys()
    differ = sorted(n for n in a if a[n] != b[n])
    assert differ == changed
    assert len(changed) == round(0.1 * len(a))  # 20 tensors -> 2
    ha, _ = mg.read_safetensors_header(base / "model.safetensors")
    hb, _ = mg.read_safetensors_header(v / "model.safetensors")
    assert ha == hb  # same header, same offsets
    assert (v / "config.json").read_bytes() == (base / "config.json").read_bytes()
    # the same seed repeats itself
    assert mg.write_variant(base, tmp_path / "v2", seed=1) == changed
    assert model_tensor_bytes(tmp_path / "v2") == b


def test_variant_of_a_larger_model_changes_ten_percent(tmp_path):
    base = mg.write_llama(tmp_path / "base", hidden_size=64, intermediate_size=128, num_layers=10,
                          num_heads=4, num_kv_heads=2, vocab_size=512, shards=2)
    changed = mg.write_variant(base, tmp_path / "v", change_fraction=0.1)
    assert len(changed) == 9  # 92 tensors
    a, b = model_tensor_bytes(base), model_tensor_bytes(tmp_path / "v")
    assert sum(a[n] != b[n] for n in a) == 9
    assert (tmp_path / "v" / "model.safetensors.index.json").exists()


def test_reordered_keeps_tensor_bytes(tiny, tmp_path):
    r = mg.write_reordered(tiny, tmp_path / "reordered", extra_metadata={"k": "v"})
    ha, sa = mg.read_safetensors_header(tiny / "model.safetensors")
    hb, sb = mg.read_safetensors_header(r / "model.safetensors")
    check_safetensors_layout(r / "model.safetensors")
    assert hb["__metadata__"] == {"format": "pt", "k": "v"}
    assert [n for n, _ in mg._tensor_items(ha)] != [n for n, _ in mg._tensor_items(hb)]
    assert any(ha[n]["data_offsets"] != hb[n]["data_offsets"] for n in ha if n != "__metadata__")
    assert tensor_bytes(r / "model.safetensors") == tensor_bytes(tiny / "model.safetensors")
    assert (r / "config.json").read_bytes() == (tiny / "config.json").read_bytes()


def test_lora_adapter_layout(tiny, tmp_path):
    a = mg.write_lora_adapter(tmp_path / "lora", tiny, r=8, target_modules=("q_proj", "v_proj", "down_proj"))
    cfg = json.loads((a / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 8
    assert cfg["base_model_name_or_path"] == str(tiny)
    assert cfg["target_modules"] == ["q_proj", "v_proj", "down_proj"]
    header = check_safetensors_layout(a / "adapter_model.safetensors")
    p = "base_model.model.model.layers.0."
    assert header[p + "self_attn.q_proj.lora_A.weight"]["shape"] == [8, 64]
    assert header[p + "self_attn.q_proj.lora_B.weight"]["shape"] == [64, 8]
    assert header[p + "self_attn.v_proj.lora_B.weight"]["shape"] == [32, 8]
    assert header[p + "mlp.down_proj.lora_A.weight"]["shape"] == [8, 128]
    assert len([n for n in header if n != "__metadata__"]) == 2 * 3 * 2
    with pytest.raises(ValueError, match="unknown target modules"):
        mg.write_lora_adapter(tmp_path / "bad", tiny, target_modules=("nope",))


def test_bench_preset_is_at_least_a_gigabyte():
    config = mg.llama_config(**mg.BENCH_1B)
    assert mg.llama_nbytes(config) >= 1.0e9
    assert mg.llama_param_count(mg.llama_config(**mg.SMOLLM2_135M)) == 134_515_008


@pytest.mark.slow
def test_bench_1b_writes_quickly(tmp_path):
    import time

    t = time.monotonic()
    d = mg.write_llama(tmp_path / "bench", **mg.BENCH_1B)
    elapsed = time.monotonic() - t
    assert (d / "model.safetensors").stat().st_size >= 1.0e9
    assert elapsed < 60, elapsed


# --- with torch / transformers / peft, when installed ------------------------------------------------

def test_tiny_loads_with_transformers(tiny):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(tiny)
    config = json.loads((tiny / "config.json").read_text())
    assert sum(p.numel() for p in model.parameters()) == mg.llama_param_count(config) == 106_816
    assert model.dtype == torch.bfloat16
    raw = tensor_bytes(tiny / "model.safetensors")["model.layers.1.mlp.up_proj.weight"]
    w = model.model.layers[1].mlp.up_proj.weight.detach()
    assert w.contiguous().view(torch.int16).numpy().tobytes() == raw
    out = model(torch.tensor([[1, 5, 7]])).logits
    assert out.shape == (1, 3, 512) and torch.isfinite(out).all()


def test_sharded_loads_with_transformers(tiny, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    d = mg.write_llama(tmp_path / "sharded", shards=2, **mg.TINY)
    a = transformers.LlamaForCausalLM.from_pretrained(tiny).state_dict()
    b = transformers.LlamaForCausalLM.from_pretrained(d).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_adapter_loads_with_peft(tiny, tmp_path):
    if importlib.util.find_spec("peft") is None:
        pytest.skip("peft is not installed (it is not a dependency of transformers); "
                    "the adapter's layout is checked by test_lora_adapter_layout")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import peft

    a = mg.write_lora_adapter(tmp_path / "lora", tiny, r=4)
    base = transformers.LlamaForCausalLM.from_pretrained(tiny)
    ids = torch.tensor([[1, 5, 7]])
    before = base(ids).logits
    model = peft.PeftModel.from_pretrained(base, a)
    after = model(ids).logits
    assert not torch.allclose(before, after)
