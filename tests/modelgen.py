"""Synthetic models for tests and benchmarks, written without torch.

Everything here is numpy plus a small streaming safetensors writer, so a model of more than a gigabyte
is written tensor by tensor, block by block, and never sits in memory whole.

Values: each tensor's elements are drawn from N(mean, std) (std 0.02 for weights, mean 1 for norm
weights) by mapping uniform 16-bit random numbers through a 65,536-entry inverse-CDF table of bit
patterns. Drawing random bits is the cheapest thing a numpy generator does, and the table lookup is one
`np.take`, so a gigabyte takes a few seconds on one core. Unlike slicing a small random pool, the bytes
never repeat inside or across tensors, so content-defined chunking finds no dedup that a real model
would not offer. Every tensor has its own generator seeded from (seed, tensor name): a tensor's bytes do
not depend on the order it is written in, nor on the other tensors.

Public functions:
    write_safetensors(path, tensors, metadata=None) -> int
    read_safetensors_header(path) -> (header: dict, data_start: int)
    llama_config(...) -> dict, llama_tensor_specs(config) -> list[(name, shape)], llama_param_count(config)
    write_llama(dir, *, hidden_size, ..., shards=1, tensor_order=None, extra_metadata=None) -> Path
    write_variant(src_dir, dst_dir, *, change_fraction=0.1, seed=1) -> list[str]  (changed tensor names)
    write_reordered(src_dir, dst_dir, extra_metadata={"k": "v"}, *, seed=0) -> Path
    write_lora_adapter(dir, base_dir, *, r=8, target_modules=("q_proj", "v_proj"), seed=0) -> Path
Presets (keyword dicts for write_llama): TINY, SMOLLM2_135M, BENCH_1B.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import statistics
import struct
import zlib
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

__all__ = [
    "TINY", "SMOLLM2_135M", "BENCH_1B", "DTYPES",
    "write_safetensors", "read_safetensors_header", "safetensors_files",
    "llama_config", "llama_tensor_specs", "llama_param_count", "llama_nbytes",
    "write_llama", "write_variant", "write_reordered", "write_lora_adapter",
]

# name -> (safetensors dtype, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "bfloat16": ("BF16", 2), "float16": ("F16", 2), "float32": ("F32", 4), "float64": ("F64", 8),
    "int8": ("I8", 1), "uint8": ("U8", 1), "int16": ("I16", 2), "uint16": ("U16", 2),
    "int32": ("I32", 4), "uint32": ("U32", 4), "int64": ("I64", 8), "uint64": ("U64", 8),
    "bool": ("BOOL", 1), "float8_e4m3fn": ("F8_E4M3", 1), "float8_e5m2": ("F8_E5M2", 1),
}
_ST_TO_NAME = {st: name for name, (st, _) in DTYPES.items()}
_ITEMSIZE = {st: size for st, size in DTYPES.values()}

# A few MB: fast enough for any unit test.
TINY = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
            vocab_size=512)
# The shape of SmolLM2-135M (the demo model): 134,515,008 parameters, 269 MB in bf16.
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
                    vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0)
# TinyLlama-1.1B's shapes with 16 of its 22 layers: 770,246,656 parameters, 1.54e9 bytes in bf16,
# 146 tensors.
BENCH_1B = dict(hidden_size=2048, intermediate_size=5632, num_layers=16, num_heads=32, num_kv_heads=4,
                vocab_size=32000)

_BLOCK_ELEMS = 4 << 20  # elements generated per step: 8 MiB of bf16


# ---------------------------------------------------------------------------------------------------
# safetensors, read and write
# ---------------------------------------------------------------------------------------------------

def _st_dtype(dtype: str) -> str:
    if dtype in DTYPES:
        return DTYPES[dtype][0]
    if dtype in _ITEMSIZE:
        return dtype
    raise ValueError(f"unknown dtype {dtype!r}; known: {sorted(DTYPES)}")


def _nbytes(st_dtype: str, shape: Sequence[int]) -> int:
    n = _ITEMSIZE[st_dtype]
    for d in shape:
        n *= int(d)
    return n


def _chunks(data) -> Iterator:
    """Yield buffers from bytes, a numpy array, a callable returning either, or an iterable of them."""
    if callable(data):
        data = data()
    if isinstance(data, np.ndarray):
        yield np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    elif isinstance(data, (bytes, bytearray, memoryview)):
        yield data
    else:
        for part in data:
            if isinstance(part, np.ndarray):
                part = np.ascontiguousarray(part).reshape(-1).view(np.uint8)
            yield part


def write_safetensors(path, tensors: Iterable[tuple], metadata: dict | None = None) -> int:
    """Write a safetensors file, streaming the data.

    `tensors` is an iterable of (name, dtype, shape, data) in file order; dtype is a numpy-style name
    ("bfloat16") or a safetensors one ("BF16"); data is bytes, a numpy array, an iterable (a generator)
    of such buffers, or a callable that returns one of those, consumed only when its turn comes. The
    header (8-byte little-endian length, then JSON padded with spaces to a multiple of 8 bytes) is
    computed from the shapes first, so the data of each tensor is written as it is produced. The file
    appears under `path` only when complete. Returns the size of the file.
    """
    path = Path(path)
    entries = [(str(name), _st_dtype(dtype), [int(d) for d in shape], data)
               for name, dtype, shape, data in tensors]
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, st, shape, _ in entries:
        if name in header or name == "__metadata__":
            raise ValueError(f"{path}: duplicate tensor name {name!r}")
        n = _nbytes(st, shape)
        header[name] = {"dtype": st, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * (-(8 + len(hjson)) % 8)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(hjson)))
            f.write(hjson)
            for name, st, shape, data in entries:
                expected = _nbytes(st, shape)
                written = 0
                for buf in _chunks(data):
                    written += f.write(buf)
                if written != expected:
                    raise ValueError(f"{path}: tensor {name!r} {st}{shape} needs {expected} bytes, "
                                     f"got {written}")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return 8 + len(hjson) + offset


def read_safetensors_header(path) -> tuple[dict, int]:
    """Return (header as parsed JSON, offset of the data section) of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100 << 20:
            raise ValueError(f"{path}: header length {n} is implausible")
        header = json.loads(f.read(n))
    return header, 8 + n


