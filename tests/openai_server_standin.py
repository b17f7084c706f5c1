"""A stand-in for `vllm serve` and `trtllm-serve` at the process boundary, for the engine wrappers' tests.
It is not a model: it answers by echoing, deterministically.

    python tests/openai_server_standin.py vllm serve MODEL_DIR --host H --port P ...
    python tests/openai_server_standin.py trtllm MODEL_DIR --host H --port P --extra_llm_api_options F ...

It takes the command line of the real server (a flag the real one lacks is an error, as with argparse),
checks the model directory at start-up the way a loader fails (no config.json, a safetensors file whose
header is corrupt: a message and exit status 1), and serves the HTTP surface the wrappers use, strictly
enough that a wrong request fails:
- GET /health, GET /v1/models; GET /metrics: vLLM's Prometheus text with vLLM's metric names, or
  TensorRT-LLM's JSON list of iteration statistics.
- vllm: POST /v1/load_lora_adapter and /v1/unload_lora_adapter, only when VLLM_ALLOW_RUNTIME_LORA_UPDATING
  is true, with vLLM's statuses and messages (400 duplicate or rank above --max-lora-rank, 404 unknown
  name or no adapter at the path); a request names its adapter in `model`.
- trtllm: no adapter endpoints; a request carries `lora_request` {lora_name, lora_int_id, lora_path},
  accepted only when the options YAML has a lora_config; an id may not name two adapter paths.
- POST /v1/completions and /v1/chat/completions, streamed as server-sent events: one chunk per token, a
  finish_reason, a usage chunk (stream_options.include_usage; usage in every chunk with
  continuous_usage_stats), then `data: [DONE]`. Unknown body fields, stream other than true, max_tokens
  below 1, a prompt plus max_tokens beyond the context: 400 with the server's kind of message. At most
  --max-num-seqs / --max_batch_size requests run at once; the others wait (counted as waiting).

The answer: tokens are words. The text is `<NAME>` (the adapter's name, or `base`) followed by the words
of the prompt (of the last chat message), then, with ignore_eos, the same again until max_tokens. Prompt
tokens: the words of the prompt; for a chat, each message's words plus 2.

Behaviour asked for by files in the directory named by $STANDIN_CONTROL:
    start-delay       seconds to wait before listening (a slow load)
    token-delay       seconds between tokens
    die-mid-stream    the next stream kills the server with SIGKILL after 3 tokens (the file is removed)
    unhealthy         /health answers 503 while the file exists
Every start appends {"flavor", "argv", "pid", "env", "options"} as a JSON line to $STANDIN_RECORD.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import struct
import sys
import time
import uuid
from pathlib import Path

import uvicorn
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
COMMON_FIELDS = {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k", "stop",
                 "seed", "ignore_eos", "n"}
LORA_REQUEST_FIELDS = {"lora_name", "lora_int_id", "lora_path", "lora_ckpt_source"}


def parse_vllm(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vllm")
    p.add_argument("subcommand", choices=["serve"])
    p.add_argument("model")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", nargs="+", default=None)
    p.add_argument("--enable-lora", action="store_true")
    p.add_argument("--max-lora-rank", type=int, default=16, choices=VLLM_LORA_RANKS)
    p.add_argument("--max-loras", type=int, default=1)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--dtype", choices=["auto", "half", "float16", "bfloat16", "float", "float32"])
    p.add_argument("--tensor-parallel-size", type=int)
    p.add_argument("--pipeline-parallel-size", type=int)
    p.add_argument("--gpu-memory-utilization", type=float)
    p.add_argument("--quantization")
    p.add_argument("--seed", type=int)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--enable-prefix-caching", action="store_true")
    p.add_argument("--disable-uvicorn-access-log", action="store_true")
    return p.parse_args(argv)


def parse_trtllm(argv: list[str]) -> argparse.Namespace:
    if argv[:1] == ["serve"]:
        argv = argv[1:]
    p = argparse.ArgumentParser(prog="trtllm-serve")
    p.add_argument("model")
    p.add_argument("--host", default="localhost")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", choices=["pytorch", "tensorrt", "_autodeploy"], default="pytorch")
    p.add_argument("--extra_llm_api_options", "--config", dest="options")
    p.add_argument("--max_seq_len", type=int)
    p.add_argument("--max_batch_size", type=int, default=2048)
    p.add_argument("--max_num_tokens", type=int)
    p.add_argument("--tp_size", "--tensor_parallel_size", type=int)
    p.add_argument("--pp_size", "--pipeline_parallel_size", type=int)
    p.add_argument("--kv_cache_free_gpu_memory_fraction", "--free_gpu_memory_fraction", type=float)
    p.add_argument("--log_level")
    return p.parse_args(argv)


def fail(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    sys.exit(1)


def check_model(model_dir: Path) -> dict:
    """The model's config.json; exits as a loader would when the directory is not a loadable model."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        fail(f"OSError: {model_dir} does not appear to have a file named config.json")
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        fail(f"RuntimeError: Cannot find any model weights with `{model_dir}`")
    for path in weights:
        data = path.read_bytes()
        try:
            (size,) = struct.unpack("<Q", data[:8])
            json.loads(data[8:8 + size])
            if 8 + size > len(data):
                raise ValueError("header beyond the end of the file")
        except (struct.error, ValueError):
            fail(f"safetensors_rust.SafetensorError: Error while deserializing header: {path.name}: "
                 "HeaderTooLarge")
    return config


