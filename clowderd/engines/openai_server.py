"""The base of engines that run an OpenAI-compatible HTTP server as a child process (vllm, tensorrt_llm).

load starts the server program on a free loopback port (server_process.py: its own process group, its
output in the host's log) and waits until GET /health answers 200, then reads /v1/models for the name the
server gives the base model. A generation is one streamed POST to /v1/completions or /v1/chat/completions
(`stream_options.include_usage` and `continuous_usage_stats`, so the usage is known even for a cancelled
request); a 400-type answer becomes InvalidRequest with the server's message, a stream cut by the server's
death an EngineError naming its exit. Cancelling closes the HTTP stream, which is how these servers are
told to stop a request.

Threads: the engine host calls load, add_adapter, remove_adapter and unload from worker threads, and
generate, cancel, health and metrics in its asyncio loop. A supervisor thread owns the server process: it
starts it, polls /health every `health_interval` seconds (and reads the queue gauges when the server
serves them), and when the server exits or fails `unhealthy_limit` checks in a row, stops its process
group and starts it again, up to `max_restarts` times in a row with a doubling delay, re-applying the
adapters before it serves again. health() reports failed, with the reason, meanwhile. health and metrics
return what the supervisor and the streams last saw; they do no I/O.

Subclasses give the server's command line and environment, the request fields that select an adapter,
and what, if anything, the server must be told when an adapter is added or removed.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time
from abc import abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import httpx

from clowderd.engines.base import Engine, Event, Finished, GenerateRequest, TextDelta, Usage
from clowderd.engines.errors import AdapterError, EngineError, InvalidRequest, ModelLoadError
from clowderd.engines.registry import ENGINES, server_executable
from clowderd.engines.server_process import ServerProcess

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
CALLER_ERRORS = (400, 413, 422)    # answers that mean the request itself cannot run
FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "cancelled"}
COMMON_PARAMS = frozenset({"command", "extra_args", "max_lora_rank"})
# No read timeout: a request may wait in the server's queue for long; a dead server is noticed by the
# supervisor, and its death closes the stream.
STREAM_TIMEOUT = httpx.Timeout(connect=10.0, read=None, write=30.0, pool=None)


class _Stopped(Exception):
    """unload began while the supervisor was starting a server."""


@dataclass
class _Stream:
    request: GenerateRequest
    queue: asyncio.Queue
    reader: asyncio.Task | None = None
    usage: Usage = field(default_factory=lambda: Usage(0, 0))
    finish_reason: str | None = None
    done: bool = False   # its last event (Finished or an error) is in the queue


class OpenAIServerEngine(Engine):
    PARAMS: frozenset[str] = frozenset()   # the engine parameters a subclass maps onto its server
    CONTEXT_PARAM: str = ""                # the parameter that limits the context, when /v1/models omits it
    DEFAULT_MAX_LORA_RANK = 16
    METRICS_PATH: str | None = None        # where the server serves its queue gauges, if it does

    # seconds; an instance may change them before load
    startup_timeout = 1800.0   # a large model's first load, with compilation, takes many minutes
    health_interval = 2.0
    health_timeout = 10.0
    adapter_timeout = 300.0
    unhealthy_limit = 3        # failed health checks in a row before the server is restarted
    max_restarts = 3           # restarts in a row before the engine gives up
    restart_backoff = 2.0      # the first restart's delay, doubled for each one after
    stable_after = 600.0       # a server that served this long starts the count of restarts again
    stop_timeout = 30.0        # from SIGTERM to SIGKILL

    def __init__(self):
        self.adapters: dict[str, Path] = {}
        self.context: int | None = None
        self.max_lora_rank = self.DEFAULT_MAX_LORA_RANK
        self.served_model: str | None = None
        self._params: dict = {}
        self._executable = ""
        self._model_dir = Path()
        self._streams: dict[str, _Stream] = {}
        self._counters = dict(requests_finished=0, requests_cancelled=0, prompt_tokens=0, generation_tokens=0)
        self._gauges: dict | None = None
        self._health = {"status": "failed", "detail": f"the {self.name} server has not been started"}
        self._serving = False
        self._process: ServerProcess | None = None
        self._base_url = ""
        self._adapters_lock = threading.Lock()   # the adapter map and the server's adapters change together
        self._process_lock = threading.Lock()    # no server is started once unload has begun
        self._stopping = threading.Event()
        self._started = threading.Event()
        self._start_error: EngineError | None = None
        self._supervisor: threading.Thread | None = None

    # ---------------------------------------------------------------------------------------- subclass hooks

    @abstractmethod
    def server_argv(self, executable: str, model_dir: Path, port: int, params: dict) -> list[str]:
        """The server's command line, listening on 127.0.0.1:`port`."""

    def server_env(self) -> dict[str, str]:
        """Variables added to the server's environment."""
        return {}

    @abstractmethod
    def adapter_fields(self, name: str) -> dict:
        """The request body fields that make the server answer with adapter `name`."""

    def attach_adapter(self, name: str, path: Path) -> None:
        """Make the running server ready to answer with the adapter (blocking). Raises AdapterError."""

    def detach_adapter(self, name: str) -> None:
        """Tell the running server the adapter is gone (blocking). Raises AdapterError."""

    def parse_metrics(self, text: str) -> dict:
        """requests_running and requests_waiting from the body of METRICS_PATH."""
        raise NotImplementedError(f"{type(self).__name__} sets METRICS_PATH but does not parse it")

    def choose_max_lora_rank(self, asked: int | None, ranks: list[int]) -> int:
        """The max_lora_rank the server starts with: the one asked for, else one that fits the
        adapters given at load."""
        if asked is not None:
            if not isinstance(asked, int) or isinstance(asked, bool) or asked < 1:
                raise ModelLoadError(f"max_lora_rank must be a positive integer, not {asked!r}")
            return asked
        return max([self.DEFAULT_MAX_LORA_RANK, *ranks])

    # ---------------------------------------------------------------------------------------- loading

    def load(self, model_dir: Path, ep_layers: dict[str, Path], params: dict) -> None:
        model_dir = Path(model_dir)
        self._params = self._check_params(params)
        self._executable = server_executable(ENGINES[self.name], params)
        _check_model_dir(model_dir)
        ranks = [_adapter_rank(name, Path(path)) for name, path in ep_layers.items()]
        self.max_lora_rank = self.choose_max_lora_rank(params.get("max_lora_rank"), ranks)
        self._model_dir = model_dir
        logging.getLogger("httpx").setLevel(logging.WARNING)  # else a line per health check in the host's log
        self._supervisor = threading.Thread(target=self._supervise, name=f"{self.name}-supervisor", daemon=True)
        self._supervisor.start()
        self._started.wait()
        if self._start_error is not None:
            self.unload()
            raise self._start_error
        try:
            for name, path in ep_layers.items():
                self.add_adapter(name, Path(path))
        except BaseException:
            self.unload()
            raise
        log.info("%s serves %s as %r on %s, context %s, adapters %s", self.name, model_dir, self.served_model,
                 self._base_url, self.context, sorted(self.adapters))

    def _check_params(self, params: dict) -> dict:
        known = self.PARAMS | COMMON_PARAMS
        unknown = sorted(set(params) - known)
        if unknown:
            raise ModelLoadError(f"unknown {self.name} engine parameters: {', '.join(unknown)}; known: "
                                 f"{', '.join(sorted(known))}")
        extra = params.get("extra_args", [])
        if not isinstance(extra, list) or not all(isinstance(a, str) for a in extra):
            raise ModelLoadError(f"extra_args must be a list of strings (arguments added to the {self.name} "
                                 f"command line), not {extra!r}")
        return dict(params)

    # ---------------------------------------------------------------------------------------- the server

    def _supervise(self) -> None:
        try:
            self._run_server()
        except Exception as e:  # a bug here must not leave load waiting, or a server unwatched
            log.exception("the %s supervisor failed", self.name)
            error = EngineError(f"the {self.name} supervisor failed: {type(e).__name__}: {e}")
            self._stop_server()
            if not self._started.is_set():
                self._start_error = error
                self._started.set()
            else:
                self._set_failed(str(error))
                log.error("%s", error)

    def _run_server(self) -> None:
        """Start the server; then watch it and restart it when it dies, until unload or too many restarts."""
        failures = 0
        while True:
            try:
                self._start_server()
            except _Stopped:
                return
            except EngineError as e:
                self._stop_server()
                if not self._started.is_set():
                    self._start_error = e
                    self._started.set()
                    return
                reason = str(e)
            else:
                self._started.set()
                up_since = time.monotonic()
                reason = self._watch()
                if reason is None:
                    return
                self._set_failed(reason)  # at once: requests fail fast while the server is stopped
                if time.monotonic() - up_since >= self.stable_after:
                    failures = 0
                self._stop_server()
            failures += 1
            if failures > self.max_restarts:
                self._set_failed(f"{reason}; gave up after {self.max_restarts} restarts in a row")
                log.error("%s", self._health["detail"])
                return
            delay = self.restart_backoff * 2 ** (failures - 1)
            self._set_failed(f"{reason}; restarting it in {delay:g} s ({failures} of {self.max_restarts})")
            log.error("%s", self._health["detail"])
            if self._stopping.wait(delay):
                return

    def _start_server(self) -> None:
        port = _free_port()
        argv = self.server_argv(self._executable, self._model_dir, port, self._params)
        env = {**os.environ, **self.server_env()}
        with self._process_lock:
            if self._stopping.is_set():
                raise _Stopped
            try:
                self._process = ServerProcess(argv, env, self.name).start()
            except OSError as e:
                raise ModelLoadError(f"cannot start the {self.name} server `{argv[0]}`: {e}") from e
            self._base_url = f"http://{LOOPBACK}:{port}"
        self._wait_healthy(self._process)
        self._read_models()
        with self._adapters_lock:
            for name, path in self.adapters.items():  # after a restart: the server has none of them
                self.attach_adapter(name, path)
            self._serving = True
            self._health = {"status": "ok"}

    def _wait_healthy(self, process: ServerProcess) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if process.poll() is not None:
                if self._stopping.is_set():
                    raise _Stopped
                raise ModelLoadError(f"{process.exit_reason()} before it answered /health{process.last_lines()}")
            try:
                if self._call("GET", "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass  # not listening yet
            if time.monotonic() >= deadline:
                raise ModelLoadError(f"the {self.name} server (pid {process.pid}) did not answer /health within "
                                     f"{self.startup_timeout:g} s{process.last_lines()}")
            if self._stopping.wait(0.2):
                raise _Stopped

    def _read_models(self) -> None:
        try:
            response = self._call("GET", "/v1/models", timeout=self.health_timeout)
            response.raise_for_status()
            model = response.json()["data"][0]
            self.served_model = model["id"]
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
            raise ModelLoadError(f"the {self.name} server's /v1/models does not name its model: "
                                 f"{type(e).__name__}: {e}") from e
        self.context = model.get("max_model_len") or self._params.get(self.CONTEXT_PARAM)

    def _watch(self) -> str | None:
        """Poll the server until it dies or stops answering (the reason), or until unload (None)."""
        process, misses = self._process, 0
        while not self._stopping.wait(self.health_interval):
            if process.poll() is not None:
                return process.exit_summary()
            try:
                response = self._call("GET", "/health", timeout=self.health_timeout)
                problem = None if response.status_code == 200 else f"/health answered {response.status_code}"
            except httpx.HTTPError as e:
                problem = f"/health did not answer ({type(e).__name__}: {e})"
            if problem is None:
                misses = 0
                self._health = {"status": "ok"}
                self._read_gauges()
                continue
            misses += 1
            where = f"the {self.name} server (pid {process.pid})"
            if misses >= self.unhealthy_limit:
                return f"{where} failed {misses} health checks in a row: {problem}"
            self._health = {"status": "failed",
                            "detail": f"{where}: {problem} ({misses} of {self.unhealthy_limit} before a restart)"}
        return None

    def _read_gauges(self) -> None:
        if self.METRICS_PATH is None:
            return
        try:
            response = self._call("GET", self.METRICS_PATH, timeout=self.health_timeout)
            response.raise_for_status()
            self._gauges = self.parse_metrics(response.text)
        except (httpx.HTTPError, ValueError) as e:
            log.warning("could not read %s of the %s server: %s", self.METRICS_PATH, self.name, e)

    def _set_failed(self, reason: str) -> None:
        self._serving = False
        self._gauges = None
        self._health = {"status": "failed", "detail": reason}

    def _stop_server(self) -> None:
        with self._process_lock:
            process = self._process
        if process is not None:
            process.stop(self.stop_timeout)

    def _call(self, method: str, path: str, timeout: float, **kwargs) -> httpx.Response:
        # A client per call: calls come from several threads, and a plain-HTTP loopback client without a
        # CA bundle (verify=False) costs microseconds to make.
        with httpx.Client(verify=False, timeout=timeout) as http:
            return http.request(method, self._base_url + path, **kwargs)

    @property
    def server_pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    # ---------------------------------------------------------------------------------------- adapters

    def add_adapter(self, name: str, path: Path) -> None:
        path = Path(path)
        with self._adapters_lock:
            if name in self.adapters:
                raise AdapterError(f"adapter {name!r} is already loaded")
            rank = _adapter_rank(name, path)
            if rank > self.max_lora_rank:
                raise AdapterError(f"adapter {name!r} ({path}) has rank {rank}, above the max_lora_rank "
                                   f"{self.max_lora_rank} the {self.name} server was started with (engine "
                                   f"parameter max_lora_rank)")
            if not self._serving:
                raise EngineError(f"the {self.name} server is not serving: {self._health.get('detail')}")
            self.attach_adapter(name, path)
            self.adapters[name] = path

    def remove_adapter(self, name: str) -> None:
        with self._adapters_lock:
            if name not in self.adapters:
                raise AdapterError(f"adapter {name!r} is not loaded; loaded: {sorted(self.adapters) or 'none'}")
            streams = list(self._streams.values())  # a copy: the host's loop adds streams meanwhile
            users = [s for s in streams if s.request.adapter == name]
            if users:
                raise AdapterError(f"adapter {name!r} is in use by {len(users)} request(s); remove it when "
                                   "they finish")
            if self._serving:  # a server that is down has lost its adapters already
                self.detach_adapter(name)
            del self.adapters[name]

    # ---------------------------------------------------------------------------------------- requests

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Event]:
        request.validate()
        if not self._serving:
            raise EngineError(f"the {self.name} server is not serving: {self._health.get('detail')}")
        if request.request_id in self._streams:
            raise InvalidRequest(f"request id {request.request_id!r} is already running")
        if request.adapter is not None and request.adapter not in self.adapters:
            raise InvalidRequest(f"unknown adapter {request.adapter!r}; loaded: "
                                 f"{', '.join(sorted(self.adapters)) or 'none'}")
        path, body = self._request_body(request)
        stream = self._streams[request.request_id] = _Stream(request, asyncio.Queue())
        stream.reader = asyncio.create_task(self._read_stream(self._base_url + path, body, stream))
        outcome = None
        try:
            while True:
                event = await stream.queue.get()
                if isinstance(event, BaseException):
                    outcome = "failed"
                    raise event
                if isinstance(event, Finished):
                    outcome = event.finish_reason
                    self._count(event)
                yield event
                if outcome is not None:
                    return
        finally:
            stream.reader.cancel()
            self._streams.pop(request.request_id, None)
            if outcome is None:  # the caller left early
                self._counters["requests_cancelled"] += 1

    def cancel(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is None or stream.done:
            return
        stream.done = True
        stream.reader.cancel()  # closing the HTTP stream makes the server abort the request
        stream.queue.put_nowait(Finished("cancelled", stream.usage))

    def _request_body(self, request: GenerateRequest) -> tuple[str, dict]:
        body = {"model": self.served_model, "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True},
                "temperature": request.temperature, "top_p": request.top_p}
        if request.messages is not None:
            path, body["messages"] = "/v1/chat/completions", request.messages
        else:
            path, body["prompt"] = "/v1/completions", request.prompt
        if request.max_tokens is not None:  # None: the server's default (vLLM: up to the context)
            body["max_tokens"] = request.max_tokens
        if request.top_k:  # 0 (no limit) is left out: older vLLM takes only -1 for that
            body["top_k"] = request.top_k
        if request.stop:
            body["stop"] = request.stop
        if request.seed is not None:
            body["seed"] = request.seed
        if request.ignore_eos:
            body["ignore_eos"] = True
        if request.adapter is not None:
            body.update(self.adapter_fields(request.adapter))
        return path, body

    async def _read_stream(self, url: str, body: dict, stream: _Stream) -> None:
        """Feed the stream's queue with its deltas, then its Finished event or its error."""
        try:
            event = await self._stream_events(url, body, stream) \
                or await self._broken_stream("the stream ended before its `data: [DONE]` line")
        except asyncio.CancelledError:
            raise
        except EngineError as e:
            event = e
        except httpx.HTTPError as e:
            event = await self._broken_stream(f"{type(e).__name__}: {e}")
        if not stream.done:
            stream.done = True
            stream.queue.put_nowait(event)

    async def _stream_events(self, url: str, body: dict, stream: _Stream) -> Finished | None:
        """Finished at `data: [DONE]`, None when the stream ends without it."""
        async with httpx.AsyncClient(verify=False, timeout=STREAM_TIMEOUT) as http:
            async with http.stream("POST", url, json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise self._refusal(response)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:"):].strip()
                    if data == "[DONE]":
                        if stream.finish_reason is None:
                            raise EngineError(f"the {self.name} server ended the stream without a finish reason")
                        return Finished(stream.finish_reason, stream.usage)
                    self._take_chunk(data, stream)
        return None

    def _take_chunk(self, data: str, stream: _Stream) -> None:
        try:
            chunk = json.loads(data)
        except ValueError:
            raise EngineError(f"the {self.name} server sent a chunk that is not JSON: {data[:200]!r}") from None
        if "error" in chunk or chunk.get("object") == "error":
            raise EngineError(f"the {self.name} server failed the request: {_error_message(chunk)}")
        usage = chunk.get("usage")
        if usage:
            stream.usage = Usage(usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0)
        for choice in chunk.get("choices") or ():
            text = choice["text"] if "text" in choice else (choice.get("delta") or {}).get("content")
            if text:
                stream.queue.put_nowait(TextDelta(text))
            reason = choice.get("finish_reason")
            if reason == "error":
                raise EngineError(f"the {self.name} server finished the request with an error")
            if reason:
                stream.finish_reason = FINISH_REASONS.get(reason, "stop")

    def _refusal(self, response: httpx.Response) -> EngineError:
        message = response_message(response)
        if response.status_code in CALLER_ERRORS:
            return InvalidRequest(f"{self.name} refused the request: {message}")
        return EngineError(f"the {self.name} server answered {response.status_code}: {message}")

    async def _broken_stream(self, detail: str) -> EngineError:
        process = self._process
        for _ in range(40):  # a server that is dying closes its sockets a moment before it is reaped
            if process.poll() is not None:
                return EngineError(f"{process.exit_summary()} (during the request)")
            await asyncio.sleep(0.05)
        return EngineError(f"the connection to the {self.name} server (pid {process.pid}) broke during the "
                           f"request: {detail}")

    def _count(self, event: Finished) -> None:
        self._counters["requests_cancelled" if event.finish_reason == "cancelled" else "requests_finished"] += 1
        self._counters["prompt_tokens"] += event.usage.prompt_tokens
        self._counters["generation_tokens"] += event.usage.completion_tokens

    # ---------------------------------------------------------------------------------------- state

    def health(self) -> dict:
        return dict(self._health)

    def metrics(self) -> dict:
        """The queue gauges from the server when it serves them, else the requests open through this
        engine as running; the counters are this engine's own, kept across server restarts."""
        gauges = self._gauges or {"requests_running": len(self._streams), "requests_waiting": 0}
        return {**gauges, **self._counters, "adapters": sorted(self.adapters)}

    def unload(self) -> None:
        self._stopping.set()
        self._stop_server()
        if self._supervisor is not None:
            self._supervisor.join()
        self._serving = False
        self._health = {"status": "failed", "detail": f"the {self.name} engine was unloaded"}


def _check_model_dir(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise ModelLoadError(f"{model_dir}: no such model directory")
    config = model_dir / "config.json"
    try:
        json.loads(config.read_bytes())
    except FileNotFoundError:
        raise ModelLoadError(f"{model_dir}: no config.json") from None
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{config} is not readable JSON: {e}") from e


def _adapter_rank(name: str, path: Path) -> int:
    """The LoRA rank of a PEFT adapter directory; AdapterError when it is not one."""
    config_file = path / "adapter_config.json"
    try:
        config = json.loads(config_file.read_bytes())
    except FileNotFoundError:
        raise AdapterError(f"adapter {name!r}: {config_file} does not exist") from None
    except (OSError, ValueError) as e:
        raise AdapterError(f"adapter {name!r}: {config_file} is not readable JSON: {e}") from e
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"adapter {name!r}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"adapter {name!r}: {config_file} has no positive rank `r` ({rank!r})")
    return rank


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def response_message(response: httpx.Response) -> str:
    try:
        return _error_message(response.json())
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase


def _error_message(body) -> str:
    """The message of an error body: {"error": {"message"}} (recent vLLM), {"message"} (older vLLM,
    TensorRT-LLM), or FastAPI's {"detail"}."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        for key in ("message", "detail"):
            if body.get(key):
                value = body[key]
                return value if isinstance(value, str) else json.dumps(value)
    return json.dumps(body)[:500]
