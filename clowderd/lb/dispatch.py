"""One method call through the lb: find the deployment's route, run the middleware chain on the request,
send it to the replica with the fewest calls outstanding (another one when it fails before its first
byte), pass the response back through the chain (which may end a choice early, e.g. at a blocked word:
the generation is then cancelled and its usage is what the replica had reported, nothing for that
choice), and let every middleware see how the call ended.

`Dispatcher.run` yields the response as pieces (text of a choice, the end of a choice, the usage) for the
HTTP and gRPC front ends to encode. A call with n > 1 runs its choices as n generations at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Union

import grpc

from clowderd.lb.errors import ApiError
from clowderd.lb.routes import NoReplica, Route, RouteTable
from clowderd.lb.upstream import UpstreamError, Workers, generate_request
from clowderd.middleware import auth, conversation
from clowderd.middleware.base import Call, Chain, Outcome, Refused, StopChoice

if TYPE_CHECKING:
    from clowderd.middleware.registry import ChainBuilder

log = logging.getLogger(__name__)

# Worker answers that mean "not this replica": the call is tried on another one if nothing was sent yet.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND)
CLIENT_GONE = 499  # the status an outcome records when the caller went away
SUMMARY_MAX_TOKENS = 256


@dataclass
class Text:
    index: int
    text: str


@dataclass
class ChoiceEnd:
    index: int
    finish_reason: str


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens}


Piece = Union[Text, ChoiceEnd, Usage]


class Dispatcher:
    def __init__(self, routes: RouteTable, workers: Workers, chain_for: "ChainBuilder"):
        self.routes = routes
        self.workers = workers
        self.chain_for = chain_for

    def models(self, api_key: str | None) -> list[Route]:
        """The deployments a caller with `api_key` may call (as the auth middleware decides: 401 without
        a valid key when the lb has keys): listing them must reveal no more than calling them."""
        try:
            user = auth.authenticate(self.chain_for.shared.keys, api_key)
        except Refused as refusal:
            refusal.middleware = auth.Authenticate.name
            raise ApiError.refused(refusal) from None
        groups = user.groups if user is not None else frozenset()
        return [r for r in self.routes.list() if auth.admits(frozenset(r.config.get("access_groups") or ()), groups)]

    def route(self, call: Call) -> Route:
        route = self.routes.get(call.model)
        if route is None:
            raise ApiError(404, f"the model {call.model!r} does not exist: it names no deployment served here "
                                "(GET /v1/models lists them)", param="model", code="model_not_found")
        return route

    async def run(self, call: Call) -> AsyncIterator[Piece]:
        """The response's pieces. Raises ApiError, before the first piece or (rarely) after it."""
        route = self.route(call)
        chain = self.chain_for(route)
        n = call.sampling.get("n", 1)
        outcome = Outcome(status=200, texts=[""] * n, finish_reasons=[""] * n, usage=None)
        call.state["upstream_seconds"] = 0.0
        try:
            try:
                await chain.request(call)
            except Refused as refusal:
                raise ApiError.refused(refusal) from None
            usage = Usage(0, 0)
            async for piece in self._choices(call, route, chain, n, usage, outcome):
                if isinstance(piece, Text):
                    outcome.texts[piece.index] += piece.text
                elif isinstance(piece, ChoiceEnd):
                    outcome.finish_reasons[piece.index] = piece.finish_reason
                yield piece
            outcome.usage = usage.as_dict()
            yield usage
        except ApiError as e:
            outcome.status, outcome.error = e.status, e.message
            raise
        except (asyncio.CancelledError, GeneratorExit):
            outcome.status, outcome.error = CLIENT_GONE, "the caller went away before the end"
            raise
        except Exception as e:
            log.exception("call failed", extra={"call": call.id, "deployment": call.model})
            outcome.status, outcome.error = 500, f"internal error: {type(e).__name__}: {e}"
            raise ApiError(500, outcome.error) from e
        finally:
            outcome.seconds = time.perf_counter() - call.received
            await asyncio.shield(chain.outcome(call, outcome))

    async def summarise(self, caller: Call, messages: list[dict]) -> str:
        """A summary of `messages` by the caller's deployment, called as the caller (the conversation
        middleware's own call: it skips conversation keeping)."""
        call = Call(method="chat", model=caller.model, messages=conversation.summary_request(messages),
                    sampling={"temperature": 0.0, "max_tokens": SUMMARY_MAX_TOKENS}, api_key=caller.api_key,
                    client=caller.client, state={"conversation": conversation.SKIP})
        return "".join([p.text async for p in self.run(call) if isinstance(p, Text)])

    async def _choices(self, call: Call, route: Route, chain: Chain, n: int, usage: Usage,
                       outcome: Outcome) -> AsyncIterator[Piece]:
        if n == 1:
            async for piece in self._choice(call, route, chain, 0, usage, outcome):
                yield piece
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def run_choice(index: int) -> None:
            try:
                async for piece in self._choice(call, route, chain, index, usage, outcome):
                    await queue.put(piece)
            except BaseException as e:
                await queue.put(e)
                raise
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(run_choice(i)) for i in range(n)]
        try:
            done = 0
            while done < n:
                item = await queue.get()
                if item is None:
                    done += 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _choice(self, call: Call, route: Route, chain: Chain, index: int, usage: Usage,
                      outcome: Outcome) -> AsyncIterator[Piece]:
        tried: set[str] = set()
        last_error: ApiError | None = None
        while True:
            try:
                endpoint = self.routes.pick(route, tried)
            except NoReplica:
                reason = f": the last one said: {last_error.message}" if last_error else ""
                raise ApiError(503, f"deployment {route.deployment!r} has no ready replica{reason}",
                               code="no_replica") from None
            tried.add(endpoint.replica_id)
            request = generate_request(call, endpoint.replica_id, index)
            sent = False
            endpoint.outstanding += 1
            try:
                stream = self.workers.generate(endpoint, request)
                async with contextlib.aclosing(stream):
                    while True:
                        t0 = time.perf_counter()
                        try:
                            response = await anext(stream)
                        except StopAsyncIteration:
                            break
                        finally:
                            call.state["upstream_seconds"] += time.perf_counter() - t0
                        outcome.replica = endpoint.replica_id
                        finish_reason = response.finish_reason
                        if response.text:
                            try:
                                text = chain.text(call, index, response.text)
                            except StopChoice as stop:  # closing the stream cancels the generation
                                text, finish_reason = stop.text, stop.finish_reason
                            if text:
                                sent = True
                                yield Text(index, text)
                        if finish_reason:
                            try:
                                tail = chain.choice_end(call, index)
                            except StopChoice as stop:
                                tail, finish_reason = stop.text, stop.finish_reason
                            if tail:
                                yield Text(index, tail)
                            sent = True
                            yield ChoiceEnd(index, finish_reason)
                            if finish_reason != response.finish_reason:
                                return  # stopped by the chain: closing the stream cancels the rest
                        if response.HasField("usage"):
                            usage.prompt_tokens += response.usage.prompt_tokens
                            usage.completion_tokens += response.usage.completion_tokens
                return
            except UpstreamError as e:
                error = ApiError.from_worker(e.code, e.details, endpoint.replica_id)
                if sent or e.code not in RETRYABLE:
                    raise error from None
                log.info("retrying on another replica", extra={"call": call.id, "replica": endpoint.replica_id,
                                                               "reason": e.details})
                last_error = error
            finally:
                endpoint.outstanding -= 1