def control(name: str) -> Path | None:
    directory = os.environ.get("STANDIN_CONTROL")
    path = Path(directory) / name if directory else None
    return path if path is not None and path.exists() else None


def control_seconds(name: str) -> float:
    path = control(name)
    return float(path.read_text() or 0) if path else 0.0


class Refused(Exception):
    def __init__(self, status: int, message: str, kind: str = "BadRequestError"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class StandIn:
    def __init__(self, flavor: str, args: argparse.Namespace, model_config: dict, options: dict):
        self.flavor = flavor
        self.args = args
        self.options = options
        self.served = (args.served_model_name or [args.model])[0] if flavor == "vllm" else args.model
        context = args.max_model_len if flavor == "vllm" else args.max_seq_len
        self.context = context or model_config.get("max_position_embeddings") or 2048
        self.max_running = args.max_num_seqs if flavor == "vllm" else args.max_batch_size
        self.slots = asyncio.Semaphore(self.max_running)
        self.adapters: dict[str, dict] = {}      # vllm: name -> {"path", "rank"}
        self.lora_ids: dict[int, str] = {}       # trtllm: lora_int_id -> path
        self.running = self.waiting = 0
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0}
        self.finished = {"stop": 0, "length": 0, "abort": 0}

    def error(self, status: int, message: str, kind: str) -> JSONResponse:
        if self.flavor == "vllm":
            body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
        else:
            body = {"object": "error", "message": message, "type": kind, "param": None, "code": status}
        return JSONResponse(body, status_code=status)

    # ------------------------------------------------------------------------------------ endpoints

    async def health(self, request: Request) -> Response:
        return Response(status_code=503 if control("unhealthy") else 200)

    async def models(self, request: Request) -> Response:
        if self.flavor == "trtllm":
            return JSONResponse({"object": "list", "data": [{"id": self.served, "object": "model",
                                                             "created": int(time.time()),
                                                             "owned_by": "tensorrt_llm"}]})
        cards = [{"id": self.served, "object": "model", "owned_by": "vllm", "root": self.args.model,
                  "parent": None, "max_model_len": self.context}]
        cards += [{"id": name, "object": "model", "owned_by": "vllm", "root": a["path"], "parent": self.served}
                  for name, a in self.adapters.items()]
        return JSONResponse({"object": "list", "data": cards})

    async def metrics(self, request: Request) -> Response:
        if self.flavor == "trtllm":
            stats = [{"iter": 1, "numActiveRequests": self.running, "numQueuedRequests": self.waiting}] \
                if self.options.get("enable_iter_perf_stats") else []
            return JSONResponse(stats)
        labels = f'engine="0",model_name="{self.served}"'
        lines = []
        for name, kind, value in (("vllm:num_requests_running", "gauge", self.running),
                                  ("vllm:num_requests_waiting", "gauge", self.waiting),
                                  ("vllm:prompt_tokens_total", "counter", self.counters["prompt_tokens"]),
                                  ("vllm:generation_tokens_total", "counter", self.counters["generation_tokens"])):
            lines += [f"# HELP {name} {name}", f"# TYPE {name} {kind}", f"{name}{{{labels}}} {float(value)}"]
        lines += ["# HELP vllm:request_success_total Count of successfully processed requests.",
                  "# TYPE vllm:request_success_total counter"]
        lines += [f'vllm:request_success_total{{{labels},finished_reason="{reason}"}} {float(n)}'
                  for reason, n in self.finished.items()]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def load_lora_adapter(self, request: Request) -> Response:
        try:
            body = await self.json_body(request)
            name, path = body.get("lora_name"), body.get("lora_path")
            if not name or not path:
                raise Refused(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
            if name in self.adapters:
                raise Refused(400, f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput")
            if not self.args.enable_lora:
                raise Refused(400, "LoRA is not enabled. Use --enable-lora to enable LoRA.")
            rank = self.adapter_rank(Path(path), name)
            if rank > self.args.max_lora_rank:
                raise Refused(400, f"LoRA rank {rank} is greater than max_lora_rank {self.args.max_lora_rank}.")
        except Refused as e:
            return self.error(e.status, e.message, e.kind)
        self.adapters[name] = {"path": path, "rank": rank}
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora_adapter(self, request: Request) -> Response:
        try:
            body = await self.json_body(request)
            name = body.get("lora_name")
            if not name:
                raise Refused(400, "either 'lora_name' and 'lora_int_id' needs to be provided.", "InvalidUserInput")
            if name not in self.adapters:
                raise Refused(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        except Refused as e:
            return self.error(e.status, e.message, e.kind)
        del self.adapters[name]
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    async def completions(self, request: Request) -> Response:
        return await self.generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self.generate(request, chat=True)

    # ------------------------------------------------------------------------------------ generation

    async def generate(self, request: Request, chat: bool) -> Response:
        try:
            body = await self.json_body(request)
            tag, prompt_words, prompt_tokens = self.check_generation(body, chat)
        except Refused as e:
            return self.error(e.status, e.message, e.kind)
        max_tokens = body.get("max_tokens") or self.context - prompt_tokens
        words = [tag, *prompt_words]
        if body.get("ignore_eos"):
            words = [words[i % len(words)] for i in range(max_tokens)]
        finish = "length" if len(words) >= max_tokens else "stop"
        tokens = [w if i == 0 else " " + w for i, w in enumerate(words[:max_tokens])]
        tokens, finish = cut_at_stop(tokens, body.get("stop") or [], finish)
        return StreamingResponse(self.stream(body, chat, tokens, finish, prompt_tokens),
                                 media_type="text/event-stream")

    def check_generation(self, body: dict, chat: bool) -> tuple[str, list[str], int]:
        """The answer's tag, the words to echo and the prompt's token count; Refused when the server
        would refuse the request."""
        allowed = COMMON_FIELDS | ({"messages"} if chat else {"prompt"})
        if self.flavor == "trtllm":
            allowed |= {"lora_request"}
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise Refused(400, f"unknown fields: {', '.join(unknown)}", "InvalidRequestError")
        if body.get("stream") is not True:
            raise Refused(400, "this stand-in only streams: `stream` must be true", "InvalidRequestError")
        options = body.get("stream_options") or {}
        if set(options) - {"include_usage", "continuous_usage_stats"}:
            raise Refused(400, f"unknown stream_options: {sorted(options)}", "InvalidRequestError")
        if not isinstance(body.get("model"), str):
            raise Refused(400, "`model` must be a string", "InvalidRequestError")
        self.check_sampling(body)
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise Refused(400, "`messages` must be a non-empty list", "InvalidRequestError")
            prompt_words = str(messages[-1].get("content", "")).split()
            prompt_tokens = sum(len(str(m.get("content", "")).split()) + 2 for m in messages)
        else:
            if not isinstance(body.get("prompt"), str):
                raise Refused(400, "`prompt` must be a string", "InvalidRequestError")
            prompt_words = body["prompt"].split()
            prompt_tokens = len(prompt_words)
        self.check_context(prompt_tokens, body.get("max_tokens"))
        return self.answer_tag(body), prompt_words, prompt_tokens

    def check_sampling(self, body: dict) -> None:
        max_tokens = body.get("max_tokens")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise Refused(400, f"max_tokens must be at least 1, got {max_tokens}.")
        top_k = body.get("top_k")
        if top_k is not None and self.flavor == "vllm" and not (top_k == -1 or top_k >= 1):
            raise Refused(400, f"top_k must be -1 (disable), or at least 1, got {top_k}.")
        if not 0 < body.get("top_p", 1) <= 1:
            raise Refused(400, f"top_p must be in (0, 1], got {body['top_p']}.")
        if body.get("temperature", 1) < 0:
            raise Refused(400, f"temperature must be non-negative, got {body['temperature']}.")
        stop = body.get("stop", [])
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise Refused(400, "stop must be a list of strings")

    def check_context(self, prompt_tokens: int, max_tokens: int | None) -> None:
        if self.flavor == "trtllm":
            if prompt_tokens + (max_tokens or 0) > self.context:
                raise Refused(400, f"The sum of prompt length ({prompt_tokens}) and max_tokens ({max_tokens}) "
                                   f"should not exceed max_seq_len ({self.context})")
            return
        if prompt_tokens >= self.context:
            raise Refused(400, f"This model's maximum context length is {self.context} tokens. However, your "
                               f"request has {prompt_tokens} input tokens. Please reduce the length of the input "
                               "messages.")
        if max_tokens is not None and prompt_tokens + max_tokens > self.context:
            raise Refused(400, f"This model's maximum context length is {self.context} tokens. However, you "
                               f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, "
                               f"{max_tokens} in the completion). Please reduce the length of the messages or "
                               "completion.")

    def answer_tag(self, body: dict) -> str:
        if self.flavor == "vllm":
            model = body["model"]
            if model == self.served:
                return "<base>"
            if model not in self.adapters:
                raise Refused(404, f"The model `{model}` does not exist.", "NotFoundError")
            return f"<{model}>"
        lora = body.get("lora_request")
        if lora is None:
            return "<base>"
        if not isinstance(lora, dict) or set(lora) - LORA_REQUEST_FIELDS or not isinstance(lora.get("lora_name"), str) \
                or not isinstance(lora.get("lora_int_id"), int) or not isinstance(lora.get("lora_path"), str):
            raise Refused(400, f"lora_request must be {{lora_name: str, lora_int_id: int, lora_path: str}}, not "
                               f"{lora!r}")
        config = self.options.get("lora_config")
        if not config:
            raise Refused(400, "LoRA is not enabled: the LLM API options have no lora_config")
        rank = self.adapter_rank(Path(lora["lora_path"]), lora["lora_name"])
        if rank > config.get("max_lora_rank", 64):
            raise Refused(400, f"LoRA rank {rank} is greater than max_lora_rank {config.get('max_lora_rank', 64)}")
        known = self.lora_ids.setdefault(lora["lora_int_id"], lora["lora_path"])
        if known != lora["lora_path"]:
            raise Refused(400, f"lora_int_id {lora['lora_int_id']} already names the adapter at {known}")
        return f"<{lora['lora_name']}>"

    async def stream(self, body: dict, chat: bool, tokens: list[str], finish: str, prompt_tokens: int):
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        options = body.get("stream_options") or {}
        sent, done, admitted = 0, False, False
        self.waiting += 1
        try:
            async with self.slots:
                self.waiting -= 1
                admitted = True
                self.running += 1
                self.counters["prompt_tokens"] += prompt_tokens
                try:
                    if chat:
                        yield self.chunk(rid, body, chat, {"role": "assistant", "content": ""}, None,
                                         prompt_tokens, 0, options)
                    for i, token in enumerate(tokens):
                        await asyncio.sleep(control_seconds("token-delay"))
                        die = control("die-mid-stream")
                        if i == 3 and die:
                            die.unlink()
                            print("standin: killing itself mid-stream, as die-mid-stream asks", file=sys.stderr,
                                  flush=True)
                            os.kill(os.getpid(), signal.SIGKILL)
                        sent += 1
                        self.counters["generation_tokens"] += 1
                        last = i == len(tokens) - 1
                        yield self.chunk(rid, body, chat, token, finish if last else None, prompt_tokens, sent,
                                         options)
                    if not tokens:
                        yield self.chunk(rid, body, chat, "", finish, prompt_tokens, 0, options)
                    if options.get("include_usage"):
                        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": sent,
                                 "total_tokens": prompt_tokens + sent}
                        yield sse({"id": rid, "object": self.chunk_object(chat), "created": int(time.time()),
                                   "model": body["model"], "choices": [], "usage": usage})
                    yield "data: [DONE]\n\n"
                    done = True
                finally:
                    self.running -= 1
                    self.finished[finish if done else "abort"] += 1
        finally:
            if not admitted:  # the client left while it waited for a slot
                self.waiting -= 1

    def chunk(self, rid, body, chat, text, finish, prompt_tokens, sent, options) -> str:
        choice = {"index": 0, "logprobs": None, "finish_reason": finish}
        if chat:
            choice["delta"] = text if isinstance(text, dict) else {"content": text}
        else:
            choice["text"] = text
        data = {"id": rid, "object": self.chunk_object(chat), "created": int(time.time()), "model": body["model"],
                "choices": [choice]}
        if options.get("continuous_usage_stats"):
            data["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": sent,
                             "total_tokens": prompt_tokens + sent}
        return sse(data)

    @staticmethod
    def chunk_object(chat: bool) -> str:
        return "chat.completion.chunk" if chat else "text_completion"

    # ------------------------------------------------------------------------------------ helpers

    async def json_body(self, request: Request) -> dict:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise Refused(415, "Unsupported Media Type: Only 'application/json' is allowed", "UnsupportedMediaType")
        try:
            body = await request.json()
        except ValueError as e:
            raise Refused(400, f"JSON decode error: {e}") from None
        if not isinstance(body, dict):
            raise Refused(400, "the body must be a JSON object")
        return body

    @staticmethod
    def adapter_rank(path: Path, name: str) -> int:
        has_weights = any(path.glob("adapter_model.*"))
        try:
            config = json.loads((path / "adapter_config.json").read_text())
        except (OSError, ValueError):
            config = None
        if config is None or not has_weights:
            raise Refused(404, f"Loading lora {name} failed: No adapter found for {path}", "NotFoundError")
        return int(config["r"])

    def app(self) -> Starlette:
        routes = [Route("/health", self.health), Route("/v1/models", self.models), Route("/metrics", self.metrics),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.chat_completions, methods=["POST"])]
        runtime_lora = os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "0").strip().lower() in ("1", "true")
        if self.flavor == "vllm" and runtime_lora:
            routes += [Route("/v1/load_lora_adapter", self.load_lora_adapter, methods=["POST"]),
                       Route("/v1/unload_lora_adapter", self.unload_lora_adapter, methods=["POST"])]
        return Starlette(routes=routes)


