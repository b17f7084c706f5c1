"""The event loop clowderd and its engine hosts run on: uvloop's (libuv), as uvicorn and vLLM's API
server do. Every HTTP request and every gRPC message costs the loop's callbacks and transport calls;
on uvloop an lb call through the middleware chain to a worker in another process took about 0.5 ms
less than on asyncio's own loop (2-core VM, bench/lb.py)."""
from __future__ import annotations

from typing import Coroutine, TypeVar

import uvloop

T = TypeVar("T")


def run(main: Coroutine[object, object, T]) -> T:
    """Run main to its end on a new uvloop event loop, as asyncio.run does."""
    return uvloop.run(main)
