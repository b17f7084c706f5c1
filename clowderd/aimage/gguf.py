"""Turn a GGUF file (llama.cpp's format) into a Hugging Face safetensors directory.

transformers loads the GGUF (dequantizing it) for both the model and the tokenizer; we write the state
dict with safetensors ourselves, because transformers refuses to `save_pretrained` a GGUF-loaded model.
The dependencies (transformers, gguf, torch, accelerate) are the optional extra `clowder[gguf]` and are
imported only when a conversion runs.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

from clowderd.errors import InvalidInput

__all__ = ["GGUF_MAGIC", "INSTALL_HINT", "DTYPES", "is_gguf_file", "gguf_architecture", "convert_gguf"]

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
INSTALL_HINT = "pip install 'clowder[gguf]'  (transformers, gguf, torch, accelerate)"
DTYPES = ("bfloat16", "float16", "float32")
_NEEDED = ("torch", "transformers", "gguf", "accelerate")


def is_gguf_file(path: Path) -> bool:
    """True when the file starts with the GGUF magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _check_dependencies() -> None:
    missing = [m for m in _NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        raise InvalidInput(f"converting a GGUF file needs {', '.join(missing)}, which "
                           f"{'is' if len(missing) == 1 else 'are'} not installed: {INSTALL_HINT}")


def gguf_architecture(gguf_path: Path) -> str:
    """The file's `general.architecture` (for example "llama"), read with the gguf package."""
    _check_dependencies()
    import gguf

    try:
        reader = gguf.GGUFReader(str(gguf_path))
        field = reader.fields["general.architecture"]
        if hasattr(field, "contents"):
            arch = field.contents()
        else:  # older gguf
            arch = bytes(field.parts[field.data[0]]).decode()
    except KeyError:
        raise InvalidInput(f"{gguf_path}: the GGUF file has no general.architecture entry") from None
    except Exception as e:  # a truncated or corrupt file
        raise InvalidInput(f"{gguf_path}: cannot read the GGUF file: {e}") from e
    return str(arch)


def _supported_architectures() -> set[str] | None:
    """GGUF architectures this transformers can load, or None when it does not tell."""
    archs: set[str] = set()
    found = False
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        archs.update(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
        found = True
    except ImportError:
        pass
    try:
        from transformers.integrations.gguf.utils import GGUF_ARCHS

        archs.update(GGUF_ARCHS)
        found = True
    except ImportError:
        pass
    return archs if found else None


def _dtype_kwargs(transformers, torch_dtype) -> dict:
    major = int(transformers.__version__.split(".")[0])
    return {"dtype": torch_dtype} if major >= 5 else {"torch_dtype": torch_dtype}


def _gguf_quantization_config(transformers):
    """Ask for a dense model where transformers could keep the weights packed (its newer loader)."""
    cls = getattr(transformers, "GgufConfig", None)
    if cls is None:
        return {}
    import inspect

    if "dequantize" not in inspect.signature(cls.__init__).parameters:
        return {}
    return {"quantization_config": cls(dequantize=True)}


def convert_gguf(gguf_path: Path, out_dir: Path, *, dtype: str = "bfloat16") -> Path:
    """Convert `gguf_path` into a Hugging Face directory at `out_dir` and return `out_dir`.

    The directory gets model.safetensors (in `dtype`; lm_head.weight left out when the embeddings are
    tied), config.json (without quantization_config), generation_config.json and the tokenizer files
    (tokenizer.json, tokenizer_config.json, chat_template.jinja, ...). It is written under a temporary
    name beside `out_dir` and renamed when complete, so a failure leaves nothing behind.

    Raises InvalidInput when the file is missing or not a GGUF, its architecture is not supported,
    `out_dir` already exists, or the optional dependencies are missing.
    """
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    if dtype not in DTYPES:
        raise InvalidInput(f"dtype {dtype!r} is not supported for GGUF conversion; use one of {', '.join(DTYPES)}")
    if not gguf_path.is_file():
        raise InvalidInput(f"{gguf_path}: no such file")
    with open(gguf_path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise InvalidInput(f"{gguf_path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")
    if out_dir.exists():
        raise InvalidInput(f"{out_dir} already exists; choose a new output directory")
    _check_dependencies()

    arch = gguf_architecture(gguf_path)
    supported = _supported_architectures()
    if supported is not None and arch not in supported:
        raise InvalidInput(f"{gguf_path}: GGUF architecture {arch!r} is not supported by the installed "
                           f"transformers (supported: {', '.join(sorted(supported))})")

    import safetensors.torch
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()  # callers show their own progress
    torch_dtype = getattr(torch, dtype)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    t0 = time.monotonic()
    try:
        where, name = str(gguf_path.parent.resolve()), gguf_path.name
        log.info("converting %s (architecture %s, %d bytes) to %s in %s",
                 gguf_path, arch, gguf_path.stat().st_size, out_dir, dtype)
        try:
            tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name, local_files_only=True)
            log.info("tokenizer loaded in %.1f s", time.monotonic() - t0)
            t1 = time.monotonic()
            model = AutoModelForCausalLM.from_pretrained(
                where, gguf_file=name, local_files_only=True, low_cpu_mem_usage=True,
                **_dtype_kwargs(transformers, torch_dtype), **_gguf_quantization_config(transformers))
            log.info("model loaded and dequantized in %.1f s", time.monotonic() - t1)
        except ValueError as e:
            if "not supported" in str(e) or "architecture" in str(e):
                raise InvalidInput(f"{gguf_path}: {e}") from e
            raise

        config = model.config
        tied = bool(getattr(config, "tie_word_embeddings", False))
        state = {}
        for key, value in model.state_dict().items():
            if tied and key == "lm_head.weight":
                continue
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise InvalidInput(f"{gguf_path}: tensor {key} came out of transformers still packed "
                                   f"({type(value).__name__}, {getattr(value, 'dtype', '?')}); cannot convert it")
            state[key] = value.detach().to(device="cpu", dtype=torch_dtype).contiguous()
        generation_config = model.generation_config
        del model
        t2 = time.monotonic()
        safetensors.torch.save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        log.info("wrote model.safetensors: %d tensors, %d parameters, %d bytes in %.1f s", len(state),
                 sum(v.numel() for v in state.values()), (tmp / "model.safetensors").stat().st_size,
                 time.monotonic() - t2)
        del state

        config_dict = config.to_dict()
        for key in ("quantization_config", "_name_or_path", "_pre_quantization_dtype"):
            config_dict.pop(key, None)
        if not config_dict.get("architectures"):
            config_dict["architectures"] = [_causal_lm_name(config)]
        config_dict["torch_dtype" if "torch_dtype" in config_dict else "dtype"] = dtype
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True, default=str) + "\n")
        generation_config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted %s to %s in %.1f s", gguf_path, out_dir, time.monotonic() - t0)
    return out_dir


def _causal_lm_name(config) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, "LlamaForCausalLM")