def _tensor_items(header: dict) -> list[tuple[str, dict]]:
    """Tensor entries of a header, in file (offset) order."""
    items = [(k, v) for k, v in header.items() if k != "__metadata__"]
    items.sort(key=lambda kv: kv[1]["data_offsets"][0])
    return items


def _copy_range(path, start: int, length: int, block: int = 16 << 20) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(start)
        while length > 0:
            buf = f.read(min(block, length))
            if not buf:
                raise ValueError(f"{path}: truncated at {f.tell()}")
            length -= len(buf)
            yield buf


def safetensors_files(model_dir) -> list[Path]:
    return sorted(Path(model_dir).glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------------
# Random values
# ---------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _normal_lut(dtype: str, mean: float, std: float) -> np.ndarray:
    """65,536 bit patterns (in `dtype`'s storage type): the quantiles (i + 0.5) / 65536 of N(mean, std)."""
    inv = statistics.NormalDist(mean, std).inv_cdf
    q = np.array([inv((i + 0.5) / 65536.0) for i in range(65536)], dtype=np.float64)
    if dtype == "bfloat16":
        bits = q.astype(np.float32).view(np.uint32).astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest even
        return bits.astype(np.uint16)
    if dtype == "float16":
        return q.astype(np.float16).view(np.uint16)
    if dtype == "float32":
        return q.astype(np.float32)
    if dtype == "float64":
        return q
    raise ValueError(f"no random values for dtype {dtype!r}")


def _tensor_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode())])