def cut_at_stop(tokens: list[str], stop: list[str], finish: str) -> tuple[list[str], str]:
    """The tokens up to the first stop string (the token holding it cut just before it)."""
    text = "".join(tokens)
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    if not hits:
        return tokens, finish
    end, out, pos = min(hits), [], 0
    for token in tokens:
        if pos + len(token) > end:
            if end > pos:
                out.append(token[:end - pos])
            break
        out.append(token)
        pos += len(token)
    return out, "stop"


def sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def main(argv: list[str]) -> None:
    flavor, argv = argv[0], argv[1:]
    args = parse_vllm(argv) if flavor == "vllm" else parse_trtllm(argv)
    options = {}
    if flavor == "trtllm" and args.options:
        options = yaml.safe_load(Path(args.options).read_text()) or {}
    record = os.environ.get("STANDIN_RECORD")
    if record:
        with open(record, "a") as f:
            f.write(json.dumps({"flavor": flavor, "argv": argv, "pid": os.getpid(), "options": options,
                                "env": {"VLLM_ALLOW_RUNTIME_LORA_UPDATING":
                                        os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING")}}) + "\n")
    model_config = check_model(Path(args.model))
    print(f"standin {flavor}: loading {args.model}", flush=True)
    time.sleep(control_seconds("start-delay"))
    standin = StandIn(flavor, args, model_config, options)
    print(f"standin {flavor}: serving {standin.served!r} on {args.host}:{args.port}", flush=True)
    uvicorn.run(standin.app(), host=args.host, port=args.port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=1)


if __name__ == "__main__":
    main(sys.argv[1:])
