"""What the HTTP fuzzers share: a client whose checked cases are counted, the count printed once the
test module is done (pytest's output capture set aside, so that it shows in a default run)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import httpx


@dataclass
class Cases:
    count: int = 0  # the fuzzer's check() adds each case it checked


@contextlib.contextmanager
def fuzz_client(request, base_url: str, what: str, cases: Cases, timeout: float = 30) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=timeout) as client:
        yield client
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\n{what} fuzzer: {cases.count} HTTP cases checked")