def _random_blocks(name: str, dtype: str, shape: Sequence[int], seed: int, *,
                   mean: float = 0.0, std: float = 0.02) -> Iterator[np.ndarray]:
    """Yield the tensor's values block by block, deterministic in (seed, name)."""
    dtype = _ST_TO_NAME.get(dtype, dtype)
    n = 1
    for d in shape:
        n *= int(d)
    rng = _tensor_rng(seed, name)
    if dtype in ("bfloat16", "float16", "float32", "float64"):
        lut = _normal_lut(dtype, float(mean), float(std))
        out = np.empty(min(n, _BLOCK_ELEMS), dtype=lut.dtype)
        done = 0
        while done < n:
            k = min(_BLOCK_ELEMS, n - done)
            u = np.frombuffer(rng.bytes(2 * k), dtype=np.uint16)
            np.take(lut, u, out=out[:k])
            yield out[:k]
            done += k
    else:  # integers and the rest: random bytes
        total = n * _ITEMSIZE[_st_dtype(dtype)]
        done = 0
        while done < total:
            k = min(8 * _BLOCK_ELEMS, total - done)
            yield rng.bytes(k)
            done += k


def _is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


def _values(name: str, dtype: str, shape, seed: int):
    """Data for write_safetensors: a lazy generator of the tensor's blocks."""
    if _is_norm(name):
        return _random_blocks(name, dtype, shape, seed, mean=1.0, std=0.02)
    return _random_blocks(name, dtype, shape, seed)


# ---------------------------------------------------------------------------------------------------
# Llama
# ---------------------------------------------------------------------------------------------------

def llama_config(*, hidden_size: int, intermediate_size: int, num_layers: int, num_heads: int,
                 num_kv_heads: int, vocab_size: int, dtype: str = "bfloat16",
                 tie_word_embeddings: bool = True, max_position_embeddings: int = 2048,
                 rope_theta: float = 10000.0, rms_norm_eps: float = 1e-5, head_dim: int | None = None,
                 bos_token_id: int = 1, eos_token_id: int = 2) -> dict:
    """A Hugging Face LlamaConfig as a config.json dict."""
    if hidden_size % num_heads and head_dim is None:
        raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim or hidden_size // num_heads,
        "vocab_size": vocab_size,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": rms_norm_eps,
        "rope_theta": rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": dtype,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
    }


def _proj_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """module name -> (out_features, in_features) of each linear layer in a llama block."""
    h = config["hidden_size"]
    i = config["intermediate_size"]
    hd = config.get("head_dim") or h // config["num_attention_heads"]
    q = config["num_attention_heads"] * hd
    kv = config.get("num_key_value_heads", config["num_attention_heads"]) * hd
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


