"""The embedded engine: a transformers causal LM, PEFT LoRA adapters on one shared base, and an
iteration-level batching loop of our own.

Batching: one scheduler thread owns the model. Each iteration is either a prefill of the waiting requests
(left-padded, up to max_batch_size) or one decode step of every running request in one batched forward
pass. The running batch shares one DynamicCache, left-padded: newly prefilled requests join it between
steps (both caches are padded on the left to the same length and concatenated on the batch axis), finished
or cancelled requests leave it (their rows are dropped), and columns that became padding for every row are
trimmed. Position ids come from the attention mask, so padding never shifts a sequence's positions.

Adapters: several LoRA adapters are loaded onto the one base (peft's multi-adapter) and a batch mixes them:
each row names its adapter (peft's `adapter_names`, "__base__" for none), so requests for different
aimages sharing this base run in the same forward pass.
"""
from __future__ import annotations

import asyncio
import gc
import json
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable

import torch

from clowderd.engines.base import Engine, Event, Finished, GenerateRequest, TextDelta, Usage
from clowderd.engines.errors import AdapterError, EngineError, InvalidRequest, ModelLoadError

log = logging.getLogger(__name__)

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
PARAMS = {"dtype", "device", "max_model_len", "max_batch_size", "attn_implementation"}


@dataclass
class _Sequence:
    request: GenerateRequest
    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[Event | BaseException], None]
    generator: torch.Generator | None
    output_ids: list[int] = field(default_factory=list)
    sent: int = 0            # characters of text already emitted
    cancelled: bool = False
    done: bool = False


@dataclass
class _Batch:
    """The running requests, row i of the cache and mask belonging to seqs[i]."""
    seqs: list[_Sequence]
    cache: object            # transformers DynamicCache, [B, heads, T, head_dim] per layer
    mask: torch.Tensor       # [B, T]: 1 where the cache holds a real token
    last: torch.Tensor       # [B]: the token each row sampled last, not yet in the cache


