"""The TensorRT-LLM engine: `trtllm-serve` (PyTorch backend) on the model directory, a LoRA adapter named
in each request.

What this wrapper relies on, as TensorRT-LLM's sources and documentation have it
(tensorrt_llm/commands/serve.py, tensorrt_llm/serve/openai_server.py and openai_protocol.py,
tensorrt_llm/executor/request.py, get_default_trtllm_modules_to_hf_modules; the docs' "LoRA (Low-Rank
Adaptation)", section "TRTLLM serve with LoRA"):
- `trtllm-serve MODEL --host H --port P --backend pytorch --extra_llm_api_options FILE` (with MODEL
  first, trtllm-serve runs its default command, `serve`; `--config` is the option's newer name). The YAML file
  overrides the LLM API arguments; LoRA is enabled there by `lora_config` with `max_lora_rank` and
  `lora_target_modules` (TensorRT-LLM's module names; attn_q, attn_k, attn_v, attn_dense, mlp_h_to_4h,
  mlp_4h_to_h, mlp_gate are q_proj, k_proj, v_proj, o_proj, gate_proj, down_proj, up_proj of a Hugging Face
  model). All seven are enabled, so an adapter added later on any of them can be served.
- The server has no endpoint to load adapters: each request carries
  `lora_request: {"lora_name", "lora_int_id", "lora_path"}` (LoRARequest). The server loads an adapter
  when a request first names it and caches it by lora_int_id, so an id is never given to two adapters.
  Adding an adapter here checks it and remembers its path; removing it forgets it.
- Request models forbid unknown fields; chat takes `max_tokens` (an alias of max_completion_tokens);
  errors are {"object": "error", "message", "type", "code"}.
- GET /health answers 200. GET /metrics is a JSON list of iteration statistics that exists only with
  enable_iter_perf_stats and is emptied by each read, so it is not polled: the engine reports the requests
  open through it as running, and none as waiting.
- dtype is an LLM API argument without a flag: it goes into the YAML file.

Engine parameters (the aimage configuration's engine.tensorrt_llm section) and the flags they become:
max_seq_len --max_seq_len, max_batch_size --max_batch_size, max_num_tokens --max_num_tokens, tp_size
--tp_size, pp_size --pp_size, kv_cache_free_gpu_memory_fraction --kv_cache_free_gpu_memory_fraction;
dtype and max_lora_rank go into the YAML file; extra_args are appended as they are, and command names the
trtllm-serve executable when it is not on PATH.
"""
from __future__ import annotations

import itertools
import shutil
import tempfile
from pathlib import Path

import yaml

from clowderd.engines.openai_server import LOOPBACK, OpenAIServerEngine

VALUE_FLAGS = {
    "max_seq_len": "--max_seq_len",
    "max_batch_size": "--max_batch_size",
    "max_num_tokens": "--max_num_tokens",
    "tp_size": "--tp_size",
    "pp_size": "--pp_size",
    "kv_cache_free_gpu_memory_fraction": "--kv_cache_free_gpu_memory_fraction",
}
LORA_TARGET_MODULES = ["attn_q", "attn_k", "attn_v", "attn_dense", "mlp_h_to_4h", "mlp_4h_to_h", "mlp_gate"]


class TensorRTLLMEngine(OpenAIServerEngine):
    name = "tensorrt_llm"
    PARAMS = frozenset(VALUE_FLAGS) | {"dtype"}
    CONTEXT_PARAM = "max_seq_len"
    DEFAULT_MAX_LORA_RANK = 64  # LoraConfig's default

    def __init__(self):
        super().__init__()
        self._lora_ids: dict[str, int] = {}
        self._next_lora_id = itertools.count(1)
        self._options_dir: Path | None = None

    def server_argv(self, executable: str, model_dir: Path, port: int, params: dict) -> list[str]:
        argv = [executable, str(model_dir), "--host", LOOPBACK, "--port", str(port), "--backend", "pytorch",
                "--extra_llm_api_options", str(self._write_options(params))]
        for key, flag in VALUE_FLAGS.items():
            if key in params:
                argv += [flag, str(params[key])]
        return argv + params.get("extra_args", [])

    def _write_options(self, params: dict) -> Path:
        if self._options_dir is None:
            self._options_dir = Path(tempfile.mkdtemp(prefix="clowder-trtllm-"))
        options = {"lora_config": {"max_lora_rank": self.max_lora_rank, "lora_target_modules": LORA_TARGET_MODULES}}
        if "dtype" in params:
            options["dtype"] = params["dtype"]
        path = self._options_dir / "llm_api_options.yaml"
        path.write_text(yaml.safe_dump(options, sort_keys=False))
        return path

    def adapter_fields(self, name: str) -> dict:
        return {"lora_request": {"lora_name": name, "lora_int_id": self._lora_ids[name],
                                 "lora_path": str(self.adapters[name])}}

    def attach_adapter(self, name: str, path: Path) -> None:
        self._lora_ids[name] = next(self._next_lora_id)

    def detach_adapter(self, name: str) -> None:
        self._lora_ids.pop(name, None)

    def unload(self) -> None:
        super().unload()
        if self._options_dir is not None:
            shutil.rmtree(self._options_dir, ignore_errors=True)