def llama_tensor_specs(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of LlamaForCausalLM, in module order."""
    h, v = config["hidden_size"], config["vocab_size"]
    proj = _proj_shapes(config)
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            specs.append((f"{p}self_attn.{m}.weight", proj[m]))
        for m in ("gate_proj", "up_proj", "down_proj"):
            specs.append((f"{p}mlp.{m}.weight", proj[m]))
        specs.append((f"{p}input_layernorm.weight", (h,)))
        specs.append((f"{p}post_attention_layernorm.weight", (h,)))
    specs.append(("model.norm.weight", (h,)))
    if not config.get("tie_word_embeddings", True):
        specs.append(("lm_head.weight", (v, h)))
    return specs


def llama_param_count(config: dict) -> int:
    return sum(int(np.prod(shape)) for _, shape in llama_tensor_specs(config))


def llama_nbytes(config: dict) -> int:
    """Bytes of tensor data (not counting headers) of the model in its torch_dtype."""
    return llama_param_count(config) * DTYPES[config.get("torch_dtype", "bfloat16")][1]


def _order(specs: list, tensor_order, seed: int) -> list:
    if tensor_order is None:
        return list(specs)
    by_name = dict(specs)
    if tensor_order == "sorted":  # what safetensors' save_file of a torch state dict gives
        return sorted(specs)
    if tensor_order == "reversed":
        return specs[::-1]
    if tensor_order == "shuffle":
        idx = np.random.default_rng(seed).permutation(len(specs))
        return [specs[i] for i in idx]
    if callable(tensor_order):
        names = list(tensor_order([n for n, _ in specs]))
    else:
        names = list(tensor_order)
    if sorted(names) != sorted(by_name):
        raise ValueError("tensor_order must name every tensor exactly once")
    return [(n, by_name[n]) for n in names]


def _split_shards(specs: list, shards: int, itemsize: int) -> list[list]:
    """Cut the ordered tensors into `shards` consecutive groups of about equal size."""
    if shards < 1 or shards > len(specs):
        raise ValueError(f"shards must be between 1 and {len(specs)}, not {shards}")
    sizes = [int(np.prod(s)) * itemsize for _, s in specs]
    total = sum(sizes)
    groups: list[list] = [[] for _ in range(shards)]
    acc = 0
    for i, (spec, size) in enumerate(zip(specs, sizes)):
        g = min(shards - 1, int(acc * shards // total))
        # keep enough tensors for the shards still empty
        g = max(g, shards - (len(specs) - i))
        groups[g].append(spec)
        acc += size
    return groups


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def write_llama(dir, *, hidden_size: int, intermediate_size: int, num_layers: int, num_heads: int,
                num_kv_heads: int, vocab_size: int, dtype: str = "bfloat16", seed: int = 0,
                tie_word_embeddings: bool = True, shards: int = 1,
                tensor_order: str | Sequence[str] | Callable | None = None,
                extra_metadata: dict | None = None, **config_overrides) -> Path:
    """Write a random-weight LlamaForCausalLM in the Hugging Face layout under `dir`.

    Files: config.json, generation_config.json, and model.safetensors, or with shards > 1
    model-0000i-of-0000N.safetensors plus model.safetensors.index.json. tensor_order: None (module
    order), "sorted", "reversed", "shuffle" (by seed), a list of every name, or a callable on the list of
    names. extra_metadata goes into every safetensors header besides {"format": "pt"}. Other keywords
    (max_position_embeddings, rope_theta, rms_norm_eps, head_dim, bos_token_id, eos_token_id) go to
    the config. Returns `dir` as a Path.
    """
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    config = llama_config(hidden_size=hidden_size, intermediate_size=intermediate_size,
                          num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                          vocab_size=vocab_size, dtype=dtype, tie_word_embeddings=tie_word_embeddings,
                          **config_overrides)
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"dtype must be bfloat16, float16 or float32, not {dtype!r}")
    specs = _order(llama_tensor_specs(config), tensor_order, seed)
    metadata = {"format": "pt", **(extra_metadata or {})}
    itemsize = DTYPES[dtype][1]
    groups = _split_shards(specs, shards, itemsize)
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups):
        fname = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(out / fname,
                          ((name, dtype, shape, _values(name, dtype, shape, seed)) for name, shape in group),
                          metadata)
        weight_map.update({name: fname for name, _ in group})
    if shards > 1:
        total = sum(int(np.prod(s)) * itemsize for _, s in specs)
        _write_json(out / "model.safetensors.index.json",
                    {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json",
                {"_from_model_config": True, "bos_token_id": config["bos_token_id"],
                 "eos_token_id": config["eos_token_id"]})
    return out


# ---------------------------------------------------------------------------------------------------
# Derived models
# ---------------------------------------------------------------------------------------------------

def _copy_other_files(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.is_file() and p.suffix != ".safetensors":
            shutil.copyfile(p, dst / p.name)


def write_variant(src_dir, dst_dir, *, change_fraction: float = 0.1, seed: int = 1) -> list[str]:
    """Copy a model directory, giving new random values to round(change_fraction * N) whole tensors
    (chosen by `seed`, at least one when change_fraction > 0), as a fine-tune of a few modules would.
    Headers, order and offsets stay the same; unchanged tensors keep their bytes. Returns the sorted
    names of the changed tensors."""
    src, dst = Path(src_dir), Path(dst_dir)
    _copy_other_files(src, dst)
    files = safetensors_files(src)
    headers = {p: read_safetensors_header(p) for p in files}
    names = sorted(n for h, _ in headers.values() for n, _ in _tensor_items(h))
    k = int(round(change_fraction * len(names)))
    if change_fraction > 0:
        k = max(k, 1)
    rng = np.random.default_rng(seed)
    changed = set(names[i] for i in rng.choice(len(names), size=min(k, len(names)), replace=False))
    for p in files:
        header, start = headers[p]

        def tensors(p=p, header=header, start=start):
            for name, e in _tensor_items(header):
                a, b = e["data_offsets"]
                if name in changed:
                    dt = _ST_TO_NAME.get(e["dtype"], e["dtype"])
                    data = _random_blocks(name, dt, e["shape"], seed + 0x5EED,
                                          mean=1.0 if _is_norm(name) else 0.0, std=0.02)
                else:
                    data = _copy_range(p, start + a, b - a)
                yield name, e["dtype"], e["shape"], data

        write_safetensors(dst / p.name, tensors(), header.get("__metadata__"))
    return sorted(changed)


def write_reordered(src_dir, dst_dir, extra_metadata: dict | None = None, *, seed: int = 0) -> Path:
    """Copy a model directory with each safetensors file's tensors in another (shuffled, never the same)
    order and `extra_metadata` (default {"k": "v"}) added to each header: header and offsets change,
    every tensor's bytes stay identical. Shard membership (the index) is unchanged."""
    if extra_metadata is None:
        extra_metadata = {"k": "v"}
    src, dst = Path(src_dir), Path(dst_dir)
    _copy_other_files(src, dst)
    rng = np.random.default_rng(seed)
    for p in safetensors_files(src):
        header, start = read_safetensors_header(p)
        items = _tensor_items(header)
        order = list(range(len(items)))
        if len(items) > 1:
            while order == list(range(len(items))):
                order = [int(i) for i in rng.permutation(len(items))]
        metadata = {**header.get("__metadata__", {}), **extra_metadata}
        write_safetensors(
            dst / p.name,
            ((items[i][0], items[i][1]["dtype"], items[i][1]["shape"],
              functools.partial(_copy_range, p, start + items[i][1]["data_offsets"][0],
                                items[i][1]["data_offsets"][1] - items[i][1]["data_offsets"][0]))
             for i in order),
            metadata)
    return dst


def write_lora_adapter(dir, base_dir, *, r: int = 8, target_modules: Sequence[str] = ("q_proj", "v_proj"),
                       seed: int = 0, lora_alpha: int | None = None, dtype: str | None = None) -> Path:
    """Write a PEFT LoRA adapter for the llama in `base_dir` (shapes from its config.json):
    adapter_config.json and adapter_model.safetensors with lora_A [r, in] and lora_B [out, r] for every
    layer and target module. Both matrices are random (PEFT would start B at zero), so the adapter
    changes the model's output. dtype defaults to the base's torch_dtype."""
    base = Path(base_dir)
    config = json.loads((base / "config.json").read_text())
    proj = _proj_shapes(config)
    unknown = [m for m in target_modules if m not in proj]
    if unknown:
        raise ValueError(f"unknown target modules {unknown}; known: {sorted(proj)}")
    dtype = dtype or config.get("torch_dtype") or config.get("dtype") or "float32"
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = []
    for n in range(config["num_hidden_layers"]):
        for m in target_modules:
            part = "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{n}.{part}.{m}"
            fan_out, fan_in = proj[m]
            for name, shape in ((f"{prefix}.lora_A.weight", (r, fan_in)),
                                (f"{prefix}.lora_B.weight", (fan_out, r))):
                tensors.append((name, dtype, shape, _random_blocks(name, dtype, shape, seed)))
    write_safetensors(out / "adapter_model.safetensors", tensors, {"format": "pt"})
    _write_json(out / "adapter_config.json", {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": r,
        "lora_alpha": lora_alpha if lora_alpha is not None else 2 * r,
        "lora_dropout": 0.0,
        "target_modules": list(target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_rslora": False,
        "use_dora": False,
        "revision": None,
    })
    return out


# ---------------------------------------------------------------------------------------------------
# GGUF (needs the `gguf` package, which is numpy-only; imported when called)
# ---------------------------------------------------------------------------------------------------

def _byte_level_chars() -> list[str]:
    """GPT-2's bytes_to_unicode: the 256 printable stand-ins of a byte-level BPE vocabulary."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def tiny_bpe_vocab(vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """A byte-level BPE vocabulary (tokens, GGUF token types, merges) of exactly vocab_size tokens:
    three special tokens (<|endoftext|>, <|im_start|>, <|im_end|>), the 256 byte tokens, then merges of
    common English pairs. Enough for a tokenizer that encodes any text."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    chars = _byte_level_chars()
    if vocab_size < len(specials) + len(chars):
        raise ValueError(f"vocab_size must be at least {len(specials) + len(chars)}")
    tokens = specials + chars
    types = [3] * len(specials) + [1] * len(chars)  # 3: control, 1: normal
    merges: list[str] = []
    have = set(tokens)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    space = chars[ord(" ")]
    candidates = [(space, c) for c in letters] + [(a, b) for a in letters for b in letters]
    for a, b in candidates:
        if len(tokens) >= vocab_size:
            break
        if a + b in have:
            continue
        merges.append(f"{a} {b}")
        tokens.append(a + b)
        types.append(1)
        have.add(a + b)
    if len(tokens) < vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is larger than this toy vocabulary can fill")
    return tokens, types, merges


_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
               "post_attention_layernorm": "ffn_norm"}


def gguf_tensor_name(hf_name: str) -> str:
    """llama.cpp's name for a Hugging Face llama tensor name."""
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".")  # model.layers.N.<module...>.weight
    return f"blk.{parts[2]}.{_GGUF_NAMES['.'.join(parts[3:-1])]}.weight"