class TransformersEngine(Engine):
    name = "transformers"

    def __init__(self):
        self.model = None
        self.tokenizer = None
        self.adapters: dict[str, Path] = {}
        self._waiting: deque[_Sequence] = deque()
        self._by_id: dict[str, _Sequence] = {}
        self._batch: _Batch | None = None
        self._wake = threading.Condition()
        self._step_lock = threading.Lock()  # held for each forward pass; adapter changes wait for it
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._failure: str | None = None
        self._counters = dict(requests_finished=0, requests_cancelled=0, prompt_tokens=0, generation_tokens=0)

    # ---------------------------------------------------------------------------------------- loading

    def load(self, model_dir: Path, ep_layers: dict[str, Path], params: dict) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        model_dir = Path(model_dir)
        unknown = sorted(set(params) - PARAMS)
        if unknown:
            raise ModelLoadError(f"unknown transformers engine parameters: {', '.join(unknown)}; "
                                 f"known: {', '.join(sorted(PARAMS))}")
        self._check_model_dir(model_dir)
        self.device = torch.device(_device(params.get("device", "auto")))
        dtype = params.get("dtype", "auto")
        if dtype != "auto" and dtype not in DTYPES:
            raise ModelLoadError(f"dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
            model, info = AutoModelForCausalLM.from_pretrained(
                str(model_dir), local_files_only=True, output_loading_info=True,
                dtype=DTYPES.get(dtype, "auto"), device_map=str(self.device),
                attn_implementation=params.get("attn_implementation", "sdpa"))
        except Exception as e:  # transformers raises OSError, ValueError, SafetensorError...
            raise ModelLoadError(f"{model_dir}: cannot load the model: {type(e).__name__}: {e}") from e
        missing = [k for k in info.get("missing_keys", ()) if k != "lm_head.weight"]
        mismatched = info.get("mismatched_keys") or []
        if missing or mismatched:
            raise ModelLoadError(f"{model_dir}: the weights do not match config.json: "
                                 f"missing {sorted(missing)[:5]}, wrong shape {list(mismatched)[:5]}")
        self.model = model.eval()
        context = getattr(model.config, "max_position_embeddings", None) or params.get("max_model_len")
        self.context = min(context, params.get("max_model_len", context))
        self.max_batch_size = int(params.get("max_batch_size", 32))
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for name, path in ep_layers.items():
            self.add_adapter(name, Path(path))
        self._thread = threading.Thread(target=self._run, name="engine-scheduler", daemon=True)
        self._thread.start()
        log.info("loaded %s on %s in %s, context %d, adapters %s", model_dir, self.device, model.dtype,
                 self.context, sorted(self.adapters))

    @staticmethod
    def _check_model_dir(model_dir: Path) -> None:
        if not model_dir.is_dir():
            raise ModelLoadError(f"{model_dir}: no such model directory")
        if not (model_dir / "config.json").is_file():
            raise ModelLoadError(f"{model_dir}: no config.json")
        if not any(model_dir.glob("*.safetensors")):
            raise ModelLoadError(f"{model_dir}: no *.safetensors weights")
        if not (model_dir / "tokenizer.json").is_file() and not (model_dir / "tokenizer_config.json").is_file():
            raise ModelLoadError(f"{model_dir}: no tokenizer (tokenizer.json)")

    # ---------------------------------------------------------------------------------------- adapters

    def add_adapter(self, name: str, path: Path) -> None:
        from peft import PeftModel

        path = Path(path)
        if name in self.adapters or name == BASE:
            raise AdapterError(f"adapter {name!r} is already loaded")
        config_file = path / "adapter_config.json"
        if not config_file.is_file():
            raise AdapterError(f"adapter {name!r}: {config_file} does not exist")
        try:
            peft_type = json.loads(config_file.read_text()).get("peft_type")
        except (OSError, ValueError) as e:
            raise AdapterError(f"adapter {name!r}: {config_file} is not readable JSON: {e}") from e
        if peft_type != "LORA":
            raise AdapterError(f"adapter {name!r}: peft_type {peft_type!r} is not supported (only LORA)")
        with self._step_lock:
            try:
                if isinstance(self.model, PeftModel):
                    self.model.load_adapter(str(path), adapter_name=name, is_trainable=False)
                else:
                    self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name,
                                                           is_trainable=False).eval()
            except Exception as e:
                self._drop_adapter(name)
                raise AdapterError(f"adapter {name!r} ({path}) does not fit this base model: "
                                   f"{type(e).__name__}: {_first_lines(str(e))}") from e
            self.adapters[name] = path

    def remove_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise AdapterError(f"adapter {name!r} is not loaded; loaded: {sorted(self.adapters) or 'none'}")
        with self._step_lock:
            users = [s for s in self._by_id.values() if s.request.adapter == name]
            if users:
                raise AdapterError(f"adapter {name!r} is in use by {len(users)} request(s); remove it when "
                                   "they finish")
            self._drop_adapter(name)
            del self.adapters[name]

    def _drop_adapter(self, name: str) -> None:
        """Remove a (possibly half-loaded) adapter; the last one unwraps the base model again."""
        from peft import PeftModel

        if not isinstance(self.model, PeftModel) or name not in self.model.peft_config:
            return
        if len(self.model.peft_config) == 1:
            self.model = self.model.unload()
        else:
            self.model.delete_adapter(name)

    # ---------------------------------------------------------------------------------------- requests

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Event]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        seq = self._submit(request, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
        try:
            while True:
                event = await queue.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            if not seq.done:
                self.cancel(request.request_id)

    def cancel(self, request_id: str) -> None:
        seq = self._by_id.get(request_id)
        if seq is not None:
            seq.cancelled = True
            with self._wake:
                self._wake.notify()

    def _submit(self, request: GenerateRequest, emit) -> _Sequence:
        if self.model is None:
            raise EngineError("no model is loaded")
        if self._failure is not None:
            raise EngineError(f"the engine has failed: {self._failure}")
        request.validate()
        if request.request_id in self._by_id:
            raise InvalidRequest(f"request id {request.request_id!r} is already running")
        if request.adapter is not None and request.adapter not in self.adapters:
            raise InvalidRequest(f"unknown adapter {request.adapter!r}; loaded: "
                                 f"{', '.join(sorted(self.adapters)) or 'none'}")
        prompt_ids = self._tokenize(request)
        if len(prompt_ids) >= self.context:
            raise InvalidRequest(f"the prompt has {len(prompt_ids)} tokens; this model's context is "
                                 f"{self.context} tokens")
        room = self.context - len(prompt_ids)
        if request.max_tokens is not None and request.max_tokens > room:
            raise InvalidRequest(f"max_tokens {request.max_tokens} does not fit: the context is {self.context} "
                                 f"tokens and the prompt takes {len(prompt_ids)}, leaving {room}")
        generator = None
        if request.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(request.seed)
        seq = _Sequence(request, prompt_ids, request.max_tokens or room, emit, generator)
        with self._wake:
            self._by_id[request.request_id] = seq
            self._waiting.append(seq)
            self._wake.notify()
        return seq

    def _tokenize(self, request: GenerateRequest) -> list[int]:
        if request.messages is not None:
            if not getattr(self.tokenizer, "chat_template", None):
                raise InvalidRequest("this model's tokenizer has no chat template; send a `prompt` instead")
            text = self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True,
                                                      tokenize=False)
            return self.tokenizer(text, add_special_tokens=False).input_ids
        return self.tokenizer(request.prompt).input_ids

    # ---------------------------------------------------------------------------------------- the loop

    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._stopping and not self._waiting and self._batch is None:
                        self._wake.wait()
                    if self._stopping:
                        return
                    self._drop_cancelled_waiting()
                    room = self.max_batch_size - (len(self._batch.seqs) if self._batch else 0)
                    new = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
                try:
                    with self._step_lock, torch.inference_mode():
                        if new:
                            self._prefill(new)
                        elif self._batch is not None:
                            self._decode()
                except Exception as e:  # a failed step fails its requests, not the engine
                    log.exception("generation step failed")
                    self._fail_running(new, EngineError(f"generation failed: {type(e).__name__}: {e}"))
        except BaseException as e:
            self._failure = f"{type(e).__name__}: {e}"
            log.exception("the engine's scheduler stopped")
            self._fail_running([], EngineError(f"the engine has failed: {self._failure}"))

    def _drop_cancelled_waiting(self) -> None:
        for seq in [s for s in self._waiting if s.cancelled]:
            self._waiting.remove(seq)
            self._finish(seq, "cancelled")

    def _fail_running(self, new: list[_Sequence], error: EngineError) -> None:
        seqs = new + (self._batch.seqs if self._batch else [])
        self._batch = None
        for seq in seqs:
            if not seq.done:
                seq.done = True
                self._by_id.pop(seq.request.request_id, None)
                seq.emit(error)

    def _forward(self, seqs, input_ids, mask, position_ids, cache) -> torch.Tensor:
        kwargs = {}
        if self.adapters:
            kwargs["adapter_names"] = [s.request.adapter or BASE for s in seqs]
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, cache=cache,
                         use_cache=True, logits_to_keep=1, **kwargs)
        return out.logits[:, -1, :].float()

    def _prefill(self, seqs: list[_Sequence]) -> None:
        from transformers import DynamicCache

        width = max(len(s.prompt_ids) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s.prompt_ids):] = torch.tensor(s.prompt_ids)
            mask[i, width - len(s.prompt_ids):] = 1
            self._counters["prompt_tokens"] += len(s.prompt_ids)
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(seqs, ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), cache)
        joined = self._advance(_Batch(seqs, cache, mask, self._sample(logits, seqs)))
        if joined is not None:
            self._batch = joined if self._batch is None else _merge(self._batch, joined)

    def _decode(self) -> None:
        b = self._batch
        b.mask = torch.cat([b.mask, torch.ones_like(b.mask[:, :1])], dim=1)
        position_ids = b.mask.sum(-1, keepdim=True) - 1
        logits = self._forward(b.seqs, b.last[:, None], b.mask, position_ids, b.cache)
        b.last = self._sample(logits, b.seqs)
        self._batch = self._advance(b)

    def _sample(self, logits: torch.Tensor, seqs: list[_Sequence]) -> torch.Tensor:
        tokens = logits.argmax(-1)
        for i, s in enumerate(seqs):
            r = s.request
            if r.temperature == 0:
                continue
            row = logits[i] / r.temperature
            if r.top_k:
                kth = torch.topk(row, min(r.top_k, row.numel())).values[-1]
                row = row.masked_fill(row < kth, float("-inf"))
            if r.top_p < 1:
                sorted_logits, order = torch.sort(row, descending=True)
                cumulative = sorted_logits.softmax(-1).cumsum(-1)
                drop = cumulative - sorted_logits.softmax(-1) >= r.top_p  # keep the token crossing top_p
                row = row.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
            tokens[i] = torch.multinomial(row.softmax(-1), 1, generator=s.generator)[0]
        return tokens

    def _advance(self, b: _Batch) -> _Batch | None:
        """Take each row's new token: emit text, finish the rows that are done; the rows left, if any."""
        keep = []
        for i, (seq, token) in enumerate(zip(b.seqs, b.last.tolist())):
            if seq.cancelled:
                self._finish(seq, "cancelled")
            else:
                seq.output_ids.append(token)
                self._counters["generation_tokens"] += 1
                reason = self._emit_text(seq, token)
                if reason:
                    self._finish(seq, reason)
                else:
                    keep.append(i)
        if not keep:
            return None
        return b if len(keep) == len(b.seqs) else _select(b, keep)

    def _emit_text(self, seq: _Sequence, token: int) -> str | None:
        """Send the text that is certain; return the finish reason when the sequence is done."""
        r = seq.request
        eos = token in self.eos_ids and not r.ignore_eos
        ids = seq.output_ids[:-1] if eos else seq.output_ids
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in r.stop) if i >= 0]
        if hits:
            self._send_text(seq, text[:min(hits)])
            return "stop"
        if eos:
            self._send_text(seq, text)
            return "stop"
        if len(seq.output_ids) >= seq.max_tokens or len(seq.prompt_ids) + len(seq.output_ids) >= self.context:
            self._send_text(seq, text)
            return "length"
        safe = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 character decodes as U+FFFD
        for s in r.stop:  # hold back a tail that may grow into a stop string
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[safe - k:safe] == s[:k]:
                    safe -= k
                    break
        self._send_text(seq, text[:safe])
        return None

    @staticmethod
    def _send_text(seq: _Sequence, text: str) -> None:
        if len(text) > seq.sent:
            seq.emit(TextDelta(text[seq.sent:]))
            seq.sent = len(text)

    def _finish(self, seq: _Sequence, reason: str) -> None:
        seq.done = True
        self._by_id.pop(seq.request.request_id, None)
        self._counters["requests_cancelled" if reason == "cancelled" else "requests_finished"] += 1
        seq.emit(Finished(reason, Usage(len(seq.prompt_ids), len(seq.output_ids))))

    # ---------------------------------------------------------------------------------------- state

    def health(self) -> dict:
        if self.model is None:
            return {"status": "failed", "detail": "no model is loaded"}
        if self._failure is not None or self._thread is None or not self._thread.is_alive():
            return {"status": "failed", "detail": self._failure or "the scheduler thread is not running"}
        return {"status": "ok"}

    def metrics(self) -> dict:
        running = len(self._batch.seqs) if self._batch else 0
        return {"requests_running": running, "requests_waiting": len(self._by_id) - running,
                **self._counters, "adapters": sorted(self.adapters)}

    def unload(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
        self._fail_running(list(self._waiting), EngineError("the engine was unloaded"))
        self._waiting.clear()
        self.model = self.tokenizer = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for but torch sees no CUDA device on this node")
    if choice not in ("cpu", "cuda"):
        raise ModelLoadError(f"device {choice!r}: use auto, cpu or cuda")
    return choice


def _first_lines(text: str, n: int = 3) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return " / ".join(lines[:n]) + (" ..." if len(lines) > n else "")


# ---------------------------------------------------------------------------------------- the shared cache

def _layers(cache):
    return [layer for layer in cache.layers if layer.is_initialized]


def _merge(a: _Batch, b: _Batch) -> _Batch:
    """One batch of a's rows then b's, both left-padded to the longer cache."""
    width = max(a.mask.shape[1], b.mask.shape[1])
    for x in (a, b):
        pad = width - x.mask.shape[1]
        if pad:
            x.mask = torch.nn.functional.pad(x.mask, (pad, 0))
            for layer in _layers(x.cache):
                layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, pad, 0))
                layer.values = torch.nn.functional.pad(layer.values, (0, 0, pad, 0))
    for la, lb in zip(_layers(a.cache), _layers(b.cache)):
        la.keys = torch.cat([la.keys, lb.keys])
        la.values = torch.cat([la.values, lb.values])
    return _Batch(a.seqs + b.seqs, a.cache, torch.cat([a.mask, b.mask]), torch.cat([a.last, b.last]))


def _select(b: _Batch, rows: list[int]) -> _Batch:
    """Keep `rows`, then trim the columns that are padding in every row left."""
    index = torch.tensor(rows, device=b.mask.device)
    mask = b.mask[index]
    start = int((mask.sum(0) > 0).nonzero()[0])
    for layer in _layers(b.cache):
        layer.keys = layer.keys[index, :, start:]
        layer.values = layer.values[index, :, start:]
    return _Batch([b.seqs[i] for i in rows], b.cache, mask[:, start:], b.last[index])
