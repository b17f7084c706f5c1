"""The vLLM engine: `vllm serve` on the model directory, LoRA adapters loaded and unloaded at run time.

What this wrapper relies on, as vLLM's sources and documentation have it (vllm/entrypoints/openai/
api_server.py and serving_models.py, vllm/entrypoints/serve/lora/api_router.py, vllm/config/lora.py,
vllm/v1/metrics/loggers.py; docs "Using LoRA adapters", "Dynamically serving LoRA Adapters"):
- `vllm serve MODEL --host H --port P --served-model-name base --enable-lora --max-lora-rank R`;
  max_lora_rank must be one of 1, 8, 16, 32, 64, 128, 256, 320, 512 (LoRAConfig), 16 by default.
- POST /v1/load_lora_adapter {"lora_name", "lora_path"} and POST /v1/unload_lora_adapter {"lora_name"}
  (JSON bodies) exist only when VLLM_ALLOW_RUNTIME_LORA_UPDATING is true in the server's environment. They
  answer 200 with a text body; 400 for a name already loaded or an adapter the engine cannot take (a rank
  above max_lora_rank, weights that do not fit); 404 for an unknown name, or a path with no adapter in it
  ("No adapter found").
- A request picks an adapter by naming it in `model`; the base model is `base` (--served-model-name).
- GET /health answers 200 once the engine is up. GET /metrics is Prometheus text; its queue gauges are
  vllm:num_requests_running and vllm:num_requests_waiting (labelled by model_name and engine; summed here).
  Its counters (vllm:prompt_tokens_total, vllm:generation_tokens_total, vllm:request_success_total) start
  from zero again with every server, so this engine counts tokens and requests from its own streams.

Engine parameters (the aimage configuration's engine.vllm section) and the flags they become: dtype
--dtype, max_model_len --max-model-len, tensor_parallel_size --tensor-parallel-size,
pipeline_parallel_size --pipeline-parallel-size, gpu_memory_utilization --gpu-memory-utilization,
max_num_seqs --max-num-seqs, max_loras --max-loras, quantization --quantization, enforce_eager
--enforce-eager, max_lora_rank --max-lora-rank; extra_args are appended as they are, and command names the
vllm executable when it is not `vllm` on PATH.
"""
from __future__ import annotations

from pathlib import Path

import httpx

from clowderd.engines.errors import AdapterError, ModelLoadError
from clowderd.engines.openai_server import LOOPBACK, OpenAIServerEngine, response_message

SERVED_MODEL_NAME = "base"
VALUE_FLAGS = {
    "dtype": "--dtype",
    "max_model_len": "--max-model-len",
    "tensor_parallel_size": "--tensor-parallel-size",
    "pipeline_parallel_size": "--pipeline-parallel-size",
    "gpu_memory_utilization": "--gpu-memory-utilization",
    "max_num_seqs": "--max-num-seqs",
    "max_loras": "--max-loras",
    "quantization": "--quantization",
}
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
QUEUE_GAUGES = {"vllm:num_requests_running": "requests_running", "vllm:num_requests_waiting": "requests_waiting"}


class VllmEngine(OpenAIServerEngine):
    name = "vllm"
    PARAMS = frozenset(VALUE_FLAGS) | {"enforce_eager"}
    CONTEXT_PARAM = "max_model_len"
    DEFAULT_MAX_LORA_RANK = 16
    METRICS_PATH = "/metrics"

    def server_argv(self, executable: str, model_dir: Path, port: int, params: dict) -> list[str]:
        argv = [executable, "serve", str(model_dir), "--host", LOOPBACK, "--port", str(port),
                "--served-model-name", SERVED_MODEL_NAME, "--enable-lora", "--max-lora-rank", str(self.max_lora_rank),
                "--disable-uvicorn-access-log"]  # else every /health poll is a line in the log
        for key, flag in VALUE_FLAGS.items():
            if key in params:
                argv += [flag, str(params[key])]
        if params.get("enforce_eager"):
            argv.append("--enforce-eager")
        return argv + params.get("extra_args", [])

    def server_env(self) -> dict[str, str]:
        return {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}

    def adapter_fields(self, name: str) -> dict:
        return {"model": name}

    def attach_adapter(self, name: str, path: Path) -> None:
        response = self._adapter_call("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)}, name)
        if response.status_code != 200:
            raise AdapterError(f"vllm could not load adapter {name!r} ({path}): {response_message(response)}")

    def detach_adapter(self, name: str) -> None:
        response = self._adapter_call("/v1/unload_lora_adapter", {"lora_name": name}, name)
        if response.status_code == 404:  # the server does not have it (anymore): nothing to unload
            return
        if response.status_code != 200:
            raise AdapterError(f"vllm could not unload adapter {name!r}: {response_message(response)}")

    def _adapter_call(self, path: str, body: dict, name: str) -> httpx.Response:
        try:
            return self._call("POST", path, timeout=self.adapter_timeout, json=body)
        except httpx.HTTPError as e:
            raise AdapterError(f"adapter {name!r}: the vllm server did not answer {path}: "
                               f"{type(e).__name__}: {e}") from e

    def parse_metrics(self, text: str) -> dict:
        sums = prometheus_sums(text, set(QUEUE_GAUGES))
        return {key: int(sums[name]) for name, key in QUEUE_GAUGES.items()}

    def choose_max_lora_rank(self, asked: int | None, ranks: list[int]) -> int:
        if asked is not None and asked not in LORA_RANKS:
            raise ModelLoadError(f"vllm takes a max_lora_rank among {', '.join(map(str, LORA_RANKS))}, not "
                                 f"{asked!r}")
        needed = super().choose_max_lora_rank(asked, ranks)
        fitting = [r for r in LORA_RANKS if r >= needed]
        if not fitting:
            raise ModelLoadError(f"an adapter has rank {needed}; vllm takes LoRA ranks up to {LORA_RANKS[-1]}")
        return fitting[0]


def prometheus_sums(text: str, names: set[str]) -> dict[str, float]:
    """The sum over all label sets of each named sample in a Prometheus text exposition. ValueError when
    one is missing. Samples are `name{labels} value` or `name value` (vLLM writes no timestamps)."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in names:
            sums[name] = sums.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    missing = sorted(names - set(sums))
    if missing:
        raise ValueError(f"no {', '.join(missing)} in the metrics")
    return sums