def _permute_for_gguf(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert script reorders q and k rows for its rotary embedding; transformers undoes
    it on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path, *, hidden_size: int, intermediate_size: int, num_layers: int, num_heads: int,
                     num_kv_heads: int, vocab_size: int, seed: int = 0, tie_word_embeddings: bool = True,
                     max_position_embeddings: int = 2048, rope_theta: float = 10000.0,
                     rms_norm_eps: float = 1e-5, name: str = "tiny-llama", **_ignored) -> dict[str, np.ndarray]:
    """Write a random-weight llama as a GGUF file (float32 tensors, llama.cpp names and metadata, a
    byte-level BPE tokenizer and a ChatML chat template), the way llama.cpp's convert script lays one out.
    Returns the Hugging Face state dict it stands for (float32 numpy arrays, q/k not permuted): what a
    correct import must give back. Takes the same keywords as write_llama (TINY works)."""
    import gguf

    config = llama_config(hidden_size=hidden_size, intermediate_size=intermediate_size,
                          num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                          vocab_size=vocab_size, dtype="float32", tie_word_embeddings=tie_word_embeddings,
                          max_position_embeddings=max_position_embeddings, rope_theta=rope_theta,
                          rms_norm_eps=rms_norm_eps)
    tokens, types, merges = tiny_bpe_vocab(vocab_size)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(max_position_embeddings)
    w.add_embedding_length(hidden_size)
    w.add_block_count(num_layers)
    w.add_feed_forward_length(intermediate_size)
    w.add_head_count(num_heads)
    w.add_head_count_kv(num_kv_heads)
    w.add_rope_freq_base(rope_theta)
    w.add_layer_norm_rms_eps(rms_norm_eps)
    w.add_rope_dimension_count(config["head_dim"])
    w.add_vocab_size(vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                        "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    state: dict[str, np.ndarray] = {}
    for hf_name, shape in llama_tensor_specs(config):
        value = np.concatenate(list(_values(hf_name, "float32", shape, seed))).reshape(shape)
        state[hf_name] = value
        if hf_name.endswith("q_proj.weight"):
            value = _permute_for_gguf(value, num_heads)
        elif hf_name.endswith("k_proj.weight"):
            value = _permute_for_gguf(value, num_kv_heads)
        w.add_tensor(gguf_tensor_name(hf_name), value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return state
