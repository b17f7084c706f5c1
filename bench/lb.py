"""The lb: its added latency, its requests per second against LiteLLM's proxy, streamed tokens per second,
and 1,000 concurrent streams, behind an echo engine that answers at once (bench/echo_engine.py, a
benchmark fixture, not a model).

    python bench/lb.py [--seconds 10] [--workdir DIR]

Clowder: a clowderd with the controller, storage and worker roles (the echo engine installed as a
plugin) and an lb clowderd that joined it, so that every call crosses from the lb to the worker over
mutual TLS, as in a cluster; a deployment `echo` of an aimage whose configuration switches on a
realistic middleware chain (API keys, a rate limit that is never reached, security checks, input and
output word filters, a system prompt, call log, audit log, query storage). LiteLLM: its proxy (installed in a virtual environment of the benchmark's own,
offline as ../shared/notes/anchors.md says) in front of bench/echo_openai.py, the same echo as an
OpenAI-compatible HTTP server. Load comes from Debian's `wrk`.

(a) one client: p50/p99 of a chat call through the lb (wrk, one connection, after a warm-up run) against
    the same call on the engine host directly (EngineClient over its local socket): the lb's added latency.
(b) 64 connections: requests/s through the lb against through LiteLLM.
(c) one streamed call: tokens/s through the lb against the engine host directly, from an echo that
    paces its words at 5,000 tokens/s (faster than any model decodes one stream; 10,000 words, so that
    the call's fixed costs weigh little), and, for the record, from the echo at full speed (as fast as
    the engine host can send; 2,000 words).
(d) 1,000 concurrent streams through the lb, --rounds times: all answered, and the lb process's memory
    after each round. One round's peak varies by some 20 MiB with the moment, so a leak is told by the
    trend: the least-squares slope of the RSS over the rounds after the first, in MiB per round.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.echo_engine import install_as_plugin  # noqa: E402
from bench.ingest import figure  # noqa: E402
from clowderd.aimage.build import build  # noqa: E402
from clowderd.aimage.clowderfile import load_clowderfile  # noqa: E402
from clowderd.engines.base import Finished, GenerateRequest  # noqa: E402
from clowderd.engines.client import EngineClient  # noqa: E402
from clowderd.middleware.auth import key_digest  # noqa: E402
from clowderd.store.content import ContentStore  # noqa: E402
from tests import modelgen  # noqa: E402
from tests.clowderd_proc import ClowderdProcess, _default_config, free_port  # noqa: E402

KEY = "ck-bench"
QUESTION = "hello there, how are you today"
CHAT = {"model": "echo", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 16}
PACE = 5000.0  # tokens/s of the paced echo
PACED_WORDS = 10_000
WARM_UP_S = 3  # a wrk run before the measured ones, on each server
LITELLM_VENV = Path.home() / ".cache" / "clowder-bench" / "litellm-venv"
MIDDLEWARE_CONFIG = {
    "security": {"max_input_bytes": 65536, "prompt_injection": {"enabled": True}},
    "filters": {"input": {"block": ["forbidden"], "redact": ["secret"]},
                "output": {"block": ["classified"], "redact": ["password"]}},
    "prompts": {"system": "You are a helpful assistant."},
    "query_storage": {"enabled": True, "store": ["query", "response", "metadata"], "retention_days": 1},
    "engine": {"name": "echo"},
}


def wrk(url: str, body: dict, connections: int, seconds: int, headers: dict) -> dict:
    """Requests/s and latency percentiles from Debian's wrk, POSTing `body`."""
    script = Path(tempfile.mkdtemp()) / "post.lua"
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(json.dumps(body))}",
             'wrk.headers["Content-Type"] = "application/json"']
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    script.write_text("\n".join(lines) + "\n")
    out = subprocess.run(["wrk", "-t", str(min(connections, 2)), "-c", str(connections), "-d", f"{seconds}s",
                          "--latency", "-s", str(script), url], capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out:
        raise SystemExit(f"wrk saw errors from {url}:\n{out}")

    def millis(label: str) -> float:
        value, unit = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return {"rps": rps, "p50_ms": millis("50%"), "p99_ms": millis("99%")}


def litellm_executable() -> Path:
    exe = LITELLM_VENV / "bin" / "litellm"
    if not exe.exists():
        print("installing LiteLLM's proxy into", LITELLM_VENV, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True)
    return exe


def wait_http(url: str, timeout: float = 60.0, headers: dict | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=2, headers=headers).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} did not answer within {timeout:.0f} s")
        time.sleep(0.2)


def start_litellm(workdir: Path) -> tuple[list[subprocess.Popen], str]:
    echo_port, proxy_port = free_port(), free_port()
    echo = subprocess.Popen([sys.executable, str(ROOT / "bench" / "echo_openai.py"), str(echo_port)])
    config = workdir / "litellm.yaml"
    config.write_text(json.dumps({"model_list": [{"model_name": "echo", "litellm_params": {
        "model": "openai/echo", "api_base": f"http://127.0.0.1:{echo_port}/v1", "api_key": "dummy"}}]}))
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY_DISABLED": "True",
           "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true"}
    proxy = subprocess.Popen([str(litellm_executable()), "--config", str(config), "--host", "127.0.0.1",
                              "--port", str(proxy_port)], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{echo_port}/v1/models")
    wait_http(f"http://127.0.0.1:{proxy_port}/health/liveliness", timeout=120)
    return [proxy, echo], f"http://127.0.0.1:{proxy_port}/v1/chat/completions"


def build_echo_images(store_dir: Path, workdir: Path) -> None:
    """echo-model:v1 (the echo at full speed) and echo-paced:v1 (PACE tokens/s), same middleware."""
    model = modelgen.write_llama(workdir / "echo-model", **modelgen.TINY)
    store = ContentStore(store_dir)
    try:
        for name, engine in (("echo-model:v1", {"name": "echo"}),
                             ("echo-paced:v1", {"name": "echo", "echo": {"tokens_per_second": PACE}})):
            clowderfile = workdir / f"Clowderfile-{name.split(':')[0]}"
            clowderfile.write_text(json.dumps({"base": str(model), "config": {**MIDDLEWARE_CONFIG, "engine": engine}}))
            build(store, load_clowderfile(clowderfile), name)
    finally:
        store.close()


def start_clowder(workdir: Path, site: Path) -> tuple[ClowderdProcess, ClowderdProcess]:
    """The worker's node (controller, storage, worker) and the lb's node, once both deployments answer
    through the lb."""
    workdir.mkdir(parents=True, exist_ok=True)
    roles = ("controller", "storage", "worker")
    config = _default_config(workdir / "node", roles)
    config["log"]["level"] = "warning"
    build_echo_images(Path(config["data_dir"]) / "store", workdir)
    env = {"PYTHONPATH": str(site)}
    node = ClowderdProcess(_fresh(workdir / "node"), config, roles,
                           args=["--deploy", "echo=echo-model:v1", "--deploy", "paced=echo-paced:v1"], env=env)
    node.wait_ready()
    lb_config = _default_config(workdir / "lb", ("lb",))
    keys = workdir / "keys.toml"
    keys.write_text(f'[users.bench]\nkeys = ["{key_digest(KEY)}"]\n')
    os.chmod(keys, 0o600)
    lb_config["lb"].update(keys_file=str(keys), requests_per_minute=10_000_000)
    lb_config["log"]["level"] = "warning"
    lb_config["node_name"] = "bench-lb"
    lb_config["cluster"] = {"controller": config["controller"]["listen"],
                            "join_token_file": str(Path(config["data_dir"]) / "controller" / "join-token")}
    lb = ClowderdProcess(_fresh(workdir / "lb"), lb_config, ("lb",), env=env)
    lb.wait_ready()
    url = f"http://{lb_config['lb']['http_listen']}/v1/chat/completions"
    deadline = time.monotonic() + 120
    for model in ("echo", "paced"):
        while httpx.post(url, json={**CHAT, "model": model}, headers={"authorization": f"Bearer {KEY}"},
                         timeout=10).status_code != 200:
            if time.monotonic() > deadline or node.returncode is not None or lb.returncode is not None:
                raise SystemExit(f"the {model} deployment did not answer:\n{node.stderr_text()[-2000:]}\n"
                                 f"{lb.stderr_text()[-2000:]}")
            time.sleep(0.5)
    return node, lb


def _fresh(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return directory


async def direct_latency(site: Path, workdir: Path, seconds: float) -> list[float]:
    """Round trips of one chat request on an echo engine host, called directly, after WARM_UP_S of them."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    async with EngineClient("echo", workdir, env=env) as client:
        samples, start = [], time.perf_counter()
        while time.perf_counter() < start + WARM_UP_S + seconds:
            t0 = time.perf_counter()
            async for event in client.generate(GenerateRequest(messages=CHAT["messages"], max_tokens=16)):
                if isinstance(event, Finished):
                    break
            if t0 >= start + WARM_UP_S:
                samples.append((time.perf_counter() - t0) * 1000)
    return samples


async def direct_stream_tokens_per_s(site: Path, workdir: Path, words: int, pace: float = 0.0) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    text = " ".join(["word"] * words)
    params = {"tokens_per_second": pace} if pace else {}
    async with EngineClient("echo", workdir, params=params, env=env) as client:
        t0 = time.perf_counter()
        async for event in client.generate(GenerateRequest(prompt=text, max_tokens=words)):
            if isinstance(event, Finished):
                return event.usage.completion_tokens / (time.perf_counter() - t0)
    raise RuntimeError("no Finished event")


def lb_stream_tokens_per_s(base: str, words: int, model: str = "echo") -> float:
    body = {"model": model, "messages": [{"role": "user", "content": " ".join(["word"] * words)}],
            "max_tokens": words, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{base}/chat/completions", json=body, timeout=60,
                      headers={"authorization": f"Bearer {KEY}"}) as r:
        raw = b"".join(r.iter_raw())  # parsed after the clock stops: the client's work is not the lb's
    seconds = time.perf_counter() - t0
    events = [json.loads(e[6:]) for e in raw.split(b"\n\n") if e.startswith(b"data: {")]
    tokens = next(e["usage"]["completion_tokens"] for e in reversed(events) if e.get("usage"))
    return tokens / seconds


async def many_streams(base: str, n: int) -> int:
    """n streamed calls at once; returns how many ended with [DONE]."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        async def one(i: int) -> bool:
            body = {**CHAT, "stream": True, "messages": [{"role": "user", "content": f"stream {i} " * 50}],
                    "max_tokens": 100}
            async with client.stream("POST", f"{base}/chat/completions", json=body,
                                     headers={"authorization": f"Bearer {KEY}"}) as r:
                lines = [line async for line in r.aiter_lines() if line]
            return r.status_code == 200 and lines[-1] == "data: [DONE]"
        return sum(await asyncio.gather(*(one(i) for i in range(n))))


def slope(values: list[float]) -> float:
    """The least-squares slope of values against their index."""
    n = len(values)
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    return (sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
            / sum((i - mean_x) ** 2 for i in range(n)))


def percentile(samples: list[float], q: float) -> float:
    return statistics.quantiles(samples, n=100)[q - 1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=int, default=10, help="length of each wrk run")
    p.add_argument("--rounds", type=int, default=8, help="rounds of 1,000 concurrent streams (at least 3)")
    p.add_argument("--workdir", type=Path, help="keep files here (default: a temporary directory)")
    args = p.parse_args()
    if args.rounds < 3:
        raise SystemExit(f"--rounds {args.rounds}: at least 3 (the first is not counted, and a slope needs two more)")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="clowder-bench-lb-"))
    site = install_as_plugin(workdir / "site")
    sys.path.insert(0, str(site))  # the aimage names the echo engine: building it checks that it is installed
    (workdir / "model").mkdir(exist_ok=True)
    auth = {"Authorization": f"Bearer {KEY}"}

    direct = asyncio.run(direct_latency(site, workdir / "model", 5.0))
    direct_tps = asyncio.run(direct_stream_tokens_per_s(site, workdir / "model", 2000))
    direct_paced = asyncio.run(direct_stream_tokens_per_s(site, workdir / "model", PACED_WORDS, PACE))
    node, proc = start_clowder(workdir / "clowder", site)
    try:
        base = f"http://{proc.config['lb']['http_listen']}/v1"
        lb_pid = proc.pid
        wrk(f"{base}/chat/completions", CHAT, 1, WARM_UP_S, auth)  # steady state: first calls fill caches
        one = wrk(f"{base}/chat/completions", CHAT, 1, args.seconds, auth)
        many = wrk(f"{base}/chat/completions", CHAT, 64, args.seconds, auth)
        lb_tps = max(lb_stream_tokens_per_s(base, 2000) for _ in range(3))
        lb_paced = max(lb_stream_tokens_per_s(base, PACED_WORDS, "paced") for _ in range(3))
        rss, done = [psutil.Process(lb_pid).memory_info().rss], []
        t0 = time.perf_counter()
        for _ in range(args.rounds):
            done.append(asyncio.run(many_streams(base, 1000)))
            rss.append(psutil.Process(lb_pid).memory_info().rss)
        streams_s = (time.perf_counter() - t0) / args.rounds
    finally:
        proc.stop()
        node.stop()
    procs, litellm_url = start_litellm(workdir)
    try:
        wrk(litellm_url, CHAT, 1, WARM_UP_S, {})
        litellm_one = wrk(litellm_url, CHAT, 1, args.seconds, {})
        litellm_many = wrk(litellm_url, CHAT, 64, args.seconds, {})
    finally:
        for proc_ in procs:
            proc_.terminate()
            proc_.wait(10)

    direct_p50, direct_p99 = percentile(direct, 50), percentile(direct, 99)
    mib = 1 << 20
    print(f"(a) one client: lb p50 {one['p50_ms']:.2f} ms, p99 {one['p99_ms']:.2f} ms; engine host directly p50 "
          f"{direct_p50:.2f} ms, p99 {direct_p99:.2f} ms; LiteLLM p50 {litellm_one['p50_ms']:.2f} ms, "
          f"p99 {litellm_one['p99_ms']:.2f} ms")
    print(f"(b) 64 connections: lb {many['rps']:.0f} requests/s (p50 {many['p50_ms']:.1f} ms), LiteLLM "
          f"{litellm_many['rps']:.0f} requests/s (p50 {litellm_many['p50_ms']:.1f} ms)")
    print(f"(c) one stream of {PACED_WORDS:,} words paced at {PACE:.0f} tokens/s: lb {lb_paced:.0f} tokens/s, engine "
          f"host directly {direct_paced:.0f} tokens/s; 2,000 words at full speed: lb {lb_tps:.0f} tokens/s, directly "
          f"{direct_tps:.0f}")
    print(f"(d) 1,000 concurrent streams, {args.rounds} rounds of {streams_s:.1f} s on average: "
          f"{', '.join(map(str, done))} ended with [DONE]; the lb's RSS {rss[0] / mib:.0f} MiB before, then "
          f"{', '.join(f'{r / mib:.0f}' for r in rss[1:])} MiB after each round")
    print(figure("lb_added_p50", one["p50_ms"] - direct_p50, "ms", "<=", 1.0))
    print(figure("lb_added_p99", one["p99_ms"] - direct_p99, "ms", "<=", 3.0))
    print(figure("lb_vs_litellm_rps_64", many["rps"] / litellm_many["rps"], "x", ">=", 10.0))
    print(figure("lb_stream_tokens_per_s_vs_direct", lb_paced / direct_paced, "x", ">=", 0.95))
    print(figure("lb_1000_streams_completed", sum(done) / (1000 * args.rounds), "x", ">=", 1.0))
    print(figure("lb_memory_growth_per_1000_streams", slope([r / mib for r in rss[2:]]), "MiB", "<=", 10.0))


if __name__ == "__main__":
    main()
